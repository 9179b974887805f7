"""Host-side checks of the multi-LoRA op's arguments, run before a Python-checked kernel launches.

``dlp_lora.ops.multi_lora`` runs them for the ``reference``, ``triton`` and ``cuda`` backends (and the
layout checks while tracing); the ``cpp`` op checks the same contract in C++
(csrc/multi_lora_checks.h), so its door only adds :func:`check_inference_only`. Every message names
the offending argument, so a user sees ``lora_ids`` rather than an out-of-bounds read or a segfault
deep in a kernel.
"""

from __future__ import annotations

import itertools

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MultiLoRAArgumentError(ValueError):
    """An argument of multi_lora() breaks the op contract."""


def _fail(arg: str, msg: str):
    raise MultiLoRAArgumentError(f"multi_lora: `{arg}` {msg}")


def check_multi_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_weights: torch.Tensor,
    *,
    check_values: bool = True,
) -> None:
    """Raise MultiLoRAArgumentError unless the arguments satisfy the op contract.

    ``check_values`` also runs the checks that need real tensors in eager mode, which fake
    tensors (torch.compile tracing, the compiled op's fake impl) cannot answer:
    - y must not overlap any input in memory (as PyTorch's out= ops): the kernels read the inputs
      while they write y, so an overlap gives a silently wrong result;
    - with grad mode on, y / x / lora_a / lora_b must not require grad: the op is inference-only
      (it writes y in place and has no backward, so autograd would lose the LoRA term);
    - seg_indptr and lora_ids values (a device sync on GPU): the patched model does that once
      per routing step instead of once per Linear.
    """
    named = dict(y=y, x=x, lora_a=lora_a, lora_b=lora_b, seg_indptr=seg_indptr,
                 lora_ids=lora_ids, lora_weights=lora_weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    for name, ndim in (("y", 2), ("x", 2), ("lora_a", 3), ("lora_b", 3), ("seg_indptr", 1),
                       ("lora_ids", 2), ("lora_weights", 2)):
        if named[name].dim() != ndim:
            _fail(name, f"must be {ndim}-D, got shape {tuple(named[name].shape)}")

    if x.dtype not in FLOAT_DTYPES:
        _fail("x", f"must be float32/float16/bfloat16/float64, got {x.dtype}")
    for name in ("y", "lora_a", "lora_b"):
        if named[name].dtype != x.dtype:
            _fail(name, f"must have x's dtype {x.dtype}, got {named[name].dtype}")
    for name, dtype in (("seg_indptr", torch.int32), ("lora_ids", torch.int32),
                        ("lora_weights", torch.float32)):
        if named[name].dtype != dtype:
            _fail(name, f"must be {dtype}, got {named[name].dtype}")

    for name, t in named.items():
        if t.device != x.device:
            _fail(name, f"is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            _fail(name, "must be contiguous (call .contiguous() first)")

    T, d_in = x.shape
    N, r, a_in = lora_a.shape
    if a_in != d_in:
        _fail("lora_a", f"has d_in={a_in} but x has d_in={d_in} (expected [N, r, {d_in}])")
    if lora_b.shape[0] != N or lora_b.shape[2] != r:
        _fail("lora_b", f"has shape {tuple(lora_b.shape)}, expected [N={N}, d_out, r={r}] to match lora_a")
    d_out = lora_b.shape[1]
    if tuple(y.shape) != (T, d_out):
        _fail("y", f"has shape {tuple(y.shape)}, expected [T={T}, d_out={d_out}]")
    S = seg_indptr.shape[0] - 1
    if S < 0:
        _fail("seg_indptr", "must have at least one entry (S+1 >= 1)")
    if lora_ids.shape[0] != S:
        _fail("lora_ids", f"has {lora_ids.shape[0]} rows but seg_indptr describes S={S} segments")
    if tuple(lora_weights.shape) != tuple(lora_ids.shape):
        _fail("lora_weights",
              f"has shape {tuple(lora_weights.shape)}, expected lora_ids' {tuple(lora_ids.shape)}")

    if check_values:
        overlap = overlapping_input(y, {k: v for k, v in named.items() if k != "y"})
        if overlap is not None:
            _fail("y", overlap_message(overlap))
        check_inference_only(y, x, lora_a, lora_b)
        check_routing_values(seg_indptr, lora_ids, num_tokens=T, num_loras=N)


def check_inference_only(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor) -> None:
    """With grad mode on, none of y / x / lora_a / lora_b may require grad (the op has no backward)."""
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
            if getattr(t, "requires_grad", False):
                _fail(name, "requires grad, but multi_lora is inference-only (it adds to y in place "
                            "and has no backward): call it under torch.no_grad() or "
                            "torch.inference_mode(), or pass detached tensors")


def overlapping_input(y: torch.Tensor, inputs: dict[str, torch.Tensor]) -> str | None:
    """The name of the first input whose memory overlaps y's, or None (sharing a storage is fine).

    Every tensor must be contiguous (checked before), so each occupies exactly the bytes
    [data_ptr, data_ptr + nbytes): two comparisons per input, cheap enough for every launch.
    """
    if y.numel() == 0:
        return None
    start = y.data_ptr()
    end = start + y.numel() * y.element_size()
    for name, t in inputs.items():
        if t.numel() and t.data_ptr() < end and start < t.data_ptr() + t.numel() * t.element_size():
            return name
    return None


def overlap_message(name: str) -> str:
    return (f"overlaps `{name}` in memory; y is written in place while the inputs are read, so it must "
            f"not share memory with any of them (pass a separate y, or clone {name})")


def check_routing_values(seg_indptr: torch.Tensor, lora_ids: torch.Tensor, *, num_tokens: int,
                         num_loras: int) -> None:
    """Value checks: seg_indptr non-decreasing from >= 0 to T, every id in [-1, N).

    Routing tensors are small (one entry per segment and slot): read once to the host as Python
    ints (one copy, a device sync on GPU), a few microseconds where tensor reductions take tens."""
    bounds = seg_indptr.tolist()
    if bounds and bounds[0] < 0:
        _fail("seg_indptr", f"must start at >= 0, got {bounds[0]}")
    if any(b < a for a, b in itertools.pairwise(bounds)):
        _fail("seg_indptr", f"must be non-decreasing, got {bounds[:16]}")
    if bounds and bounds[-1] != num_tokens:
        _fail("seg_indptr", f"must end at T={num_tokens}, ends at {bounds[-1]}")
    if lora_ids.numel():
        if lora_ids.numel() <= _HOST_IDS_MAX:
            ids = lora_ids.flatten().tolist()
            lo, hi = min(ids), max(ids)
        else:
            lo, hi = (int(v) for v in torch.aminmax(lora_ids))
        if lo < -1:
            _fail("lora_ids", f"contains {lo}; ids must be in [-1, N) with -1 = empty slot")
        if hi >= num_loras:
            _fail("lora_ids", f"contains {hi} but the bank holds N={num_loras} adapters (ids must be < N)")


# Above this many ids, one tensor reduction is cheaper than reading them as Python ints.
_HOST_IDS_MAX = 4096
