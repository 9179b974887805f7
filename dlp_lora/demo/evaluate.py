"""The composite-K evaluation: base vs oracle single LoRA vs DLP-LoRA (vs LoRA-Flow) on a shuffled mix
of all tasks.

Every batch of the shuffled composite is generated greedily by each method on the same base weights:
  base      the unpatched model (no adapter)
  oracle    patched, `use_mixture` with each prompt's own task adapter at weight 1 (chosen by hand)
  dlp       patched with the router: top-p over its softmax, kept probabilities renormalised, fused
  loraflow  (when a LoRA-Flow model is given) trained layer gates weight every task adapter at every
            token (dlp_lora.demo.loraflow_gates)
Exact match of the continuation (cut at EOS) against the answer is the score. The runs of a batch
follow each other, so drifts in machine load hit all methods alike; decode time per token is
measured inside generate() (first to last decode step), so prefill is not part of it.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import torch

from ..bench.timing import StepClock
from ..options import DEFAULT_TOP_P

METHODS = ("base", "oracle", "dlp")
LORAFLOW = "loraflow"  # a fourth method, where evaluate_composite is given a LoRA-Flow model
METHOD_TITLES = {"base": "base", "oracle": "oracle LoRA", "dlp": "DLP-LoRA", "loraflow": "LoRA-Flow"}


@dataclass
class CompositeResult:
    """Per-task exact match of each method, router accuracy, and decode time per token."""

    tasks: list[str]
    counts: dict[str, int]
    accuracy: dict[str, dict[str, float]]  # method -> task -> exact match in [0, 1]
    router_accuracy: dict[str, float]  # task -> top-1 router prediction is the task's adapter
    decode_ms_per_token: dict[str, float]  # method -> ms per decode step (one token per sequence)
    dlp_adapters_per_prompt: float  # mean number of adapters the router's top-p kept
    examples: list[dict] = field(default_factory=list)  # a few prompts with every method's answer
    methods: tuple[str, ...] = METHODS  # the methods evaluated

    def average(self, per_task: dict[str, float]) -> float:
        return sum(per_task[t] for t in self.tasks) / len(self.tasks)

    def decode_ratio(self, method: str) -> float:
        return self.decode_ms_per_token[method] / self.decode_ms_per_token["base"]

    def table_rows(self) -> list[dict]:
        """One row per task then an "average" row: exact match in %, router accuracy in %, time ratios."""
        rows = []
        for task in self.tasks + ["average"]:
            pick = (lambda d: self.average(d)) if task == "average" else (lambda d, t=task: d[t])
            row = {"task": task, "n": sum(self.counts.values()) if task == "average" else self.counts[task]}
            row.update({m: 100 * pick(self.accuracy[m]) for m in self.methods})
            row["router"] = 100 * pick(self.router_accuracy)
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        return {
            "tasks": self.tasks,
            "rows": self.table_rows(),
            "decode_ms_per_token": self.decode_ms_per_token,
            "methods": list(self.methods),
            "decode_ratio_to_base": {m: self.decode_ratio(m) for m in self.methods},
            "dlp_adapters_per_prompt": self.dlp_adapters_per_prompt,
            "examples": self.examples,
        }


def exact_match(answers: list[str], targets: list[str]) -> list[bool]:
    return [a.strip() == t for a, t in zip(answers, targets, strict=True)]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], float, int]:
    """Greedy continuations (cut at EOS) and the decode (seconds, steps) of this call."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    clock = StepClock(enc["input_ids"].device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=[clock],
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts, *clock.decode_seconds()


def shuffled_composite(rows: list[tuple[str, str, str]], seed: int) -> list[tuple[str, str, str]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def evaluate_composite(model, tokenizer, bank, router, rows: list[tuple[str, str, str]], *,
                       top_p: float = DEFAULT_TOP_P, batch_size: int = 32, progress: bool = True,
                       loraflow=None) -> CompositeResult:
    """Run base, oracle and DLP-LoRA (and LoRA-Flow) over `rows` = shuffled (task, prompt, answer); see
    the module doc.

    model: an unpatched causal LM (it is patched and unpatched per batch, and left unpatched).
    bank: LoRABank whose names are the tasks; router: a Router over the same names.
    loraflow: None, or a LoRA-Flow model over the same bank and base weights (loraflow_gates).
    """
    from tqdm.auto import tqdm

    from ..patch import use_mixture

    methods = METHODS if loraflow is None else (*METHODS, LORAFLOW)
    tasks = [name for name in bank.names if any(t == name for t, _, _ in rows)]
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, _, a in rows) + 1
    correct = {m: {t: 0 for t in tasks} for m in methods}
    counts = {t: 0 for t in tasks}
    seconds = dict.fromkeys(methods, 0.0)
    steps = dict.fromkeys(methods, 0)
    examples = []

    # one untimed warm-up of every path (first-call allocations, lazy imports)
    warm = [p for _, p, _ in rows[:2]]
    greedy_answers(model, tokenizer, warm, 2)
    with _patched(model, bank, router, top_p):
        greedy_answers(model, tokenizer, warm, 2)
    if loraflow is not None:
        greedy_answers(loraflow, tokenizer, warm, 2)

    def run(method: str, prompts: list[str], routing=None, on=model) -> None:
        with routing or contextlib.nullcontext():
            answers[method], s, n = greedy_answers(on, tokenizer, prompts, max_new)
        seconds[method] += s
        steps[method] += n

    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="composite eval", unit="batch", disable=None if progress else True,
                      leave=False):
        names, prompts, targets = zip(*batch, strict=True)
        answers: dict[str, list[str]] = {}
        run("base", list(prompts))
        with _patched(model, bank, router, top_p):
            run("oracle", list(prompts), use_mixture(model, [{name: 1.0} for name in names]))
            run("dlp", list(prompts))
        if loraflow is not None:
            run(LORAFLOW, list(prompts), on=loraflow)
        for name in names:
            counts[name] += 1
        for m in methods:
            for name, ok in zip(names, exact_match(answers[m], list(targets)), strict=True):
                correct[m][name] += ok
        if len(examples) < 2 * len(tasks):
            examples += [{"task": names[i], "prompt": prompts[i], "answer": targets[i],
                          **{m: answers[m][i] for m in methods}} for i in range(min(2, len(batch)))]

    predicted = router.predict([p for _, p, _ in rows])
    router_hits = {t: 0 for t in tasks}
    for (name, _, _), guess in zip(rows, predicted, strict=True):
        router_hits[name] += guess == name
    # how many adapters DLP-LoRA fused per prompt (top-p keeps more than one when the router hesitates)
    enc = tokenizer([p for _, p, _ in rows], return_tensors="pt", padding=True)
    lora_ids, _ = router.route(enc["input_ids"], enc["attention_mask"], top_p=top_p)
    return CompositeResult(
        tasks=tasks,
        counts=counts,
        accuracy={m: {t: correct[m][t] / counts[t] for t in tasks} for m in methods},
        router_accuracy={t: router_hits[t] / counts[t] for t in tasks},
        decode_ms_per_token={m: 1000 * seconds[m] / max(1, steps[m]) for m in methods},
        dlp_adapters_per_prompt=float((lora_ids >= 0).sum(dim=1).float().mean()),
        examples=examples,
        methods=methods,
    )


@contextlib.contextmanager
def _patched(model, bank, router, top_p: float):
    from ..patch import patch_model, unpatch_model

    # reroute="prompt": each composite prompt is one sentence, routed once at prefill
    patch_model(model, bank, router, top_p=top_p, reroute="prompt")
    try:
        yield model
    finally:
        unpatch_model(model)
