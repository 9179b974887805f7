"""From directories to a CompletionEngine: the base model, its PEFT adapters, the router, patched.

    check_artifacts(model_dir, {"math": dir, ...}, router_dir)   # cheap: files only, before any start
    engine = load_engine(ServeConfig(model_dir, adapters, router_dir))

The loading itself is dlp_lora.artifacts.load_patched_model, which ``dlp-lora generate`` also runs, so a
served prompt and a generated one meet the same model, tokenizer and routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import label_mismatch
from ..options import DEFAULT_REROUTE, DEFAULT_TOP_P
from .engine import CompletionEngine
from .protocol import MAX_REQUEST_BYTES

__all__ = ["ServeConfig", "check_artifacts", "load_engine", "load_front"]


@dataclass(frozen=True)
class ServeConfig:
    """What a replica loads. adapters: {name: PEFT directory}; router: a Router directory or None
    (then every request must name a mixture or an adapter). top_p / max_loras: the router's defaults."""

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    router: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    reroute: str = DEFAULT_REROUTE
    top_p: float = DEFAULT_TOP_P
    max_loras: int | None = None
    model_name: str | None = None  # the `model` clients send; default: the model directory's name
    threads: int | None = None  # torch threads per replica (CPU)
    api_key: str | None = field(default=None, repr=False)  # the front's bearer key; None: no check
    max_request_bytes: int = MAX_REQUEST_BYTES  # the front answers a larger body with 413

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).resolve().name


def check_artifacts(model: str | Path, adapters: dict, router: str | Path | None) -> None:
    """Raise ValueError naming the first missing or mismatched file (reads JSON only, no tensors)."""
    model = Path(model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model: {model} has no config.json (not a Hugging Face model directory)")
    if not adapters:
        raise ValueError("--adapters: give at least one adapter")
    for name, directory in adapters.items():
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"--adapters {name}: {directory} has no adapter_config.json "
                             "(not a PEFT adapter)")
    if router is None:
        return
    config = Path(router) / "router_config.json"
    try:
        labels = json.loads(config.read_text())["label_names"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--router: {router} is not a saved router (no readable {config.name})") from None
    mismatch = label_mismatch(labels, list(adapters))
    if mismatch:
        raise ValueError(f"--router: {mismatch}")


def load_engine(config: ServeConfig) -> CompletionEngine:
    """Load and patch the model once (a replica's start-up); raises ValueError / OSError on bad input."""
    import torch

    from ..artifacts import load_patched_model

    if config.threads:
        torch.set_num_threads(config.threads)
    check_artifacts(config.model, config.adapters, config.router)
    model, tokenizer = load_patched_model(Path(config.model), config.adapters, config.router,
                                          device=config.device, dtype=config.dtype, top_p=config.top_p,
                                          max_loras=config.max_loras, reroute=config.reroute)
    return CompletionEngine(model, tokenizer, max_context=_max_context(model.config, tokenizer))


def load_front(config: ServeConfig):
    """What the HTTP front needs to validate requests without the model: (tokenizer, ServedModels)."""
    from transformers import AutoConfig

    from ..artifacts import load_tokenizer
    from .protocol import ServedModels

    tokenizer = load_tokenizer(Path(config.model), "--model")
    model_config = AutoConfig.from_pretrained(config.model)
    max_context = _max_context(model_config, tokenizer)
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer, ServedModels(config.served_name, tuple(config.adapters), max_context, chat_template)


def _max_context(model_config, tokenizer) -> int:
    """The model's positions, or the tokenizer's limit when smaller (a huge sentinel means none)."""
    positions = int(getattr(model_config, "max_position_embeddings", 0) or 2048)
    limit = getattr(tokenizer, "model_max_length", None)
    return min(positions, int(limit)) if isinstance(limit, int) and 0 < limit < 10**9 else positions
