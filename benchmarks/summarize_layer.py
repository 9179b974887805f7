"""Compact bench_layer.py's raw pytest-benchmark JSON into benchmarks/results/layer_cpu.json.

    python benchmarks/summarize_layer.py RAW_JSON OUT_JSON
    (make bench-layer: benchmarks/results/layer_cpu_raw.json -> benchmarks/results/layer_cpu.json)

pytest-benchmark's --benchmark-json keeps every sample of every case (~1 MB for this file); the
committed file keeps each case's statistics (median, quartiles, IQR, stddev, rounds), its extra_info,
the machine and the versions, and adds two ratios per case from the same run: to the bare Linear
(``x_base``) and, for the MeteoRA forms, to DLP-LoRA with the same bank (``x_dlp``).
benchmarks/make_readme_tables.py renders the README table from it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(raw: dict) -> dict:
    benches = raw["benchmarks"]
    base = {b["group"]: b["stats"]["median"] for b in benches if b["extra_info"]["variant"] == "base"}
    dlp = {(b["group"], b["extra_info"]["n_adapters"]): b["stats"]["median"]
           for b in benches if b["extra_info"]["variant"] == "dlp"}
    cases = []
    for b in benches:
        info, stats = b["extra_info"], {k: v for k, v in b["stats"].items() if k != "data"}
        case = {"group": b["group"], "name": b["name"], "extra_info": info, "stats": stats}
        if b["group"] in base:
            case["x_base"] = stats["median"] / base[b["group"]]
        if info["variant"].startswith("meteora") and (b["group"], info["n_adapters"]) in dlp:
            case["x_dlp"] = stats["median"] / dlp[(b["group"], info["n_adapters"])]
        cases.append(case)
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # summarizing must work without torch
        torch_version = None
    return {
        "what": "one adapted Linear: DLP-LoRA vs MeteoRA-style gating vs PEFT (benchmarks/bench_layer.py)",
        "generated_by": "make bench-layer (benchmarks/bench_layer.py + benchmarks/summarize_layer.py)",
        "datetime": raw.get("datetime"),
        "machine_info": raw.get("machine_info"),
        "commit_info": raw.get("commit_info"),
        "versions": {"torch": torch_version, "pytest_benchmark": raw.get("version")},
        "benchmarks": cases,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    summary = summarize(json.loads(Path(argv[1]).read_text()))
    out = Path(argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out} ({len(summary['benchmarks'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
