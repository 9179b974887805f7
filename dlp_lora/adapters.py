"""Reading PEFT LoRA adapter directories: adapter_config.json plus adapter_model.safetensors (or .bin).

Every config is checked before any tensor is read, and every refusal names the adapter and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import pickle
import warnings
from pathlib import Path

import torch

__all__ = ["AdapterLoadError", "AdapterModule", "check_adapter_module", "read_peft_adapter"]

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


def check_adapter_module(name: str, module_name: str, a: torch.Tensor, b: torch.Tensor, scaling: float,
                         source: str | Path | None = None) -> None:
    """Refuse values that would silently turn the model's outputs into NaN or garbage.

    a: lora_A.weight [r, d_in], b: lora_B.weight [d_out, r] (shapes are the bank's to check);
    both must be floating and finite, scaling a finite real. ``source``: the file, for the message.
    """
    where = f"adapter {name!r}, module {module_name!r}" + (f" ({str(source)!r})" if source else "")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise AdapterLoadError(f"{where}: the scaling must be a finite number, got {scaling!r}")
    for label, t in (("lora_A", a), ("lora_B", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise AdapterLoadError(f"{where}: {label} must be a floating tensor, got {got}")
        if not bool(torch.isfinite(t).all()):
            raise AdapterLoadError(f"{where}: {label} holds non-finite values (NaN or inf)")


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
    raw = _read_config_json(name, path)
    config = _lora_config(name, path, raw)
    tensors, weights_file = _read_tensors(name, path)

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
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterLoadError(
                f"adapter {name!r}, module {module_name!r}: the rank (r / rank_pattern in "
                f"{str(config_file)!r}) must be an integer >= 1, got {r!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise AdapterLoadError(
                f"adapter {name!r}, module {module_name!r}: lora_alpha (or alpha_pattern) in "
                f"{str(config_file)!r} must be a finite number, got {alpha!r}"
            )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterLoadError(
                f"adapter {name!r}, module {module_name!r}: the config gives rank {r} (r / rank_pattern) but "
                f"lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}"
            )
        scaling = float(alpha / math.sqrt(r) if config.use_rslora else alpha / r)
        check_adapter_module(name, module_name, a, b, scaling, source=weights_file)
        modules[module_name] = (a, b, scaling)
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


def _read_config_json(name: str, path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"adapter {name!r}: no {CONFIG_NAME} in {str(path)!r}")
    where = f"adapter {name!r}: {str(config_file)!r}"
    try:
        raw = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(
            f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{where} must hold a JSON object, got a {type(raw).__name__}")
    return raw


def _lora_config(name: str, path: Path, raw: dict):
    """Parse adapter_config.json with PEFT's own LoraConfig; refuse what a plain delta cannot express."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(
            f"adapter {name!r}: peft_type is {peft_type!r}, only LoRA adapters are supported"
        )
    from peft import LoraConfig

    where = f"adapter {name!r}: {str(path / CONFIG_NAME)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about fields of newer versions it drops
            config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # PEFT's own field checks
        raise AdapterLoadError(f"{where} is not a valid LoRA config ({' '.join(str(e).split())})") from None
    if not config.target_modules:
        raise AdapterLoadError(f"{where} names no target_modules")

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


def _read_tensors(name: str, path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors and the file they came from."""
    if (path / SAFETENSORS_NAME).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = path / SAFETENSORS_NAME
        try:
            return load_file(str(file), device="cpu"), file
        except SafetensorError as e:
            raise AdapterLoadError(f"adapter {name!r}: {str(file)!r} is not readable as safetensors "
                                   f"({e}); it may be truncated or not a safetensors file") from None
    if (path / BIN_NAME).is_file():
        # Older PEFT (safe_serialization=False). weights_only refuses anything but tensors.
        file = path / BIN_NAME
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise AdapterLoadError(f"adapter {name!r}: {str(file)!r} is not a readable PyTorch checkpoint "
                                   f"({' '.join(str(e).split())[:200]})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterLoadError(f"adapter {name!r}: {str(file)!r} must hold a dict of tensors")
        return tensors, file
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
