"""Reading PEFT LoRA adapter directories: adapter_config.json plus adapter_model.safetensors (or .bin).

Every config is checked before any tensor is read, and every refusal names the adapter and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch

__all__ = ["AdapterLoadError", "AdapterModule", "read_peft_adapter"]

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# PEFT initialisations that rewrite the base weights (W <- W - scaled A0 B0): such an adapter is only
# right on the modified base model, unless saved with `path_initial_model_for_weight_conversion`.
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class AdapterLoadError(ValueError):
    """An adapter directory cannot be loaded into a LoRABank (the message names the adapter)."""


# (lora_A [r, d_in], lora_B [d_out, r], scaling) of one module of one adapter
AdapterModule = tuple[torch.Tensor, torch.Tensor, float]


def read_peft_adapter(name: str, path: str | Path) -> tuple[dict[str, AdapterModule], dict]:
    """Read one PEFT LoRA adapter directory: ({module_name: (lora_A, lora_B, scaling)}, config dict).

    Module names are the base model's (PEFT's ``base_model.model.`` prefix stripped). The rank and
    alpha of each module follow PEFT: rank_pattern / alpha_pattern keys matched with PEFT's own
    ``get_pattern_key``, scaling = alpha / r, or alpha / sqrt(r) with use_rslora. Weights of
    modules that target_modules (regex: full match; list: suffix match), exclude_modules or
    layers_to_transform rule out are skipped with a warning, as PEFT would not load them.
    """
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"adapter {name!r}: no {CONFIG_NAME} in {str(path)!r}")
    raw = json.loads(config_file.read_text())
    config = _lora_config(name, path, raw)
    tensors = _read_tensors(name, path)

    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    unexpected, base_copies = [], []
    for key, tensor in tensors.items():
        module_key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if module_key.endswith(".base_layer.weight"):
            base_copies.append(module_key[: -len(".base_layer.weight")])
        elif module_key.endswith(".lora_A.weight"):
            lora_a[module_key[: -len(".lora_A.weight")]] = tensor
        elif module_key.endswith(".lora_B.weight"):
            lora_b[module_key[: -len(".lora_B.weight")]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterLoadError(
            f"adapter {name!r} ({str(path)!r}) holds tensors that are not LoRA A/B weights of Linear layers: "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}. dlp-lora only mixes LoRA deltas; "
            "modules_to_save, trainable tokens, embedding LoRA and LoRA biases cannot be mixed per sequence, "
            "so such adapters are refused rather than silently applied in part."
        )
    if base_copies:
        # PEFT (save_embedding_layers="auto") stores a copy of the base weight of a targeted lm_head /
        # embedding layer. The model's own weight is used instead: the same tensor when the adapter was
        # trained on this base model; a resized vocabulary shows up as a shape misfit in patch_model.
        warnings.warn(
            f"adapter {name!r} also stores base-layer weights of {base_copies}; dlp-lora keeps the "
            "model's own weights (right when the adapter was trained on this base model)",
            UserWarning,
            stacklevel=3,
        )
    if set(lora_a) != set(lora_b):
        missing = sorted(set(lora_a) ^ set(lora_b))
        raise AdapterLoadError(f"adapter {name!r}: modules {missing[:6]} have only one of lora_A / lora_B")
    if not lora_a:
        raise AdapterLoadError(f"adapter {name!r} ({str(path)!r}) holds no LoRA weights")

    from peft.tuners.tuners_utils import check_target_module_exists

    modules: dict[str, AdapterModule] = {}
    skipped = []
    for module_name, a in lora_a.items():
        matched = check_target_module_exists(config, module_name)
        # PEFT returns a falsy value or an _ExcludedModule marker (truthy!) for modules it would not adapt.
        if not matched or type(matched).__name__ == "_ExcludedModule":
            skipped.append(module_name)
            continue
        b = lora_b[module_name]
        rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
        r = rank_pattern.get(_get_pattern_key(rank_pattern, module_name), config.r)
        alpha = alpha_pattern.get(_get_pattern_key(alpha_pattern, module_name), config.lora_alpha)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterLoadError(
                f"adapter {name!r}, module {module_name!r}: the config gives rank {r} (r / rank_pattern) but "
                f"lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}"
            )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[module_name] = (a, b, float(scaling))
    if skipped:
        warnings.warn(
            f"adapter {name!r}: weights for {skipped[:4]}{' ...' if len(skipped) > 4 else ''} are not "
            "selected by its target_modules / exclude_modules / layers_to_transform; PEFT would not "
            "load them, so they are ignored",
            UserWarning,
            stacklevel=3,
        )
    if not modules:
        raise AdapterLoadError(
            f"adapter {name!r}: none of its weights match its target_modules {config.target_modules!r}"
        )
    return modules, raw


def _lora_config(name: str, path: Path, raw: dict):
    """Parse adapter_config.json with PEFT's own LoraConfig; refuse what a plain delta cannot express."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(
            f"adapter {name!r}: peft_type is {peft_type!r}, only LoRA adapters are supported"
        )
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fields of newer versions it drops
        config = LoraConfig.from_pretrained(str(path))

    def refuse(what: str, hint: str = ""):
        raise AdapterLoadError(
            f"adapter {name!r} ({str(path)!r}) uses {what}, which dlp-lora does not support"
            + (f": {hint}" if hint else "")
        )

    # Every LoRA variant PEFT knows (DoRA, aLoRA, VeLoRA, ...) changes the forward, not just the delta;
    # PEFT tags them in LoraConfig's field metadata, so new variants are refused too.
    fields = {field.name: field for field in dataclasses.fields(config)}
    for field in fields.values():
        if field.metadata.get("is_lora_variant") and getattr(config, field.name, None):
            refuse(
                f"the LoRA variant {field.name}={getattr(config, field.name)!r}",
                "only plain LoRA deltas B A x are mixed",
            )
    init = config.init_lora_weights
    init_variants = (
        fields["init_lora_weights"].metadata.get("lora_variants", []) if "init_lora_weights" in fields else []
    )
    if isinstance(init, str) and (init in init_variants or init.lower().startswith(BASE_MODIFYING_INITS)):
        refuse(
            f"init_lora_weights={init!r}",
            "this initialisation rewrites the base weights; re-save the "
            "adapter with save_pretrained(path_initial_model_for_weight_conversion=...) first",
        )
    if getattr(config, "lora_bias", False):
        refuse("lora_bias=True", "a trained bias on lora_B is not part of the mixed delta")
    if config.bias != "none":
        refuse(f"bias={config.bias!r}", "it trains the base model's biases, which cannot differ per sequence")
    if getattr(config, "target_parameters", None):
        refuse(f"target_parameters={config.target_parameters!r}", "only Linear / Conv1D modules are patched")
    if getattr(config, "layer_replication", None):
        refuse("layer_replication", "it changes the base model's structure")
    if getattr(config, "use_qalora", False):
        refuse("use_qalora=True")
    return config


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / SAFETENSORS_NAME), device="cpu")
    if (path / BIN_NAME).is_file():
        # Older PEFT (safe_serialization=False). weights_only refuses anything but tensors.
        return torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    raise AdapterLoadError(f"adapter {name!r}: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {str(path)!r}")


def _get_pattern_key(pattern_keys, module_name: str) -> str:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a dotted suffix of the name."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # peft < 0.14 kept this inline; same semantics
        import re

        def get_pattern_key(keys, key):
            return next((k for k in keys if re.match(rf"(.*\.)?({k})$", key)), key)

    return get_pattern_key(list(pattern_keys), module_name)
