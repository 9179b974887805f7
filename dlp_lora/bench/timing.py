"""Timing generate(): a per-step clock, interleaved rounds, and quartile statistics."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence

import torch

from .variants import Variant
from .workload import BenchSettings


class StepClock:
    """A LogitsProcessor that stamps every generation step (after its forward).

    Wall time (perf_counter) is the measure. Process CPU time (all threads) is stamped too: on a
    shared machine it is far less disturbed by other processes than wall time, so its ratios are
    a useful cross-check (it also counts threads spinning at barriers, so it is not a speed).
    """

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stamps: list[tuple[float, float]] = []

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()

    def __call__(self, input_ids, scores):
        self.stamps.append(self.now())
        return scores

    def decode_seconds(self) -> tuple[float, int]:
        """(wall seconds, steps) between the first and the last stamped step: the decode, prefill excluded."""
        if len(self.stamps) < 2:
            return 0.0, 0
        return self.stamps[-1][0] - self.stamps[0][0], len(self.stamps) - 1


def generate_options(settings: BenchSettings) -> dict:
    """generate() arguments shared by every variant: with ``compile``, a static KV cache and
    transformers' automatic torch.compile of the decode steps (its CompileConfig defaults: inductor,
    mode="reduce-overhead", which is CUDA graphs on a GPU; the prefill runs eager)."""
    if not settings.compile:
        return {}
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    # Every variant is its own module tree: each adds guards on the same code objects, beyond
    # dynamo's default of 8 entries, after which it would silently run the rest eager.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
    return {"cache_implementation": "static", "compile_config": config}


def time_generate(variant: Variant, input_ids: torch.Tensor, new_tokens: int,
                  options: dict | None = None) -> dict:
    """One greedy generate() (``options``: extra generate() arguments); returns prefill seconds and
    decode seconds per step."""
    from transformers import LogitsProcessorList

    batch = input_ids.shape[0]
    clock = StepClock(input_ids.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  logits_processor=LogitsProcessorList([clock]), **(options or {}),
                  **variant.generate_kwargs(batch))
    with torch.inference_mode(), variant.context(batch):
        start = clock.now()
        variant.model.generate(**kwargs)
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"{variant.name}: expected {new_tokens} generation steps, "
                           f"clocked {len(clock.stamps)}")
    walls = [wall for wall, _ in clock.stamps]
    steps = max(new_tokens - 1, 1)
    return {"prefill_s": walls[0] - start[0],
            # the median step: robust to a stray spike from another process; on a quiet machine it
            # equals the mean (decode steps differ only by a KV cache a few tokens longer)
            "decode_s": statistics.median(b - a for a, b in itertools.pairwise(walls)),
            "decode_mean_s": (walls[-1] - walls[0]) / steps,
            "decode_cpu_s": (clock.stamps[-1][1] - clock.stamps[0][1]) / steps}


def run_interleaved(variants: Sequence[Variant], input_ids: torch.Tensor, *, new_tokens: int, reps: int,
                    warmup_tokens: int, progress, options: dict | None = None) -> dict[str, list[dict]]:
    """Warm every variant up, then ``reps`` rounds over all variants (order rotated per round).

    With a static cache (``options``), the warm-up generates ``new_tokens`` too: the cache length
    is part of the compiled graphs' shapes, so a shorter warm-up would leave the compile to round 1.
    """
    warmup = new_tokens if options and options.get("cache_implementation") else max(warmup_tokens, 2)
    for v in variants:
        time_generate(v, input_ids, warmup, options)
        progress.update(1)
    samples: dict[str, list[dict]] = {v.name: [] for v in variants}
    for rep in range(reps):
        shift = rep % len(variants)
        for v in list(variants[shift:]) + list(variants[:shift]):
            samples[v.name].append(time_generate(v, input_ids, new_tokens, options))
            progress.update(1)
    return samples


def quartiles(values: Sequence[float]) -> dict:
    values = sorted(values)
    if len(values) == 1:
        q1 = med = q3 = values[0]
    else:
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}
