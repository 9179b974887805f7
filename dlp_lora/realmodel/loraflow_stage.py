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

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

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
    value["wall_seconds"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
    return value


def _summary(scores: list[float]) -> dict:
    return {"mean": statistics.mean(scores), "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores), "max": max(scores), "per_seed": scores}


def run_loraflow(model, tokenizer, adapter_dirs: dict[str, Path], recipe, root: Path, exclude: frozenset[str],
                 log: Callable[[str], None]) -> dict:
    from ..bank import LoRABank
    from .pipeline import chat_prompt, exact, generate_answers

    out_dir = root / "loraflow"
    settings = {"epochs": recipe.loraflow_epochs, "lr": recipe.loraflow_lr,
                "weight_decay": recipe.loraflow_weight_decay, "warmup_ratio": recipe.loraflow_warmup,
                "schedule": "linear warm-up, cosine decay", "clip": recipe.loraflow_clip,
                "batch_size": recipe.loraflow_batch, "dev_examples": recipe.loraflow_dev,
                "checkpoint": "epoch with the lowest dev answer loss", "seeds": list(recipe.loraflow_seeds),
                "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-5)", "gate_init": "zeros"}

    def train_and_score(name: str, bank, train, dev, seed: int, messages, targets) -> dict:
        flow = loraflow_model(model, bank)
        start = time.perf_counter()
        torch.manual_seed(seed)
        done = train_gates(flow, train, epochs=recipe.loraflow_epochs, lr=recipe.loraflow_lr,
                           batch_size=recipe.loraflow_batch, weight_decay=recipe.loraflow_weight_decay,
                           pad_id=tokenizer.pad_token_id, seed=seed, warmup_ratio=recipe.loraflow_warmup,
                           clip=recipe.loraflow_clip, dev=dev,
                           log=lambda line: log(f"loraflow {name} seed {seed}: {line}"))
        save_gates(flow, out_dir / f"{name}-seed{seed}-gates")
        ok = exact(generate_answers(flow, tokenizer, messages, recipe, targets=targets), targets)
        score = sum(ok) / len(ok)
        log(f"loraflow {name} seed {seed}: {score:.1%} exact match (best epoch {done.best_epoch}, "
            f"{done.steps} steps, {time.perf_counter() - start:.0f} s)")
        return {"exact_match": score, "epoch_losses": done.epoch_losses, "dev_losses": done.dev_losses,
                "best_epoch": done.best_epoch, "steps": done.steps, "seconds": round(done.seconds, 1)}

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
    runs = [_cached(out_dir / f"composite-seed{s}.json",
                    lambda s=s: train_and_score("composite", bank, train_ids, dev_ids, s, messages, targets))
            for s in recipe.loraflow_seeds]

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

    # --- fusion: gates over the two adapters the composite skill needs, on that skill's examples
    parts = list(tasks.FUSION_PARTS)
    pair_bank = LoRABank.from_peft({t: adapter_dirs[t] for t in parts})
    held = tasks.held_out(tasks.FUSION_TASK, recipe.fusion_eval, recipe.seed + 2000)
    f_messages, f_targets = [m for m, _ in held], [a for _, a in held]
    stream = tasks.stream(tasks.FUSION_TASK, recipe.seed + 500, exclude)
    f_train = _pairs(tokenizer, [next(stream) for _ in range(recipe.loraflow_fusion_examples)], chat_prompt)
    f_dev = _pairs(tokenizer, [next(stream) for _ in range(recipe.loraflow_dev)], chat_prompt)
    f_runs = [_cached(out_dir / f"fusion-seed{s}.json",
                      lambda s=s: train_and_score("fusion", pair_bank, f_train, f_dev, s, f_messages,
                                                  f_targets))
              for s in recipe.loraflow_seeds]

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
    unit_seconds = {name: unit.get("wall_seconds") for name, unit in units.items()}
    return {"settings": settings, "composite": composite, "fusion": fusion, "unit_seconds": unit_seconds}
