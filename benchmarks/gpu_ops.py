"""GPU microbenchmark of the multi-LoRA op: triton and cuda backends vs torch compositions.

    python3 benchmarks/gpu_ops.py                     # on a GPU: writes benchmarks/results/gpu_ops_<gpu>.json
    python3 benchmarks/gpu_ops.py --dry-run --out /tmp/gpu_ops_dry.json   # CPU smoke test (interpreter)

Implementations (each checked against an fp32 reference before it is timed):
  triton, cuda         the raw kernels of those backends (what a patched Linear calls)
  triton+graph, ...    the same call captured once in a CUDA graph and replayed: launch overhead off
  torch_loop           one pass per selected adapter: where, two matmuls, index_add_ (PEFT / Mixtral
                       style; dlp_lora.bench.baselines.apply_loop)
  torch_bmm            gather the K (A, B) of every token, bmm, bmm, weighted sum (MeteoRA's batch path;
                       dlp_lora.bench.baselines.apply_gather_bmm), also graph-captured when possible

Shapes: decode (one token per segment, each its own mixture of K=3 out of N in {26, 100},
r in {8, 16}, d 4096 -> 4096, T in {1, 8, 32, 64}) and prefill (T in {512, 2048, 4096} in 1 or 4
segments, K=3 of N=26, r=16). Timing: triton.testing.do_bench (CUDA events, L2 flushed before every
call, as a layer of a real model finds it) -> median, quartiles. Roofline beside every time:
    bytes = b * (L*r*(d_in+d_out) + T*d_in + 2*T*d_out),  L = distinct adapters touched
    FLOPs = 2 * T * K * r * (d_in + d_out)
achieved GB/s = bytes / median, compared with a measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if "--dry-run" in sys.argv:  # must precede the first import of the Triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from dlp_lora import ops  # noqa: E402
from dlp_lora.bench.baselines import LoRAStack, apply_gather_bmm, apply_loop  # noqa: E402
from dlp_lora.bench.provenance import machine_info, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BMM_MAX_BYTES = 8 << 30  # torch_bmm materialises T*K copies of A and B: skip it beyond this


@dataclass(frozen=True)
class Shape:
    phase: str
    seg_lengths: tuple[int, ...]
    K: int
    N: int
    r: int
    d_in: int
    d_out: int

    @property
    def T(self) -> int:
        return sum(self.seg_lengths)

    @property
    def S(self) -> int:
        return len(self.seg_lengths)

    @property
    def name(self) -> str:
        return f"{self.phase} T={self.T} S={self.S} K={self.K} N={self.N} r={self.r} {self.d_in}x{self.d_out}"


def benchmark_shapes(dry_run: bool, quick: bool) -> list[Shape]:
    if dry_run:
        return [Shape("decode", (1,) * t, 3, 5, 8, 64, 48) for t in (1, 4)] + \
               [Shape("prefill", (20, 12), 3, 5, 8, 64, 48)]
    d = 4096
    decode_T = (1, 64) if quick else (1, 8, 32, 64)
    shapes = [Shape("decode", (1,) * t, 3, n, r, d, d) for n in (26, 100) for r in (8, 16) for t in decode_T]
    for t in ((512, 4096) if quick else (512, 2048, 4096)):
        for s in (1, 4):
            shapes.append(Shape("prefill", tuple(t // s + (i < t % s) for i in range(s)), 3, 26, 16, d, d))
    return shapes


@dataclass
class Inputs:
    y: torch.Tensor              # [T, d_out]
    x: torch.Tensor              # [T, d_in]
    lora_a: torch.Tensor         # [N, r, d_in]
    lora_b: torch.Tensor         # [N, d_out, r]
    seg_indptr: torch.Tensor     # [S+1] int32
    lora_ids: torch.Tensor       # [S, K] int32
    lora_weights: torch.Tensor   # [S, K] float32
    token_ids: torch.Tensor      # [T, K] int64: each token's segment ids (the torch baselines' input)
    token_weights: torch.Tensor  # [T, K] float32
    stack: LoRAStack             # same adapters, scaling 1 (folded into the weights)

    @property
    def op_args(self) -> tuple[torch.Tensor, ...]:
        return (self.y, self.x, self.lora_a, self.lora_b, self.seg_indptr, self.lora_ids, self.lora_weights)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """Random data of rms ~1 in y and delta; every segment mixes K distinct adapters."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(shape.N, generator=gen)[: shape.K] for _ in range(shape.S)])
    ids = ids.to(torch.int32)
    weights = torch.rand(shape.S, shape.K, generator=gen) * 0.9 + 0.1
    bounds = torch.tensor([0, *shape.seg_lengths]).cumsum(0).to(torch.int32)
    lengths = torch.tensor(shape.seg_lengths)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    a = rand(shape.N, shape.r, shape.d_in, scale=shape.d_in ** -0.5)
    b = rand(shape.N, shape.d_out, shape.r, scale=shape.r ** -0.5)
    return Inputs(
        y=rand(shape.T, shape.d_out), x=rand(shape.T, shape.d_in), lora_a=a, lora_b=b,
        seg_indptr=bounds.to(device), lora_ids=ids.to(device), lora_weights=weights.to(device),
        token_ids=ids.long().repeat_interleave(lengths, dim=0).to(device),
        token_weights=weights.repeat_interleave(lengths, dim=0).to(device),
        stack=LoRAStack(a, b, torch.ones(shape.N, device=device)),
    )


def roofline(shape: Shape, distinct: int, elem_bytes: int) -> dict:
    moved = elem_bytes * (distinct * shape.r * (shape.d_in + shape.d_out) + shape.T * shape.d_in
                          + 2 * shape.T * shape.d_out)
    flops = 2 * shape.T * shape.K * shape.r * (shape.d_in + shape.d_out)
    return {"bytes": moved, "flops": flops, "flop_per_byte": round(flops / moved, 3),
            "distinct_adapters": distinct}


# ----------------------------------------------------------------------------- implementations

def implementations(inp: Inputs, device: str, dry_run: bool) -> dict[str, Callable[[], None]]:
    """name -> a zero-argument call that adds the delta into inp.y (in place)."""
    impls: dict[str, Callable[[], None]] = {}
    backends = [b for b in ("triton", "cuda") if b in ops.available_backends(device)]
    if dry_run:
        backends.append("reference")
    for backend in backends:
        kernel = ops.get_kernel(backend)
        impls[backend] = lambda kernel=kernel: kernel(*inp.op_args)
    impls["torch_loop"] = lambda: apply_loop(inp.y, inp.x, inp.stack, inp.token_ids, inp.token_weights)
    T, K = inp.token_ids.shape
    gathered = T * K * inp.lora_a[0].numel() * 2 * inp.x.element_size()
    if gathered <= BMM_MAX_BYTES:
        impls["torch_bmm"] = lambda: apply_gather_bmm(inp.y, inp.x, inp.stack, inp.token_ids,
                                                      inp.token_weights)
    return impls


def cuda_graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture one call of fn in a CUDA graph (after a warm-up on a side stream); return replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def relative_error(inp: Inputs, fn: Callable[[], None], expected_delta: torch.Tensor) -> float:
    """rms(delta_fn - expected) / rms(expected) for one call on a fresh copy of y."""
    y0 = inp.y.clone()
    fn()
    got = inp.y.float() - y0.float()
    inp.y.copy_(y0)
    scale = expected_delta.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((got - expected_delta).pow(2).mean().sqrt() / scale)


def count_kernels(fn: Callable[[], None]) -> int | None:
    """Device kernels one call launches (torch.profiler); None when the profiler sees none."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset")))
    return n or None


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], None], device: str, rep_ms: int) -> list[float]:
    """Per-call times in ms: do_bench samples on a GPU, a few wall-clock calls on CPU."""
    if device == "cuda":
        import triton.testing

        warmup = max(10, rep_ms // 4)
        try:
            return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="all"))
        except (TypeError, ValueError, AssertionError):  # a Triton without return_mode="all"
            return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, quantiles=[0.25, 0.5, 0.75]))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def summary(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    med = statistics.median(samples)
    return {"median_us": round(med * 1e3, 3), "q1_us": round(q[0] * 1e3, 3), "q3_us": round(q[2] * 1e3, 3),
            "min_us": round(min(samples) * 1e3, 3), "samples": len(samples),
            "spread_iqr_over_median": round((q[2] - q[0]) / med, 4) if med > 0 else None}


def copy_bandwidth_gbps(device: str, rep_ms: int) -> float | None:
    """Device-to-device copy: (read + write bytes) / median time, 1 GiB buffers."""
    if device != "cuda":
        return None
    nbytes = 1 << 30
    src, dst = torch.empty(2, nbytes, dtype=torch.uint8, device=device).unbind(0)
    med_ms = statistics.median(time_ms(lambda: dst.copy_(src), device, rep_ms))
    return round(2 * nbytes / (med_ms * 1e-3) / 1e9, 1)  # the buffers are freed on return


# ----------------------------------------------------------------------------- environment

def gpu_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu_dryrun"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------- main

def run_shape(shape: Shape, dtype: torch.dtype, device: str, args) -> dict:
    inp = make_inputs(shape, dtype, device)
    distinct = int(torch.unique(inp.lora_ids).numel())
    row = {"shape": asdict(shape) | {"T": shape.T, "S": shape.S}, "name": shape.name,
           "roofline": roofline(shape, distinct, inp.x.element_size()), "impls": {}}
    expected = ops.multi_lora_delta(inp.x.float(), inp.lora_a.float(), inp.lora_b.float(), inp.seg_indptr,
                                    inp.lora_ids, inp.lora_weights)
    impls = implementations(inp, device, args.dry_run)
    if device == "cuda" and not args.no_graphs:
        for name in [n for n in impls if n != "torch_loop"]:  # torch_loop reads ids on the host
            try:
                impls[f"{name}+graph"] = cuda_graphed(impls[name])
            except Exception as exc:  # report, keep going
                row["impls"][f"{name}+graph"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    for name, fn in impls.items():
        try:
            result = {"rel_err_vs_fp32": round(relative_error(inp, fn, expected), 7)}
            result.update(summary(time_ms(fn, device, args.rep_ms)))
            seconds = result["median_us"] * 1e-6
            result["GBps"] = round(row["roofline"]["bytes"] / seconds / 1e9, 2)
            result["TFLOPs"] = round(row["roofline"]["flops"] / seconds / 1e12, 4)
            if args.copy_gbps:
                result["fraction_of_copy_bw"] = round(result["GBps"] / args.copy_gbps, 4)
            counted = args.count_launches_for.get(shape.phase)
            if device == "cuda" and not name.endswith("+graph") and shape == counted:
                result["kernels_per_call"] = count_kernels(fn)
        except Exception as exc:  # one broken implementation must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        row["impls"][name] = result
    del inp, impls
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict], copy_gbps: float | None) -> None:
    names = sorted({n for r in rows for n in r["impls"]}, key=lambda n: (n.startswith("torch"), n))
    header = f"{'shape':48s} {'MB':>7s} " + " ".join(f"{n:>17s}" for n in names) + "   best op / best torch"
    print(f"\nmedian us (GB/s); device copy bandwidth: {copy_gbps} GB/s")
    print(header)
    for r in rows:
        cells, best = [], {}
        for n in names:
            res = r["impls"].get(n, {})
            if "median_us" in res:
                cells.append(f"{res['median_us']:>9.1f} ({res['GBps']:>5.0f})")
                kind = "torch" if n.startswith("torch") else "op"
                best[kind] = min(best.get(kind, math.inf), res["median_us"])
            else:
                cells.append(f"{'err' if 'error' in res else '-':>17s}")
        ratio = f"{best['torch'] / best['op']:.2f}x faster" if len(best) == 2 else ""
        print(f"{r['name']:48s} {r['roofline']['bytes'] / 1e6:7.2f} " + " ".join(cells) + f"   {ratio}")
    errors = [(r["name"], n, res["error"]) for r in rows for n, res in r["impls"].items() if "error" in res]
    for name, impl, err in errors:
        print(f"ERROR {impl} on {name}: {err}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke test: tiny shapes, Triton interpreter")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench time budget per measurement")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/gpu_ops_<gpu>.json; dry runs: required)")
    args = parser.parse_args(argv)

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run for a CPU smoke test)")
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out (dry-run numbers are not results)")
    out = args.out or RESULTS / f"gpu_ops_{gpu_slug()}.json"
    dtype = getattr(torch, args.dtype)
    shapes = benchmark_shapes(args.dry_run, args.quick)
    args.count_launches_for = {s.phase: s for s in shapes}  # the last shape of each phase
    args.copy_gbps = copy_bandwidth_gbps(device, args.rep_ms)

    started = time.time()
    rows = []
    for shape in shapes:
        rows.append(run_shape(shape, dtype, device, args))
        print(f"[{time.time() - started:6.1f}s] {shape.name}", flush=True)
    result = {
        "what": "multi-LoRA op microbenchmark (benchmarks/gpu_ops.py)",
        "dry_run": args.dry_run, "device": device, "dtype": args.dtype,
        "machine": machine_info("cuda"), "versions": versions(),
        "timing": "triton.testing.do_bench: CUDA events, L2 flushed before each call; median and quartiles"
                  if device == "cuda" else "wall clock, 3 calls (dry run: not a measurement)",
        "copy_bandwidth_GBps": args.copy_gbps,
        "seconds": round(time.time() - started, 1),
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(rows, args.copy_gbps)
    print(f"\nwrote {out}")
    failed = sum("error" in res for r in rows for res in r["impls"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
