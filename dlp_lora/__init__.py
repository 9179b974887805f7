"""dlp-lora: sentence-level dynamic multi-LoRA fusion (DLP-LoRA, arXiv 2410.01497).

    from dlp_lora import LoRABank, Router, patch_model
    bank = LoRABank.from_peft({"math": "adapters/gsm8k", "de_en": "adapters/news_de"})
    model = patch_model(model, bank, Router.load("router/"), top_p=0.6)

Heavy modules (transformers, peft) load on first use of the names that need them.
"""

from __future__ import annotations

import importlib

from . import ops

__version__ = "0.1.0"

_LAZY = {
    "LoRABank": ".bank",
    "Router": ".router",
    "route_top_p": ".router",
    "Route": ".routing_state",
    "RoutingRecord": ".routing_state",
    "patch_model": ".patch",
    "unpatch_model": ".patch",
    "use_mixture": ".patch",
    "is_patched": ".patch",
    "PatchError": ".patch",
    "export_mixture": ".export",
}

__all__ = ["ops", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'dlp_lora' has no attribute {name!r}")
