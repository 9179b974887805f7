"""Decode speed on the real model: batch 1, greedy, 64 new tokens, eager, one thread, interleaved rounds.

Variants (all on one set of weights, dlp_lora.bench.workload.shared_copy):
    base              the model without adapters
    peft_single       PEFT serving one task adapter (all seven projections, unmerged)
    dlp_tasks_K3      DLP-LoRA over the six task adapters, a fixed 3-adapter mixture
    dlp_N26_K3 / dlp_N100_K3   DLP-LoRA over 26 / 100 random rank-8 adapters, 3 per mixture
    dlp_qv_skip       a bank of the task adapters plus one q,v-only adapter, the mixture {qv: 1}: the op
                      runs on the 60 q_proj / v_proj modules only
    dlp_qv_all        the same with the skip turned off (every module's target mask set to all
                      adapters), as before modules were skipped: the op runs on all 210 modules
Ratios are paired per round (dlp_lora.bench.report.summarize), against base and peft_single.
Then one decode step of base, peft_single, dlp_tasks_K3 and dlp_qv_skip is profiled
(dlp_lora.bench.breakdown.decode_step_profile: self time per operator category, and the time
outside operators: Python), to say where DLP-LoRA's extra time goes.

Beside the timings, ``exactness``: the largest logit difference of DLP-LoRA (one adapter) and of PEFT
from PEFT in float64, on the speed prompt, and the logits' scale: on a 30-layer model float32 rounding
alone reaches ~1e-4, so tolerances are stated relative to that scale.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..bench.breakdown import PROFILE_ROUNDS, decode_step_profile, median_profile
from ..bench.report import summarize
from ..bench.timing import run_interleaved
from ..bench.variants import Variant, mixture_variant
from ..bench.workload import ModelShape, ensure_peft_adapters, load_banks, shared_copy

# Profiled after the timed rounds (where a goal is missed, this says where the time goes): the
# profiler's per-operator cost inflates variants that dispatch more operators, so its wall times
# are not the speed; the timed rounds are.
PROFILED = ("base", "peft_single", "dlp_tasks_K3", "dlp_qv_skip")
# Decode steps a profile covers beyond the short run's: a step of this model dispatches ~5,000
# operators, and parsing the profiler's events costs more than the steps themselves.
PROFILE_STEPS = 8
SPEED_MESSAGE = "Write a short story about a robot who learns to paint. Use simple sentences."


def _qv_adapter(base, out: Path, rank: int, alpha: int) -> Path:
    """A random q,v-only PEFT LoRA (written once)."""
    from peft import LoraConfig, get_peft_model

    if (out / "adapter_model.safetensors").is_file():
        return out
    model = get_peft_model(shared_copy(base), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (p.shape[1] ** -0.5 if "lora_A" in name
                                                                      else 0.02))
    model.save_pretrained(str(out))
    return out


def exactness(base, adapter_dir: Path, ids: torch.Tensor) -> dict:
    """max |logits - float64 PEFT logits| of float32 PEFT and of float32 DLP-LoRA, one adapter."""
    import copy

    from peft import PeftModel

    from ..bank import LoRABank
    from ..patch import patch_model, use_mixture

    with torch.no_grad():
        peft32 = PeftModel.from_pretrained(shared_copy(base), str(adapter_dir)).eval()(input_ids=ids).logits
        peft64 = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(adapter_dir)).eval()
        reference = peft64(input_ids=ids).logits
        del peft64
        ours = patch_model(shared_copy(base), LoRABank.from_peft({"a": adapter_dir}))
        with use_mixture(ours, {"a": 1.0}):
            dlp32 = ours(input_ids=ids).logits
    scale = reference.abs().max().item()
    return {"logits_scale": scale,
            "peft_fp32_vs_fp64": (peft32.double() - reference).abs().max().item(),
            "dlp_fp32_vs_fp64": (dlp32.double() - reference).abs().max().item(),
            "dlp_vs_peft_fp32": (dlp32 - peft32).abs().max().item()}


def measure(model_dir: Path, tokenizer, adapter_dirs: dict[str, Path], recipe, root: Path,
            log: Callable[[str], None]) -> dict:
    from peft import PeftModel
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ..bank import LoRABank
    from ..bench.provenance import load_average
    from ..patch import patch_model, use_mixture
    from . import tasks
    from .pipeline import chat_prompt

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    base.requires_grad_(False)
    c = base.config
    shape = ModelShape(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                       c.num_key_value_heads, c.vocab_size)
    task_names = list(tasks.TASKS)
    variants = [Variant("base", "base", base)]
    single = PeftModel.from_pretrained(shared_copy(base), str(adapter_dirs[task_names[0]])).eval()
    variants.append(Variant("peft_single", "peft", single, n_adapters=1))
    task_bank = LoRABank.from_peft({t: adapter_dirs[t] for t in task_names})
    tasks_model = patch_model(shared_copy(base), task_bank)
    mix = {task_names[0]: 0.5, task_names[1]: 0.3, task_names[2]: 0.2}
    variants.append(Variant("dlp_tasks_K3", "dlp", tasks_model, n_adapters=len(task_names), k=3,
                            context=lambda batch: use_mixture(tasks_model, mix)))
    log(f"speed: writing / reading {max(recipe.speed_banks)} random rank-{recipe.lora_rank} adapters")
    random_dirs = ensure_peft_adapters(base, shape, max(recipe.speed_banks), rank=recipe.lora_rank,
                                       alpha=recipe.lora_alpha, seed=recipe.seed, cache_dir=root / "speed")
    banks = load_banks(recipe.speed_banks, random_dirs, torch.float32, "cpu")
    for n, bank in banks.items():
        variants.append(mixture_variant(base, bank, n, 3))
    qv = _qv_adapter(base, root / "speed" / "qv_only", recipe.lora_rank, recipe.lora_alpha)
    qv_bank = LoRABank.from_peft({**{t: adapter_dirs[t] for t in task_names}, "qv": qv})
    skip_model = patch_model(shared_copy(base), qv_bank)
    all_model = patch_model(shared_copy(base), qv_bank)
    for module in all_model.modules():
        if hasattr(module, "dlp_lora_adapters"):
            module.dlp_lora_adapters = -1  # every bit: the op runs on every module, as before the skip
    variants.append(Variant("dlp_qv_skip", "dlp", skip_model, n_adapters=len(task_names) + 1, k=1,
                            context=lambda batch: use_mixture(skip_model, {"qv": 1.0})))
    variants.append(Variant("dlp_qv_all", "dlp", all_model, n_adapters=len(task_names) + 1, k=1,
                            context=lambda batch: use_mixture(all_model, {"qv": 1.0})))
    ids = tokenizer([chat_prompt(tokenizer, SPEED_MESSAGE)], return_tensors="pt",
                    add_special_tokens=False)["input_ids"]
    patched_modules = sum(hasattr(m, "dlp_lora_adapters") for m in tasks_model.modules())
    log(f"speed: {len(variants)} variants x {recipe.speed_rounds} rounds, {recipe.speed_new_tokens} "
        f"new tokens, prompt {ids.shape[1]} tokens, {patched_modules} patched modules")
    load_start = load_average()
    with tqdm(total=len(variants) * (recipe.speed_rounds + 1), desc="speed", disable=None) as bar:
        samples = run_interleaved(variants, ids, new_tokens=recipe.speed_new_tokens, reps=recipe.speed_rounds,
                                  warmup_tokens=4, progress=bar)
    rows = summarize(variants, samples, 1, references=["base", "peft_single"])
    log(f"speed: profiling one decode step of {', '.join(PROFILED)} ({PROFILE_ROUNDS} interleaved rounds)")
    profiles = {name: [] for name in PROFILED}
    for _ in range(PROFILE_ROUNDS):
        for variant in (v for v in variants if v.name in PROFILED):
            profiles[variant.name].append(decode_step_profile(variant, ids, {}, PROFILE_STEPS))
    for row in rows:
        if row["variant"] in profiles:
            row["profile_per_decode_step"] = median_profile(profiles[row["variant"]])
            cpu = row["profile_per_decode_step"]["cpu_ms"]
            log(f"speed profile {row['variant']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu.items()))
    exact = exactness(base, adapter_dirs[task_names[0]], ids)
    log(f"exactness (one adapter, float32, vs PEFT float64): {exact}")
    for row in rows:
        log(f"speed {row['variant']}: {row['decode_ms_per_token']['median']:.1f} ms/token, "
            f"x base {row['ratio_to_base']['median']:.3f} [IQR {row['ratio_to_base']['iqr']:.3f}]")
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": recipe.speed_new_tokens,
            "rounds": recipe.speed_rounds, "threads": 1, "patched_modules": patched_modules,
            "task_mixture": mix, "load_average_start": load_start, "load_average_end": load_average(),
            "exactness": exact, "rows": rows}
