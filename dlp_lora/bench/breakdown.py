"""Where a decode step's time goes, variant by variant (``dlp-lora bench --breakdown``).

Where a goal is missed, this says by how much and why. The MeteoRA goal (token-level gating costs
at least 2x DLP-LoRA's decode time) is a claim about what a decode step does, so this run measures
that, at batch 1, for ``base``, ``peft_single``, ``dlp_N`` and ``meteora_<form>_N``:

* ``weights_mb_per_token``: the weight bytes one decode step must read at least once (a model, not
  a measurement): every Linear of the base model (lm_head included), plus the adapters the variant
  touches in each targeted module: one for PEFT single, K for DLP-LoRA, and for MeteoRA its gate
  ``Linear(d_in, N)`` plus the top-2 adapters the token picked. Decode at batch 1 is bound by these
  reads on a CPU (and on a GPU once launches are hidden), so their ratio to base is the floor of
  the time ratio.
* ``profile_per_decode_step``: torch.profiler over two generate() calls of different lengths; the difference,
  divided by the extra steps, is the cost of one decode step without the prefill (median of
  PROFILE_ROUNDS interleaved rounds; the profiler's own per-call cost is in it): operator calls
  (every level of dispatch, nested ones included) and self time by category:

      matmul     aten::mm / addmm / bmm: the base Linears, lm_head, MeteoRA's gates and its bmm form
      attention  aten::_scaled_dot_product_*
      lora_op    the multi-LoRA op (dlp_lora::multi_lora, dlp_lora::multi_lora_python)
      other      everything else: small ops (topk, softmax, index, cat, casts, ...) and dispatch

  CPU self time always, and ``outside_ops``: the profiled wall time of the step minus the time in
  operators (Python: generate()'s loop, module calls, hooks, the gating code). On a GPU also the
  kernels: their number per step and their device time, by the same categories read off kernel
  names (cuBLAS / CUTLASS gemm and gemv, flash attention, our shrink / expand kernels of both
  backends). Kernel rows, not operator rows, because an operator's row repeats its kernels' time.
* ``decode_ms_per_token`` / ``ratio_to_base``: unprofiled, the variants interleaved round by round
  and the ratios paired per round (bench.summarize), because the profiler's per-operator overhead
  would inflate the variants that dispatch more operators.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

import torch
from torch import nn
from torch.autograd import DeviceType

CATEGORIES = ("matmul", "attention", "lora_op", "other")
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
_LORA_OP = {"dlp_lora::multi_lora", "dlp_lora::multi_lora_python"}
# A decode step's profile should not include the prefill: it is the difference of two generate()
# calls that differ only in the number of steps.
SHORT_STEPS = 4
PROFILE_ROUNDS = 3


def category(op_name: str) -> str:
    """The breakdown category of a profiler event name."""
    if op_name in _MATMUL:
        return "matmul"
    if op_name.startswith("aten::_scaled_dot_product") or op_name.startswith("aten::_flash_attention"):
        return "attention"
    if op_name in _LORA_OP:
        return "lora_op"
    return "other"


_KERNEL_WORDS = (  # (category, lower-case substrings of a GPU kernel's name), first match wins
    ("lora_op", ("shrink_kernel", "expand_kernel")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
)


def kernel_category(kernel_name: str) -> str:
    """The breakdown category of a GPU kernel, from its name."""
    name = kernel_name.lower()
    return next((cat for cat, words in _KERNEL_WORDS if any(w in name for w in words)), "other")


def weight_bytes_per_token(variant, base: nn.Module, rank: int, target_modules) -> dict:
    """Weight bytes one batch-1 decode step reads at least once: base Linears + touched adapters."""
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    size = next(iter(linears.values())).weight.element_size()
    base_bytes = sum(m.weight.numel() for m in linears.values()) * size
    targets = [m for name, m in linears.items() if name.rsplit(".", 1)[-1] in target_modules]
    adapter_bytes = sum(rank * (m.in_features + m.out_features) for m in targets) * size
    gate_bytes = 0
    if variant.family == "peft":
        adapters = 0 if variant.name == "peft_merged" else 1
    elif variant.family == "dlp":
        adapters = variant.k
    elif variant.family == "meteora":
        adapters = min(2, variant.n_adapters)  # top-2 of one token's gate logits
        gate_bytes = variant.n_adapters * sum(m.in_features for m in targets) * size
    else:
        adapters = 0
    extra = adapters * adapter_bytes + gate_bytes
    return {"base_mb": base_bytes / 1e6, "adapters_read": adapters,
            "adapter_mb": adapters * adapter_bytes / 1e6, "gate_mb": gate_bytes / 1e6,
            "total_mb": (base_bytes + extra) / 1e6, "ratio_to_base": (base_bytes + extra) / base_bytes}


def _profile_generate(variant, prompts: torch.Tensor, steps: int, options: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .timing import time_generate

    on_gpu = prompts.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        timing = time_generate(variant, prompts, steps, options)
    cpu_us, device_us, calls, kernels = defaultdict(float), defaultdict(float), 0, 0
    category_calls = defaultdict(int)
    for event in prof.key_averages():
        if event.device_type == DeviceType.CPU:
            cpu_us[category(event.key)] += event.self_cpu_time_total
            category_calls[category(event.key)] += event.count
            calls += event.count
        else:  # a GPU kernel (or copy / memset)
            device_us[kernel_category(event.key)] += event.self_device_time_total
            kernels += event.count
    # wall time of the whole generate() under the profiler (its first step stamped after prefill)
    wall_s = timing["prefill_s"] + timing["decode_mean_s"] * max(steps - 1, 1)
    return {"cpu_us": cpu_us, "device_us": device_us, "calls": calls, "category_calls": category_calls,
            "kernels": kernels, "wall_us": wall_s * 1e6}


def decode_step_profile(variant, prompts: torch.Tensor, options: dict, steps: int) -> dict:
    """One decode step's operator calls and self time (ms) per category, prefill excluded."""
    short = _profile_generate(variant, prompts, SHORT_STEPS, options)
    long = _profile_generate(variant, prompts, SHORT_STEPS + steps, options)
    per_step = {
        "calls": (long["calls"] - short["calls"]) / steps,
        "calls_by_category": {c: (long["category_calls"][c] - short["category_calls"][c]) / steps
                              for c in CATEGORIES},
        "cpu_ms": {c: (long["cpu_us"][c] - short["cpu_us"][c]) / steps / 1e3 for c in CATEGORIES},
    }
    per_step["cpu_ms"]["ops_total"] = sum(per_step["cpu_ms"].values())
    # Host time in no operator: Python (generate()'s loop, module calls, hooks, the gating code).
    per_step["wall_ms"] = (long["wall_us"] - short["wall_us"]) / steps / 1e3
    per_step["cpu_ms"]["outside_ops"] = per_step["wall_ms"] - per_step["cpu_ms"]["ops_total"]
    if prompts.device.type == "cuda":
        per_step["kernels"] = (long["kernels"] - short["kernels"]) / steps
        per_step["device_ms"] = {c: (long["device_us"][c] - short["device_us"][c]) / steps / 1e3
                                 for c in CATEGORIES}
        per_step["device_ms"]["total"] = sum(per_step["device_ms"].values())
    return per_step


def breakdown_variants(variants):
    """The variants the breakdown compares: base, PEFT single, DLP-LoRA (use_mixture), MeteoRA.

    Left out: peft_merged (the base model's work), dlp_router_N (dlp_N plus one router call per
    prompt), dlp_cuda_N and peft_mixed (batch > 1).
    """
    keep = re.compile(r"base|peft_single|dlp_N\d+|meteora_\w+_N\d+")
    return [v for v in variants if keep.fullmatch(v.name)]


def run_breakdown(base: nn.Module, banks: dict, adapter_dirs, settings, progress) -> list[dict]:
    """Timed rounds, then PROFILE_ROUNDS profiles per variant, at batch 1; one row per variant."""
    from .report import summarize
    from .timing import generate_options, run_interleaved
    from .variants import main_variants
    from .workload import TARGET_MODULES, random_prompts

    variants = breakdown_variants(main_variants(base, banks, adapter_dirs, settings, settings.meteora_forms))
    prompts = random_prompts(1, settings, base.config.vocab_size)
    options = generate_options(settings)
    progress.reset(total=len(variants) * (1 + settings.reps + PROFILE_ROUNDS))  # warm-up, rounds, profiles
    progress.set_description("breakdown: timed rounds")
    samples = run_interleaved(variants, prompts, new_tokens=settings.new_tokens, reps=settings.reps,
                              warmup_tokens=settings.warmup_tokens, progress=progress, options=options)
    rows = summarize(variants, samples, 1, references=("base",))
    progress.set_description("breakdown: profiles")
    # Profiled rounds, interleaved like the timed ones: one profile moved a category by 30% here.
    profiles: dict[str, list[dict]] = {v.name: [] for v in variants}
    for _ in range(PROFILE_ROUNDS):
        for variant in variants:
            profiles[variant.name].append(decode_step_profile(variant, prompts, options, settings.new_tokens))
            progress.update(1)
    for row, variant in zip(rows, variants, strict=True):
        row["weights_mb_per_token"] = weight_bytes_per_token(variant, base, settings.rank, TARGET_MODULES)
        row["profile_per_decode_step"] = median_profile(profiles[variant.name])
    return rows


def median_profile(profiles: list[dict]) -> dict:
    """The per-key median of several decode_step_profile() results (same keys), plus their count."""
    def median_of(values):
        if isinstance(values[0], dict):
            return {key: median_of([v[key] for v in values]) for key in values[0]}
        return statistics.median(values)

    return {**median_of(profiles), "rounds": len(profiles)}
