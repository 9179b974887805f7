"""LoRA-Flow on the real model, at its authors' full recipe, beside its two ceilings.

Composite: gates over the six task adapters, trained on ``loraflow_examples_per_task`` examples per
task (the shuffled composite, one gate set for all of it, as one router serves it), evaluated on the
composite's held-out prompts. Fusion: gates over the two adapters the composite skill needs, trained
on ``loraflow_fusion_examples`` examples of that skill (LoRA-Flow's home ground), evaluated on the
fusion's held-out prompts. Recipe: 5 epochs, linear warm-up over 20% of the steps then cosine decay,
AdamW lr 1e-3 with weight decay 0.1, gradient clipping 1.0, the epoch with the lowest dev answer loss
kept; one run per seed (mean and spread reported).

Ceilings through the same LoRA-Flow path (token-level weights, the op form): ``uniform`` (zero gates:
1/k each) and, on the composite, ``oracle`` (gate bias one-hot on the prompt's own task, so every
token weighs that adapter 1 and the others 0).

Each unit (one seed's gates and score, each ceiling) is cached in ``<root>/loraflow/`` as it ends.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from .._atomic import atomic_write_text
from ..bench.loraflow import save_gates, train_gates
from ..demo.loraflow_gates import ceilings, loraflow_model
from . import tasks


def _pairs(tokenizer, examples, chat_prompt) -> list[tuple[list[int], list[int]]]:
    """(prompt ids in the chat template, answer ids + end of turn)"""
    out = []
    for message, answer in examples:
        prompt = tokenizer(chat_prompt(tokenizer, message), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((prompt, answer_ids + [tokenizer.eos_token_id]))
    return out


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The unit's cached value, else computed, stamped with its wall time and written whole."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    value = compute()
    return _write(path, {**value, "wall_seconds": round(time.perf_counter() - start, 1)})


@dataclass(frozen=True)
class SeedJob:
    """One LoRA-Flow training and its score: everything a worker process needs (picklable)."""

    name: str                      # "composite" or "fusion"
    seed: int
    model_dir: str
    adapters: dict[str, str]       # the candidates, in order: name -> PEFT directory
    train: list                    # [(prompt ids, answer ids)]
    dev: list
    messages: list[str]            # held-out prompts and their answers
    targets: list[str]
    gates_dir: str
    recipe: object
    threads: int


def train_and_score(job: SeedJob, model=None, tokenizer=None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Train the gates of ``job`` at the authors' recipe, save them, score the held-out prompts.

    ``model``/``tokenizer``: the loaded base (in process); a worker loads its own from job.model_dir.
    """
    from ..artifacts import load_tokenizer
    from ..bank import LoRABank
    from .pipeline import exact, generate_answers
    from .pipeline import log as pipeline_log

    start = time.perf_counter()
    log = log or pipeline_log
    torch.set_num_threads(job.threads)
    if model is None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(job.model_dir, "--model")
    recipe = job.recipe
    flow = loraflow_model(model, LoRABank.from_peft(job.adapters))
    torch.manual_seed(job.seed)
    done = train_gates(flow, job.train, epochs=recipe.loraflow_epochs, lr=recipe.loraflow_lr,
                       batch_size=recipe.loraflow_batch, weight_decay=recipe.loraflow_weight_decay,
                       pad_id=tokenizer.pad_token_id, seed=job.seed, warmup_ratio=recipe.loraflow_warmup,
                       clip=recipe.loraflow_clip, dev=job.dev,
                       log=lambda line: log(f"loraflow {job.name} seed {job.seed}: {line}"))
    save_gates(flow, job.gates_dir)
    ok = exact(generate_answers(flow, tokenizer, job.messages, recipe, targets=job.targets), job.targets)
    score = sum(ok) / len(ok)
    log(f"loraflow {job.name} seed {job.seed}: {score:.1%} exact match (best epoch {done.best_epoch}, "
        f"{done.steps} steps, {time.perf_counter() - start:.0f} s)")
    return {"exact_match": score, "epoch_losses": done.epoch_losses, "dev_losses": done.dev_losses,
            "best_epoch": done.best_epoch, "steps": done.steps, "seconds": round(done.seconds, 1),
            "threads": job.threads, "wall_seconds": round(time.perf_counter() - start, 1)}


def run_seeds(jobs: list[SeedJob], paths: list[Path], model, tokenizer,
              log: Callable[[str], None]) -> list[dict]:
    """Every seed's result, cached one file each. Seeds not cached yet run side by side, one worker
    process per core at one torch thread each: training at batch 4 splits poorly across threads (on
    2 cores, two such processes did ~1.6x the steps per second of one process at two threads).
    Each records how many ran together and, once the pool is done, its share of the pool's time."""
    results = {i: json.loads(p.read_text()) for i, p in enumerate(paths) if p.is_file()}
    pending = [i for i in range(len(jobs)) if i not in results]
    workers = min(len(pending), os.cpu_count() or 1)
    if workers <= 1:
        for i in pending:
            value = train_and_score(jobs[i], model, tokenizer, log)
            results[i] = _write(paths[i], {**value, "concurrent": 1})
        return [results[i] for i in range(len(jobs))]
    log(f"loraflow: {len(pending)} trainings, {workers} at a time (one process and one thread each)")
    jobs_1 = {i: dataclasses.replace(jobs[i], threads=1) for i in pending}
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_score, jobs_1[i]): i for i in pending}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = _write(paths[i], {**future.result(), "concurrent": workers})
    # the pool's elapsed time, shared among its trainings: what they cost together
    share = round((time.perf_counter() - start) / len(pending), 1)
    for i in pending:
        results[i] = _write(paths[i], {**results[i], "elapsed_share_seconds": share})
    return [results[i] for i in range(len(jobs))]


def _write(path: Path, value: dict) -> dict:
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")
    return value


def _elapsed(unit: dict) -> float | None:
    """What a unit added to the stage's elapsed time: its share of its pool's time, else (a pool that
    was interrupted) its wall time over the trainings beside it, else its wall time; None if unknown."""
    if "elapsed_share_seconds" in unit:
        return unit["elapsed_share_seconds"]
    if "wall_seconds" in unit:
        return round(unit["wall_seconds"] / unit.get("concurrent", 1), 1)
    return None


def _summary(scores: list[float]) -> dict:
    return {"mean": statistics.mean(scores), "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores), "max": max(scores), "per_seed": scores}


def run_loraflow(model, tokenizer, model_dir: Path, adapter_dirs: dict[str, Path], recipe, root: Path,
                 exclude: frozenset[str], log: Callable[[str], None]) -> dict:
    from ..bank import LoRABank
    from .pipeline import chat_prompt, exact, generate_answers

    out_dir = root / "loraflow"
    settings = {"epochs": recipe.loraflow_epochs, "lr": recipe.loraflow_lr,
                "weight_decay": recipe.loraflow_weight_decay, "warmup_ratio": recipe.loraflow_warmup,
                "schedule": "linear warm-up, cosine decay", "clip": recipe.loraflow_clip,
                "batch_size": recipe.loraflow_batch, "dev_examples": recipe.loraflow_dev,
                "checkpoint": "epoch with the lowest dev answer loss", "seeds": list(recipe.loraflow_seeds),
                "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-5)", "gate_init": "zeros"}

    def seed_jobs(name: str, candidates: list[str], train, dev, messages, targets) -> list[SeedJob]:
        return [SeedJob(name, s, str(model_dir), {t: str(adapter_dirs[t]) for t in candidates}, train, dev,
                        messages, targets, str(out_dir / f"{name}-seed{s}-gates"), recipe, recipe.threads)
                for s in recipe.loraflow_seeds]

    # --- composite: gates over the six task adapters
    names = list(tasks.TASKS)
    bank = LoRABank.from_peft({t: adapter_dirs[t] for t in names})
    rows = [(t, m, a) for t in names for m, a in tasks.held_out(t, recipe.eval_per_task, recipe.seed + 1000)]
    messages, targets = [m for _, m, _ in rows], [a for _, _, a in rows]
    streams = {t: tasks.stream(t, recipe.seed + 300 + i, exclude) for i, t in enumerate(names)}
    train = [next(streams[t]) for t in names for _ in range(recipe.loraflow_examples_per_task)]
    dev = [next(streams[t]) for _ in range(recipe.loraflow_dev // len(names) + 1) for t in names]
    random.Random(recipe.seed).shuffle(train)
    train_ids, dev_ids = _pairs(tokenizer, train, chat_prompt), _pairs(tokenizer, dev[:recipe.loraflow_dev],
                                                                       chat_prompt)
    composite_jobs = seed_jobs("composite", names, train_ids, dev_ids, messages, targets)

    # --- fusion: gates over the two adapters the composite skill needs, on that skill's examples
    parts = list(tasks.FUSION_PARTS)
    pair_bank = LoRABank.from_peft({t: adapter_dirs[t] for t in parts})
    held = tasks.held_out(tasks.FUSION_TASK, recipe.fusion_eval, recipe.seed + 2000)
    f_messages, f_targets = [m for m, _ in held], [a for _, a in held]
    stream = tasks.stream(tasks.FUSION_TASK, recipe.seed + 500, exclude)
    f_train = _pairs(tokenizer, [next(stream) for _ in range(recipe.loraflow_fusion_examples)], chat_prompt)
    f_dev = _pairs(tokenizer, [next(stream) for _ in range(recipe.loraflow_dev)], chat_prompt)
    fusion_jobs = seed_jobs("fusion", parts, f_train, f_dev, f_messages, f_targets)

    # every training of both parts in one pool, so that no core waits for a part's last seed
    jobs = composite_jobs + fusion_jobs
    paths = [out_dir / f"{job.name}-seed{job.seed}.json" for job in jobs]
    done = run_seeds(jobs, paths, model, tokenizer, log)
    runs, f_runs = done[:len(composite_jobs)], done[len(composite_jobs):]

    def ceiling_scores() -> dict:
        def score(flow, some_rows) -> float:
            some_targets = [a for _, _, a in some_rows]
            ok = exact(generate_answers(flow, tokenizer, [m for _, m, _ in some_rows], recipe,
                                        targets=some_targets), some_targets)
            return sum(ok) / len(ok)

        found = ceilings(model, bank, rows, score)
        log(f"loraflow composite ceilings: {found}")
        return found

    composite = {"train_examples": len(train_ids), "dev_examples": len(dev_ids), "prompts": len(rows),
                 "runs": runs, "exact_match": _summary([r["exact_match"] for r in runs]),
                 "ceilings": _cached(out_dir / "composite-ceilings.json", ceiling_scores)}

    def fusion_uniform() -> dict:
        flow = loraflow_model(model, pair_bank)
        ok = exact(generate_answers(flow, tokenizer, f_messages, recipe, targets=f_targets), f_targets)
        log(f"loraflow fusion uniform: {sum(ok) / len(ok):.1%}")
        return {"exact_match": sum(ok) / len(ok)}

    fusion = {"train_examples": len(f_train), "dev_examples": len(f_dev), "prompts": len(held),
              "candidates": parts, "runs": f_runs,
              "exact_match": _summary([r["exact_match"] for r in f_runs]),
              "uniform_ceiling": _cached(out_dir / "fusion-uniform.json", fusion_uniform)}
    units = {f"composite seed {s}": r for s, r in zip(recipe.loraflow_seeds, runs, strict=True)}
    units |= {f"fusion seed {s}": r for s, r in zip(recipe.loraflow_seeds, f_runs, strict=True)}
    units |= {"composite ceilings": composite["ceilings"], "fusion uniform": fusion["uniform_ceiling"]}
    # Each unit's wall time when it was computed (cached units keep theirs), so the stage's cost holds
    # across interrupted runs; a unit cached before this was recorded has none.
    unit_seconds = {name: _elapsed(unit) for name, unit in units.items()}
    return {"settings": settings, "composite": composite, "fusion": fusion, "unit_seconds": unit_seconds}
