"""From directories to a patched model: the tokenizer, the router checked against the bank, the model.

Shared by ``dlp-lora generate`` and the server's replicas (dlp_lora/serving/loading.py), so a generated
prompt and a served one meet the same model, tokenizer and routing. Errors are ArtifactError (a
ValueError) whose message starts with the flag that named the directory, so ``dlp-lora`` prints them
as its one-line errors and the server refuses to start with the same words.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ArtifactError", "check_router_matches", "label_mismatch", "load_patched_model", "load_tokenizer"]


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


def label_mismatch(labels, names) -> str | None:
    """Why a router with these labels cannot route this bank (its labels must be exactly the bank's
    adapter names, in any order, each once), or None when it can."""
    labels = list(labels)
    if sorted(labels) != sorted(names) or len(set(labels)) != len(labels):
        return (f"its labels {sorted(labels)} do not match the adapters {sorted(names)}; train it on "
                "tasks named like the adapters")
    return None


def check_router_matches(router, names: list[str], tokenizer) -> None:
    """A router must score exactly the bank's adapters, and read the model's token ids."""
    mismatch = label_mismatch(router.label_names, names)
    if mismatch:
        raise ArtifactError(f"--router: {mismatch}")
    own = getattr(router, "tokenizer", None)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ArtifactError("--router: it was trained with a different tokenizer than the model's; retrain "
                            "it with --tokenizer pointing at this model")


def load_patched_model(model_dir: Path, adapters: dict, router_dir: Path | str | None, *, device, dtype,
                       top_p: float, max_loras: int | None, reroute: str):
    """(patched model, tokenizer): the bank of ``adapters`` {name: PEFT dir}, the router (checked
    against the bank and the model's tokenizer), the model in ``dtype`` on ``device``, patched.
    Without a router, reroute is "prompt" (only fixed mixtures apply adapters)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .bank import LoRABank
    from .patch import patch_model
    from .router import Router

    hf_logging.disable_progress_bar()  # stderr is for errors; "Loading weights" bars would precede them
    bank = LoRABank.from_peft(dict(adapters))
    tokenizer = load_tokenizer(Path(model_dir), "--model")
    router = Router.load(router_dir, device=device) if router_dir else None
    if router is not None:
        check_router_matches(router, bank.names, tokenizer)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged weights file
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ArtifactError(f"--model: no causal LM could be loaded from {model_dir} ({detail})") from None
    patch_model(model, bank, router, top_p=top_p, max_loras=max_loras,
                reroute=reroute if router is not None else "prompt", tokenizer=tokenizer)
    return model, tokenizer
