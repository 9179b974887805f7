"""Redraw the scaling plot (decode time ratio to base against N) from a `dlp-lora bench` JSON.

    python benchmarks/plot_scaling.py benchmarks/results/e2e_cpu.json [out.png]

`dlp-lora bench --scaling --out X.json` already draws X_scaling.png; use this after moving a
result file, or to restyle the plot without rerunning the benchmark. The JSON's "plot" entry is
updated to the new path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dlp_lora.bench.report import plot_scaling


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(args[0])
    result = json.loads(path.read_text())
    if not result.get("scaling"):
        print(f"{path} has no scaling sweep (run dlp-lora bench --scaling)", file=sys.stderr)
        return 1
    out = Path(args[1]) if len(args) > 1 else path.with_name(path.stem + "_scaling.png")
    result["plot"] = str(plot_scaling(result, out))
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
