"""Shared inputs and checks for every backend of the multi-LoRA op (cpp, triton, cuda).

Not a test module (pytest does not collect it): the backend test files import it, so all
backends are checked on the same sweep with the same tolerances.

    from op_cases import CASE_SWEEP, assert_matches_reference
    case = CASE_SWEEP[0]
    args = case.tensors(torch.bfloat16)  # OpTensors(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    y_before = args.y.clone()
    ops.multi_lora(*args, backend="cpp")
    assert_matches_reference(y_before, args.y, args, torch.bfloat16, "cpp", case=case)

An ``OpCase`` is a frozen description (shape, segment layout, adapter-popularity pattern, seed);
``tensors()`` builds fresh random data from it (never zeros), deterministically per seed.
Values are scaled so that delta and y have the same order of magnitude (rms ~ 1): a wrong delta
cannot hide behind a large y, and bf16/fp16 rounding of y is the dominant, predictable error.

Popularity patterns (which adapters the S*K slots pick; punica's sweep found bugs that
uniform ids never showed):
  distinct   - slots walk a random permutation of the bank: as many different adapters as possible
  identical  - every segment has the same K ids
  zipf       - id of rank i drawn with probability ~ 1 / (i+1)^1.2
  skewed     - 90% of slots pick one hot adapter, the rest are uniform
Empty slots (-1) are sprinkled with ``empty_slot_prob``; ``all_empty_segment`` makes one
non-empty segment have only -1 slots (its rows must stay bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from dlp_lora.ops import multi_lora_delta

PATTERNS = ("distinct", "identical", "zipf", "skewed")


class OpTensors(NamedTuple):
    """Arguments of multi_lora in contract order (unpack with ``*``)."""

    y: torch.Tensor             # [T, d_out]     dtype
    x: torch.Tensor             # [T, d_in]      dtype
    lora_a: torch.Tensor        # [N, r, d_in]   dtype
    lora_b: torch.Tensor        # [N, d_out, r]  dtype
    seg_indptr: torch.Tensor    # [S+1] int32
    lora_ids: torch.Tensor      # [S, K] int32, -1 = empty slot
    lora_weights: torch.Tensor  # [S, K] float32


@dataclass(frozen=True)
class OpCase:
    """One point of the shape space. ``seg_lengths`` may contain zeros (empty segments)."""

    d_in: int
    d_out: int
    N: int
    r: int
    K: int
    seg_lengths: tuple[int, ...]
    offset: int = 0                 # rows before the first segment: must stay untouched
    pattern: str = "zipf"
    empty_slot_prob: float = 0.25
    all_empty_segment: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if min(self.d_in, self.d_out, self.N, self.r, self.K) < 1 or self.offset < 0:
            raise ValueError(f"bad OpCase {self}")
        if any(n < 0 for n in self.seg_lengths) or not self.seg_lengths:
            raise ValueError("seg_lengths must be a non-empty tuple of lengths >= 0")

    @property
    def T(self) -> int:
        return self.offset + sum(self.seg_lengths)

    @property
    def S(self) -> int:
        return len(self.seg_lengths)

    @property
    def id(self) -> str:
        """Short readable name for pytest ids."""
        segs = (f"S{self.S}" if self.S > 6 else "-".join(map(str, self.seg_lengths)))
        return (f"T{self.T}_seg{segs}{'_off' + str(self.offset) if self.offset else ''}_"
                f"{self.d_in}x{self.d_out}_N{self.N}_r{self.r}_K{self.K}_{self.pattern}"
                f"{'_allempty' if self.all_empty_segment else ''}")

    def lora_ids(self, gen: torch.Generator) -> torch.Tensor:
        """[S, K] int32 ids following ``pattern``, with -1 slots."""
        S, K, N = self.S, self.K, self.N
        if self.pattern == "distinct":
            reps = math.ceil(S * K / N)
            flat = torch.cat([torch.randperm(N, generator=gen) for _ in range(reps)])[: S * K]
            ids = flat.view(S, K)
        elif self.pattern == "identical":
            ids = torch.randperm(N, generator=gen)[:K].repeat(math.ceil(K / N))[:K].expand(S, K)
        elif self.pattern == "zipf":
            probs = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.2
            rank_to_id = torch.randperm(N, generator=gen)
            ids = rank_to_id[torch.multinomial(probs, S * K, replacement=True, generator=gen)].view(S, K)
        else:  # skewed
            hot = int(torch.randint(N, (1,), generator=gen))
            uniform = torch.randint(N, (S, K), generator=gen)
            ids = torch.where(torch.rand(S, K, generator=gen) < 0.9, torch.full_like(uniform, hot), uniform)
        ids = ids.to(torch.int32).clone()
        ids[torch.rand(S, K, generator=gen) < self.empty_slot_prob] = -1
        if self.all_empty_segment:
            nonempty = [s for s, n in enumerate(self.seg_lengths) if n > 0]
            ids[nonempty[len(nonempty) // 2]] = -1
        return ids

    def tensors(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> OpTensors:
        """Fresh random inputs (deterministic per ``seed``); y rms ~ delta rms ~ 1."""
        gen = torch.Generator().manual_seed(self.seed)
        T, S, K = self.T, self.S, self.K
        bounds = [self.offset]
        for n in self.seg_lengths:
            bounds.append(bounds[-1] + n)
        ids = self.lora_ids(gen)
        weights = torch.rand(S, K, generator=gen) * 0.9 + 0.1
        # A x ~ N(0, 1) per rank; B (A x) ~ N(0, 1); the mixture then has rms ~ sqrt(sum w^2) ~ 1.
        x = torch.randn(T, self.d_in, generator=gen)
        lora_a = torch.randn(self.N, self.r, self.d_in, generator=gen) / math.sqrt(self.d_in)
        lora_b = torch.randn(self.N, self.d_out, self.r, generator=gen) / math.sqrt(self.r)
        y = torch.randn(T, self.d_out, generator=gen)
        return OpTensors(
            y.to(device=device, dtype=dtype),
            x.to(device=device, dtype=dtype),
            lora_a.to(device=device, dtype=dtype),
            lora_b.to(device=device, dtype=dtype),
            torch.tensor(bounds, dtype=torch.int32, device=device),
            ids.to(device),
            weights.to(device),
        )


def _case(T, d_in, d_out, N, r, K, layout, pattern, seed, **kw) -> OpCase:
    """Build a case from a named segment layout for T tokens (offset rows come out of T)."""
    offset = kw.pop("offset", 0)
    n = T - offset
    if layout == "decode":        # one token per segment, each its own mixture
        lengths = (1,) * n
    elif layout == "one":
        lengths = (n,)
    elif layout == "mixed":       # a few segments of unequal length with empty ones between
        gen = torch.Generator().manual_seed(1000 + seed)
        cuts = sorted(torch.randint(0, n + 1, (3,), generator=gen).tolist())
        parts = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], n - cuts[2]]
        lengths = (0, parts[0], 0, parts[1], parts[2], 0, parts[3])
    else:
        raise ValueError(layout)
    return OpCase(d_in, d_out, N, r, K, lengths, offset=offset, pattern=pattern, seed=seed, **kw)


# The sweep every backend runs: each T, empty segments, K = 1..4 with -1 slots, N in {1, 26, 100},
# r in {1, 8, 16, 64}, d_in/d_out not multiples of any block size, every popularity pattern.
CASE_SWEEP: tuple[OpCase, ...] = (
    _case(1, 72, 200, 1, 1, 1, "one", "identical", 1, empty_slot_prob=0.0),
    _case(1, 200, 72, 26, 8, 3, "decode", "distinct", 2),
    _case(7, 72, 200, 26, 16, 4, "decode", "zipf", 3),
    _case(7, 200, 72, 100, 8, 2, "mixed", "skewed", 4),
    _case(7, 72, 72, 1, 64, 2, "mixed", "identical", 5, offset=2, all_empty_segment=True),
    _case(64, 200, 200, 100, 16, 3, "decode", "zipf", 6),
    _case(64, 72, 200, 26, 64, 4, "one", "identical", 7, empty_slot_prob=0.0),
    _case(64, 200, 72, 26, 8, 3, "mixed", "distinct", 8, offset=5),
    _case(64, 256, 128, 26, 16, 2, "mixed", "skewed", 9),  # multiples of every vector width
    _case(300, 200, 72, 26, 16, 3, "mixed", "zipf", 10, all_empty_segment=True),
    _case(300, 72, 200, 100, 8, 2, "decode", "skewed", 11),
    _case(300, 200, 200, 1, 64, 1, "one", "identical", 12, empty_slot_prob=0.0),
    _case(300, 72, 72, 100, 1, 4, "mixed", "distinct", 13, offset=3),
    _case(300, 200, 72, 26, 16, 4, "one", "zipf", 14),
)


# --- the oracle check ------------------------------------------------------------------------

# (relative-RMS bound, elementwise relative bound) per (backend, dtype), flash-linear-attention style:
#   rel_rms  = rms(y_after - expected) / rms(expected)       over the whole output
#   element  : |y_after - expected| <= elem * max(|expected|, rms(expected))   (catches one bad row)
# expected = y_before + delta computed in float64 from the same (rounded) inputs.
# Why these numbers: with y and delta of rms ~ 1 the final rounding of y to its dtype dominates
# (half an ulp: 2^-24 fp32, 2^-11 fp16, 2^-8 bf16 relative); fp32 accumulation adds ~1e-6.
# cpp's long-segment GEMM path rounds the [T, K*r] intermediate to x's dtype (as every
# bf16 GEMM library does), about one more half-ulp. Triton on a GPU uses TF32 tl.dot for fp32.
_DEFAULT_TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 8e-3),
    torch.bfloat16: (1.5e-2, 6e-2),
    torch.float64: (1e-12, 1e-10),
}
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    **{("reference", dt): tol for dt, tol in _DEFAULT_TOL.items()},
    **{("cpp", dt): tol for dt, tol in _DEFAULT_TOL.items()},
    **{("cuda", dt): tol for dt, tol in _DEFAULT_TOL.items()},
    **{("triton", dt): tol for dt, tol in _DEFAULT_TOL.items()},
    ("triton-gpu", torch.float32): (2e-3, 2e-2),  # TF32 tl.dot: 10-bit mantissa products
}


def tolerance(backend: str, dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get((backend, dtype), _DEFAULT_TOL[dtype])


def assert_matches_reference(
    y_before: torch.Tensor,
    y_after: torch.Tensor,
    args: OpTensors,
    dtype: torch.dtype,
    backend: str,
    *,
    case: OpCase | None = None,
    tol: tuple[float, float] | None = None,
    delta: torch.Tensor | None = None,
) -> None:
    """Check one call of a backend against the float64 oracle and the in-place contract.

    y_before [T, d_out]: a clone of y taken before the call; y_after: y after it; args: the
    other inputs as passed. Rows with no contribution (before the first segment, in empty
    segments, or in segments whose slots are all -1) must be bit-identical to y_before.
    ``delta``: reference_delta(args), when the caller checks several backends on the same inputs.
    """
    what = f"{backend}/{dtype}" + (f" on {case.id}" if case is not None else "")
    assert y_after.dtype == dtype and y_after.shape == y_before.shape, what
    rel_rms_tol, elem_tol = tol or tolerance(backend, dtype)
    seg_indptr, lora_ids = args[4], args[5]
    if delta is None:
        delta = reference_delta(args)
    expected = y_before.cpu().double() + delta
    got = y_after.cpu().double()

    untouched = ~_rows_with_delta(seg_indptr.cpu(), lora_ids.cpu(), y_before.shape[0])
    if untouched.any():
        changed = (y_after.cpu()[untouched] != y_before.cpu()[untouched]).any(dim=1)
        bad_rows = untouched.nonzero().flatten()[changed].tolist()[:10]
        assert not changed.any(), f"{what}: rows without any adapter changed: {bad_rows}"
    if expected.numel() == 0:
        return
    err = (got - expected).abs()
    scale = expected.pow(2).mean().sqrt().clamp_min(1e-30)
    rel_rms = float(err.pow(2).mean().sqrt() / scale)
    bound = elem_tol * torch.maximum(expected.abs(), scale)
    worst = int((err / bound).flatten().argmax())
    row, col = divmod(worst, expected.shape[1])
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    assert rel_rms <= rel_rms_tol and bool((err <= bound).all()), (
        f"{what}: rel-RMS error {rel_rms:.3g} (bound {rel_rms_tol:g}); worst element [{row}, {col}] "
        f"got {float(got[row, col]):.6g} expected {float(expected[row, col]):.6g} "
        f"(elementwise bound {float(bound[row, col]):.3g})")


def reference_delta(args: OpTensors) -> torch.Tensor:
    """The float64 delta [T, d_out] of the op on these (already rounded) inputs, on CPU."""
    _, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights = args
    return multi_lora_delta(x.cpu(), lora_a.cpu(), lora_b.cpu(), seg_indptr.cpu(), lora_ids.cpu(),
                            lora_weights.cpu(), dtype=torch.float64)


def _rows_with_delta(seg_indptr: torch.Tensor, lora_ids: torch.Tensor, T: int) -> torch.Tensor:
    """Bool [T]: rows inside a segment that has at least one adapter (id >= 0)."""
    mask = torch.zeros(T, dtype=torch.bool)
    bounds = seg_indptr.tolist()
    active = (lora_ids >= 0).any(dim=1).tolist() if lora_ids.numel() else [False] * (len(bounds) - 1)
    for s in range(len(bounds) - 1):
        if active[s]:
            mask[bounds[s]:bounds[s + 1]] = True
    return mask


def with_seed(case: OpCase, seed: int) -> OpCase:
    """The same shape with other random data."""
    return replace(case, seed=seed)


# --- memory overlap of y with an input (the op must refuse it) --------------------------------

ALIASABLE = ("x", "lora_a", "lora_b", "seg_indptr", "lora_ids", "lora_weights")


def alias_y(args: OpTensors, name: str, overlap_bytes: int = 1, y_first: bool = False) -> OpTensors:
    """``args`` with y and input ``name`` placed in one byte buffer so that they share memory.

    The second of the two (the input, or y when ``y_first``) starts about ``overlap_bytes`` before
    the end of the first (rounded down to 8-byte alignment, so at least one byte is shared; a large
    value makes them start together). Both keep their shapes, dtypes and contiguity, and the input
    keeps its values (written last), so only the overlap is wrong with the call.
    """
    tensors = args._asdict()
    y, target = tensors["y"], tensors[name]
    assert y.numel() and target.numel(), "empty tensors occupy no memory"
    first, second = (y, target) if y_first else (target, y)
    first_bytes = first.numel() * first.element_size()
    offset = max(0, (first_bytes - overlap_bytes) // 8 * 8)
    second_bytes = second.numel() * second.element_size()
    buf = torch.empty(max(first_bytes, offset + second_bytes), dtype=torch.uint8, device=y.device)
    views = [buf[:first_bytes].view(first.dtype).view(first.shape),
             buf[offset:offset + second_bytes].view(second.dtype).view(second.shape)]
    y_view, target_view = views if y_first else views[::-1]
    y_view.copy_(y)
    target_view.copy_(target)
    tensors["y"], tensors[name] = y_view, target_view
    return OpTensors(**tensors)
