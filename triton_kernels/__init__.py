"""Triton kernels for the multi-LoRA op, installed as ``dlp_lora.triton_kernels``.

TRITON_INTERPRET=1 must be set before this package is imported to run them on CPU tensors.
"""


def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    try:
        from .multi_lora import multi_lora_triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name):
    if name == "multi_lora_triton":
        from .multi_lora import multi_lora_triton

        return multi_lora_triton
    raise AttributeError(name)
