"""Load the compiled extension dlp_lora._C once; never let a missing or broken build crash import."""

from __future__ import annotations

import warnings

_state: dict = {}


def load_extension():
    """Return the dlp_lora._C module, or None (after one warning) when it cannot be loaded."""
    if "module" in _state:
        return _state["module"]
    try:
        from dlp_lora import _C  # noqa: F401  (registers torch.ops.dlp_lora.*)

        from . import _fake  # noqa: F401  (fake impl of torch.ops.dlp_lora.multi_lora)
        module = _C
    except Exception as exc:  # ImportError, undefined symbol, ABI mismatch...
        module = None
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "dlp_lora: the compiled extension dlp_lora._C could not be loaded "
            f"({_state['error']}); falling back to the 'reference' backend on CPU "
            "(and 'triton' on GPU when available). Rebuild with `make build` or "
            "`pip install --no-build-isolation .` for the fast C++/CUDA kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    _state["module"] = module
    return module


def extension_error() -> str | None:
    load_extension()
    return _state.get("error")


def extension_has_cuda() -> bool:
    module = load_extension()
    return bool(module is not None and getattr(module, "with_cuda", lambda: False)())
