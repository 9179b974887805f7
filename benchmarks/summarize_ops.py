"""Summarize bench_ops.py's raw pytest-benchmark JSON into benchmarks/results/ops_cpu.json.

    python benchmarks/summarize_ops.py RAW_JSON OUT_JSON [NOTE]
    (make bench-ops: benchmarks/results/ops_cpu_raw.json -> benchmarks/results/ops_cpu.json)

Per shape: every implementation's median, quartiles, IQR, stddev and rounds; the roofline figures
(FLOPs = 2*T*K*r*(d_in+d_out), bytes = b*(L*r*(d_in+d_out) + T*d_in + 2*T*d_out), L = distinct
adapters) with the achieved GB/s and GFLOP/s beside each time; and the speedup of `cpp` over the
better baseline (> 1: cpp is faster), checked against the goal: >= 2 at decode, >= 1/1.3 at prefill.
The gemm_threshold group reports which cpp path (fused loops or gather+GEMM) is faster per length.
Also prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

BASELINES = ("peft_loop", "gather_bmm")
GOALS = {"decode": 2.0, "prefill": 1 / 1.3}
SHAPE_KEYS = ("phase", "dtype", "T", "S", "N", "r", "d_in", "d_out", "K", "segment_rows")


def _timing(stats: dict, info: dict) -> dict:
    median = stats["median"]
    return {
        "median_us": median * 1e6,
        "q1_us": stats["q1"] * 1e6,
        "q3_us": stats["q3"] * 1e6,
        "iqr_us": stats["iqr"] * 1e6,
        "stddev_us": stats["stddev"] * 1e6,
        "min_us": stats["min"] * 1e6,
        "rounds": stats["rounds"],
        "achieved_GBps": info["bytes"] / median / 1e9,
        "achieved_GFLOPps": info["flops"] / median / 1e9,
        "loadavg_1min": info.get("loadavg_1min"),
    }


def _machine(raw: dict) -> dict:
    info = raw["machine_info"]
    cpu = info.get("cpu", {})
    flags = set(cpu.get("flags", []))
    machine = {
        "cpu": cpu.get("brand_raw") or platform.processor(),
        "cpu_family_model": f"{cpu.get('family')}/{cpu.get('model')}",
        "logical_cores": cpu.get("count"),
        "simd": sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx2", "amx"))),
        "system": f"{info.get('system')} {info.get('release')}",
    }
    try:  # the kernel's instruction set on this machine
        from dlp_lora.ops._extension import load_extension

        module = load_extension()
        machine["cpp_isa"] = module.cpu_isa() if module is not None else None
    except Exception as exc:  # summarizing must work without the package
        machine["cpp_isa"] = f"unknown ({exc})"
    return machine


def _versions(raw: dict) -> dict:
    versions = {"python": raw["machine_info"].get("python_version"), "pytest_benchmark": raw.get("version")}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    commit = raw.get("commit_info", {})
    versions["commit"] = commit.get("id")
    versions["commit_dirty"] = commit.get("dirty")
    return versions


def summarize(raw: dict) -> dict:
    shapes: dict[tuple, dict] = {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        key = tuple(info.get(k) for k in SHAPE_KEYS)
        entry = shapes.setdefault(key, {
            **{k: info.get(k) for k in SHAPE_KEYS if info.get(k) is not None},
            "threads": info.get("threads"),
            "roofline": {"flops": info["flops"], "bytes": info["bytes"],
                         "distinct_loras": info["distinct_loras"],
                         "flops_per_byte": info["flops"] / info["bytes"]},
            "impls": {},
        })
        entry["impls"][info["impl"]] = _timing(bench["stats"], info)

    results, thresholds = [], []
    for entry in shapes.values():
        impls = entry["impls"]
        if entry["phase"] == "gemm_threshold":
            fused, gemm = impls.get("cpp_fused"), impls.get("cpp_gemm")
            if fused and gemm:
                entry["faster_path"] = "fused" if fused["median_us"] <= gemm["median_us"] else "gemm"
                entry["gemm_over_fused"] = fused["median_us"] / gemm["median_us"]
            thresholds.append(entry)
            continue
        timed = {name: impls[name]["median_us"] for name in BASELINES if name in impls}
        if "cpp" in impls and timed:
            best = min(timed, key=timed.get)
            entry["best_baseline"] = best
            entry["speedup_vs_best_baseline"] = timed[best] / impls["cpp"]["median_us"]
            goal = GOALS.get(entry["phase"])
            if goal is not None:
                entry["goal_speedup"] = goal
                entry["meets_goal"] = entry["speedup_vs_best_baseline"] >= goal
        results.append(entry)

    def worst(phase, dtype):
        ratios = [e["speedup_vs_best_baseline"] for e in results
                  if e["phase"] == phase and e["dtype"] == dtype and "speedup_vs_best_baseline" in e]
        return min(ratios) if ratios else None

    dtypes = sorted({e["dtype"] for e in results})
    loads = [t["loadavg_1min"] for e in results + thresholds for t in e["impls"].values()
             if t.get("loadavg_1min") is not None]
    return {
        "what": "multi-LoRA op on CPU: cpp backend vs a per-adapter loop (peft_loop) and gather+bmm",
        "generated_by": "make bench-ops (benchmarks/bench_ops.py + benchmarks/summarize_ops.py)",
        "datetime": raw.get("datetime"),
        "machine": _machine(raw),
        "versions": _versions(raw),
        "torch_threads_in_run": sorted({e["threads"] for e in results + thresholds if e.get("threads")}),
        "load_during_run": ({"loadavg_1min_min": min(loads), "loadavg_1min_max": max(loads)}
                            if loads else None),
        "roofline_formulas": {
            "flops": "2 * T * K * r * (d_in + d_out)",
            "bytes": "b * (L * r * (d_in + d_out) + T * d_in + 2 * T * d_out), L = distinct adapters touched",
        },
        "summary": {
            "worst_speedup": {f"{phase} {dtype}": worst(phase, dtype) for phase in GOALS for dtype in dtypes},
            "goals": {"decode": ">= 2x vs the better baseline", "prefill": "within 1.3x (speedup >= 0.77)"},
            "all_goals_met": all(e.get("meets_goal", True) for e in results),
        },
        "shapes": results,
        "gemm_threshold": thresholds,
    }


def print_table(summary: dict) -> None:
    print(f"{'shape':46s} {'cpp us':>9s} {'peft us':>9s} {'bmm us':>10s} {'speedup':>8s} {'cpp GB/s':>8s}")
    def cell(impls, impl):
        return f"{impls[impl]['median_us']:.0f}" if impl in impls else "-"

    for e in summary["shapes"]:
        i = e["impls"]
        name = f"{e['phase']} {e['dtype']} T={e['T']} S={e['S']} N={e['N']} r={e['r']} d={e['d_in']}"
        flag = "" if e.get("meets_goal", True) else "  < goal"
        print(f"{name:46s} {cell(i, 'cpp'):>9s} {cell(i, 'peft_loop'):>9s} {cell(i, 'gather_bmm'):>10s} "
              f"{e.get('speedup_vs_best_baseline', float('nan')):8.2f} "
              f"{i['cpp']['achieved_GBps'] if 'cpp' in i else float('nan'):8.1f}{flag}")
    for e in summary["gemm_threshold"]:
        i = e["impls"]
        print(f"gemm_threshold {e['dtype']} rows/segment={e['segment_rows']}: "
              f"fused {cell(i, 'cpp_fused')} us, gemm {cell(i, 'cpp_gemm')} us -> {e.get('faster_path')}")
    print("worst speedups:", json.dumps(summary["summary"]["worst_speedup"]))


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    raw = json.loads(Path(argv[1]).read_text())
    summary = summarize(raw)
    if len(argv) == 4:  # how this run differs from `make bench-ops`, e.g. OMP_NUM_THREADS=1
        summary = {"note": argv[3], **summary}
    out = Path(argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
