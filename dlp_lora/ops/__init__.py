"""The segmented multi-LoRA op: one contract, four backends.

    multi_lora(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)   # y += delta, in place

      x            [T, d_in]      activations, contiguous rows (fp32 / fp16 / bf16; fp64: reference only)
      lora_a       [N, r, d_in]   stacked lora_A.weight (PEFT layout), x's dtype
      lora_b       [N, d_out, r]  stacked lora_B.weight (PEFT layout), x's dtype
      seg_indptr   [S+1] int32    segment s = rows seg_indptr[s] : seg_indptr[s+1]
      lora_ids     [S, K] int32   adapter per slot, -1 = empty slot
      lora_weights [S, K] float32 mixture weight times that adapter's scaling
      y            [T, d_out]     x's dtype, accumulated in place (rows outside segments untouched)

Backends: ``reference`` (plain torch, the oracle), ``cpp`` (compiled CPU kernel),
``triton`` (GPU; CPU tensors under TRITON_INTERPRET=1), ``cuda`` (compiled GPU kernel).
Choice: the ``backend`` argument, else $DLP_LORA_BACKEND, else automatic by device:
CPU -> cpp (reference if the extension is missing); CUDA -> triton, else cuda, else reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .._env import forced_backend, triton_interpret
from ._extension import extension_error, extension_has_cuda, load_extension
from .reference import multi_lora_delta, multi_lora_reference
from .validate import (
    MultiLoRAArgumentError,
    check_inference_only,
    check_multi_lora_args,
    check_routing_values,
)

__all__ = [
    "BACKENDS", "MultiLoRAArgumentError", "available_backends", "check_multi_lora_args",
    "check_routing_values", "extension_error", "get_kernel", "multi_lora", "multi_lora_delta",
    "multi_lora_reference", "resolve_backend",
]

BACKENDS = ("reference", "cpp", "triton", "cuda")
Kernel = Callable[..., None]


@functools.cache
def _triton_importable() -> bool:
    from .. import triton_kernels

    return triton_kernels.is_available()


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable on ``device`` (default: every device this process can reach)."""
    devices = [torch.device(device)] if device is not None else (
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []))
    out = []
    for name in BACKENDS:
        if any(_usable(name, d) for d in devices):
            out.append(name)
    return out


def _usable(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu" and load_extension() is not None
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if name == "cuda":
        return device.type == "cuda" and torch.cuda.is_available() and extension_has_cuda()
    return False


def resolve_backend(
    device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The backend a call on ``device`` will use (explicit > $DLP_LORA_BACKEND > automatic).

    float64 runs only on the reference backend: chosen automatically, refused when forced.
    """
    forced = backend or forced_backend()
    if forced is not None and forced != "auto":
        if forced not in BACKENDS:
            raise MultiLoRAArgumentError(
                f"multi_lora: `backend` must be one of {BACKENDS} or 'auto', got {forced!r}")
        if not _usable(forced, device):
            raise RuntimeError(
                f"multi_lora: backend {forced!r} is not usable on {device} "
                f"(available there: {available_backends(device)}"
                + (f"; extension: {extension_error()}" if extension_error() else "") + ")"
            )
        if dtype == torch.float64 and forced != "reference":
            raise MultiLoRAArgumentError(
                f"multi_lora: float64 is only supported by the reference backend, not {forced!r}")
        return forced
    if dtype == torch.float64:
        return "reference"
    order = ("cpp", "reference") if device.type == "cpu" else ("triton", "cuda", "reference")
    for candidate in order:
        if _usable(candidate, device):
            return candidate
    return "reference"


@functools.cache
def get_kernel(backend: str) -> Kernel:
    """The raw in-place kernel of a resolved backend: kernel(y, x, a, b, seg_indptr, ids, weights).

    No validation; eager only (under torch.compile, :func:`multi_lora` runs the registered op).
    """
    if backend == "reference":
        return multi_lora_reference
    if backend in ("cpp", "cuda"):
        load_extension()
        return torch.ops.dlp_lora.multi_lora.default
    if backend == "triton":
        from ..triton_kernels import multi_lora_triton

        return multi_lora_triton
    raise MultiLoRAArgumentError(f"multi_lora: unknown backend {backend!r}")


# --- torch.library registration: one op that torch.compile / CUDA graphs can capture -------------
# The compiled kernels (cpp on CPU, cuda on GPU) are the extension's C++ op torch.ops.dlp_lora.multi_lora
# (schema in csrc/registration.cpp, fake impl in _fake.py). The backends written in Python (reference,
# triton) share this op, so a traced forward holds one opaque node whatever the backend: dynamo cannot
# trace a Triton launcher's host code, and CUDA graphs replay the node.

@torch.library.custom_op("dlp_lora::multi_lora_python", mutates_args=("y",))
def _multi_lora_python(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       seg_indptr: torch.Tensor, lora_ids: torch.Tensor, lora_weights: torch.Tensor,
                       backend: str) -> None:
    get_kernel(backend)(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)


@_multi_lora_python.register_fake
def _(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights, backend):
    return None


def multi_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_weights: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """y += sum_k w[s,k] * B[id] A[id] x  for every segment s; returns y. See the module docstring.

    The one door to the op. Eager: the backend's raw kernel, called directly (a Python custom op
    costs ~100 us a call in dispatch; a decode step of a patched model makes one call per module).
    Under torch.compile: the registered op, captured as one node.

    validate=True (the default) refuses any argument that breaks the contract with a
    MultiLoRAArgumentError naming it, before anything is written. Where each check lives:

    - ``cpp``: the C++ op checks everything itself (csrc/multi_lora_checks.h: tensor types, ranks,
      dtypes, devices, contiguity, shapes, y overlapping an input, seg_indptr from >= 0
      non-decreasing to T, every id in [-1, N)), so the door adds only the check C++ cannot make
      (no tensor requires grad in grad mode: the op is inference-only) and turns the C++ error
      into a MultiLoRAArgumentError. A few microseconds a call.
    - ``reference``, ``triton``, ``cuda``: dlp_lora/ops/validate.py checks the same contract in
      Python (the Python backends have no C++ checks; the CUDA op checks the layout in C++ but not
      the values, which would cost it a device sync on every call).
    - under torch.compile: the layout checks only (values are not known while tracing).

    validate=False skips every check and takes ``backend`` as already resolved (the patched Linear
    checks its routing tensors once per forward and resolves the backend once per device and dtype).
    """
    if validate:
        if not isinstance(x, torch.Tensor):
            raise MultiLoRAArgumentError(f"multi_lora: `x` must be a torch.Tensor, got {type(x).__name__}")
        backend = resolve_backend(x.device, backend, x.dtype)
        if torch.compiler.is_compiling():
            # Value checks read tensors (a sync); under torch.compile they would break the graph.
            check_multi_lora_args(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights,
                                  check_values=False)
        elif backend == "cpp":
            check_inference_only(y, x, lora_a, lora_b)
            try:
                get_kernel(backend)(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)  # the C++ op
            except (RuntimeError, TypeError) as e:
                # a TORCH_CHECK of csrc/multi_lora_checks.h ("multi_lora: `lora_ids` ...") or the schema's
                # type check ("dlp_lora::multi_lora() Expected ... for argument 'y' ..."): both name the
                # argument. The first line only: torch may append C++ frames or the schema.
                message = str(e).split("\n", 1)[0]
                schema = "dlp_lora::multi_lora() "
                if message.startswith(schema):
                    message = "multi_lora: " + message[len(schema):]
                if not message.startswith("multi_lora: "):
                    raise  # not an argument check: a failure of the kernel itself
                raise MultiLoRAArgumentError(message) from None
            return y
        else:
            check_multi_lora_args(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    elif backend is None:
        backend = resolve_backend(x.device, None, x.dtype)
    if not torch.compiler.is_compiling():
        get_kernel(backend)(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    elif backend in ("cpp", "cuda"):
        torch.ops.dlp_lora.multi_lora(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    else:
        torch.ops.dlp_lora.multi_lora_python(
            y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights, backend)
    return y

