"""LoRA-Flow in the demo: gates over the same task LoRAs DLP-LoRA's router chooses from.

LoRA-Flow (dlp_lora.bench.loraflow) needs its fusion gates trained on a few examples, with the base
model and the LoRAs frozen. The demo gives it the same candidates as the router (every task's
adapter) and a budget of the same order as the router's: at most ``examples_per_task`` (prompt,
answer) pairs per task, drawn from the training streams (never the held-out prompts), one gate set
for the shuffled composite, as one router serves it. The loss is on the answer and EOS tokens,
encoded as the adapters were trained (BOS prompt answer EOS).

The learning rate and the number of epochs were chosen on a dev split drawn from the training streams
(neither the gates' examples nor the held-out prompts), among lr 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 and 2 or
5 epochs: lr 1e-3 (the authors' usual value) for 2 epochs answered the most dev prompts exactly;
higher rates did worse, and more epochs lowered the training loss but not the dev exact match. One
thing limits the method here: the first layer's gate sees only the current character's embedding,
which does not say which task the prompt is.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ..bench import loraflow
from ..bench.baselines import stacks_from_bank
from ..bench.loraflow import load_gates, patch_loraflow, save_gates, train_gates
from ..bench.workload import shared_copy
from . import tasks

EXAMPLES_PER_TASK = 200  # the most LoRA-Flow's gates see of each task
EPOCHS = 2
LR = 1e-3
BATCH_SIZE = 4


def settings(per_task: int) -> dict:
    """What the gates are trained with, for the result file."""
    return {"examples_per_task": per_task, "epochs": EPOCHS, "lr": LR, "batch_size": BATCH_SIZE,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-5)", "gate_init": "zeros", "temperature": 1.0}


def gates_key(per_task: int) -> str:
    """Hash of the settings and of the code that trains the gates: the name of their cache folder, so
    edited gate code retrains only the gates, not the adapters they sit on."""
    digest = hashlib.sha256(json.dumps(settings(per_task), sort_keys=True).encode())
    for path in (__file__, loraflow.__file__):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def gate_examples(tokenizer, task_names: Sequence[str], seed: int, exclude: set[str],
                  per_task: int = EXAMPLES_PER_TASK) -> list[tuple[list[int], list[int]]]:
    """``per_task`` (prompt ids, answer ids + EOS) per task from its training stream, shuffled."""
    pairs = []
    for i, name in enumerate(task_names):
        stream = tasks.stream([tasks.TASKS[name]], seed + 200 + i, exclude=exclude)
        for _ in range(per_task):
            prompt, answer = next(stream)
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            pairs.append((tokenizer(prompt)["input_ids"], answer_ids + [tokenizer.eos_token_id]))
    random.Random(seed).shuffle(pairs)
    return pairs


def loraflow_model(model: nn.Module, bank, *, form: str = "op") -> nn.Module:
    """A LoRA-Flow model over every adapter of ``bank`` (candidates in the bank's order), on a copy of
    ``model`` that shares its weights; the gates start at zeros (uniform weights)."""
    return patch_loraflow(shared_copy(model), stacks_from_bank(bank), names=list(bank.names), form=form)


def train_demo_gates(model: nn.Module, bank, tokenizer, examples, out: str | Path, *, epochs: int = EPOCHS,
                     lr: float = LR, batch_size: int = BATCH_SIZE, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> str:
    """Train LoRA-Flow gates over ``bank`` on ``examples`` and save them to ``out``; returns a note
    for the build log. ``model`` itself is left as it was."""
    flow = loraflow_model(model, bank)
    start = time.perf_counter()
    done = train_gates(flow, examples, epochs=epochs, lr=lr, batch_size=batch_size,
                       pad_id=tokenizer.pad_token_id, seed=seed, log=log)
    save_gates(flow, out)
    losses = " -> ".join(f"{x:.3f}" for x in done.epoch_losses)
    return (f"{len(examples)} examples, {done.steps} steps in {time.perf_counter() - start:.0f} s, "
            f"answer loss per epoch {losses}")


def fix_gate_weights(flow: nn.Module, candidate: int | None, layers: Sequence[int] | None = None) -> None:
    """Give the gates of ``layers`` (default: every layer) fixed weights, the same at every token:
    candidate j alone (weight 1 on it, 0 on the others) or, with None, the uniform 1/k. The gate's
    matrix is zeroed (softmax of zeros = 1/k) and its bias set to one-hot(j) - 1/k."""
    import torch

    gates = loraflow.loraflow_gates(flow)
    for i in gates if layers is None else layers:
        gate = gates[i]
        k = gate.bias.shape[0]
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.zero_()
            if candidate is not None:
                gate.bias.sub_(1.0 / k)
                gate.bias[candidate] += 1.0


def ceilings(model: nn.Module, bank, rows, score: Callable[[nn.Module, list], float]) -> dict:
    """LoRA-Flow's ceilings through its own path (token-level weights) over ``bank``, on ``rows`` =
    [(task, ...)] where task is a bank name; score(flow, rows) -> exact match of those rows.

    oracle_weights: every layer's gate gives each prompt its own task's adapter alone;
    oracle_weights_except_layer0: the same on every layer but the first, whose gate is left uniform
    (the best gates can do when the first layer's input does not tell the task apart);
    uniform: every adapter 1/k everywhere.
    """
    flow = loraflow_model(model, bank)
    layers = sorted(loraflow.loraflow_gates(flow))
    names = list(bank.names)
    result = {}
    for key, fixed_layers in (("oracle_weights", layers), ("oracle_weights_except_layer0", layers[1:])):
        hits = 0.0
        for j, name in enumerate(names):
            own = [row for row in rows if row[0] == name]
            if own:
                fix_gate_weights(flow, None)
                fix_gate_weights(flow, j, fixed_layers)
                hits += score(flow, own) * len(own)
        result[key] = hits / len(rows)
    fix_gate_weights(flow, None)
    result["uniform"] = score(flow, list(rows))
    return result


def trained_loraflow_model(model: nn.Module, bank, gates_dir: str | Path) -> nn.Module:
    """loraflow_model with the gates saved in ``gates_dir`` (by train_demo_gates)."""
    return load_gates(loraflow_model(model, bank), gates_dir)
