"""A model directory's tokenizer and a router checked against a bank: shared by the CLI and the server.

Errors are ArtifactError (a ValueError) whose message starts with the flag that named the directory,
so ``dlp-lora`` prints them as its one-line errors and the server refuses to start with the same words.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ArtifactError", "check_router_matches", "load_tokenizer"]


class ArtifactError(ValueError):
    """A directory that cannot serve as the tokenizer or router asked for (the message names the flag)."""


def load_tokenizer(directory: Path, flag: str):
    """The Hugging Face tokenizer of ``directory``, left-padding, with a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ArtifactError(f"{flag}: no Hugging Face tokenizer could be loaded from {directory} "
                            f"({detail})") from None
    tokenizer.padding_side = "left"  # generation continues each prompt at its last column
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_router_matches(router, names: list[str], tokenizer) -> None:
    """A router must score exactly the bank's adapters, and read the model's token ids."""
    if sorted(router.label_names) != sorted(names):
        raise ArtifactError(f"--router: its labels {sorted(router.label_names)} do not match the adapters "
                            f"{sorted(names)}; train it on tasks named like the adapters")
    own = getattr(router, "tokenizer", None)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ArtifactError("--router: it was trained with a different tokenizer than the model's; retrain "
                            "it with --tokenizer pointing at this model")
