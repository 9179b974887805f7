"""Regenerate the benchmark tables of README.md and docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/make_readme_tables.py              # rewrite every table between its markers
    python benchmarks/make_readme_tables.py --print      # only print the tables

Each table replaces the text between ``<!-- BENCH:<name> -->`` and ``<!-- /BENCH:<name> -->`` in
whichever target file holds those markers (by default README.md and docs/benchmarks.md):

  headline   e2e_*.json (the full run) + demo*.json   README.md: the few ratios that matter
  ops        ops_*.json                 benchmarks/summarize_ops.py (kernel microbenchmarks)
  layer      layer_*.json               benchmarks/summarize_layer.py's compact bench_layer.py JSON
  e2e        e2e_*.json                 dlp-lora bench (dlp_lora/bench/harness.py)
  breakdown  decode_breakdown_*.json    dlp-lora bench --breakdown
  loraflow   loraflow_e2e_*.json        dlp-lora bench --loraflow (LoRA-Flow against DLP-LoRA)
  demo       demo*.json                 the composite-task demo (make demo)
  real_model real_model_*.json          SmolLM2-135M-Instruct end to end (make real-model)

Numbers in the docs come from here, never typed by hand. A result file that is missing leaves its
section untouched; a section whose markers no target holds is reported, and printed instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")


# ----------------------------------------------------------------------------- helpers

def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _rel(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _provenance(result: dict, path: Path) -> str:
    machine, versions = result.get("machine", {}), result.get("versions", {})
    where = machine.get("gpu") or machine.get("cpu", "?")
    count = machine.get("cpu_count") or machine.get("logical_cores")
    cores = f", {count} cores" if count else ""
    threads = machine.get("torch_threads") or "/".join(map(str, result.get("torch_threads_in_run") or []))
    if threads:
        cores += f", {threads} torch thread(s)"
    load, load_text = result.get("load_average"), ""
    if isinstance(load, dict) and load.get("start") and load.get("end"):
        load_text = f", load average {load['start'][0]} -> {load['end'][0]}"
    elif isinstance(result.get("load_during_run"), dict):
        during = result["load_during_run"]
        load_text = f", load average {during['loadavg_1min_min']:.1f}-{during['loadavg_1min_max']:.1f}"
    soft = ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "peft", "dlp_lora")
                     if k in versions)
    created = result.get("created") or str(result.get("datetime", ""))[:19]
    return f"_{where}{cores}{load_text}; {soft}; from `{_rel(path)}` ({created})._"


# ----------------------------------------------------------------------------- e2e (dlp-lora bench)

def render_e2e(path: Path) -> str:
    result = json.loads(path.read_text())
    cfg, model = result["config"], result["config"]["model"]
    parts = [
        f"**End-to-end greedy decode** ({_preset(result)}): Llama h={model['hidden_size']}, "
        f"{model['num_hidden_layers']} layers, {model['parameters'] / 1e6:.0f}M parameters, {cfg['dtype']}; "
        f"{cfg['prompt_len']}-token prompt, {cfg['new_tokens']} new tokens, r={cfg['rank']} on "
        f"{len(cfg['target_modules'])} projections; DLP-LoRA top_p={cfg['top_p']}, "
        f"max_loras={cfg['max_loras']}; "
        f"median of {cfg['reps']} interleaved rounds [IQR]. Ratios: median over rounds of the paired ratio."
        + (" **Compiled**: every variant decodes with a static KV cache and generate()'s automatic "
           "torch.compile (inductor, mode reduce-overhead)." if cfg.get("compile") else "")
        + (" **Incomplete run**: it stopped before the end (a time limit); only the batch sizes "
           f"{sorted({r['batch'] for r in result['e2e']})} were measured."
           if result.get("complete") is False else ""),
        "",
        _provenance(result, path),
        "",
    ]
    rows = []
    for r in result["e2e"]:
        d = r["decode_ms_per_token"]
        rows.append([r["batch"], r["variant"], r.get("n_adapters"), f"{d['median']:.2f} [{d['iqr']:.2f}]",
                     f"{r['tokens_per_s']:.1f}", _ratio(r, "base"), _ratio(r, "peft_single")])
    parts.append(md_table(["batch", "variant", "N", "decode ms/token", "tokens/s", "x base", "x PEFT single"],
                          rows))
    if result.get("goals"):
        parts += ["", md_table(["goal", "what it asks", "measured", "limit", "met"],
                               [[g["goal"], goal_in_words(g, cfg), g["measured"], g["limit"],
                                 "yes" if g["met"] else "**no**"] for g in result["goals"]])]
    if result.get("scaling"):
        parts += ["", _render_scaling(result)]
    if result.get("arguments"):
        parts += ["", f"Rerun: `{rerun_command(result['arguments'])}`"]
    return "\n".join(parts)


def goal_in_words(goal: dict, config: dict) -> str:
    """A goal of dlp_lora/bench/harness.py's evaluate_goals, said in words (its N, batch and limit
    are read from the goal itself)."""
    text, limit = goal["goal"], goal["limit"]
    if text.startswith("MeteoRA"):
        match = re.search(r"dlp_N(\d+) time \(batch (\d+)\)", text)
        n, batch = match.groups() if match else ("N", "?")
        return (f"token-level gating (a MeteoRA-style gate at every module and token, its fastest form) "
                f"takes at least {limit:g}x DLP-LoRA's decode time per token (the project's goal for "
                f"routing once per sentence); "
                f"bank of {_adapters(n)}, batch {batch}; measured = MeteoRA time / DLP-LoRA time")
    n_match, batch_match = re.search(r"N=(\d+)", text), re.search(r"batch (\d+)", text)
    if not (text.startswith("DLP-LoRA") and n_match and batch_match):
        return text
    n, batch = int(n_match.group(1)), int(batch_match.group(1))
    k = min(config.get("max_loras") or n, n)
    who = ("one sequence" if batch == 1
           else f"{batch} sequences decoded together, each with its own mixture,")
    return (f"{who} fusing {k} of a bank of {_adapters(n)} decodes at most {(limit - 1) * 100:.0f}% "
            "slower per token than the base model without adapters")


def _adapters(n) -> str:
    return f"{n} adapter" + ("" if str(n) == "1" else "s")


def rerun_command(arguments: dict) -> str:
    """The `dlp-lora bench` command line that a result file's recorded arguments came from."""
    words = ["dlp-lora bench"]
    for key, value in arguments.items():
        if key in ("cache_dir", "seed") or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is False:
            if key == "scaling":
                words.append("--no-scaling")
        elif isinstance(value, list):
            words.append(f"{flag} " + " ".join(map(str, value)))
        else:
            words.append(f"{flag} {value}")
    return " ".join(words)


def _preset(result: dict) -> str:
    """'full preset', or what a run changed: files written before bench.py named edited runs say only
    'short' in their config, so the recorded command-line arguments are checked too."""
    cfg, args = result["config"], result.get("arguments", {})
    if "+" in cfg["preset"]:
        return f"preset {cfg['preset']}"
    if args.get("full"):
        return f"{cfg['preset']} preset"
    edited = {"batch sizes": args.get("batch_sizes"), "N": args.get("adapters"),
              "MeteoRA forms": args.get("forms"), "rounds": args.get("reps"),
              "new tokens": args.get("new_tokens")}
    edited = {k: v for k, v in edited.items() if v is not None}
    if not edited:
        return f"{cfg['preset']} preset"
    return f"{cfg['preset']} preset, edited: " + ", ".join(f"{k} {v}" for k, v in edited.items())


def _ratio(row: dict, ref: str, label: str = "ratio_to") -> str:
    q = row.get(f"{label}_{ref}")
    return f"{q['median']:.3f} [{q['iqr']:.3f}]" if q else "-"


def _render_scaling(result: dict) -> str:
    rows = result["scaling"]
    ns = sorted({r["n_adapters"] for r in rows})
    labels = [(f"DLP-LoRA K={k}", lambda r, k=k: r["family"] == "dlp" and r["k"] == k)
              for k in sorted({r["k"] for r in rows if r["family"] == "dlp"})]
    labels.append(("MeteoRA top-2 (op form)", lambda r: r["family"] == "meteora"))
    table = []
    for label, match in labels:
        by_n = {r["n_adapters"]: r for r in rows if match(r)}
        table.append([label] + [f"{by_n[n]['ratio_to_base']['median']:.3f}" if n in by_n else "-"
                                for n in ns])
    out = ["**Scaling** (batch 1, decode time / base model, median): adapters in the bank N across, "
           "adapters mixed per sequence K down.", "", md_table(["", *[f"N={n}" for n in ns]], table)]
    if result.get("plot"):
        # this section lives in docs/benchmarks.md: the link is relative to docs/
        out += ["", f"![decode time ratio against N](../{_rel(result['plot'])})"]
    return "\n".join(out)


# ----------------------------------------------------------------------------- decode breakdown

def render_breakdown(path: Path) -> str:
    """dlp-lora bench --breakdown: one batch-1 decode step per variant, measured and modelled."""
    result = json.loads(path.read_text())
    cfg, model = result["config"], result["config"]["model"]
    on_gpu = any("device_ms" in r["profile_per_decode_step"] for r in result["breakdown"])
    rows = []
    for r in result["breakdown"]:
        d, w, prof = r["decode_ms_per_token"], r["weights_mb_per_token"], r["profile_per_decode_step"]
        cpu = prof["cpu_ms"]
        row = [r["variant"], r.get("n_adapters"), f"{d['median']:.2f} [{d['iqr']:.2f}]", _ratio(r, "base"),
               f"{w['total_mb']:.1f}", f"{w['ratio_to_base']:.3f}", f"{prof['calls']:.0f}",
               *(f"{cpu[c]:.2f}" for c in ("matmul", "lora_op", "attention", "other", "outside_ops"))]
        if on_gpu:
            gpu = prof["device_ms"]
            row += [f"{prof['kernels']:.0f}", f"{gpu['lora_op']:.3f}", f"{gpu['total']:.2f}"]
        rows.append(row)
    header = ["variant", "N", "decode ms/token", "x base", "weights MB read/token", "x base (weights)",
              "op calls/step", "matmul ms", "LoRA op ms", "attention ms", "other ops ms", "outside ops ms"]
    if on_gpu:
        header += ["GPU kernels/step", "LoRA kernels ms", "GPU kernel ms"]
    dlp_ks = "/".join(str(k) for k in sorted({r["k"] for r in result["breakdown"] if r["family"] == "dlp"}))
    head = (f"**One decode step, broken down** (`dlp-lora bench --breakdown`, batch 1): Llama "
            f"h={model['hidden_size']}, {model['num_hidden_layers']} layers, {cfg['dtype']}, r={cfg['rank']} "
            f"on {len(cfg['target_modules'])} projections, DLP-LoRA K={dlp_ks}, "
            f"MeteoRA top-2. Decode ms/token and x base: unprofiled, median of {cfg['reps']} interleaved "
            "rounds [IQR], paired ratios. Weights read: the base Linears plus the adapters (and MeteoRA "
            "gates) one step touches, a model of the bytes, not a measurement. Columns 'matmul ms' to "
            "'outside ops ms': "
            "torch.profiler self time per decode step (difference of two generate() lengths, so no "
            "prefill; median of the profiled rounds), by operator category; 'outside ops' is the "
            "profiled step's wall time in no operator (Python: generate(), module calls, gating code). "
            "The profiler adds its own cost to every operator call, so compare these columns with "
            "each other, not with the unprofiled decode time.")
    parts = [head, "", _provenance(result, path), "", md_table(header, rows)]
    if result.get("arguments"):
        parts += ["", f"Rerun: `{rerun_command(result['arguments'])}`"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- layer (pytest-benchmark)

def render_layer(path: Path) -> str:
    """One adapted Linear (benchmarks/summarize_layer.py's file): every variant's median and its ratios
    to the bare Linear and, for the MeteoRA forms, to DLP-LoRA with the same bank."""
    raw = json.loads(path.read_text())
    benches = raw.get("benchmarks", [])

    def n_adapters(b):  # base and PEFT do not depend on the bank size: measured once, shown as "-"
        variant = b["extra_info"].get("variant", "")
        return None if variant == "base" or variant.startswith("peft") else b["extra_info"].get("n_adapters")

    rows = []
    order = lambda b: (b["group"], n_adapters(b) or 0, b["stats"]["median"])
    for b in sorted(benches, key=order):
        stats = b["stats"]
        rows.append([b["group"], b["extra_info"].get("variant"), n_adapters(b),
                     f"{stats['median'] * 1e6:.1f} [{stats['iqr'] * 1e6:.1f}]",
                     f"{b['x_base']:.2f}" if "x_base" in b else "-",
                     f"{b['x_dlp']:.2f}" if "x_dlp" in b else ""])
    machine = raw.get("machine_info", {})
    threads = {b["extra_info"].get("threads") for b in benches} - {None}
    head = (f"**One adapted Linear** (benchmarks/bench_layer.py): median µs [IQR], r=8; x dlp = MeteoRA "
            f"form / DLP-LoRA with the same N; "
            f"_{machine.get('cpu', {}).get('brand_raw', machine.get('processor', ''))}, "
            f"{'/'.join(map(str, sorted(threads))) or '?'} torch thread(s), "
            f"torch {raw.get('versions', {}).get('torch')}, "
            f"from `{_rel(path)}` ({raw.get('datetime', '')[:19]})._")
    return "\n".join([head, "", md_table(["case", "variant", "N", "µs", "x base", "x dlp"], rows)])


# ----------------------------------------------------------------------------- ops (summarize_ops.py)

def render_ops(path: Path) -> str:
    """The kernel microbenchmarks: cpp against the better of the per-adapter loop and gather+bmm."""
    data = json.loads(path.read_text())
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        return render_rows(path, "Kernel microbenchmarks")
    rows = []
    for s in shapes:
        impls, best = s["impls"], s.get("best_baseline")
        cpp, base = impls.get("cpp", {}), impls.get(best, {})
        rows.append([s["phase"], s["dtype"], s["T"], s["S"], s["N"], s["K"], s["r"],
                     f"{s['d_in']}x{s['d_out']}", _us(cpp), f"{_us(base)} ({best})",
                     f"{s['speedup_vs_best_baseline']:.2f}",
                     f"{s['goal_speedup']:.2f}", "yes" if s["meets_goal"] else "**no**",
                     f"{s['roofline']['bytes'] / 1e6:.2f}", f"{cpp.get('achieved_GBps', 0):.1f}"])
    header = ["phase", "dtype", "T", "S", "N", "K", "r", "d_in x d_out", "cpp µs", "best baseline µs",
              "speedup", "goal", "met", "MB moved", "cpp GB/s"]
    what = data.get("what", "multi-LoRA op")
    goals = data.get("summary", {}).get("goals", {})
    goal_text = "; ".join(f"{phase}: the cpp backend {_ops_goal_in_words(rule)}"
                          for phase, rule in goals.items())
    head = (f"**Kernel microbenchmarks**: {what}; median [IQR] over pytest-benchmark rounds. "
            "speedup = best baseline time / cpp time; "
            + (f"goal, per phase: {goal_text}." if goal_text else "goal: the speedup it must reach."))
    return "\n".join([head, "", _provenance(data, path), "", md_table(header, rows)])


def _ops_goal_in_words(rule: str) -> str:
    """summarize_ops.py's goal strings ('>= 2x vs the better baseline', 'within 1.3x (...)') in words."""
    if rule.startswith(">="):
        return f"at least {rule[2:].strip().split('x')[0]}x faster than the better baseline"
    if rule.startswith("within"):
        factor = rule.split()[1]
        detail = rule[len("within " + factor):].strip(" ()")
        return f"at most {factor} slower than the better baseline ({detail})"
    return rule


def _us(timing: dict) -> str:
    if not timing:
        return "-"
    return f"{timing['median_us']:.1f} [{timing['iqr_us']:.1f}]"


# ----------------------------------------------------------------------------- demo / other files

def render_rows(path: Path, title: str) -> str:
    """A table of every flat row in a result file: its ``rows`` / ``results`` list (or the list itself)."""
    data = json.loads(path.read_text())
    keys = ("rows", "results", "table", "cases", "benchmarks")
    rows = data if isinstance(data, list) else next(
        (data[k] for k in keys if isinstance(data.get(k), list)), [])
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return f"_{title}: no rows found in `{_rel(path)}`._"
    header: list[str] = []
    for r in rows:
        header += [k for k, v in r.items() if k not in header and not isinstance(v, (dict, list))]
    parts = [f"**{title}**", ""]
    if isinstance(data, dict):
        parts += [_provenance(data, path), ""]
    parts.append(md_table(header, [[r.get(k) for k in header] for r in rows]))
    return "\n".join(parts)


def render_demo(path: Path) -> str:
    """The composite-K table of `make demo`: exact match per task and method, router accuracy, and
    decode time per token as a ratio to base (measured over the whole shuffled composite, so it is
    given once, on the average row)."""
    from dlp_lora.demo.evaluate import METHOD_TITLES as titles
    from dlp_lora.demo.evaluate import METHODS

    data = json.loads(path.read_text())
    # files written before LoRA-Flow joined the demo hold no "methods"
    methods = data.get("methods") or [m for m in METHODS if m in data.get("decode_ratio_to_base", {})]
    header = ["task", "n", *(f"{titles[m]} EM %" for m in methods), "router acc %",
              *(f"{titles[m]} decode time" for m in methods)]
    rows = []
    for row in data["rows"]:
        average = row["task"] == "average"
        times = [f"{data['decode_ratio_to_base'][m]:.2f}x" if average else "" for m in methods]
        cells = [row["task"], row["n"], *(f"{row[m]:.1f}" for m in methods), f"{row['router']:.1f}", *times]
        rows.append([f"**{c}**" if average and c != "" else c for c in cells])
    recipe, seconds = data.get("recipe", {}), data.get("seconds", {})
    # this run's build times; a run on cached artifacts reports the times of the run that built them
    built = {k: v for k, v in seconds.get("build", {}).items() if v is not None}
    first = seconds.get("first_build") or {}
    steps = built or first
    setup = (("artifacts built in " if built else "artifacts cached, first built in ")
             + f"{sum(steps.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items()) + ")"
             ) if steps else "artifacts cached"
    head = (f"**Composite-{len(data['tasks'])} demo** (`make demo`): shuffled prompts of every task, greedy "
            f"decoding, exact match; DLP-LoRA = router + top-p {data.get('top_p')} fusion "
            f"({data.get('dlp_adapters_per_prompt', 0):.2f} adapters per prompt on average). "
            + _demo_loraflow_caption(data.get("loraflow"))
            + f"Char-level Llama, hidden {recipe.get('hidden_size')}, rank-{recipe.get('lora_rank')} LoRAs; "
            f"{setup}, evaluation {seconds.get('evaluation', 0):.0f} s.")
    return "\n".join([head, "", _provenance(data, path), "", md_table(header, rows)])


def _demo_loraflow_caption(flow: dict | None) -> str:
    if not flow:
        return ""
    text = (f"LoRA-Flow = a gate per decoder layer weighting all {len(flow['candidates'])} task adapters "
            f"at every token, trained ({flow['epochs']} epochs, lr {flow['lr']:g}, batch "
            f"{flow['batch_size']}) on {flow['examples_per_task']} examples per task with the base and the "
            f"adapters frozen. ")
    ceilings = flow.get("ceilings")
    if ceilings:
        text += (f"Its ceilings, through the same gated path with fixed weights: each prompt's own adapter "
                 f"at every layer {100 * ceilings['oracle_weights']:.1f}%, the same with the first layer's "
                 f"gate left uniform {100 * ceilings['oracle_weights_except_layer0']:.1f}%, a uniform "
                 f"1/{len(flow['candidates'])} mixture {100 * ceilings['uniform']:.1f}%. The first layer's "
                 "gate reads only the current character's embedding, which does not say which task the "
                 "prompt is, so on this 4-layer character model even perfect gates on the later layers are "
                 "capped there: the method is measured where it cannot work (see the real model below). ")
    return text


# ----------------------------------------------------------------------------- real model (make real-model)

REAL_METHODS = {"base": "base", "oracle": "oracle LoRA", "dlp_lora": "DLP-LoRA"}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def render_real_model(path: Path) -> str:
    """SmolLM2-135M-Instruct: composite, fusion, LoRA-Flow and speed, each from the stage that ran;
    a run whose stages are not all done says so first."""
    data = json.loads(path.read_text())
    stages, recipe = data.get("stages", {}), data.get("recipe", {})
    prov = dict(data, created=data.get("started"),
                load_average={"start": data.get("load_average_start"), "end": data.get("load_average_end")})
    missing = [s for s in ("composite", "fusion", "speed", "loraflow") if s not in stages]
    parts = []
    if missing:
        parts.append(f"**Partial run**: not run yet: {', '.join(missing)} (`make real-model` resumes from "
                     "its cache).")
    adapters = stages.get("adapters", {})
    budget = ", ".join(f"{t} {a['steps']} steps / {a['seconds']:.0f} s" for t, a in adapters.items())
    parts.append(f"**SmolLM2-135M-Instruct** (`make real-model`): {len(adapters)} "
                 f"rank-{recipe.get('lora_rank')} PEFT LoRAs on {', '.join(recipe.get('lora_targets', []))} "
                 "(at most "
                 f"{recipe.get('adapter_steps')} steps of {recipe.get('adapter_batch')}, stopped once "
                 f"{100 * recipe.get('adapter_target', 0):.0f}% of fresh samples were exact: {budget}); "
                 f"prompts in the chat template, greedy decoding, exact match; DLP-LoRA = router + top-p "
                 f"{recipe.get('top_p')} (at most {recipe.get('max_loras')} adapters).")
    parts.append(_provenance(prov, path))
    seconds = data.get("stage_seconds")
    if seconds:
        untimed = [u for u, s in stages.get("loraflow", {}).get("unit_seconds", {}).items() if s is None]
        total = "Run time from scratch" if not untimed else "Time of the stages as computed"
        parts.append(f"{total}: {sum(seconds.values()) / 60:.0f} min ("
                     + ", ".join(f"{stage} {s / 60:.1f} min" for stage, s in seconds.items())
                     + "); each stage's figure is from the run that computed it"
                     + (f", and LoRA-Flow's counts only its units with a recorded time (not: "
                        f"{', '.join(untimed)})" if untimed else "") + ".")
    composite = stages.get("composite")
    if composite:
        tasks = list(next(iter(composite["methods"].values()))["per_task"])
        rows = [[REAL_METHODS.get(m, m), _pct(r["exact_match"]), *(_pct(r["per_task"][t]) for t in tasks)]
                for m, r in composite["methods"].items()]
        flow = stages.get("loraflow", {}).get("composite")
        if flow:
            spread = _pct(flow["exact_match"]["stdev"])
            rows.append([f"LoRA-Flow (mean of {len(flow['runs'])} seeds, sd {spread})",
                         _pct(flow["exact_match"]["mean"]), *([""] * len(tasks))])
            for key, title in (("oracle_weights", "LoRA-Flow path, oracle weights (ceiling)"),
                               ("oracle_weights_except_layer0", "LoRA-Flow path, oracle weights but layer 0 "
                                                                "uniform"),
                               ("uniform", "LoRA-Flow path, uniform weights")):
                rows.append([title, _pct(flow["ceilings"][key]), *([""] * len(tasks))])
        parts += [f"Composite: {composite['prompts']} shuffled prompts of {len(tasks)} tasks; router "
                  f"accuracy {_pct(composite['router_accuracy'])}%.",
                  md_table(["method", "EM %", *(f"{t} %" for t in tasks)], rows)]
    fusion = stages.get("fusion")
    if fusion:
        parts += _real_fusion(fusion, stages.get("loraflow", {}).get("fusion"))
    speed = stages.get("speed")
    if speed:
        rows = [[r["variant"], f"{r['decode_ms_per_token']['median']:.1f}", _ratio(r, "base"),
                 _ratio(r, "peft_single")] for r in speed["rows"]]
        load = speed.get("load_average_start"), speed.get("load_average_end")
        parts += [f"Speed: batch 1, greedy, {speed['new_tokens']} new tokens, eager, {speed['threads']} "
                  f"thread, {speed['rounds']} interleaved rounds, prompt {speed['prompt_tokens']} tokens, "
                  f"{speed['patched_modules']} patched modules; load average {load[0] and load[0][0]} -> "
                  f"{load[1] and load[1][0]} (ratios are paired per round).",
                  md_table(["variant", "decode ms/token", "x base [IQR]", "x PEFT one adapter [IQR]"], rows)]
        profiled = [r for r in speed["rows"] if "profile_per_decode_step" in r]
        if profiled:
            rounds = profiled[0]["profile_per_decode_step"]["rounds"]
            parts += ["Where a decode step's time goes (torch.profiler, one step without the prefill, "
                      f"median of {rounds} interleaved rounds; self time in ms by operator category, and "
                      "the step's wall time outside any operator: Python, module calls, routing; the "
                      "profiler's own cost is in it, so the timed rounds above are the speed):",
                      md_table(["variant", "operator calls", *PROFILE_COLUMNS, "wall"],
                               [_profile_row(r["variant"], r["profile_per_decode_step"]) for r in profiled])]
        exact = speed.get("exactness")
        if exact:
            scale = exact["logits_scale"]
            peft, dlp = exact["peft_fp32_vs_fp64"], exact["dlp_fp32_vs_fp64"]
            parts.append(f"Exactness, one adapter in float32 against PEFT in float64 (logits up to "
                         f"{scale:.1f}): PEFT {peft:.1e} ({peft / scale:.1e} of the scale), DLP-LoRA "
                         f"{dlp:.1e} ({dlp / scale:.1e}); DLP-LoRA vs PEFT in float32 "
                         f"{exact['dlp_vs_peft_fp32']:.1e}.")
    return "\n\n".join(p for p in parts if p)


PROFILE_COLUMNS = ("matmul", "attention", "lora_op", "other", "outside_ops")
FUSION_METHODS = {"base": "base model", "fixed_50_50": "fixed mixture, 1/2 each",
                  "fixed_sum": "fixed mixture, 1 each", "dlp_lora": "DLP-LoRA (router + top-p)",
                  "composite_lora_ceiling": "a LoRA trained on the skill itself (ceiling)"}


def _profile_row(variant: str, profile: dict) -> list[str]:
    return [variant, f"{profile['calls']:.0f}", *(f"{profile['cpu_ms'][c]:.2f}" for c in PROFILE_COLUMNS),
            f"{profile['wall_ms']:.2f}"]


def _real_fusion(fusion: dict, flow: dict | None) -> list[str]:
    """The fusion stage's caption and table (the two skills are read off its only_<adapter> methods)."""
    needed = [m.removeprefix("only_") for m in fusion["methods"] if m.startswith("only_")]
    def title(method: str) -> str:
        if method.startswith("only_"):
            return f"the {method.removeprefix('only_')} adapter alone"
        return FUSION_METHODS.get(method, method)

    rows = [[title(m), _pct(r["exact_match"])] for m, r in fusion["methods"].items()]
    if flow:
        seeds = ", ".join(_pct(r["exact_match"]) for r in flow["runs"])
        rows.append([f"LoRA-Flow gates over {' and '.join(flow['candidates'])}, trained on "
                     f"{flow['train_examples']} examples of the skill (mean of {len(flow['runs'])} seeds, sd "
                     f"{_pct(flow['exact_match']['stdev'])}; seeds {seeds})",
                     _pct(flow["exact_match"]["mean"])])
        rows.append(["LoRA-Flow path, uniform weights", _pct(flow["uniform_ceiling"]["exact_match"])])
    k = ", ".join(f"K={k}: {n}" for k, n in fusion["k_distribution"].items())
    routed = ", ".join(f"{s}: {n}" for s, n in fusion.get("routed_sets", {}).items())
    return [f"Fusion: {fusion['prompts']} prompts that need two skills in one answer (the "
            f"{' and '.join(needed)} adapters); adapters top-p keeps per prompt: {k} ({routed}).",
            md_table(["method", "EM %"], rows)]


# ----------------------------------------------------------------------------- LoRA-Flow (bench --loraflow)

LORAFLOW_FAMILIES = ("base", "peft", "dlp", "meteora", "loraflow")


def render_loraflow(path: Path) -> str:
    """LoRA-Flow-style fusion (K of N adapters, a gate per decoder layer, token-level weights) beside
    DLP-LoRA at the same N, in one interleaved run: decode time, and paired ratios to base and to
    dlp_N (DLP-LoRA, K=max_loras per sequence)."""
    result = json.loads(path.read_text())
    cfg, model = result["config"], result["config"]["model"]
    head = (f"**LoRA-Flow against DLP-LoRA, end to end** ({_preset(result)}): "
            f"Llama h={model['hidden_size']}, {model['num_hidden_layers']} layers, "
            f"{model['parameters'] / 1e6:.0f}M parameters, {cfg['dtype']}; "
            f"{cfg['prompt_len']}-token prompt, {cfg['new_tokens']} new tokens, r={cfg['rank']} on "
            f"{len(cfg['target_modules'])} projections; median of {cfg['reps']} interleaved rounds [IQR]. "
            f"`loraflow_<form>_k<K>_N<N>`: a random gate per decoder layer weights adapters 0..K-1 at every "
            f"token (form `loop`: plain torch, one pass per adapter; `op`: our op, one segment per token); "
            f"`dlp_N<N>`: every sequence its own mixture of {cfg['max_loras']} adapters, fixed per sequence. "
            f"x DLP-LoRA: median over rounds of the paired ratio to `dlp_N<N>` at the same batch; "
            f"(CPU time): the same ratio of process CPU time, which a descheduled round disturbs less "
            f"than wall time on a busy machine.")
    rows = []
    for r in result["e2e"]:
        if r["family"] not in LORAFLOW_FAMILIES or (r["family"] == "peft" and r["variant"] != "peft_single"):
            continue
        d, n = r["decode_ms_per_token"], r.get("n_adapters")
        gated = r["family"] in ("meteora", "loraflow")
        dlp = _ratio(r, f"dlp_N{n}") if gated else "-"
        dlp_cpu = _ratio(r, f"dlp_N{n}", "cpu_time_ratio_to") if gated else "-"
        rows.append([r["batch"], r["variant"], n, r.get("k"), f"{d['median']:.2f} [{d['iqr']:.2f}]",
                     f"{r['tokens_per_s']:.1f}", _ratio(r, "base"), dlp, dlp_cpu])
    header = ["batch", "variant", "N", "K", "decode ms/token", "tokens/s", "x base", "x DLP-LoRA",
              "x DLP-LoRA (CPU time)"]
    parts = [head, "", _provenance(result, path), "", md_table(header, rows)]
    if result.get("arguments"):
        parts += ["", f"Rerun: `{rerun_command(result['arguments'])}`"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- headline (README)

def render_serve(path: Path) -> str:
    """benchmarks/bench_serve.py: serial, static and continuous batching, closed and open loop."""
    result = json.loads(path.read_text())
    lines = ["| mode | max batch | load | tokens/s | requests/s | TTFT p50 / p95 / p99 s "
             "| latency p50 / p95 / p99 s | requests by batch size | errors |",
             "|---|---:|---|---:|---:|---|---|---|---:|"]
    for r in result["rows"]:
        ttft, lat = r["ttft_s"], r["latency_s"]
        load = f"{r['clients']} clients" if r["load"] == "closed" else f"Poisson {r['rate_per_s']}/s"
        load += f", round {r['round']}" if r.get("round") else ""
        sizes = ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items())
        quantiles = [" / ".join(f"{q[k]:.2f}" for k in ("p50", "p95", "p99")) for q in (ttft, lat)]
        lines.append(f"| {r['mode']} | {r['max_batch_size']} | {load} | {r['tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {quantiles[0]} | {quantiles[1]} | {sizes} | "
                     f"{len(r['errors'])} |")
    machine, v, c = result["machine"], result["versions"], result["config"]
    load = result["load_average"]
    lines += ["", f"{c['model_parameters'] / 1e6:.0f}M-parameter Llama, {c['dtype']}, "
              f"{c['adapters']} adapters, max_tokens drawn from {c['max_tokens_choices']}, "
              f"{c['prompt_words']}-word prompts, {c['requests_per_client']} requests per client, "
              f"{c['poisson_requests']} per Poisson rate, 1 replica, {c['threads']} torch thread(s); "
              f"{machine['cpu']} ({machine['cpu_count']} cores); torch {v['torch']}, ray {c['ray']}; "
              f"load average {load['start']} -> {load['end']}; {result['created']}."]
    for goal in result["goals"]:
        figures = (f"{goal['ratio']}x" if "ratio" in goal
                   else f"p99 TTFT {goal['p99_ttft_s']} s (static, continuous)")
        if goal.get("per_round"):
            figures += f" (median over rounds; per round {goal['per_round']})"
        lines.append(f"- {goal['goal']}: {figures}: {'met' if goal['met'] else 'missed'}")
    rerun = f"nice python benchmarks/bench_serve.py --out {_rel(path)}"
    lines += ["", f"_From `{_rel(path)}`; rerun: `{rerun}`._"]
    return "\n".join(lines) + "\n"




def render_headline(results_dir: Path) -> str | None:
    """README's one table: DLP-LoRA's decode time against the base model, PEFT and token-level gating
    (batch 1, from the full end-to-end run) and the demo's accuracy, each beside its goal in words."""
    e2e_path, demo_path = _headline_files(results_dir)
    if e2e_path is None and demo_path is None and not any(results_dir.glob("serve_*.json")) and not any(
            results_dir.glob("real_model_*.json")):
        return None
    rows, sources = [], []
    if e2e_path is not None:
        result = json.loads(e2e_path.read_text())
        by_variant = {r["variant"]: r for r in result["e2e"] if r["batch"] == 1}
        goals = result.get("goals", [])
        k = result["config"].get("max_loras")
        ns = sorted(r["n_adapters"] for r in by_variant.values() if r["family"] == "dlp"
                    and r["variant"] == f"dlp_N{r['n_adapters']}" and r["n_adapters"] > 1)

        def goal_for(prefix: str, suffix: str = "") -> dict | None:
            return next((g for g in goals
                         if g["goal"].startswith(prefix) and g["goal"].endswith(suffix)), None)

        for n in ns:
            goal = goal_for(f"DLP-LoRA N={n}, batch 1")
            rows.append([f"DLP-LoRA decode time / base model; {k} of {_adapters(n)} fused",
                         f"at most {(goal['limit'] - 1) * 100:.0f}% slower than the model without adapters"
                         if goal else "no goal set",
                         _headline_ratio(by_variant[f"dlp_N{n}"], "base"), _met(goal)])
        for n in ns:
            rows.append([f"DLP-LoRA decode time / PEFT serving one adapter; {k} of {_adapters(n)} fused",
                         "no goal set: what mixing costs over plain single-adapter LoRA",
                         _headline_ratio(by_variant[f"dlp_N{n}"], "peft_single"), "-"])
        for n in ns:
            goal = goal_for("MeteoRA", f"dlp_N{n} time (batch 1)")
            if goal:
                rows.append([f"token-level gating (MeteoRA-style, best form) / DLP-LoRA decode time; "
                             f"{_adapters(n)}",
                             f"at least {goal['limit']:g}x: the project's goal for routing once per sentence "
                             "instead of at every token and module",
                             f"{goal['measured']:.2f}x", _met(goal)])
        sources.append(f"`{_rel(e2e_path)}` ({_machine(result)}, batch 1)")
    if demo_path is not None:
        demo = json.loads(demo_path.read_text())
        average = next(r for r in demo["rows"] if r["task"] == "average")
        rows.append([f"`make demo`: exact match of DLP-LoRA (router + top-p) over {average['n']} prompts of "
                     f"{len(demo['tasks'])} tasks",
                     "as good as the oracle, which gives every prompt its own task's adapter",
                     f"{average['dlp']:.1f}% (oracle {average['oracle']:.1f}%, base {average['base']:.1f}%, "
                     + (f"LoRA-Flow {average['loraflow']:.1f}%, " if "loraflow" in average else "")
                     + f"router accuracy {average['router']:.1f}%)",
                     "yes" if average["dlp"] >= average["oracle"] else "**no**"])
        sources.append(f"`{_rel(demo_path)}` ({_machine(demo)})")
    real_path = next(iter(_result_files(results_dir, "real_model_*.json")), None)
    if real_path is not None:
        real = json.loads(real_path.read_text())
        rows += _real_model_headline(real)
        sources.append(f"`{_rel(real_path)}` ({_machine(real)}"
                       + ("" if real.get("complete") else ", a partial run") + ")")
    serve_path = next(iter(sorted(results_dir.glob("serve_cpu*.json"))), None)
    if serve_path is not None:
        served = json.loads(serve_path.read_text())
        for goal in served["goals"]:
            measured = (f"{goal['ratio']:.2f}x" if "ratio" in goal
                        else "p99 {:.2f} s -> {:.2f} s".format(*goal["p99_ttft_s"]))
            rows.append(["`dlp-lora serve`, mixed max_tokens, each request its own routed mixture",
                         goal["goal"], measured, _met(goal)])
        sources.append(f"`{_rel(serve_path)}` ({served['machine'].get('cpu', '?')}, "
                       f"{served['config']['threads']} torch thread(s) per replica, "
                       f"load {served['load_average']['start'][0]})")
    note = ("_Ratios: median over interleaved rounds of the paired ratio [IQR]. From "
            + " and ".join(sources) + "; every table: [docs/benchmarks.md](docs/benchmarks.md)._")
    return "\n".join([md_table(["what", "goal", "measured", "met"], rows), "", note])


def _real_model_headline(real: dict) -> list[list[str]]:
    """SmolLM2's rows: DLP-LoRA's decode time over the task adapters, and the composite's accuracy."""
    rows, stages = [], real.get("stages", {})
    speed = stages.get("speed")
    if speed:
        row = next(r for r in speed["rows"] if r["variant"] == "dlp_tasks_K3")
        ratio = row["ratio_to_base"]["median"]
        rows.append(["SmolLM2-135M-Instruct (`make real-model`): DLP-LoRA decode time / base model; 3 of "
                     f"its 6 task adapters fused, {speed['patched_modules']} patched modules",
                     "at most 10% slower than the model without adapters", _headline_ratio(row, "base"),
                     "yes" if ratio <= 1.10 else "**no**"])
    composite = stages.get("composite")
    if composite:
        methods = composite["methods"]
        rows.append([f"SmolLM2-135M-Instruct: exact match of DLP-LoRA over {composite['prompts']} prompts of "
                     f"{len(methods['base']['per_task'])} tasks",
                     "as good as the oracle, which gives every prompt its own task's adapter",
                     f"{_pct(methods['dlp_lora']['exact_match'])}% (oracle "
                     f"{_pct(methods['oracle']['exact_match'])}%, "
                     f"base {_pct(methods['base']['exact_match'])}%, "
                     f"router accuracy {_pct(composite['router_accuracy'])}%)",
                     "yes" if methods["dlp_lora"]["exact_match"] >= methods["oracle"]["exact_match"]
                     else "**no**"])
    fusion, flow = stages.get("fusion"), stages.get("loraflow", {}).get("fusion")
    if fusion and flow:
        methods = fusion["methods"]
        needed = " + ".join(m.removeprefix("only_") for m in methods if m.startswith("only_"))
        dlp, gates = methods["dlp_lora"]["exact_match"], flow["exact_match"]["mean"]
        rows.append([f"SmolLM2-135M-Instruct fusion: exact match of DLP-LoRA over {fusion['prompts']} "
                     f"prompts that need two adapters in one answer ({needed})",
                     "as good as LoRA-Flow trained on that skill (its home ground)",
                     f"{_pct(dlp)}% (LoRA-Flow {_pct(gates)}%, fixed 1/2 each "
                     f"{_pct(methods['fixed_50_50']['exact_match'])}%, a LoRA trained on the skill "
                     f"{_pct(methods['composite_lora_ceiling']['exact_match'])}%)",
                     "yes" if dlp >= gates else "**no**"])
    return rows


def _headline_files(results_dir: Path) -> tuple[Path | None, Path | None]:
    """The full-preset end-to-end run (else the first e2e file) and the first demo file."""
    e2e = _result_files(results_dir, "e2e_*.json")
    full = [p for p in e2e if json.loads(p.read_text()).get("config", {}).get("preset") == "full"]
    demo = _result_files(results_dir, "demo*.json")
    return (full or e2e or [None])[0], (demo or [None])[0]


def _headline_ratio(row: dict, ref: str) -> str:
    q = row.get(f"ratio_to_{ref}")
    return f"{q['median']:.2f}x [{q['iqr']:.2f}]" if q else "-"


def _met(goal: dict | None) -> str:
    if goal is None:
        return "-"
    return "yes" if goal["met"] else "**no**"


def _machine(result: dict) -> str:
    machine = result.get("machine", {})
    where = machine.get("gpu") or machine.get("cpu", "?")
    threads = machine.get("torch_threads")
    return where + (f", {threads} torch thread(s)" if threads else "")


# ----------------------------------------------------------------------------- sections and markers

SECTIONS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "ops": ("ops_*.json", render_ops),
    "layer": ("layer_*.json", render_layer),
    "e2e": ("e2e_*.json", render_e2e),
    "breakdown": ("decode_breakdown_*.json", render_breakdown),
    "loraflow": ("loraflow_e2e_*.json", render_loraflow),
    "demo": ("demo*.json", render_demo),
    "serve": ("serve_cpu*.json", render_serve),  # serve_hostile_*.json is the load test's, not this table's
    "real_model": ("real_model_*.json", render_real_model),
}


def _result_files(results_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in results_dir.glob(pattern) if not p.name.endswith("_raw.json"))


def build_tables(results_dir: Path) -> dict[str, str]:
    """Section name -> markdown, for every section that has at least one result file."""
    tables = {}
    headline = render_headline(results_dir)
    if headline is not None:
        tables["headline"] = headline
    for name, (pattern, render) in SECTIONS.items():
        files = _result_files(results_dir, pattern)
        if files:
            tables[name] = "\n\n".join(render(p) for p in files)
    return tables


def replace_section(text: str, name: str, body: str) -> str | None:
    """``text`` with the section's body replaced, or None when the markers are missing."""
    pattern = re.compile(rf"(<!-- BENCH:{name} -->\n).*?(<!-- /BENCH:{name} -->)", re.DOTALL)
    if not pattern.search(text):
        return None
    note = "<!-- generated by benchmarks/make_readme_tables.py; do not edit by hand -->\n"
    return pattern.sub(lambda m: m.group(1) + note + body.rstrip() + "\n" + m.group(2), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", "--readme", dest="targets", type=Path, action="append",
                        help="a markdown file whose markers to fill (repeatable; default: "
                             + ", ".join(_rel(t) for t in TARGETS) + ")")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the tables, change nothing")
    args = parser.parse_args(argv)
    targets = args.targets or list(TARGETS)

    tables = build_tables(args.results)
    if not tables:
        print(f"no result files in {args.results}; nothing to do")
        return 0
    texts = {} if args.print_only else {t: t.read_text() for t in targets if t.exists()}
    for name, body in tables.items():
        placed = False
        for target, text in texts.items():
            updated = replace_section(text, name, body)
            if updated is not None:
                texts[target], placed = updated, True
                print(f"updated the {name} table in {_rel(target)}")
        if not placed:
            if texts:
                print(f"{', '.join(_rel(t) for t in texts)} has no <!-- BENCH:{name} --> ... "
                      f"<!-- /BENCH:{name} --> markers; the table is printed instead:", file=sys.stderr)
            print(f"\n<!-- BENCH:{name} -->\n{body}\n<!-- /BENCH:{name} -->\n")
    for target, text in texts.items():
        if text != target.read_text():
            target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
