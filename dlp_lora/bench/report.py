"""Reporting a run: per-variant summaries and paired ratios, the goals, the scaling plot, the result file."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from .._atomic import atomic_write_text
from .provenance import load_average
from .timing import quartiles
from .variants import Variant


def summarize(variants: Sequence[Variant], samples: dict[str, list[dict]], batch: int,
              references: Sequence[str]) -> list[dict]:
    """Per variant: decode ms/token, tokens/s, prefill ms, and paired ratios to each reference.

    ratio_to_<ref>: quartiles over rounds of (this variant's decode time / ref's, same round);
    cpu_time_ratio_to_<ref>: the same with process CPU time (a cross-check on a busy machine).
    """
    def column(name, key):
        return [s[key] for s in samples[name]]

    def in_ms(values):
        return {k: (x * 1e3 if k != "n" else x) for k, x in quartiles(values).items()}

    rows = []
    for v in variants:
        decode = column(v.name, "decode_s")
        row = {
            "variant": v.name, "family": v.family, "batch": batch, "n_adapters": v.n_adapters,
            "k": v.k, "form": v.form,
            "decode_ms_per_token": in_ms(decode),
            "decode_mean_ms_per_token": in_ms(column(v.name, "decode_mean_s")),
            "tokens_per_s": batch / statistics.median(decode),
            "prefill_ms": in_ms(column(v.name, "prefill_s")),
            "decode_cpu_ms_per_token": in_ms(column(v.name, "decode_cpu_s")),
        }
        for ref in references:
            if ref not in samples:
                continue
            for key, label in (("decode_s", "ratio_to"), ("decode_cpu_s", "cpu_time_ratio_to")):
                pairs = zip(column(v.name, key), column(ref, key), strict=True)
                row[f"{label}_{ref}"] = quartiles([a / b for a, b in pairs])
            row[f"ratio_of_medians_to_{ref}"] = statistics.median(decode) / statistics.median(
                column(ref, "decode_s"))
        row.update(v.info)
        rows.append(row)
    return rows


# The decode-time goals: DLP-LoRA's whole point is to cost little more than the base model while
# every sequence carries its own mixture. (description, batch, N adapters, limit on the ratio to base)
GOALS = (
    ("DLP-LoRA N=26, batch 1: <= 1.10x base decode time", 1, 26, 1.10),
    ("DLP-LoRA N=100, batch 1: <= 1.15x base decode time", 1, 100, 1.15),
    ("DLP-LoRA batch 8 with 8 mixtures (N=26): <= 1.20x base decode time", 8, 26, 1.20),
    ("DLP-LoRA batch 8 with 8 mixtures (N=100): <= 1.20x base decode time", 8, 100, 1.20),
)


GPU_GOALS = (
    ("DLP-LoRA N=26, batch 1, GPU: <= 1.15x base decode time", 1, 26, 1.15),
    ("DLP-LoRA N=100, batch 1, GPU: <= 1.2x base decode time", 1, 100, 1.2),
    ("DLP-LoRA N=26, batch 8 (8 mixtures), GPU: <= 1.15x base decode time", 8, 26, 1.15),
    ("DLP-LoRA N=100, batch 8 (8 mixtures), GPU: <= 1.2x base decode time", 8, 100, 1.2),
)


def evaluate_goals(rows: list[dict], device: str = "cpu") -> list[dict]:
    """The decode-time goals for ``device`` (CPU or GPU limits), checked against this run's paired
    ratios (a goal whose row was not measured is left out), plus MeteoRA's best form against DLP-LoRA."""
    by_key = {(r["variant"], r["batch"]): r for r in rows}
    goals = []
    for text, batch, n, limit in GPU_GOALS if device.startswith("cuda") else GOALS:
        row = by_key.get((f"dlp_N{n}", batch))
        if row:
            ratio = row["ratio_to_base"]["median"]
            goals.append({"goal": text, "measured": round(ratio, 4), "limit": limit, "met": ratio <= limit})
    for (name, batch), row in by_key.items():
        if not name.startswith("dlp_N"):  # the router variant is the same path plus one router call
            continue
        rivals = [r for r in rows if r["family"] == "meteora" and r["batch"] == batch
                  and r["n_adapters"] == row["n_adapters"]]
        if rivals:
            best = min(rivals, key=lambda r: r["decode_ms_per_token"]["median"])
            factor = best["decode_ms_per_token"]["median"] / row["decode_ms_per_token"]["median"]
            text = f"MeteoRA best form >= 2x {row['variant']} time (batch {batch})"
            goals.append({"goal": text, "measured": round(factor, 4), "limit": 2.0, "met": factor >= 2.0,
                          "best_form": best["form"]})
    return goals


def plot_scaling(result: dict, path: Path) -> Path:
    """Decode time ratio to base against N: one line per K (DLP-LoRA) and one for MeteoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scaling"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in sorted({r["k"] for r in rows if r["family"] == "dlp"}):
        pts = sorted((r["n_adapters"], r["ratio_to_base"]) for r in rows
                     if r["family"] == "dlp" and r["k"] == k)
        _errorline(ax, pts, label=f"DLP-LoRA, K={k}", marker="o")
    pts = sorted((r["n_adapters"], r["ratio_to_base"]) for r in rows if r["family"] == "meteora")
    _errorline(ax, pts, label="MeteoRA-style top-2 gating (op form)", marker="s", linestyle="--",
               color="black")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("adapters in the bank (N)")
    ax.set_ylabel("decode time / base model (median, IQR)")
    m, cfg = result["config"]["model"], result["config"]
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine.get('torch_threads')} thread(s)"
    ax.set_title(f"Llama h={m['hidden_size']} L={m['num_hidden_layers']} {cfg['dtype']}, batch 1, "
                 f"r={cfg['rank']}, {where}", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _errorline(ax, pts, **kwargs):
    xs = [n for n, _ in pts]
    meds = [r["median"] for _, r in pts]
    err = [[r["median"] - r["q1"] for _, r in pts], [r["q3"] - r["median"] for _, r in pts]]
    ax.errorbar(xs, meds, yerr=err, capsize=3, **kwargs)


def save_result(result: dict, out: Path | None, load_start) -> None:
    """Stamp the load average at the end and write ``result`` to ``out`` (if given) as JSON."""
    result["load_average"] = {"start": load_start, "end": load_average()}
    if out:  # whole or not at all: a run stopped mid-write keeps the previous file
        atomic_write_text(out, json.dumps(result, indent=1, default=str) + "\n")


def print_summary(result: dict) -> None:
    """The run's decode table and goals as plain text on stdout."""
    header = ("batch", "variant", "ms/token [IQR]", "tok/s", "x base", "x base (CPU time)", "x peft_single")
    rows = [header]
    for r in result["e2e"]:
        d = r["decode_ms_per_token"]
        rows.append((str(r["batch"]), r["variant"], f"{d['median']:.1f} [{d['iqr']:.1f}]",
                     f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_base']['median']:.3f}",
                     f"{r['cpu_time_ratio_to_base']['median']:.3f}",
                     f"{r['ratio_to_peft_single']['median']:.3f}" if "ratio_to_peft_single" in r else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("decode, ms/token (median [IQR]) and ratios (paired median; CPU-time ratio)")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for g in result["goals"]:
        print(f"{'MET ' if g['met'] else 'MISS'}  {g['goal']}: {g['measured']}")
