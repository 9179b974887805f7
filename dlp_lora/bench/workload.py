"""What a benchmark runs on: the Llama shapes, run settings, shared base weights, PEFT adapters, prompts."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..options import DEFAULT_TOP_P
from .baselines import FORMS as _FORM_FUNCTIONS

FORMS = tuple(_FORM_FUNCTIONS)  # the MeteoRA-style execution forms
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    top_p: float = DEFAULT_TOP_P
    max_loras: int = 3
    reroute: str = "prompt"
    scaling: bool = False
    scaling_adapter_counts: tuple[int, ...] = (1, 10, 26, 50, 100)
    scaling_ks: tuple[int, ...] = (1, 2, 3, 4)
    scaling_new_tokens: int = 16
    scaling_reps: int = 3
    compile: bool = False
    loraflow: bool = False                   # LoRA-Flow variants in the main table
    loraflow_forms: tuple[str, ...] = ("loop", "op")
    variants: tuple[str, ...] | None = None  # fnmatch patterns of the variants to run; base always runs
    seed: int = 0
    model: ModelShape = field(default_factory=lambda: CPU_MODEL)


# The default: ~3 minutes on 2 idle cores (batch 8 prefills of 512 tokens dominate). Only N=26 and
# MeteoRA's strongest form (op), 16 new tokens, 2 rounds; same model, prompt and variants otherwise.
SHORT = dict(preset="short", new_tokens=16, batch_sizes=(1, 8), adapter_counts=(26,),
             meteora_forms=("op",), reps=2, scaling=False, loraflow=False)
FULL = dict(preset="full", new_tokens=64, batch_sizes=(1, 8), adapter_counts=(1, 26, 100),
            meteora_forms=FORMS, reps=9, scaling=True, scaling_new_tokens=32, scaling_reps=3, loraflow=True)


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


def random_prompts(batch: int, settings: BenchSettings, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + 7919 * batch)
    # skip the lowest ids (special tokens in real vocabularies)
    ids = torch.randint(100, vocab, (batch, settings.prompt_len), generator=generator)
    return ids.to(settings.device)


def load_banks(counts, adapter_dirs, dtype, device) -> dict:
    from ..bank import LoRABank

    return {n: LoRABank.from_peft({d.name: str(d) for d in adapter_dirs[:n]}, dtype=dtype, device=device)
            for n in sorted(set(counts))}
