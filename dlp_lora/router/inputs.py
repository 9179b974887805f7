"""What the router reads: adapter label names, texts, and the base model's token ids for them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_label_names(label_names) -> list[str]:
    if isinstance(label_names, str) or not isinstance(label_names, Sequence) or not label_names:
        raise ValueError(f"label_names must be a non-empty list of str, got {label_names!r}")
    names = list(label_names)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"label_names must be non-empty strings, got {bad[:5]!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"label_names must be unique, duplicated: {dupes}")
    return names


def _check_texts(texts, arg: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{arg} must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{arg}[{i}] must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{arg}[{i}] is an empty text")
    return list(texts)


def _encode(tokenizer, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise in one batch call (fast tokenizers run it in Rust) and right-pad.

    Returns input_ids [n, L] int64 and attention_mask [n, L] int64. Pads with id 0 and a
    zero mask, so the tokenizer needs no pad token.
    """
    kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
    seqs = tokenizer(texts, **kwargs)["input_ids"]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = int(lengths.max()) if len(seqs) else 0
    mask = torch.arange(L) < lengths[:, None]
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    ids[mask] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, mask.long()
