"""The variants a benchmark compares: base, PEFT, DLP-LoRA (mixtures and router) and MeteoRA-style gating."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .workload import BenchSettings, shared_copy, target_linear_names


@dataclass
class Variant:
    """One way of running generate(): a model plus per-batch generate kwargs and context."""

    name: str
    family: str                        # base | peft | dlp | meteora
    model: nn.Module
    n_adapters: int | None = None
    k: int | None = None               # adapters per sequence (scaling sweep)
    form: str | None = None            # meteora form
    batch_sizes: tuple[int, ...] | None = None   # None: every batch size
    generate_kwargs: Callable[[int], dict] = lambda batch: {}
    context: Callable[[int], contextlib.AbstractContextManager] = lambda batch: contextlib.nullcontext()
    info: dict = field(default_factory=dict)


def peft_variants(base: nn.Module, adapter_dirs: Sequence[Path], max_batch: int) -> list[Variant]:
    """PEFT applied to shared copies of ``base``: single unmerged, single merged, mixed batch."""
    from peft import PeftModel

    single = PeftModel.from_pretrained(shared_copy(base), str(adapter_dirs[0])).eval()

    merged_tree = shared_copy(base)
    for name in target_linear_names(merged_tree):
        # merging writes into the weights: give those a private copy
        linear = merged_tree.get_submodule(name)
        linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    merged = PeftModel.from_pretrained(merged_tree, str(adapter_dirs[0])).merge_and_unload().eval()

    out = [Variant("peft_single", "peft", single, n_adapters=1),
           Variant("peft_merged", "peft", merged, n_adapters=1)]
    n_mixed = min(max_batch, len(adapter_dirs))
    if max_batch > 1 and n_mixed > 1:
        names = [f"task_{i:03d}" for i in range(n_mixed)]
        mixed = PeftModel.from_pretrained(shared_copy(base), str(adapter_dirs[0]), adapter_name=names[0])
        mixed.eval()
        for name, path in zip(names[1:], adapter_dirs[1:n_mixed], strict=True):
            mixed.load_adapter(str(path), adapter_name=name)
        out.append(Variant(
            "peft_mixed", "peft", mixed, n_adapters=n_mixed,
            batch_sizes=tuple(b for b in range(2, max_batch + 1)),
            generate_kwargs=lambda batch: {"adapter_names": [names[i % n_mixed] for i in range(batch)]},
            info={"adapters_per_batch": f"sequence i uses adapter i mod {n_mixed}"}))
    return out


def dlp_router_variant(base: nn.Module, bank, settings: BenchSettings, n: int) -> Variant:
    """patch_model with a randomly initialised Router: the full path, router call included.

    An untrained router gives nearly uniform probabilities, so top_p=0.6 keeps max_loras adapters
    with weights near 1/3; different prompts often get the same set (the JSON records them).
    """
    from ..patch import patch_model
    from ..router import Router

    torch.manual_seed(settings.seed + n)
    router = Router(list(bank.names)).eval()
    model = patch_model(shared_copy(base), bank, router, top_p=settings.top_p,
                        max_loras=settings.max_loras, reroute=settings.reroute)
    return Variant(f"dlp_router_N{n}", "dlp", model, n_adapters=n, k=min(settings.max_loras, n))


def mixture_variant(base: nn.Module, bank, n: int, k: int, name: str | None = None,
                    backend: str | None = None) -> Variant:
    """DLP-LoRA with K adapters per sequence given through use_mixture (the router bypassed).

    Sequence i mixes adapters i*k .. i*k+k-1 (mod N) with weights proportional to 1, 1/2, 1/4...
    (a router-like, decreasing mixture), so a batch of 8 at N >= 24 has 8 disjoint mixtures.
    backend: the op backend (default: automatic, triton on a GPU).
    """
    from ..patch import patch_model, use_mixture

    names = list(bank.names)
    model = patch_model(shared_copy(base), bank, backend=backend)
    raw = [2.0 ** -j for j in range(k)]
    weights = [w / sum(raw) for w in raw]

    def mixtures(batch):
        return [{names[(i * k + j) % n]: weights[j] for j in range(k)} for i in range(batch)]

    return Variant(name or f"dlp_N{n}_K{k}", "dlp", model, n_adapters=n, k=k,
                   context=lambda batch: use_mixture(model, mixtures(batch)))


def meteora_variant(base: nn.Module, bank, n: int, form: str, seed: int) -> Variant:
    from .baselines import patch_token_gating, stacks_from_bank

    model = patch_token_gating(shared_copy(base), stacks_from_bank(bank), form=form, seed=seed)
    return Variant(f"meteora_{form}_N{n}", "meteora", model, n_adapters=n, k=2, form=form)


def used_mixtures(variant: Variant) -> list[dict]:
    """The mixture each sequence got at the prefill of the variant's latest generate()."""
    log = getattr(variant.model, "dlp_routing_log", [])
    return [{name: round(w, 4) for name, w in zip(rec.adapters, rec.weights, strict=True)}
            for rec in sorted(log, key=lambda rec: rec.sequence) if rec.step == 0]


def _second_gpu_backend(device: str) -> bool:
    """True on a GPU where the automatic backend is triton and the cuda kernel is built too."""
    from .. import ops

    if not device.startswith("cuda"):
        return False
    return ops.resolve_backend(torch.device(device)) == "triton" and "cuda" in ops.available_backends(device)


def main_variants(base, banks: dict, adapter_dirs, settings: BenchSettings,
                  forms: Sequence[str]) -> list[Variant]:
    """The main table's variants, in table order: base, PEFT, then per N DLP-LoRA and MeteoRA."""
    variants = [Variant("base", "base", base)]
    variants += peft_variants(base, adapter_dirs, max(settings.batch_sizes))
    for n in settings.adapter_counts:
        k = min(settings.max_loras, n)
        variants.append(mixture_variant(base, banks[n], n, k, name=f"dlp_N{n}"))
        if _second_gpu_backend(settings.device):
            # The automatic choice on a GPU is triton; the compiled CUDA kernel launches from C++
            # (no Python launcher), which may matter in eager decode: time both.
            variants.append(mixture_variant(base, banks[n], n, k, name=f"dlp_cuda_N{n}", backend="cuda"))
        variants.append(dlp_router_variant(base, banks[n], settings, n))
        variants += [meteora_variant(base, banks[n], n, form, settings.seed) for form in forms]
    return variants
