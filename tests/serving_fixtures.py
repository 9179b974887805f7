"""Served artifacts on disk: a tiny Llama with its word-level tokenizer, one PEFT adapter per task and
a trained Router, each an ordinary directory as `dlp-lora serve` takes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_fixtures import ROUTING_WEIGHT_ATOL, TASKS, make_adapter, task_sentence, tiny_model, word_tokenizer

# Prompts of several sentences (so the router splits them into spans), mostly one task's words.
PROMPTS = [
    "al1 al2 the al3 . be4 be1 a be2 . al5",
    "be0 be3 of be6 be7",
    "ga2 ga5 and ga1 ! ga0 ga3",
    "al0 be0 ga0 al1 be1 .",
    "the a of and to is",
    "ga4 ga6 . al2 al4 al6 ? be5",
    "be2 be2 be2 . be1",
    "al7 ga7 be7 al3",
]


def build(root: Path) -> dict:
    """{"model": dir, "adapters": {task: dir}, "router": dir}; the model dir holds the tokenizer."""
    from dlp_lora.router import Router

    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_model("llama", seed=11, vocab_size=len(tokenizer))
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    # lora_alpha=1 (scaling 1/4): deltas that steer the tiny model without making it emit EOS at once
    adapters = {task: make_adapter(model, root / task, seed=40 + i, lora_alpha=1)
                for i, task in enumerate(TASKS)}
    rng = torch.Generator().manual_seed(5)
    texts, labels = [], []
    for task in TASKS:
        for _ in range(40):
            texts.append(task_sentence(task, rng, length=6))
            labels.append(task)
    router = Router.fit(texts, labels, tokenizer, epochs=4, verbose=False)
    return {"model": model_dir, "adapters": adapters, "router": router.save(root / "router")}


SMOLLM2_TOKENIZER = Path(__file__).parent / "fixtures" / "smollm2_tokenizer"  # with its chat template
# Chat-routing tasks: a router trained on these sentences alone has never seen the chat scaffolding.
CHAT_TASKS = {
    "french": [f"Translate {w} to French." for w in ("cat", "dog", "house", "tree", "car", "book")],
    "math": [f"What is {a} + {b}?" for a, b in ((1, 2), (12, 30), (7, 9), (40, 2), (5, 5), (3, 8))],
}


def build_chat(root: Path) -> dict:
    """Like build(), on an instruct model's tokenizer (SmolLM2's BPE with its chat template): a tiny Llama
    over its 49,152 tokens, adapters "french" and "math", and a router trained on CHAT_TASKS."""
    from transformers import AutoTokenizer

    from dlp_lora.router import Router

    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER))
    model = tiny_model("llama", seed=13, vocab_size=len(tokenizer), hidden=16)
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    adapters = {task: make_adapter(model, root / task, seed=60 + i, lora_alpha=1)
                for i, task in enumerate(CHAT_TASKS)}
    texts = [text for task in CHAT_TASKS for text in CHAT_TASKS[task]]
    labels = [task for task in CHAT_TASKS for _ in CHAT_TASKS[task]]
    router = Router.fit(texts, labels, tokenizer, epochs=30, val_fraction=0.0, seed=0, verbose=False)
    return {"model": model_dir, "adapters": adapters, "router": router.save(root / "router")}


def config(art: dict, **overrides):
    """The ServeConfig of these artifacts (string paths, as a replica gets them)."""
    from dlp_lora.serving.loading import ServeConfig

    return ServeConfig(model=str(art["model"]), adapters={k: str(v) for k, v in art["adapters"].items()},
                       router=str(art["router"]), **overrides)




def assert_routing_equal(got: list[dict], expected: list[dict], where: object = "") -> None:
    """Routing spans ({"position", "adapters": {name: weight}, "reason"}): all exact but the weights."""
    def shape(spans):
        return [(s["position"], s["reason"], list(s["adapters"])) for s in spans]

    assert shape(got) == shape(expected), where
    for g, e in zip(got, expected, strict=True):
        weights = list(e["adapters"].values())
        assert list(g["adapters"].values()) == pytest.approx(weights, abs=ROUTING_WEIGHT_ATOL), where


def generate_alone(model, tokenizer, prompt: str, max_tokens: int, mixture: dict | None = None,
                   routing_top_p: float | None = None, max_loras: int | None = None,
                   add_special_tokens: bool = True) -> dict:
    """The oracle: greedy generate() of one prompt alone on a patched model, as `dlp-lora generate` runs it.

    Returns {"text", "finish_reason", "routing"} in the server's terms (routing: every RoutingRecord of
    the call as {"position", "adapters", "reason"}). add_special_tokens=False for a chat-templated
    prompt, which holds its own.
    """
    from dlp_lora import Route, use_mixture

    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=add_special_tokens)
    entry = mixture if mixture is not None else Route(routing_top_p, max_loras)
    with torch.no_grad(), use_mixture(model, [entry]) as log:
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        records = list(log)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new
    kept = new[:new.index(tokenizer.eos_token_id)] if stopped else new
    return {
        "text": tokenizer.decode(kept, skip_special_tokens=True),
        "finish_reason": "stop" if stopped else "length",
        "routing": [{"position": r.position, "adapters": dict(zip(r.adapters, r.weights, strict=True)),
                     "reason": r.reason} for r in sorted(records, key=lambda r: r.position)],
    }


def http_request(url: str, body=None, headers: dict | None = None, method: str | None = None,
                 timeout: float = 60) -> tuple[int, dict | str]:
    """(status, parsed JSON or the text) of one HTTP request; body: bytes, or an object sent as JSON."""
    import json
    import urllib.error
    import urllib.request

    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
