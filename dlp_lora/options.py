"""Routing and batching options shared by the library, the CLI and the server: their defaults and choices.

No imports, so ``dlp-lora --help`` can show them without loading torch.
"""

__all__ = ["BATCHING_MODES", "DEFAULT_BATCHING", "DEFAULT_REROUTE", "DEFAULT_TOP_P", "REROUTE_MODES"]

# The router keeps the smallest set of adapters whose probability mass reaches top_p (the paper's
# threshold; dlp_lora/router/top_p.py).
DEFAULT_TOP_P = 0.6
# When the router runs (dlp_lora/routing_state.py): again at every new sentence, or once per prompt.
REROUTE_MODES = ("sentence", "prompt")
DEFAULT_REROUTE = "sentence"

# How a server's model replica batches (dlp_lora.serving.app.DLPLoRAModel): "continuous" schedules
# rows at every decode step; "static" runs the rows that arrive together as one generate().
BATCHING_MODES = ("continuous", "static")
DEFAULT_BATCHING = "continuous"
