"""The sentence rule (dlp_lora/sentences.py) on a real BPE tokenizer's token ids: SmolLM2-135M-Instruct's
tokenizer (Apache-2.0), shipped in tests/fixtures/smollm2_tokenizer/ so that no download is needed.

Decimals, URLs, file names, abbreviations, numbered lists, code, quotes, CJK, chat-template scaffolding;
then the same rule inside a patched model: spans of a chat prompt, rerouting while decoding, the router
never reading scaffolding, and `--show-routing` putting each terminator in the span it ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_fixtures import default_backend, make_adapter, tiny_model
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from dlp_lora import LoRABank, patch_model
from dlp_lora.cli import routing_lines
from dlp_lora.sentences import SentenceRule

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(FIXTURE))


@pytest.fixture(scope="module")
def rule(tok):
    return SentenceRule(tok)


def spans(tok, rule, ids: list[int]) -> list[str]:
    starts = [0, *rule.sentence_starts(ids), len(ids)]
    return [tok.decode(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


CASES = [
    # decimals and arithmetic: "." is its own token in this vocabulary
    ("What is 2.5 + 3.75? It is 6.25.", ["What is 2.5 + 3.75?", " It is 6.25."]),
    # URLs, file names, version numbers
    ("Visit www.example.com or run setup.py now. Then stop.",
     ["Visit www.example.com or run setup.py now.", " Then stop."]),
    ("Install v1.2.3 first! It works.", ["Install v1.2.3 first!", " It works."]),
    # abbreviations: known ones and runs of single letters with periods
    ("Eat fruit, e.g. apples, i.e. red ones. Dr. Smith agrees.",
     ["Eat fruit, e.g. apples, i.e. red ones.", " Dr. Smith agrees."]),
    ("It rains in the U.S. all year. Mr. Lee left at 5 p.m. today.",
     ["It rains in the U.S. all year.", " Mr. Lee left at 5 p.m. today."]),
    # a numbered list: the markers are no sentence ends, each item's period is
    ("Steps:\n1. Buy milk.\n2. Drink it.\nDone.", ["Steps:\n1. Buy milk.", "\n2. Drink it.", "\nDone."]),
    # code: attribute access and newlines end nothing
    ("def f(x):\n    y = x.real\n    return y.imag\n\nprint(f(2.0))",
     ["def f(x):\n    y = x.real\n    return y.imag\n\nprint(f(2.0))"]),
    # a newline alone is no sentence end
    ("first line\nsecond line\n- a bullet\n- another", ["first line\nsecond line\n- a bullet\n- another"]),
    # closing quotes stay with their sentence; runs of terminators are one end
    ('He said "stop." Then he left.', ['He said "stop."', " Then he left."]),
    ("What?! Really!! Yes...", ["What?!", " Really!!", " Yes..."]),
    # CJK terminators need no whitespace after them
    ("\u8fd9\u662f\u53e5\u5b50\u3002\u8fd9\u662f\u53e6\u4e00\u4e2a\uff01",
     ["\u8fd9\u662f\u53e5\u5b50\u3002", "\u8fd9\u662f\u53e6\u4e00\u4e2a\uff01"]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:24] for c in CASES])
def test_sentences_on_real_token_ids(tok, rule, text, expected):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert spans(tok, rule, ids) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0][:24] for c in CASES])
def test_each_end_is_decided_when_the_next_token_arrives(tok, rule, text, expected):
    """What is decided at token j reads tokens[: j + 1] only: generation sees the same ends as the prompt."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole = rule.sentence_starts(ids)
    assert [j for j in range(1, len(ids)) if rule.starts_sentence(ids[: j + 1], j)] == whole
    assert not rule.ends_after(ids, len(ids) - 1)  # the last token: its end is not decided yet


def test_a_terminator_before_end_of_text_ends_its_sentence(tok, rule):
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("It is Paris.", add_special_tokens=False)["input_ids"] + [end_of_turn]
    assert rule.ends_after(ids, len(ids) - 2)
    assert not rule.ends_after(ids, len(ids) - 3)


def _chat(tok, messages, generation_prompt=True) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_scaffolding_is_no_sentence_and_no_content(tok, rule):
    messages = [{"role": "user", "content": "Translate to French. What is 12 + 30?"}]
    ids = _chat(tok, messages)
    pieces = spans(tok, rule, ids)
    # the template's newlines and role lines end nothing: its default system prompt and the user's first
    # sentence are one span, the second sentence another, the generation prompt a third
    assert len(pieces) == 3
    assert pieces[0].endswith("<|im_start|>user\nTranslate to French.")
    assert pieces[1] == " What is 12 + 30?"
    assert pieces[2] == "<|im_end|>\n<|im_start|>assistant\n"
    assert rule.content(ids) == tok(messages[0]["content"], add_special_tokens=False)["input_ids"]


def test_content_of_a_conversation_is_its_messages(tok, rule):
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Bonjour! How can I help?"},
        {"role": "user", "content": "Say 2.5 in words."},
    ]
    expected = [t for m in messages for t in tok(m["content"], add_special_tokens=False)["input_ids"]]
    assert rule.content(_chat(tok, messages)) == expected
    # plain text (no template around it) is all content
    plain = tok("Line one.\nLine two.", add_special_tokens=False)["input_ids"]
    assert rule.content(plain) == plain


class KeywordRouter:
    """Router stand-in over the real vocabulary: "math" for tokens with a digit, "french" for the rest."""

    label_names = ["french", "math"]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[list[int]] = []

    def route(self, input_ids, attention_mask=None, *, top_p=0.6, max_loras=None):
        from dlp_lora.router import route_top_p

        probs = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            row = [t for t, m in zip(ids, mask, strict=True) if m]
            self.calls.append(row)
            digits = sum(any(c.isdigit() for c in self.tokenizer.decode([t])) for t in row)
            probs.append([len(row) - digits + 0.5, 3 * digits + 0.5])
        probs = torch.tensor(probs)
        return route_top_p(probs / probs.sum(-1, keepdim=True), top_p, max_loras)


class ForceTokens(LogitsProcessor):
    def __init__(self, forced: list[int], prompt_length: int):
        self.forced, self.prompt_length = forced, prompt_length

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.forced[input_ids.shape[1] - self.prompt_length]] = 0.0
        return out


@pytest.fixture(scope="module")
def patched(tok, tmp_path_factory):
    base = tiny_model("llama", vocab_size=len(tok), hidden=16)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {name: make_adapter(base, root / name, seed=i) for i, name in enumerate(("french", "math"))}
    router = KeywordRouter(tok)
    model = patch_model(base, LoRABank.from_peft(adapters), router, top_p=0.99, reroute="sentence",
                        tokenizer=tok, backend=default_backend())
    return model, router


def test_chat_prompt_routing_and_display(tok, rule, patched):
    """A chat prompt's spans are its sentences; the router reads content only; the display keeps each
    terminator in the span it ends; a generated sentence end reroutes at the next sentence's first token."""
    model, router = patched
    ids = _chat(tok, [{"role": "user", "content": "Translate to French. What is 12 + 30?"}])
    reply = tok(" It is 42. Bonjour", add_special_tokens=False)["input_ids"]
    router.calls.clear()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=len(reply), do_sample=False,
                             pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([ForceTokens(reply, len(ids))]))
    assert out[0, len(ids):].tolist() == reply
    scaffolding = set(ids) - set(rule.content(ids))
    assert router.calls and all(not scaffolding & set(call) for call in router.calls)
    log = list(model.dlp_routing_log)
    bonjour = len(ids) + reply.index(tok(" Bonjour", add_special_tokens=False)["input_ids"][0])
    assert [(r.step, r.position, r.reason) for r in log] == [
        (0, 0, "sentence"), (0, rule.sentence_starts(ids)[0], "sentence"),
        (0, rule.sentence_starts(ids)[1], "sentence"), (bonjour - len(ids) + 1, bonjour, "sentence"),
    ]
    lines = routing_lines(log, 0, out[0].tolist(), tok)
    texts = [line.split(") ", 1)[1].rsplit(" -> ", 1)[0] for line in lines]
    assert texts[0].endswith("Translate to French.'") and texts[1] == "' What is 12 + 30?'"
    assert texts[3] == "' Bonjour'" and texts[2].endswith("It is 42.'")
    assert [r.adapters[0] for r in log] == ["french", "math", "math", "math"]
