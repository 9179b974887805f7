"""`dlp-lora generate` on an instruct model's tokenizer (SmolLM2's, the shipped fixture): the chat template
is applied (by default when the tokenizer has one, with a note; --chat / --no-chat force it), the router
reads the message, and --show-routing keeps each terminator in the sentence it ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft_fixtures import make_adapter, tiny_model
from transformers import AutoTokenizer

from dlp_lora import Router
from dlp_lora.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_tokenizer"
PROMPT = "Translate to French. What is 12 + 30?"


@pytest.fixture(scope="module")
def chat_art(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    base = tiny_model("llama", vocab_size=len(tok), hidden=16)
    base.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    adapters = {name: make_adapter(base, root / name, seed=i) for i, name in enumerate(("french", "math"))}
    texts = [f"Translate {w} to French." for w in ("cat", "dog", "house", "tree", "car", "book")] + [
        f"What is {a} + {b}?" for a, b in ((1, 2), (12, 30), (7, 9), (40, 2), (5, 5), (3, 8))]
    router = Router.fit(texts, ["french"] * 6 + ["math"] * 6, tok, epochs=30, val_fraction=0.0, seed=0)
    router.save(root / "router")
    return root, adapters


def _args(root, adapters, *extra):
    return ["generate", "--model", str(root / "model"), "--adapters",
            *(f"{n}={d}" for n, d in adapters.items()), "--router", str(root / "router"),
            "--prompt", PROMPT, "--max-new-tokens", "2", "--show-routing", *extra]


def test_chat_template_applied_by_default_and_routed_on_the_message(chat_art, capsys):
    root, adapters = chat_art
    assert main(_args(root, adapters)) == 0
    captured = capsys.readouterr()
    assert "chat template" in captured.err and "--no-chat" in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == PROMPT  # the reply follows on its own line
    routing = [line for line in lines if "routing:" in line]
    # the template's default system prompt and role lines join the first sentence, ends stay in their span
    assert routing[0].split(" -> ")[0].endswith("Translate to French.'")
    assert "' What is 12 + 30?'" in routing[1]
    assert routing[0].endswith("-> french 1.00") and routing[1].endswith("-> math 1.00")


def test_no_chat_routes_the_raw_text(chat_art, capsys):
    root, adapters = chat_art
    assert main(_args(root, adapters, "--no-chat")) == 0
    captured = capsys.readouterr()
    assert "chat template" not in captured.err
    routing = [line for line in captured.out.splitlines() if "routing:" in line]
    assert "'Translate to French.'" in routing[0] and "' What is 12 + 30?'" in routing[1]


def test_chat_without_a_template_is_one_line_error(chat_art, tmp_path, capsys):
    root, adapters = chat_art
    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    tok.chat_template = None
    (tmp_path / "model").mkdir()
    for f in (root / "model").iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (tmp_path / "model" / f.name).symlink_to(f)
    tok.save_pretrained(tmp_path / "model")
    args = _args(root, adapters, "--chat")
    args[2] = str(tmp_path / "model")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chat: the model's tokenizer has no chat template" in err[0]
