"""CPU microbenchmarks of the multi-LoRA op: the `cpp` backend against two torch compositions.

    make bench-ops      # pytest-benchmark -> benchmarks/results/ops_cpu_raw.json -> summarize_ops.py

Implementations, all computing  y[t] += sum_k w[s,k] * B[id] (A[id] x[t])  in place:
  cpp        torch.ops.dlp_lora.multi_lora (the compiled kernel a patched Linear calls; no validation)
  peft_loop  (a) one pass per adapter, two matmuls on the rows that use it, PEFT's mixed-batch way.
             Its grouping (which rows use which adapter) is built once outside the timed call, which
             flatters it: a real forward rebuilds it per step.
  gather_bmm (b) MeteoRA's batch path: gather the K (A, B) of every token, bmm, bmm, weighted sum
             (dlp_lora.bench.baselines.apply_gather_bmm, the same code the end-to-end benchmark runs).

Shapes (K = 3 adapters per segment, no empty slots, d_in = d_out = d):
  decode   T in {1, 4, 8, 16, 32} tokens, each its own segment and mixture, N = 26, r = 16, d = 4096;
           T in {1, 32} for the other (N in {26, 100}) x (r in {8, 16}) x (d in {2048, 4096})
  prefill  T = 512 in S in {1, 2, 4} equal segments (N = 26, r = 16, d = 4096),
           S in {1, 4} for r = 8, d = 2048.
           gather_bmm runs at S = 1 only: it works per token, so its cost does not depend on S, and at
           ~1 s a call it is 20x behind peft_loop there anyway.
  gemm_threshold  cpp alone, fused loops vs gather+GEMM, 4 segments of L rows: where the default
           switch (csrc/multi_lora_cpu.cpp, default_gemm_min_rows) should sit
each in float32 and bfloat16. Rounds are sized to ~0.3 s per benchmark to keep `make bench-ops` short.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from dlp_lora.bench.baselines import LoRAStack, apply_gather_bmm
from dlp_lora.ops._extension import load_extension

_C = load_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="compiled extension not built")

K = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _decode_shapes():
    shapes = [(T, 26, 16, 4096) for T in (1, 4, 8, 16, 32)]
    for N in (26, 100):
        for r in (8, 16):
            for d in (2048, 4096):
                if (N, r, d) != (26, 16, 4096):
                    shapes += [(1, N, r, d), (32, N, r, d)]
    return [("decode", T, T, N, r, d) for T, N, r, d in shapes]


PREFILL = ([("prefill", 512, S, 26, 16, 4096) for S in (1, 2, 4)]
           + [("prefill", 512, S, 26, 8, 2048) for S in (1, 4)])
SHAPES = _decode_shapes() + PREFILL


def make_problem(T, S, N, r, d, dtype, seed=0):
    """Inputs of one call: S equal segments over T rows, K distinct random adapters per segment."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(dtype)
    lora_a = (torch.randn(N, r, d, generator=gen) / d**0.5).to(dtype)
    lora_b = (torch.randn(N, d, r, generator=gen) / r**0.5).to(dtype)
    y = torch.randn(T, d, generator=gen).to(dtype)
    seg_indptr = torch.arange(0, T + 1, T // S, dtype=torch.int32)
    lora_ids = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(S)]).to(torch.int32)
    lora_weights = torch.rand(S, K, generator=gen) * 0.9 + 0.1
    return y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights


def make_cpp(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights):
    op = torch.ops.dlp_lora.multi_lora.default
    return lambda: op(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)


def make_peft_loop(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights):
    """(a) per adapter: rows that use it (a slice when they are one segment), two matmuls, add."""
    bounds = seg_indptr.tolist()
    rows_of: dict[int, list[tuple[int, int, float]]] = {}
    for s, (ids, ws) in enumerate(zip(lora_ids.tolist(), lora_weights.tolist(), strict=True)):
        for idx, w in zip(ids, ws, strict=True):
            rows_of.setdefault(idx, []).append((bounds[s], bounds[s + 1], w))
    plan = []
    for idx, spans in rows_of.items():
        if len(spans) == 1:
            start, end, w = spans[0]
            plan.append((lora_a[idx], lora_b[idx], slice(start, end), w))
        else:
            rows = torch.cat([torch.arange(start, end) for start, end, _ in spans])
            coeff = torch.cat([torch.full((end - start, 1), w) for start, end, w in spans]).to(x.dtype)
            plan.append((lora_a[idx], lora_b[idx], rows, coeff))

    def run():
        for a, b, rows, coeff in plan:
            if isinstance(rows, slice):
                y[rows] += (x[rows] @ a.T) @ b.T * coeff
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T * coeff)
    return run


def make_gather_bmm(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights):
    """(b) MeteoRA's per-token gather + bmm: segment ids and weights repeated for every token."""
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).long()
    token_ids = lora_ids.long().repeat_interleave(lengths, dim=0)   # [T, K]
    token_w = lora_weights.repeat_interleave(lengths, dim=0)        # [T, K]
    stack = LoRAStack(lora_a, lora_b, torch.ones(lora_a.shape[0]))
    return lambda: apply_gather_bmm(y, x, stack, token_ids, token_w)


IMPLS = {"cpp": make_cpp, "peft_loop": make_peft_loop, "gather_bmm": make_gather_bmm}


def roofline(T, S, N, r, d, dtype, lora_ids):
    """FLOPs and the bytes an ideal kernel moves: each touched adapter once, x once, y read+written."""
    b = torch.finfo(dtype).bits // 8
    L = int(torch.unique(lora_ids).numel())
    return {"flops": 2 * T * K * r * (d + d), "bytes": b * (L * r * (d + d) + T * d + 2 * T * d),
            "distinct_loras": L}


def timed(benchmark, fn, target_s=0.3, max_rounds=200):
    """benchmark.pedantic with the round count sized from one warm call (the two calls below are the
    warm-up; a call slower than 0.2 s, gather_bmm at prefill, gets 3 rounds)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    rounds = 3 if once > 0.2 else int(min(max_rounds, max(5, target_s / once)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if once > 0.05 else 2)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("phase, T, S, N, r, d", SHAPES,
                         ids=[f"{p}-T{T}-S{S}-N{N}-r{r}-d{d}" for p, T, S, N, r, d in SHAPES])
def test_multi_lora_cpu(benchmark, phase, T, S, N, r, d, impl, dtype_name):
    if phase == "prefill" and impl == "gather_bmm" and S > 1:
        pytest.skip("gather_bmm is per token: timed at S=1 only (same cost for every S)")
    dtype = DTYPES[dtype_name]
    problem = make_problem(T, S, N, r, d, dtype)
    benchmark.group = f"{phase} {dtype_name} T={T} S={S} N={N} r={r} d={d}"
    benchmark.extra_info.update(phase=phase, impl=impl, dtype=dtype_name, T=T, S=S, N=N, r=r, d_in=d, d_out=d,
                                K=K, threads=torch.get_num_threads(), loadavg_1min=os.getloadavg()[0],
                                **roofline(T, S, N, r, d, dtype, problem[5]))
    timed(benchmark, IMPLS[impl](*problem))


@contextlib.contextmanager
def _gemm_min_rows(rows):
    previous = _C.set_gemm_min_rows(rows)
    try:
        yield
    finally:
        _C.set_gemm_min_rows(previous)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("path", ["fused", "gemm"])
@pytest.mark.parametrize("L", [8, 16, 32, 64])
def test_gemm_threshold(benchmark, L, path, dtype_name):
    dtype = DTYPES[dtype_name]
    S, N, r, d = 4, 26, 16, 4096
    problem = make_problem(S * L, S, N, r, d, dtype)
    benchmark.group = f"gemm_threshold {dtype_name} L={L}"
    benchmark.extra_info.update(phase="gemm_threshold", impl=f"cpp_{path}", dtype=dtype_name, T=S * L, S=S,
                                N=N, r=r, d_in=d, d_out=d, K=K, segment_rows=L,
                                threads=torch.get_num_threads(), loadavg_1min=os.getloadavg()[0],
                                **roofline(S * L, S, N, r, d, dtype, problem[5]))
    with _gemm_min_rows(1 << 30 if path == "fused" else 1):
        timed(benchmark, make_cpp(*problem), target_s=0.2)
