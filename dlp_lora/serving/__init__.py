"""dlp-lora as an OpenAI-compatible server on Ray Serve (``pip install "dlp-lora[serve]"``).

    from ray import serve
    from dlp_lora.serving import build_app
    serve.run(build_app(model="llama/", adapters={"math": "a/math"}, router="router/"))

protocol: the OpenAI request/response/error shapes and their validation; engine: many requests as
one fused generate() (no Ray); loading: directories to a patched model; app: the Ray Serve
deployment and build_app. Only ``app`` imports Ray, on first use of build_app / DLPLoRAServer.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_app": ".app",
    "DLPLoRAServer": ".app",
    "CompletionEngine": ".engine",
    "GenerationRow": ".engine",
    "RowResult": ".engine",
    "ServeConfig": ".loading",
    "load_engine": ".loading",
    "APIError": ".protocol",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'dlp_lora.serving' has no attribute {name!r}")
