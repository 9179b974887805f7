"""The demo end to end: build (or reuse) the artifacts, run the composite evaluation, report it.

The base model is the shipped one (dlp_lora/demo/base-model/, see shipped.py), checked against its sha256.
What is trained on it lives in a cache directory keyed by the recipe, the base's sha256 and the code
that trains, so a second run only evaluates:

    <cache>/<recipe key>/adapters/<task>/    one PEFT LoRA per task (save_pretrained)
    <cache>/<recipe key>/router/             the trained router (Router.save)
    <cache>/<recipe key>/loraflow_gates-<key>/  LoRA-Flow's gates over the adapters (loraflow_gates.py)

Each one is written to a temporary sibling and renamed when complete, so an interrupted run never
leaves a half-written artifact that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._atomic import atomic_write_text
from .._env import DEMO_DIR_ENV
from ..bench.provenance import load_average, machine_info, timestamp, versions
from ..options import DEFAULT_TOP_P
from . import build, loraflow_gates, shipped, tasks
from .evaluate import (
    METHOD_TITLES,
    CompositeResult,
    evaluate_composite,
    exact_match,
    greedy_answers,
    shuffled_composite,
)

DEFAULT_CACHE = Path(".cache") / "dlp_demo"
EVAL_SEED = 1000  # the held-out composite's seed; training streams exclude its prompts


@dataclass
class DemoArtifacts:
    root: Path
    model_dir: Path
    adapters: dict[str, Path]
    router_dir: Path
    gates_dir: Path | None = None  # LoRA-Flow's trained gates
    seconds: dict[str, float | None] = field(default_factory=dict)  # build step -> seconds (None = cached)
    # build step -> {"seconds", "note", "created"} of the run that built it (cached runs report it too)
    build_log: dict[str, dict] = field(default_factory=dict)

    @property
    def build_log_path(self) -> Path:
        return self.root / "build_log.json"


def recipe_key(recipe: build.Recipe, base_dir: Path) -> str:
    """Hash of the recipe, of the base's sha256 manifest and of the code that turns them into artifacts
    (task definitions, training, the data streams' seeds below), so an edited task, schedule or base
    never reuses artifacts built by the old one."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    digest.update((base_dir / shipped.MANIFEST).read_bytes())
    for module in (tasks, build, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def cache_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get(DEMO_DIR_ENV) or DEFAULT_CACHE)


def eval_rows(recipe: build.Recipe) -> list[tuple[str, str, str]]:
    """The held-out composite: eval_per_task distinct (task, prompt, answer) per task, shuffled."""
    chosen = [tasks.TASKS[name] for name in recipe.tasks]
    return shuffled_composite(tasks.held_out_set(chosen, recipe.eval_per_task, EVAL_SEED), EVAL_SEED)


def _build_once(art: DemoArtifacts, path: Path, make: Callable[[Path], str], label: str,
                readable: Callable[[Path], object] | None = None, log: Callable[[str], None] = print,
                ) -> None:
    """Run `make(tmp)` unless `path` exists (and `readable(path)` does not raise ValueError);
    `tmp` becomes `path` only when make returns. make returns a note for the log line, which is kept
    with the build time in the artifacts' build_log.json."""
    seconds = art.seconds
    if path.is_dir():
        try:
            if readable is not None:
                readable(path)
            seconds[label] = None
            return
        except ValueError as e:  # e.g. a router saved by an older, incompatible dlp-lora
            log(f"cached {label} is unusable ({e}); rebuilding it")
            shutil.rmtree(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    note = make(tmp)
    os.replace(tmp, path)
    seconds[label] = time.perf_counter() - start
    log(f"      {label}: {note}, {seconds[label]:.0f} s")
    art.build_log[label] = {"seconds": round(seconds[label], 1), "note": note, "created": timestamp()}
    tmp_log = art.build_log_path.with_suffix(".partial")
    tmp_log.write_text(json.dumps(art.build_log, indent=1) + "\n")
    os.replace(tmp_log, art.build_log_path)


def prepare(recipe: build.Recipe, root: str | Path | None = None, *, log: Callable[[str], None] = print
            ) -> DemoArtifacts:
    """Check the shipped base, build whatever is missing of the adapters, the router and LoRA-Flow's
    gates; return their paths. Raises shipped.BaseModelError if a file of the base does not match its
    sha256."""
    base_dir = shipped.verified_base()
    root = cache_dir(root) / f"{recipe.name}-{recipe_key(recipe, base_dir)}"
    adapters = {t: root / "adapters" / t for t in recipe.tasks}
    art = DemoArtifacts(root, base_dir, adapters, root / "router")
    if art.build_log_path.is_file():
        art.build_log = json.loads(art.build_log_path.read_text())
    held_out = {prompt for _, prompt, _ in eval_rows(recipe)}

    tokenizer = build.load_tokenizer(art.model_dir)

    if not all(path.is_dir() for path in art.adapters.values()):
        log(f"[1/3] training one rank-{recipe.lora_rank} PEFT LoRA per task on all seven projections "
            f"(until {recipe.adapter_target:.1%} exact match, at most {recipe.adapter_steps} steps)")
    for i, name in enumerate(recipe.tasks):
        task = tasks.TASKS[name]

        def make_adapter(out: Path, task=task, i=i) -> str:
            stream = tasks.stream([task], recipe.seed + 7 + i, exclude=held_out)
            done = build.train_adapter(art.model_dir, tokenizer, task, stream, recipe, out)
            return f"{done.steps} steps, {done.exact_match:.1%} exact match on fresh samples"

        _build_once(art, art.adapters[name], make_adapter, f"adapter {name}", log=log)

    def make_router(out: Path) -> str:
        log("[2/3] training the router on the tasks' prompts")
        texts, labels = [], []
        for i, name in enumerate(recipe.tasks):
            stream = tasks.stream([tasks.TASKS[name]], recipe.seed + 100 + i, exclude=held_out)
            texts += [next(stream)[0] for _ in range(recipe.router_prompts_per_task)]
            labels += [name] * recipe.router_prompts_per_task
        # the global RNG drives the router's dropout: seed it here, whatever was built before
        with build.reproducible(recipe.seed + 100):
            router = Router.fit(texts, labels, tokenizer, val_fraction=0.1, seed=recipe.seed, verbose=False)
        router.save(out)
        return f"{len(texts)} prompts, {router.val_accuracy:.1%} held-out accuracy"

    from ..router import Router

    _build_once(art, art.router_dir, make_router, "router", readable=Router.load, log=log)

    # LoRA-Flow's budget: the router's prompts per task, capped at the ~200 examples its gates learn from
    per_task = gate_examples_per_task(recipe)
    art.gates_dir = root / f"loraflow_gates-{loraflow_gates.gates_key(per_task)}"

    def make_gates(out: Path) -> str:
        from transformers import AutoModelForCausalLM

        from ..bank import LoRABank

        log(f"[3/3] training LoRA-Flow's layer gates over the {len(recipe.tasks)} task adapters "
            f"({per_task} examples per task)")
        examples = loraflow_gates.gate_examples(tokenizer, recipe.tasks, recipe.seed, held_out, per_task)
        model = AutoModelForCausalLM.from_pretrained(str(art.model_dir), dtype=torch.float32).eval()
        model.requires_grad_(False)
        with build.reproducible(recipe.seed + 200):
            return loraflow_gates.train_demo_gates(model, LoRABank.from_peft(art.adapters), tokenizer,
                                                   examples, out, seed=recipe.seed)

    from ..bench.loraflow import read_gates_config

    _build_once(art, art.gates_dir, make_gates, "loraflow gates", readable=read_gates_config, log=log)
    return art


def gate_examples_per_task(recipe: build.Recipe) -> int:
    return min(loraflow_gates.EXAMPLES_PER_TASK, recipe.router_prompts_per_task)


def run(recipe: build.Recipe, *, cache: str | Path | None = None, out: str | Path = "demo_out",
        top_p: float = DEFAULT_TOP_P, log: Callable[[str], None] = print) -> tuple[CompositeResult, Path]:
    """Prepare the artifacts, evaluate the shuffled composite, print the table, write JSON + PNG."""
    with build.quiet_transformers():
        return _run(recipe, cache, out, top_p, log)


def _run(recipe: build.Recipe, cache: str | Path | None, out: str | Path, top_p: float,
         log: Callable[[str], None]) -> tuple[CompositeResult, Path]:
    from transformers import AutoModelForCausalLM

    from ..bank import LoRABank
    from ..router import Router

    load_start = load_average()
    start, cpu_start = time.perf_counter(), time.process_time()
    art = prepare(recipe, cache, log=log)
    setup_seconds, setup_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    cached = all(v is None for v in art.seconds.values())
    first = sum(v["seconds"] for v in art.build_log.values())
    status = (f"all cached, built in {first:.0f} s by an earlier run" if cached
              else f"built in {setup_seconds:.0f} s")
    log(f"artifacts in {art.root} ({status})")

    base = shipped.read_manifest(art.model_dir)
    tokenizer = build.load_tokenizer(art.model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(art.model_dir), dtype=torch.float32).eval()
    bank = LoRABank.from_peft(art.adapters)
    router = Router.load(art.router_dir)
    flow = loraflow_gates.trained_loraflow_model(model, bank, art.gates_dir)
    rows = eval_rows(recipe)
    log(f"evaluating the shuffled composite: {len(rows)} prompts x (base, oracle LoRA, DLP-LoRA, LoRA-Flow), "
        "greedy")
    eval_start, eval_cpu_start = time.perf_counter(), time.process_time()
    result = evaluate_composite(model, tokenizer, bank, router, rows, top_p=top_p, loraflow=flow)
    eval_seconds, eval_cpu = time.perf_counter() - eval_start, time.process_time() - eval_cpu_start
    ceilings = loraflow_ceilings(model, tokenizer, bank, rows)
    log(f"LoRA-Flow path with fixed weights: {', '.join(f'{k} {100 * v:.1f}%' for k, v in ceilings.items())}")

    log("")
    log(format_table(result, top_p))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "composite-K demo (make demo)",
        "created": timestamp(),
        **result.to_json(),
        "top_p": top_p,
        "loraflow": {**loraflow_gates.settings(gate_examples_per_task(recipe)),
                     "candidates": list(bank.names), "ceilings": ceilings},
        # hidden_size: the README's caption names the base's width
        "recipe": {**dataclasses.asdict(recipe), "hidden_size": base["recipe"]["hidden_size"],
                   "base": base["recipe"]},
        "base_model": {"sha256": base["files"]["model.safetensors"], "note": base["note"]},
        "artifacts": str(art.root),
        "build_log": art.build_log,
        # wall seconds; CPU seconds (all threads) tell a busy machine from a slow step
        "seconds": {"build": art.seconds, "first_build": {k: v["seconds"] for k, v in art.build_log.items()},
                    "setup_total": setup_seconds, "evaluation": eval_seconds,
                    "setup_cpu": setup_cpu, "evaluation_cpu": eval_cpu},
        "machine": machine_info(), "versions": versions(),
        "load_average": {"start": load_start, "end": load_average()},
    }
    atomic_write_text(out / "composite.json", json.dumps(payload, indent=2) + "\n")
    png = plot(result, out / "composite.png")
    log(f"\ntime: {time_summary(art.seconds, setup_seconds, eval_seconds)}")
    log(f"results: {out.resolve()}/ (composite.json{', composite.png' if png else ''})")
    return result, out


def loraflow_ceilings(model, tokenizer, bank, rows) -> dict:
    """Exact match of the LoRA-Flow path with fixed weights (loraflow_gates.ceilings) on ``rows``."""
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, _, a in rows) + 1

    def score(flow, some_rows) -> float:
        answers, _, _ = greedy_answers(flow, tokenizer, [p for _, p, _ in some_rows], max_new)
        return sum(exact_match(answers, [a for _, _, a in some_rows])) / len(some_rows)

    return loraflow_gates.ceilings(model, bank, rows, score)


def time_summary(build_seconds: dict[str, float | None], setup: float, evaluation: float) -> str:
    """e.g. 'setup 92 s (adapters 5 x 17 s, router 3 s) + evaluation 4 s'."""
    built = {k: v for k, v in build_seconds.items() if v is not None}
    if not built:
        return f"setup {setup:.0f} s (every artifact cached) + evaluation {evaluation:.0f} s"
    adapters = [v for k, v in built.items() if k.startswith("adapter ")]
    parts = [f"{k} {v:.0f} s" for k, v in built.items() if not k.startswith("adapter ")]
    if adapters:
        parts.insert(0, f"adapters {len(adapters)} x {sum(adapters) / len(adapters):.0f} s")
    return f"setup {setup:.0f} s ({', '.join(parts)}) + evaluation {evaluation:.0f} s"


def format_table(result: CompositeResult, top_p: float = DEFAULT_TOP_P) -> str:
    """The composite table as plain text: exact match per task and on average, router accuracy, and
    decode time per token of each method as a ratio to the base model (measured over the whole
    shuffled composite, so it sits on the average row)."""
    methods = result.methods
    header = ["task", "n", *(f"{METHOD_TITLES[m]} EM%" for m in methods), "router acc%",
              *(f"{METHOD_TITLES[m]} time" for m in methods)]
    lines = []
    for row in result.table_rows():
        avg = row["task"] == "average"
        times = [f"{result.decode_ratio(m):.2f}x" if avg else "" for m in methods]
        lines.append([row["task"], str(row["n"]), *(f"{row[m]:.1f}" for m in methods), f"{row['router']:.1f}",
                      *times])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = "-" * len(fmt(header))
    ms = ", ".join(f"{METHOD_TITLES[m]} {result.decode_ms_per_token[m]:.2f}" for m in methods)
    title = (f"Composite-{len(result.tasks)} (shuffled, {sum(result.counts.values())} prompts, greedy): "
             f"exact match; DLP-LoRA = router + top-p {top_p} fusion"
             + ("; LoRA-Flow = trained layer gates over every adapter at every token"
                if "loraflow" in result.methods else ""))
    body = [fmt(r) for r in lines]
    return "\n".join([title, rule, fmt(header), rule, *body[:-1], rule, body[-1], rule,
                      f"decode time per token in ms (ratio to base on the average row): {ms}",
                      f"DLP-LoRA fused {result.dlp_adapters_per_prompt:.2f} adapters per prompt on average"])


def plot(result: CompositeResult, path: Path) -> Path | None:
    """Bars of exact match per task and method, and of decode-time ratio per method (None: no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result.table_rows()
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [4, 1]})
    methods = result.methods
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        offset = (j - (len(methods) - 1) / 2) * width
        bars = ax.bar([i + offset for i in range(len(rows))], [r[m] for r in rows], width,
                      label=METHOD_TITLES[m])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)  # a base bar at 0 is otherwise invisible
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 125)
    ax.set_title(f"Composite-{len(result.tasks)}: shuffled prompts of every task")
    ax.legend(loc="upper center", ncol=len(methods), frameon=False)
    ax_t.bar([METHOD_TITLES[m] for m in methods], [result.decode_ratio(m) for m in methods],
             color=[f"C{j}" for j in range(len(methods))])
    ax_t.set_ylabel("decode time per token / base")
    ax_t.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
