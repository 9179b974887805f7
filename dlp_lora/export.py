"""export_mixture: write one weighted mixture of a LoRABank's adapters as a single plain PEFT LoRA adapter.

    path = export_mixture(bank, {"math": 0.7, "de_en": 0.3}, "adapters/mix-math-de")

Engines that apply one adapter per request (vLLM, SGLang) cannot mix several LoRAs, but a mixture
is one LoRA. For adapters k with scaling s_k and mixture weight w_k, per module,

    sum_k w_k s_k B_k A_k  =  B' A'    A' = concat_k(w_k A_k)      [R, d_in]   (rows)
                                       B' = concat_k(s_k B_k)      [d_out, R]  (columns)

with scaling 1 (r == lora_alpha == R, no rslora, no rank/alpha patterns). The bank already holds
s_k B_k (per-module rank, alpha, rslora and patterns folded in at load), so every adapter's own
scaling rule is honoured by construction. This is PEFT's ``add_weighted_adapter(combination_type="cat")``,
without its limits (rslora on the first adapter, mixed target_modules types).

Choices:
- Adapters are concatenated in bank order, whatever the order of the mixture dict, so the same
  mixture always gives the same bytes and the same content hash.
- The mixture follows the one rule of dlp_lora/mixture.py: negative weights are allowed (A' = w A
  is exact for any sign), zero weights are dropped (they add nothing and would only spend rank).
- A module that some adapters of the mixture do not target gets no rows from them; a module none of
  them targets is left out. Every module is zero-padded to one rank R (PEFT and vLLM take a single
  ``r`` here), R = the largest per-module sum of ranks, or ``pad_rank``.
- ``dlp_mixture.json`` beside the weights records the sources, their weights and a sha256 of the
  exported tensors and config, so one mixture exported twice is recognisably one adapter
  (engines cache adapters by name: ``suggested_name`` is ``mix-<first 12 hex digits>``).
- The directory is written under a temporary name beside ``out_dir`` and renamed into place, so a
  failure never leaves a half-written adapter and an existing one survives until the new one is
  complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

import torch

from ._atomic import atomic_directory
from .adapters import CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME
from .bank import LoRABank
from .mixture import Mixture, MixtureError
from .ops.reference import accumulation_dtype

__all__ = ["export_mixture", "mixture_rank", "content_hash", "ExportError", "VLLM_MAX_LORA_RANKS"]

MIXTURE_NAME = "dlp_mixture.json"
FORMAT = "dlp-lora-mixture"
FORMAT_VERSION = 1
# The values vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks); it allocates every
# adapter slot at that rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Fields of PEFT's LoraConfig.to_dict() left out of adapter_config.json: the patterns because the
# export has none (vLLM reads them when present), peft_version from the hash only (see content_hash).
_DROPPED_FIELDS = ("rank_pattern", "alpha_pattern")
_UNHASHED_FIELDS = ("peft_version",)


class ExportError(ValueError):
    """export_mixture refused its input before writing anything; ``arg`` names the bad argument."""

    def __init__(self, arg: str, detail: str):
        super().__init__(f"export_mixture: `{arg}` {detail}")
        self.arg, self.detail = arg, detail


def export_mixture(
    bank: LoRABank,
    mixture: Mapping[str, float],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    pad_rank: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``mixture`` = {adapter name: weight} of ``bank`` as one PEFT LoRA adapter in ``out_dir``.

    Writes adapter_config.json, adapter_model.safetensors (``base_model.model.<module>.lora_A.weight``
    [R, d_in] and ``.lora_B.weight`` [d_out, R], ``dtype``, default the bank's) and dlp_mixture.json.
    base_model_name_or_path: recorded in the config (default: the one the sources share, if any).
    pad_rank: export at this rank R (zero rows / columns), e.g. the engine's max_lora_rank.
    overwrite: replace an existing non-empty ``out_dir`` (only one holding an adapter).
    Returns ``out_dir`` as a Path. Raises ExportError (a ValueError) naming the argument, before
    anything is written, for a mixture that breaks the rule of :mod:`dlp_lora.mixture` (negative
    weights are allowed), a ``pad_rank`` below the mixture's rank, or an ``out_dir`` that exists.
    """
    kept, dropped = _check_mixture(bank, mixture)
    dtype = _check_dtype(bank, dtype)
    out = _check_out_dir(out_dir, overwrite)
    rank = mixture_rank(bank, dict(kept))
    if rank == 0:
        raise ExportError("mixture", f"{dict(kept)}: its adapters target no module of the bank")
    if pad_rank is not None:
        if isinstance(pad_rank, bool) or not isinstance(pad_rank, int) or pad_rank < 1:
            raise ExportError("pad_rank", f"must be a positive int, got {pad_rank!r}")
        if pad_rank < rank:
            raise ExportError("pad_rank", f"{pad_rank} is smaller than the mixture's rank {rank}")

    out_rank = pad_rank or rank
    tensors = _mixture_tensors(bank, kept, dtype, out_rank)
    config = _adapter_config(bank, [name for name, _ in kept], tensors, out_rank, base_model_name_or_path)
    digest = content_hash(tensors, config)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "content_sha256": digest,
        "suggested_name": f"mix-{digest[:12]}",
        "rank": out_rank,
        "mixture_rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
        "adapters": [
            {
                "name": name,
                "weight": weight,
                "path": str(bank.sources[name].resolve()) if name in bank.sources else None,
                "rank": max(e.ranks[bank.index(name)] for e in bank.modules.values()),
            }
            for name, weight in kept
        ],
        "dropped_zero_weight": dropped,
    }
    _write_atomically(out, tensors, config, record)
    return out


def mixture_rank(bank: LoRABank, mixture: Mapping[str, float]) -> int:
    """The rank R the exported adapter needs: the largest per-module sum of the adapters' ranks."""
    ids = [bank.index(name) for name, weight in mixture.items() if weight != 0]
    return max((sum(e.ranks[i] for i in ids) for e in bank.modules.values()), default=0)


def content_hash(tensors: Mapping[str, torch.Tensor], config: Mapping) -> str:
    """sha256 (hex) of adapter_config.json's fields and of every tensor's name, dtype, shape and bytes.

    Independent of dict order and of the PEFT version that wrote the config, so the same adapter
    exported twice, anywhere, hashes the same.
    """
    h = hashlib.sha256()
    fields = {k: v for k, v in config.items() if k not in _UNHASHED_FIELDS}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"\n{key}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- checks (all before anything is computed or written) -----------------------------------------


def _check_mixture(bank: LoRABank, mixture) -> tuple[list[tuple[str, float]], list[str]]:
    """(kept [(name, weight)] in bank order, names given with weight 0), or ExportError."""
    try:
        checked = Mixture(mixture, bank.names)
    except MixtureError as e:
        raise ExportError("mixture", e.detail) from None
    return checked.in_order(bank.names), list(checked.dropped)


def _check_dtype(bank: LoRABank, dtype) -> torch.dtype:
    dtype = bank.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ExportError("dtype", f"must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _check_out_dir(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError("out_dir", f"{str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError("out_dir", f"{str(out)!r} exists and is not empty (overwrite replaces it)")
        # overwrite deletes the old directory: only ever one that holds an adapter
        if not ((out / CONFIG_NAME).is_file() or (out / MIXTURE_NAME).is_file()):
            raise ExportError(
                "out_dir",
                f"{str(out)!r} is not empty and holds no {CONFIG_NAME} or {MIXTURE_NAME}; "
                "refusing to replace a directory that is not an adapter",
            )
    return out


# --- the adapter -----------------------------------------------------------------------------------


def _mixture_tensors(
    bank: LoRABank, kept: list[tuple[str, float]], dtype: torch.dtype, rank: int
) -> dict[str, torch.Tensor]:
    """PEFT-named lora_A [rank, d_in] / lora_B [d_out, rank] of ``dtype`` on the CPU, per targeted module."""
    acc = accumulation_dtype(torch.promote_types(dtype, bank.dtype or dtype))  # float64 if either is
    tensors: dict[str, torch.Tensor] = {}
    for module_name, entry in bank.modules.items():
        ids = [(bank.index(name), w) for name, w in kept]
        blocks = [(i, w, entry.ranks[i]) for i, w in ids if entry.ranks[i] > 0]
        if not blocks:
            continue
        lora_a = torch.zeros(rank, entry.d_in, dtype=dtype)
        lora_b = torch.zeros(entry.d_out, rank, dtype=dtype)
        row = 0
        for i, w, r in blocks:
            # the weight goes on A; lora_b already holds scaling * B of adapter i
            lora_a[row : row + r] = (entry.lora_a[i, :r].to("cpu", acc) * w).to(dtype)
            lora_b[:, row : row + r] = entry.lora_b[i, :, :r].to("cpu", dtype)
            row += r
        prefix = f"{PEFT_PREFIX}{module_name}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
    return tensors


def _adapter_config(
    bank: LoRABank, names: list[str], tensors: Mapping[str, torch.Tensor], rank: int, base_model: str | None
) -> dict:
    """adapter_config.json as PEFT writes it (LoraConfig.to_dict), for r == lora_alpha == rank."""
    from peft import LoraConfig

    sources = [bank.configs.get(name, {}) for name in names]
    task_types = sorted({str(c["task_type"]) for c in sources if c.get("task_type")})
    if len(task_types) > 1:
        raise ExportError("mixture", f"mixes adapters of different task_type {task_types}: {names}")
    if base_model is None:
        shared = {c.get("base_model_name_or_path") for c in sources}
        base_model = shared.pop() if len(shared) == 1 else None
    modules = sorted(key[len(PEFT_PREFIX) : -len(".lora_A.weight")] for key in tensors if ".lora_A." in key)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=_target_modules(sources, modules),
        bias="none",
        use_rslora=False,
        lora_dropout=0.0,
        # GPT-2 style Conv1D modules: PEFT needs the flag; lora_A / lora_B keep nn.Linear shapes anyway
        fan_in_fan_out=any(c.get("fan_in_fan_out") for c in sources),
        task_type=task_types[0] if task_types else None,
        base_model_name_or_path=base_model,
        inference_mode=True,
    ).to_dict()
    for key in _DROPPED_FIELDS:
        config.pop(key, None)
    return {k: _plain(v) for k, v in config.items()}


def _target_modules(sources: list[dict], modules: list[str]) -> list[str]:
    """The module type names (``q_proj``) when they select exactly ``modules``, else the full names.

    Type names are what PEFT writes and what every engine reads. They are exact when every source
    adapter listed plain type names and targeted every layer: then each module of those types is in
    ``modules``. Otherwise (regex targets, layers_to_transform, exclude_modules, banks built from
    tensors) the full module names are listed; PEFT matches a list entry as a dotted suffix, so
    they select exactly ``modules``.
    """
    types: set[str] = set()
    for config in sources:
        listed = config.get("target_modules")
        restricted = any(config.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
        if restricted or not isinstance(listed, list) or any("." in t for t in listed):
            return modules
        types.update(listed)
    if not {m.rsplit(".", 1)[-1] for m in modules} <= types:
        return modules
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def _plain(value):
    """JSON-ready: enums to their value, sets to sorted lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


# --- writing ----------------------------------------------------------------------------------------


def _write_atomically(out: Path, tensors: Mapping[str, torch.Tensor], config: dict, record: dict) -> None:
    """The three files, written beside ``out`` and renamed into place (see dlp_lora._atomic)."""
    from safetensors.torch import save

    with atomic_directory(out) as tmp:
        (tmp / SAFETENSORS_NAME).write_bytes(save(dict(tensors), metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / MIXTURE_NAME).write_text(json.dumps(record, indent=2) + "\n")
