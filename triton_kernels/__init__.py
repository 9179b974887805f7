"""Triton kernels for the multi-LoRA op, installed as ``dlp_lora.triton_kernels``.

TRITON_INTERPRET=1 must be set before this package is imported to run them on CPU tensors.
"""


def is_available() -> bool:
    """Whether Triton is installed. A broken kernel file raises here rather than reading as "no Triton"."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from .multi_lora import multi_lora_triton  # noqa: F401
    return True


def __getattr__(name):
    if name == "multi_lora_triton":
        from .multi_lora import multi_lora_triton

        return multi_lora_triton
    raise AttributeError(name)
