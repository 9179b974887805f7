"""The transformers input adapter: what a patched model's routing reads from a forward's arguments.

Which of a prefill's tokens are real (the attention mask, 2-D or the 4-D masks transformers builds),
how many tokens a cache holds, and the check that a prompt is not empty. Kept apart from the
routing rules (routing_policy) so another model interface needs only another adapter.
"""

from __future__ import annotations

import torch

__all__ = ["check_not_empty", "past_length", "token_mask"]


def past_length(cache) -> int:
    """Tokens already in a transformers cache (Cache object or legacy tuple); 0 for None."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer, key [B, heads, past, head_dim]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def token_mask(attention_mask, length: int) -> torch.Tensor | None:
    """[B, length] mask of the real tokens of a prefill from whatever mask the model got.

    2-D masks (1 = token) are used as they are. transformers builds 4-D masks [B, 1, L, L_kv]
    (bool: True = attend; float: 0 = attend) for compilable caches such as StaticCache: the last
    query row of a prefill attends to exactly the real prompt tokens, at key positions [0, L).
    A dict of masks (per attention type) is read through its full-attention entry.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -length:]
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and attention_mask.shape[-1] >= length
    ):
        last_row = attention_mask[:, 0, -1, :length]
        return last_row.long() if last_row.dtype == torch.bool else (last_row == 0).long()
    raise NotImplementedError(
        "dlp-lora: cannot tell padding from tokens with this attention_mask "
        f"({type(attention_mask).__name__}{tuple(getattr(attention_mask, 'shape', ()))}); "
        "pass a 2-D [batch, length] mask"
    )


def check_not_empty(L: int, attention_mask) -> None:
    if L == 0:
        raise ValueError(
            "dlp-lora: empty prompt (input_ids has length 0); the router needs at least one token"
        )
    if attention_mask is not None:
        lengths = attention_mask.sum(-1).tolist()
        empty = [b for b, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(
                f"dlp-lora: empty prompt: sequence(s) {empty} have no tokens (attention_mask is all zero)"
            )
