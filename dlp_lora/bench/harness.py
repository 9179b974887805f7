"""End-to-end decode benchmark: DLP-LoRA against the base model, PEFT and MeteoRA-style gating.

    dlp-lora bench --out benchmarks/results/e2e_cpu.json            # short preset (~3 min, 2 idle cores)
    dlp-lora bench --full --out benchmarks/results/e2e_cpu.json     # issue 4's complete configuration
    python -m dlp_lora.bench --help

The short preset keeps the model, prompt and batch sizes but runs only N=26, MeteoRA's strongest
form (op), 16 new tokens and 2 rounds, without the scaling sweep. ``--full``: N in {1, 26, 100},
all three MeteoRA forms, 64 new tokens, 9 rounds, plus the sweep (~60 min at 1 thread; with 5 rounds,
one or two disturbed rounds moved a median by 30% on this shared VM).
On a machine shared with other work, use ``--threads 1``: two OpenMP threads whose barriers wait
on descheduled threads made decode ~15x slower here, and the ratios meaningless.

What one run does (every number it reports comes from this run):

* builds a Llama model from a config (no download): on CPU hidden 1024, 8 layers, intermediate
  2816, fp32; on CUDA a ~1.1B TinyLlama-shaped model in bf16;
* writes N random, non-zero PEFT adapters (r=8, all seven projections) with ``get_peft_model`` +
  ``save_pretrained`` into a cache directory (reused by later runs);
* builds the variants on one set of shared base weights: ``base``; PEFT ``peft_single`` (one
  adapter, unmerged), ``peft_merged`` (merge_and_unload), ``peft_mixed`` (``adapter_names=``, one
  adapter per sequence, batch > 1 only); for every N, DLP-LoRA as ``dlp_N`` (patch_model, every
  sequence its own mixture of K=3 adapters through use_mixture) and ``dlp_router_N`` (patch_model
  with a Router, top_p=0.6, max_loras=3), and ``meteora_{loop,bmm,op}_N`` (dlp_lora.bench.baselines,
  top-2 token gating); on a GPU with both kernels, ``dlp_cuda_N`` too (``dlp_N`` with the compiled
  CUDA kernel instead of the automatic Triton one);
* greedy ``generate()`` of ``new_tokens`` tokens after a ``prompt_len``-token random prompt, every
  sequence of a batch its own prompt (so its own mixture); one warm-up per variant, then
  ``reps`` rounds that visit every variant once (round-robin, the order rotated each round);
* times every generation step with a LogitsProcessor clock: decode time per token = the median
  interval between steps (the mean is reported too), so prefill is reported apart;
* reports medians and interquartile ranges, and ratios to ``base`` and to ``peft_single`` as the
  median over rounds of the paired ratio (same round, so load drift cancels); the goals of
  issue 4 are checked on those ratios (the MeteoRA one on the ratio of median decode times);
* with ``--compile``: every variant generates with a static KV cache and transformers' automatic
  torch.compile of the decode steps (inductor; mode="reduce-overhead", i.e. CUDA graphs on a GPU);
  the warm-up compiles, and the prefill runs eager as transformers does;
* optional scaling sweep (``--full`` or ``--scaling``): N in {1,10,26,50,100} x K in {1..4}
  adapters per sequence through ``use_mixture`` at batch 1, plus MeteoRA (op form) per N,
  plotted as time ratio to base against N (PNG).

Routing, honestly: ``dlp_N`` fixes the mixtures (sequence i: adapters 3i..3i+2, weights 4/7, 2/7,
1/7), so the 8 sequences of a batch have 8 different mixtures, as the issue asks; the router is
bypassed. ``dlp_router_N`` runs the real path with a Router of random (untrained) weights: its
nearly uniform softmax makes top_p=0.6 keep max_loras=3 adapters, but different prompts often
share one set. The JSON records the mixtures each sequence used. The MeteoRA gates are random.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .provenance import load_average, machine_info, timestamp, versions

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMS = ("loop", "bmm", "op")


@dataclass(frozen=True)
class ModelShape:
    """A Llama architecture built from a config (random weights, no download)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**asdict(self), max_position_embeddings=2048, tie_word_embeddings=False)


CPU_MODEL = ModelShape(1024, 2816, 8, 16, 16)
# TinyLlama-1.1B's shape: about 1.1B parameters.
GPU_MODEL = ModelShape(2048, 5632, 22, 32, 4)
# For smoke tests of the harness itself: seconds, not minutes; its numbers mean nothing.
TINY_MODEL = ModelShape(64, 176, 2, 4, 4, vocab_size=512)
MODELS = {"cpu": CPU_MODEL, "gpu": GPU_MODEL, "tiny": TINY_MODEL}


@dataclass
class BenchSettings:
    """Everything that defines a run; stored verbatim in the output JSON."""

    preset: str = "short"
    device: str = "cpu"
    dtype: str = "float32"
    prompt_len: int = 64
    new_tokens: int = 16
    batch_sizes: tuple[int, ...] = (1, 8)
    adapter_counts: tuple[int, ...] = (26,)
    meteora_forms: tuple[str, ...] = ("op",)
    reps: int = 2
    warmup_tokens: int = 4
    rank: int = 8
    lora_alpha: int = 16
    top_p: float = 0.6
    max_loras: int = 3
    reroute: str = "prompt"
    scaling: bool = False
    scaling_adapter_counts: tuple[int, ...] = (1, 10, 26, 50, 100)
    scaling_ks: tuple[int, ...] = (1, 2, 3, 4)
    scaling_new_tokens: int = 16
    scaling_reps: int = 3
    compile: bool = False
    variants: tuple[str, ...] | None = None  # fnmatch patterns of the variants to run; base always runs
    seed: int = 0
    model: ModelShape = field(default_factory=lambda: CPU_MODEL)


# The default: ~3 minutes on 2 idle cores (batch 8 prefills of 512 tokens dominate). Only N=26 and
# MeteoRA's strongest form (op), 16 new tokens, 2 rounds; same model, prompt and variants otherwise.
SHORT = dict(preset="short", new_tokens=16, batch_sizes=(1, 8), adapter_counts=(26,),
             meteora_forms=("op",), reps=2, scaling=False)
FULL = dict(preset="full", new_tokens=64, batch_sizes=(1, 8), adapter_counts=(1, 26, 100),
            meteora_forms=FORMS, reps=9, scaling=True, scaling_new_tokens=32, scaling_reps=3)


# ----------------------------------------------------------------------------- model & adapters

def build_base_model(shape: ModelShape, *, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config()).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are ``model``'s own tensors (no weight copy).

    Each variant patches or wraps its own tree in place, and all of them read one set of weights.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _adapter_cache_key(shape: ModelShape, rank: int, alpha: int, dtype: torch.dtype, seed: int) -> str:
    text = json.dumps([asdict(shape), rank, alpha, str(dtype), seed, TARGET_MODULES, "v1"])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def ensure_peft_adapters(base: nn.Module, shape: ModelShape, count: int, *, rank: int, alpha: int,
                         seed: int, cache_dir: Path) -> list[Path]:
    """Directories of ``count`` random PEFT LoRA adapters for ``base``; written once, then reused.

    Built the way a user's adapters are: ``get_peft_model`` on the base, random non-zero A and B
    (normal, std 1/sqrt(d_in) and 0.02: a realistic delta size), ``save_pretrained``.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    root = cache_dir / f"adapters-{_adapter_cache_key(shape, rank, alpha, base.dtype, seed)}"
    dirs = [root / f"task_{i:03d}" for i in range(count)]
    missing = [i for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").exists()]
    if not missing:
        return dirs
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
    peft_model = get_peft_model(shared_copy(base), config)
    lora_params = [(name, p) for name, p in peft_model.named_parameters() if "lora_" in name]
    for i in tqdm(missing, desc="writing PEFT adapters", leave=False):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad():
            for name, p in lora_params:
                std = p.shape[1] ** -0.5 if "lora_A" in name else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        # write to a temporary name and rename, so an interrupted run never leaves half an adapter
        tmp = dirs[i].with_name(dirs[i].name + ".tmp")
        for stale in (tmp, dirs[i]):
            shutil.rmtree(stale, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        tmp.rename(dirs[i])
    return dirs


def target_linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES]


# ----------------------------------------------------------------------------- variants

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


# ----------------------------------------------------------------------------- timing

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


def summarize(variants: Sequence[Variant], samples: dict[str, list[dict]], batch: int,
              references: Sequence[str]) -> list[dict]:
    """Per variant: decode ms/token, tokens/s, prefill ms, and paired ratios to each reference.

    ratio_to_<ref>: quartiles over rounds of (this variant's decode time / ref's, same round);
    cpu_time_ratio_to_<ref>: the same with process CPU time (a cross-check on a busy machine).
    """
    def column(name, key):
        return [s[key] for s in samples[name]]

    def in_ms(values):
        return {k: (x * 1e3 if k != "n" else x) for k, x in quartiles(values).items()}

    rows = []
    for v in variants:
        decode = column(v.name, "decode_s")
        row = {
            "variant": v.name, "family": v.family, "batch": batch, "n_adapters": v.n_adapters,
            "k": v.k, "form": v.form,
            "decode_ms_per_token": in_ms(decode),
            "decode_mean_ms_per_token": in_ms(column(v.name, "decode_mean_s")),
            "tokens_per_s": batch / statistics.median(decode),
            "prefill_ms": in_ms(column(v.name, "prefill_s")),
            "decode_cpu_ms_per_token": in_ms(column(v.name, "decode_cpu_s")),
        }
        for ref in references:
            if ref not in samples:
                continue
            for key, label in (("decode_s", "ratio_to"), ("decode_cpu_s", "cpu_time_ratio_to")):
                pairs = zip(column(v.name, key), column(ref, key), strict=True)
                row[f"{label}_{ref}"] = quartiles([a / b for a, b in pairs])
            row[f"ratio_of_medians_to_{ref}"] = statistics.median(decode) / statistics.median(
                column(ref, "decode_s"))
        row.update(v.info)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the runs

def random_prompts(batch: int, settings: BenchSettings, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + 7919 * batch)
    # skip the lowest ids (special tokens in real vocabularies)
    ids = torch.randint(100, vocab, (batch, settings.prompt_len), generator=generator)
    return ids.to(settings.device)


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


def run_e2e(base, banks: dict, adapter_dirs, settings: BenchSettings, progress,
            on_batch_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The main table: every variant, every batch size, ratios to base and peft_single.

    ``on_batch_done(rows so far)`` runs after each batch size (run() saves a partial result there).
    """
    variants = main_variants(base, banks, adapter_dirs, settings, settings.meteora_forms)
    if settings.variants:
        variants = [v for v in variants if v.name == "base"
                    or any(fnmatch.fnmatchcase(v.name, pattern) for pattern in settings.variants)]
    options = generate_options(settings)
    rows = []
    for batch in settings.batch_sizes:
        active = [v for v in variants if v.batch_sizes is None or batch in v.batch_sizes]
        prompts = random_prompts(batch, settings, base.config.vocab_size)
        progress.set_description(f"e2e batch {batch}")
        samples = run_interleaved(active, prompts, new_tokens=settings.new_tokens, reps=settings.reps,
                                  warmup_tokens=settings.warmup_tokens, progress=progress, options=options)
        batch_rows = summarize(active, samples, batch, references=("base", "peft_single"))
        for row, v in zip(batch_rows, active, strict=True):
            if v.family == "dlp":
                mixtures = used_mixtures(v)
                row["mixtures"] = mixtures
                row["distinct_mixtures"] = len({tuple(sorted(m)) for m in mixtures})
        rows += batch_rows
        if on_batch_done is not None:
            on_batch_done(rows)
    return rows


def run_scaling(base, banks: dict, settings: BenchSettings, progress) -> list[dict]:
    """N x K sweep at batch 1: DLP-LoRA (use_mixture, K adapters) and MeteoRA (op form) vs base."""
    rows = []
    prompts = random_prompts(1, settings, base.config.vocab_size)
    options = generate_options(settings)
    for n in settings.scaling_adapter_counts:
        progress.set_description(f"scaling N={n}")
        variants = [Variant("base", "base", base)]
        variants += [mixture_variant(base, banks[n], n, k) for k in settings.scaling_ks if k <= n]
        variants.append(meteora_variant(base, banks[n], n, "op", settings.seed))
        samples = run_interleaved(variants, prompts, new_tokens=settings.scaling_new_tokens,
                                  reps=settings.scaling_reps, warmup_tokens=settings.warmup_tokens,
                                  progress=progress, options=options)
        rows += [dict(row, n_adapters=n) for row in summarize(variants, samples, 1, references=("base",))]
    return rows


# Issue 4's limits on DLP-LoRA's decode time ratio to base: (description, batch, N, limit).
GOALS = (
    ("DLP-LoRA N=26, batch 1: <= 1.10x base decode time", 1, 26, 1.10),
    ("DLP-LoRA N=100, batch 1: <= 1.15x base decode time", 1, 100, 1.15),
    ("DLP-LoRA batch 8 with 8 mixtures (N=26): <= 1.20x base decode time", 8, 26, 1.20),
    ("DLP-LoRA batch 8 with 8 mixtures (N=100): <= 1.20x base decode time", 8, 100, 1.20),
)


GPU_GOALS = (
    ("DLP-LoRA N=26, batch 1, GPU: <= 1.15x base decode time", 1, 26, 1.15),
    ("DLP-LoRA N=100, batch 1, GPU: <= 1.2x base decode time", 1, 100, 1.2),
    ("DLP-LoRA N=26, batch 8 (8 mixtures), GPU: <= 1.15x base decode time", 8, 26, 1.15),
    ("DLP-LoRA N=100, batch 8 (8 mixtures), GPU: <= 1.2x base decode time", 8, 100, 1.2),
)


def evaluate_goals(rows: list[dict], device: str = "cpu") -> list[dict]:
    """Issue 4's goals for ``device`` (CPU or GPU limits), checked against this run's paired ratios
    (a goal whose row was not measured is left out), plus MeteoRA's best form against DLP-LoRA."""
    by_key = {(r["variant"], r["batch"]): r for r in rows}
    goals = []
    for text, batch, n, limit in GPU_GOALS if device.startswith("cuda") else GOALS:
        row = by_key.get((f"dlp_N{n}", batch))
        if row:
            ratio = row["ratio_to_base"]["median"]
            goals.append({"goal": text, "measured": round(ratio, 4), "limit": limit, "met": ratio <= limit})
    for (name, batch), row in by_key.items():
        if not name.startswith("dlp_N"):  # the router variant is the same path plus one router call
            continue
        rivals = [r for r in rows if r["family"] == "meteora" and r["batch"] == batch
                  and r["n_adapters"] == row["n_adapters"]]
        if rivals:
            best = min(rivals, key=lambda r: r["decode_ms_per_token"]["median"])
            factor = best["decode_ms_per_token"]["median"] / row["decode_ms_per_token"]["median"]
            text = f"MeteoRA best form >= 2x {row['variant']} time (batch {batch})"
            goals.append({"goal": text, "measured": round(factor, 4), "limit": 2.0, "met": factor >= 2.0,
                          "best_form": best["form"]})
    return goals


# ----------------------------------------------------------------------------- plot

def plot_scaling(result: dict, path: Path) -> Path:
    """Decode time ratio to base against N: one line per K (DLP-LoRA) and one for MeteoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scaling"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in sorted({r["k"] for r in rows if r["family"] == "dlp"}):
        pts = sorted((r["n_adapters"], r["ratio_to_base"]) for r in rows
                     if r["family"] == "dlp" and r["k"] == k)
        _errorline(ax, pts, label=f"DLP-LoRA, K={k}", marker="o")
    pts = sorted((r["n_adapters"], r["ratio_to_base"]) for r in rows if r["family"] == "meteora")
    _errorline(ax, pts, label="MeteoRA-style top-2 gating (op form)", marker="s", linestyle="--",
               color="black")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("adapters in the bank (N)")
    ax.set_ylabel("decode time / base model (median, IQR)")
    m, cfg = result["config"]["model"], result["config"]
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine.get('torch_threads')} thread(s)"
    ax.set_title(f"Llama h={m['hidden_size']} L={m['num_hidden_layers']} {cfg['dtype']}, batch 1, "
                 f"r={cfg['rank']}, {where}", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _errorline(ax, pts, **kwargs):
    xs = [n for n, _ in pts]
    meds = [r["median"] for _, r in pts]
    err = [[r["median"] - r["q1"] for _, r in pts], [r["q3"] - r["median"] for _, r in pts]]
    ax.errorbar(xs, meds, yerr=err, capsize=3, **kwargs)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--full", action="store_true",
                        help="issue 4's complete configuration: 64 new tokens, N in {1,26,100}, all "
                             "three MeteoRA forms, 9 rounds, plus the N x K scaling sweep (tens of "
                             "minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="scaling plot PNG (default: next to --out, <stem>_scaling.png)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="model shape (default: cpu on CPU, gpu = ~1.1B bf16 on CUDA; tiny = smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--adapters", type=int, nargs="+", default=None,
                        help="bank sizes N for the main table")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=None, help="MeteoRA forms to run")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                        help="run the N x K scaling sweep (default: only with --full)")
    parser.add_argument("--scaling-adapters", type=int, nargs="+", default=None,
                        help="bank sizes N of the scaling sweep (default 1 10 26 50 100)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlp_lora_bench",
                        help="where the random PEFT adapters are written once and reused")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="every variant generates with a static KV cache and transformers' automatic "
                             "torch.compile of the decode steps (inductor, mode='reduce-overhead': CUDA "
                             "graphs on a GPU); the first generate() of each variant compiles")
    parser.add_argument("--variants", nargs="+", default=None, metavar="PATTERN",
                        help="run only the variants matching these fnmatch patterns (e.g. 'dlp_N*' "
                             "'meteora_op_*'); base always runs (the ratios need it)")
    parser.add_argument("--profile", metavar="VARIANT", default=None,
                        help="instead of benchmarking, profile one variant (e.g. dlp_N26, base) at batch "
                             "--batch-sizes[0] with torch.profiler and print the top operators")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the main table, break one decode step down per variant at batch 1 "
                             "(base, peft_single, dlp_N, meteora_<form>_N): weight bytes read, operator "
                             "calls and profiled time by category, plus unprofiled paired ratios "
                             "(dlp_lora/decode_breakdown.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = dict(FULL if args.full else SHORT)
    preset.update(device=device, seed=args.seed)
    if device.startswith("cuda"):
        preset.update(dtype="bfloat16", model=GPU_MODEL)
    if args.model:
        preset.update(model=MODELS[args.model])
    overrides = {"reps": args.reps, "new_tokens": args.new_tokens, "scaling": args.scaling,
                 "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
                 "adapter_counts": tuple(args.adapters) if args.adapters else None,
                 "meteora_forms": tuple(args.forms) if args.forms else None, "compile": args.compile,
                 "variants": tuple(args.variants) if args.variants else None,
                 "scaling_adapter_counts": tuple(args.scaling_adapters) if args.scaling_adapters else None}
    changed = {k: v for k, v in overrides.items() if v is not None and preset.get(k) != v}
    if changed:  # result files and README tables must not call an edited run by a preset's name
        preset["preset"] = f"{preset['preset']} + " + ", ".join(f"{k}={v}" for k, v in changed.items())
    preset.update(changed)
    settings = BenchSettings(**preset)
    if settings.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is measured between steps)")
    return settings


def load_banks(counts, adapter_dirs, dtype, device) -> dict:
    from ..bank import LoRABank

    return {n: LoRABank.from_peft({d.name: str(d) for d in adapter_dirs[:n]}, dtype=dtype, device=device)
            for n in sorted(set(counts))}


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, settings.dtype)
    load_start = load_average()
    if settings.device == "cpu" and load_start and load_start[0] > 0.5 and torch.get_num_threads() > 1:
        # Measured here: at load ~3 on 2 cores, 2 OpenMP threads made decode ~15x slower than 1
        # thread (each barrier waits for a descheduled thread). Ratios then mean little.
        warnings.warn(f"dlp-lora bench: load average is {load_start[0]} on a {os.cpu_count()}-core machine "
                      f"and torch uses {torch.get_num_threads()} threads: timings will be noisy and slow; "
                      "prefer an idle machine, or --threads 1", RuntimeWarning, stacklevel=2)
    base = build_base_model(settings.model, device=settings.device, dtype=dtype, seed=settings.seed)
    counts = set(settings.adapter_counts)
    if settings.scaling:
        counts |= set(settings.scaling_adapter_counts)
    adapter_dirs = ensure_peft_adapters(base, settings.model, max(max(counts), max(settings.batch_sizes)),
                                        rank=settings.rank, alpha=settings.lora_alpha, seed=settings.seed,
                                        cache_dir=args.cache_dir)
    banks = load_banks(counts, adapter_dirs, dtype, settings.device)

    if args.profile:
        return profile_variant(args.profile, base, banks, adapter_dirs, settings)

    result = {
        "benchmark": "end-to-end greedy decode",
        "created": timestamp(),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(settings.device), "versions": versions(),
        "config": {**{k: v for k, v in asdict(settings).items() if k != "model"},
                   "model": {**asdict(settings.model), "architecture": "LlamaForCausalLM",
                             "parameters": sum(p.numel() for p in base.parameters())},
                   "target_modules": list(TARGET_MODULES),
                   "routing": "dlp_N*: use_mixture, sequence i mixes adapters 3i..3i+2 (mod N) with "
                              "weights 4/7, 2/7, 1/7 (K=min(3, N)); dlp_router_N*: a Router with random "
                              "(untrained) weights, top_p and max_loras as above, routed once per prompt "
                              f"(reroute={settings.reroute!r}); scaling sweep: use_mixture with K adapters",
                   "meteora": "one random gate Linear(d_in, N) per module, top-2, softmax(top2 / 1.0)",
                   "generation": ("static KV cache; decode steps compiled by transformers' automatic "
                                  "torch.compile (CompileConfig defaults: inductor, reduce-overhead)"
                                  if settings.compile else "dynamic KV cache, eager"),
                   "timing": "decode time per token = median of the intervals between generation steps "
                             "of one generate() (decode_mean_ms_per_token: their mean); ratios = median "
                             "over rounds of the paired ratio within a round"},
    }
    if args.breakdown:
        return run_breakdown_file(args, settings, result, base, banks, adapter_dirs, load_start)

    per_n = 2 + len(settings.meteora_forms)
    total = sum((3 + (b > 1) + per_n * len(settings.adapter_counts)) * (settings.reps + 1)
                for b in settings.batch_sizes)
    if settings.scaling:
        total += sum((2 + sum(k <= n for k in settings.scaling_ks)) * (settings.scaling_reps + 1)
                     for n in settings.scaling_adapter_counts)

    def finish(complete: bool) -> None:
        result["complete"] = complete
        result["goals"] = evaluate_goals(result.get("e2e", []), settings.device)
        save_result(result, args.out, load_start)

    def batch_done(rows: list[dict]) -> None:
        # Saved after every batch size: a run stopped by a time limit (gpu_check.sh gives each step
        # a few minutes of a lent GPU) still leaves the batch sizes it finished, marked incomplete.
        result["e2e"] = rows
        finish(complete=False)

    with tqdm(total=total, unit="gen") as progress:
        result["e2e"] = run_e2e(base, banks, adapter_dirs, settings, progress, on_batch_done=batch_done)
        if settings.scaling:
            result["scaling"] = run_scaling(base, banks, settings, progress)
    if settings.scaling and (args.out or args.plot):
        plot = args.plot or args.out.with_name(args.out.stem + "_scaling.png")
        result["plot"] = str(plot_scaling(result, plot))
    finish(complete=True)
    print_summary(result)
    return result


def save_result(result: dict, out: Path | None, load_start) -> None:
    """Stamp the load average at the end and write ``result`` to ``out`` (if given) as JSON."""
    result["load_average"] = {"start": load_start, "end": load_average()}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")


def run_breakdown_file(args, settings: BenchSettings, result: dict, base, banks, adapter_dirs,
                       load_start) -> dict:
    """``--breakdown``: dlp_lora.bench.breakdown's rows, with the run's provenance, to --out."""
    from tqdm.auto import tqdm

    from .breakdown import run_breakdown

    result["benchmark"] = "decode-step breakdown at batch 1"
    with tqdm(unit="gen") as progress:  # run_breakdown sets the total once it knows the variants
        result["breakdown"] = run_breakdown(base, banks, adapter_dirs, settings, progress)
    save_result(result, args.out, load_start)
    for row in result["breakdown"]:
        prof, weights = row["profile_per_decode_step"], row["weights_mb_per_token"]
        print(f"{row['variant']:>18}: {row['decode_ms_per_token']['median']:7.2f} ms/token "
              f"(x base {row['ratio_to_base']['median']:.3f}); "
              f"weights x base {weights['ratio_to_base']:.3f}; "
              f"{prof['calls']:.0f} op calls/step; profiled ms/step "
              + " ".join(f"{k} {v:.2f}" for k, v in prof["cpu_ms"].items()))
    return result


def print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="decode, ms/token (median [IQR]) and ratios (paired median; CPU-time ratio)")
    for col in ("batch", "variant", "ms/token", "tok/s", "x base", "x base (CPU time)", "x peft_single"):
        table.add_column(col)
    for r in result["e2e"]:
        d = r["decode_ms_per_token"]
        table.add_row(str(r["batch"]), r["variant"], f"{d['median']:.1f} [{d['iqr']:.1f}]",
                      f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_base']['median']:.3f}",
                      f"{r['cpu_time_ratio_to_base']['median']:.3f}",
                      f"{r['ratio_to_peft_single']['median']:.3f}" if "ratio_to_peft_single" in r else "-")
    console = Console()
    console.print(table)
    for g in result["goals"]:
        console.print(f"{'MET ' if g['met'] else 'MISS'}  {g['goal']}: {g['measured']}")


def profile_variant(name: str, base, banks, adapter_dirs, settings: BenchSettings) -> dict:
    """torch.profiler over one generate() of one variant; prints the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    variants = {v.name: v for v in main_variants(base, banks, adapter_dirs, settings, FORMS)}
    if name not in variants:
        raise SystemExit(f"--profile: unknown variant {name!r}; choose from {sorted(variants)}")
    prompts = random_prompts(settings.batch_sizes[0], settings, base.config.vocab_size)
    options = generate_options(settings)
    time_generate(variants[name], prompts, settings.new_tokens if options else 4, options)
    activities = [ProfilerActivity.CPU]
    if settings.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        timing = time_generate(variants[name], prompts, settings.new_tokens, options)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"{name}: decode {timing['decode_s'] * 1e3:.2f} ms/token (under the profiler)")
    return {"profile": name, **timing}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlp-lora bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
