"""Triton backend of the segmented multi-LoRA op: a shrink kernel and an expand kernel.

    multi_lora_triton(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)   # y += delta, in place

      x            [T, d_in]      fp32 / fp16 / bf16, unit column stride
      lora_a       [N, r, d_in]   x's dtype, contiguous (PEFT lora_A.weight stacked)
      lora_b       [N, d_out, r]  x's dtype, contiguous (PEFT lora_B.weight stacked)
      seg_indptr   [S+1] int32    segment s = rows seg_indptr[s] : seg_indptr[s+1]
      lora_ids     [S, K] int32   adapter per slot, -1 = empty slot
      lora_weights [S, K] float32 mixture weight times scaling
      y            [T, d_out]     x's dtype, unit column stride; y = (float(y) + delta) rounded once

A mixture of K adapters is one adapter of rank K*r gathered by ids, so the op is two launches:

  shrink   t[split, row, k*r + j] = w[s, k] * sum_{i in split} x[row, i] * A[id_k][j, i]       fp32
  expand   y[row, :] = round(float(y[row, :]) + sum_split sum_k t[.., k*r : k*r + r] @ B[id_k]^T)

Both kernels run over the same grid of (token tile, segment lane, ...): token tile i covers rows
[i*BLOCK_M, (i+1)*BLOCK_M); the segments overlapping it are found on the device by a
PROBES-ary search of seg_indptr (no host sync, no per-call token->segment map), and segment
lane j of the tile handles the j-th, (j+NUM_J)-th, ... of them. Every (row, output) element is
written by exactly one program, so there are no atomics and results are deterministic.

Split-K: for decode (few tokens) the shrink has too few programs to pull A at full bandwidth, so
d_in is split over SPLIT programs that write separate fp32 partials; the expand sums them (no
memset, no atomics). The fp32 intermediate t is the only allocation (caching allocator; no
kernel launch), so a call is exactly two launches.

Precision: 16-bit dots accumulate in fp32 (products are exact). fp32 operands (fp32 inputs, and
the fp32 t times B in the expand) use input_precision="tf32x3" on a GPU, which is near-fp32
accurate, instead of plain TF32. On CPU tensors (TRITON_INTERPRET=1) every tile is upcast to
fp32 before tl.dot, because the interpreter computes bf16 arithmetic on raw bits; its fp32->bf16
store truncates instead of rounding to nearest (at most 1 bf16 ulp off).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .._env import triton_interpret
from ..ops.validate import overlap_message, overlapping_input


@triton.jit
def _first_segment(seg_indptr, S, row, PROBES: tl.constexpr):
    """Smallest s in [0, S] with seg_indptr[s + 1] > row (S if none): a PROBES-ary search.

    Each round loads PROBES evenly spaced segment ends at once, so S <= PROBES takes one round.
    """
    # tl.full, not `S * 0`: were S specialised, S == 1 would be a constexpr, and a loop-carried
    # variable must keep one type.
    lo = tl.full((), 0, tl.int32)
    hi = lo + S
    while lo < hi:
        step = (hi - lo + PROBES - 1) // PROBES
        probe = lo + tl.arange(0, PROBES) * step
        valid = probe < hi
        ends = tl.load(seg_indptr + probe + 1, mask=valid, other=0)
        m = tl.sum((valid & (ends <= row)).to(tl.int32), axis=0)
        # The answer lies in (probe[m-1], probe[m]] (or [lo, lo] when m == 0).
        next_lo = tl.where(m > 0, lo + (m - 1) * step + 1, lo)
        hi = tl.where(m > 0, tl.minimum(lo + m * step, hi), lo)
        lo = next_lo
    return lo


# Sizes that change from call to call (tokens, segments) or only index scalars are not
# specialised on (== 1, % 16), so a decode loop over T = 1, 2, 3, ... reuses one compiled kernel.
_VARYING = ["T", "S", "K", "R"]


@triton.jit(do_not_specialize=_VARYING + ["split_len"])
def _shrink_kernel(
    x, lora_a, seg_indptr, lora_ids, lora_weights, t_buf,
    T, S, K, R, D_IN, KR, x_row_stride, split_len,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, NUM_J: tl.constexpr,
    SPLIT: tl.constexpr, PROBES: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """t_buf[sp, row, c] = w[s, c // R] * x[row, split sp] . A[id][c % R, split sp] (fp32).

    Grid: (token tiles, NUM_J segment lanes, column blocks * SPLIT). Columns c in [0, K*R) are
    the K gathered adapters' rank rows side by side, so x is read once per column block.
    Empty slots (-1) store zeros so that the expand never reads uninitialised memory.
    """
    pid_tile = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_c = tl.program_id(2) // SPLIT
    sp = tl.program_id(2) % SPLIT

    tile_start = pid_tile * BLOCK_M
    tile_end = tl.minimum(tile_start + BLOCK_M, T)
    rows = tile_start + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < KR
    slot = cols // R
    rank_row = cols % R
    k_lo = sp * split_len
    k_hi = tl.minimum(k_lo + split_len, D_IN)
    x_rows = x + rows.to(tl.int64)[:, None] * x_row_stride
    t_out = t_buf + sp.to(tl.int64) * T * KR + rows.to(tl.int64)[:, None] * KR + cols[None, :]

    s = _first_segment(seg_indptr, S, tile_start, PROBES) + pid_j
    seg_start = tl.load(seg_indptr + s, mask=s < S, other=T)
    while seg_start < tile_end:
        seg_end = tl.load(seg_indptr + s + 1)
        row_ok = (rows >= seg_start) & (rows < seg_end)
        if seg_end > seg_start:
            ids = tl.load(lora_ids + s * K + slot, mask=col_ok, other=-1)
            use = col_ok & (ids >= 0)
            # Row of the gathered A for column c: A[id][c % R, :], contiguous along d_in.
            a_rows = lora_a + (tl.where(use, ids, 0).to(tl.int64) * R + rank_row) * D_IN
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < k_hi
                xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_rows[None, :] + kk[:, None], mask=use[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(xt, at, acc, input_precision=PRECISION)
            w = tl.load(lora_weights + s * K + slot, mask=use, other=0.0)
            # where(), not acc * 0: a NaN weight in an empty slot must not leak into the sum.
            out = tl.where(use[None, :], acc * w[None, :], 0.0)
            tl.store(t_out, out, mask=row_ok[:, None] & col_ok[None, :])
        s += NUM_J
        seg_start = tl.load(seg_indptr + s, mask=s < S, other=T)


@triton.jit(do_not_specialize=_VARYING)
def _expand_kernel(
    y, t_buf, lora_b, seg_indptr, lora_ids,
    T, S, K, R, D_OUT, KR, y_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, NUM_J: tl.constexpr,
    SPLIT: tl.constexpr, PROBES: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[row, n] = round(float(y[row, n]) + sum_k t[row, k*R : k*R+R] . B[id_k][n, :]).

    Grid: (token tiles, NUM_J segment lanes, output blocks). Empty slots are skipped entirely
    (no B traffic); the fp32 sum over slots and splits is rounded to y's dtype once.
    """
    pid_tile = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_n = tl.program_id(2)

    tile_start = pid_tile * BLOCK_M
    tile_end = tl.minimum(tile_start + BLOCK_M, T)
    rows = tile_start + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < D_OUT
    jr = tl.arange(0, R_PAD)
    r_ok = jr < R

    s = _first_segment(seg_indptr, S, tile_start, PROBES) + pid_j
    seg_start = tl.load(seg_indptr + s, mask=s < S, other=T)
    while seg_start < tile_end:
        seg_end = tl.load(seg_indptr + s + 1)
        row_ok = (rows >= seg_start) & (rows < seg_end)
        if seg_end > seg_start:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K):
                lora_id = tl.load(lora_ids + s * K + k)
                if lora_id >= 0:
                    t_ptrs = t_buf + rows64[:, None] * KR + (k * R + jr)[None, :]
                    t_mask = row_ok[:, None] & r_ok[None, :]
                    tt = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
                    for sp in range(0, SPLIT):
                        tt += tl.load(t_ptrs + sp * T * KR, mask=t_mask, other=0.0)
                    # B[id][n, j] as an [R_PAD, BLOCK_N] tile: r contiguous elements per output n.
                    b_ptrs = lora_b + (lora_id.to(tl.int64) * D_OUT + ns[None, :]) * R + jr[:, None]
                    bt = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                    acc = tl.dot(tt, bt, acc, input_precision=PRECISION)
            y_ptrs = y + rows64[:, None] * y_row_stride + ns[None, :]
            mask = row_ok[:, None] & n_ok[None, :]
            old = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (old + acc).to(y.dtype.element_ty), mask=mask)
        s += NUM_J
        seg_start = tl.load(seg_indptr + s, mask=s < S, other=T)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one call. Any values >= 16 (powers of two) are correct; they only set speed.

    block_m: token rows per tile; block_k: d_in chunk of the shrink; block_c: gathered rank
    columns per shrink program; block_n: outputs per expand program; split_k: d_in splits of the
    shrink; probes: seg_indptr entries read per search round; lanes: programs per tile that
    share its segments (None: block_m, so one-token segments each get their own program).
    """

    block_m: int = 64
    block_k: int = 64
    block_c: int = 64
    block_n: int = 128
    split_k: int = 1
    probes: int = 32
    lanes: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for field in ("block_m", "block_k", "block_c", "block_n", "probes"):
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{field} must be a power of two >= 16, got {value}")
        if self.split_k < 1:
            raise ValueError(f"LaunchConfig.split_k must be >= 1, got {self.split_k}")
        if self.lanes is not None and self.lanes < 1:
            raise ValueError(f"LaunchConfig.lanes must be >= 1, got {self.lanes}")


# Host-side integer helpers in plain Python: in recent Triton (3.9 here) triton.cdiv and
# triton.next_power_of_2 are constexpr functions, and one host call costs ~4 us (measured here),
# against 0.05 us for the same arithmetic inline. The op made seven such calls per launch.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Cached: a decode step calls the op once per patched Linear with the same few shapes, and
# working the tiles out takes ~7 us in Python (37 us with Triton's host helpers; 0.7 us cached),
# about 1 ms a step for the 154 Linears of a 22-layer Llama. LaunchConfig is frozen, so sharing
# one instance is safe.
@functools.lru_cache(maxsize=4096)
def choose_config(T: int, S: int, K: int, r: int, d_in: int, d_out: int, dtype: torch.dtype,
                  device: torch.device, *, num_sms: int | None = None) -> LaunchConfig:
    """Tile sizes from shapes alone (no device reads). Deterministic: no autotuning.

    Decode-like calls (a few rows per segment) get 16-row tiles and a split-K shrink so that
    enough programs stream the adapters; prefill gets 64-row tiles so each adapter tile is
    reused across many rows. On CPU (interpreter) tiles are large to keep the programs few.
    ``num_sms`` defaults to the device's multiprocessor count.
    """
    rows_per_segment = T / max(S, 1)
    block_m = min(64, _pow2_at_least(int(rows_per_segment)))
    block_c = min(64, _pow2_at_least(K * r))
    if device.type != "cuda":
        # The interpreter pays per program and per op, not per element: few, wide programs,
        # one lane per tile walking all of the tile's segments.
        return LaunchConfig(block_m=64, block_k=min(256, _pow2_at_least(d_in)),
                            block_c=min(256, _pow2_at_least(K * r)), block_n=min(256, _pow2_at_least(d_out)),
                            split_k=1, probes=32, lanes=1, num_warps=1, num_stages=1)
    wide = dtype == torch.float32
    block_k = 64 if (wide or block_m == 64) else 128
    block_n = 64 if (wide or block_m == 16) else 128
    tiles = _cdiv(T, block_m)
    # A tile overlaps about block_m / rows_per_segment + 1 segments: one lane each; lanes beyond
    # that would only search and exit (the lane loop still covers tiles that overlap more).
    lanes = min(block_m, math.ceil(block_m / max(rows_per_segment, 1e-9)) + 1)
    active = min(tiles + S, tiles * min(S, lanes))  # (tile, segment) pairs that do work
    programs = active * _cdiv(K * r, block_c)
    # Split d_in while the shrink still fits one wave of programs and every split keeps at
    # least two BLOCK_K chunks; the expand then sums `split_k` fp32 partials per row.
    num_sms = num_sms or _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split_k = 1
    while split_k < 16 and 2 * programs * split_k <= num_sms and d_in >= 2 * split_k * 2 * block_k:
        split_k *= 2
    return LaunchConfig(block_m=block_m, block_k=block_k, block_c=block_c, block_n=block_n,
                        split_k=split_k, probes=32, lanes=lanes, num_warps=4, num_stages=3)


def _check_layout(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights) -> None:
    """Cheap host checks (attributes only, no device reads) the kernels rely on.

    The passing case runs once per patched Linear per step, so it is one expression; the loop
    that names the offending argument runs only on failure.
    """
    if y.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("multi_lora_triton: `x` and `y` need unit column stride")
    if not (lora_a.is_contiguous() and lora_b.is_contiguous() and seg_indptr.is_contiguous()
            and lora_ids.is_contiguous() and lora_weights.is_contiguous()):
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("seg_indptr", seg_indptr),
                        ("lora_ids", lora_ids), ("lora_weights", lora_weights)):
            if not t.is_contiguous():
                raise ValueError(f"multi_lora_triton: `{name}` must be contiguous")
    if x.is_cpu and not triton_interpret():
        raise RuntimeError("multi_lora_triton: CPU tensors need TRITON_INTERPRET=1 set before import")
    overlap = overlapping_input(y, dict(x=x, lora_a=lora_a, lora_b=lora_b, seg_indptr=seg_indptr,
                                        lora_ids=lora_ids, lora_weights=lora_weights))
    if overlap is not None:
        raise ValueError(f"multi_lora_triton: `y` {overlap_message(overlap)}")


def multi_lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_weights: torch.Tensor,
    *,
    config: LaunchConfig | None = None,
) -> None:
    """In place ``y += delta`` (module docstring); two kernel launches, no host sync.

    Values are not validated here (dlp_lora.ops.multi_lora does that): ids must lie in [-1, N)
    and seg_indptr must be non-decreasing, ending at <= T.
    """
    _check_layout(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    T, d_in = x.shape
    N, r, _ = lora_a.shape
    d_out = lora_b.shape[1]
    S, K = lora_ids.shape
    if min(T, d_in, d_out, N, r, S, K) == 0:
        return
    cfg = config or choose_config(T, S, K, r, d_in, d_out, x.dtype, x.device)
    upcast = x.device.type == "cpu"
    # fp32 operands on a GPU: 3xTF32 (near-fp32 accuracy on tensor cores) rather than plain TF32.
    # 16-bit operands keep the default; the interpreter ignores the setting (numpy matmul).
    fp32_dot = "ieee" if upcast else "tf32x3"
    shrink_dot = fp32_dot if x.dtype == torch.float32 else "tf32"
    kr = K * r
    num_j = min(S, cfg.lanes or cfg.block_m)
    tiles = _cdiv(T, cfg.block_m)
    split_len = _cdiv(_cdiv(d_in, cfg.split_k), cfg.block_k) * cfg.block_k
    split = _cdiv(d_in, split_len)  # never launch a split with no columns

    t_buf = torch.empty((split, T, kr), dtype=torch.float32, device=x.device)
    _shrink_kernel[(tiles, num_j, _cdiv(kr, cfg.block_c) * split)](
        x, lora_a, seg_indptr, lora_ids, lora_weights, t_buf,
        T, S, K, r, d_in, kr, x.stride(0), split_len,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c, NUM_J=num_j,
        SPLIT=split, PROBES=cfg.probes, UPCAST=upcast, PRECISION=shrink_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _expand_kernel[(tiles, num_j, _cdiv(d_out, cfg.block_n))](
        y, t_buf, lora_b, seg_indptr, lora_ids,
        T, S, K, r, d_out, kr, y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=_pow2_at_least(r), NUM_J=num_j,
        SPLIT=split, PROBES=cfg.probes, PRECISION=fp32_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
