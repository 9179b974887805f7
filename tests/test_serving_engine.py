"""The serving engine and protocol in-process (no Ray, no HTTP): one batched generate() per set of
compatible settings, where every row matches the same prompt generated alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading

import pytest
import serving_fixtures as sf

from dlp_lora.serving.engine import BatchRunner, GenerationRow, RowResult
from dlp_lora.serving.loading import load_engine
from dlp_lora.serving.protocol import (
    APIError,
    ServedModels,
    check_prompt_length,
    choice,
    completion_response,
    parse_chat_request,
    parse_completion_request,
    stream_choice,
    stream_chunk,
)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return sf.build(tmp_path_factory.mktemp("serving_engine"))


@pytest.fixture(scope="module")
def engine(art):
    return load_engine(sf.config(art))


@pytest.fixture(scope="module")
def oracle(art):
    """Another engine on the same directories: its model runs each prompt alone."""
    return load_engine(sf.config(art))


def _alone(oracle, prompt, max_tokens, mixture=None, routing_top_p=None, max_loras=None):
    return sf.generate_alone(oracle.model, oracle.tokenizer, prompt, max_tokens, mixture, routing_top_p,
                             max_loras)


def _rows(engine):
    """8 rows: routed with the defaults, routed with their own options, manual mixtures; max_tokens 3..17."""
    options = [{}, {"mixture": {"alpha": 0.7, "gamma": 0.3}}, {}, {"routing_top_p": 0.9, "max_loras": 2},
               {"mixture": {"beta": 1.0}}, {}, {"routing_top_p": 0.9, "max_loras": 2},
               {"mixture": {"alpha": 1.5, "beta": -0.5}}]  # negative weights are allowed
    return [GenerationRow(engine.encode(p), max_tokens=3 + 2 * i, **options[i])
            for i, p in enumerate(sf.PROMPTS)]


def test_batch_rows_equal_each_prompt_alone(engine, oracle):
    rows = _rows(engine)
    calls = engine.calls
    results = engine.run(rows)
    assert engine.calls - calls == 1  # manual and routed rows, with their own routing options, in one call
    for prompt, row, result in zip(sf.PROMPTS, rows, results, strict=True):
        assert isinstance(result, RowResult), result
        expected = _alone(oracle, prompt, row.max_tokens, row.mixture, row.routing_top_p,
                          row.max_loras)
        assert (result.text, result.finish_reason) == (expected["text"], expected["finish_reason"]), prompt
        sf.assert_routing_equal(result.routing, expected["routing"], prompt)
        assert result.batch_size > 1
        assert result.prompt_tokens == len(row.prompt_ids)
        if result.finish_reason == "length":
            assert len(result.token_ids) == result.completion_tokens == row.max_tokens
    reasons = {span["reason"] for r in results for span in r.routing}
    assert reasons == {"sentence", "mixture"}
    assert any(len(r.routing) > 1 for r in results)  # some prompts were split into sentence spans
    assert any(span["position"] >= len(row.prompt_ids)  # and some re-routed while generating
               for row, r in zip(rows, results, strict=True) for span in r.routing)


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(engine, oracle):
    prompt = sf.PROMPTS[3]
    full = _alone(oracle, prompt, 12)["text"]
    words = full.split()
    assert len(words) >= 6, full
    stop = " ".join(words[3:5])  # two tokens: the first must be held back until the second rules it out
    expected = full[:full.find(stop)]
    pieces = []
    rows = [GenerationRow(engine.encode(prompt), max_tokens=12, stop=("zz-never", stop),
                          on_text=pieces.append),
            GenerationRow(engine.encode(sf.PROMPTS[0]), max_tokens=12)]
    cut, other = engine.run(rows)
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    assert "".join(pieces) == expected and len(pieces) >= 2
    assert not any(stop in piece for piece in pieces)
    assert other.text == _alone(oracle, sf.PROMPTS[0], 12)["text"]
    assert len(other.token_ids) == 12  # the cut row ended early; the call ran on for the other


def test_a_bad_row_fails_alone(engine, oracle):
    rows = _rows(engine)[:3]
    rows.insert(1, GenerationRow(engine.encode(sf.PROMPTS[1]), max_tokens=4, mixture={"no_such": 1.0}))
    results = engine.run(rows)
    assert isinstance(results[1], ValueError) and "no_such" in str(results[1])
    for i in (0, 2, 3):
        row = rows[i]
        expected = _alone(oracle, sf.PROMPTS[i - (i > 1)], row.max_tokens, row.mixture)
        assert results[i].text == expected["text"]


def test_sampling_settings_split_calls_and_a_seed_fixes_a_row(engine):
    prompt_ids = engine.encode(sf.PROMPTS[5])
    greedy = GenerationRow(prompt_ids, max_tokens=8)
    hot = GenerationRow(prompt_ids, max_tokens=8, temperature=1.5, top_p=0.9)
    seeded = GenerationRow(prompt_ids, max_tokens=8, temperature=1.5, seed=123)
    calls = engine.calls
    results = engine.run([greedy, hot, dataclasses.replace(hot), seeded])
    assert engine.calls - calls == 3  # greedy; the two unseeded sampled rows together; the seeded one alone
    assert [r.batch_size for r in results] == [1, 2, 2, 1]
    again = engine.run([seeded, hot, greedy])
    assert again[0].text == results[3].text  # whatever else is in the batch
    assert again[2].text == results[0].text


def test_a_cancelled_row_ends_within_a_step_and_frees_the_call(engine, oracle):
    """Cancelled after its 3rd token: the row ends at the next step, the others run to their end; a row
    cancelled before its call never runs; the event does not travel when a row is pickled."""
    import pickle

    left, other = sf.PROMPTS[0], sf.PROMPTS[1]
    pieces: list[str] = []

    def on_text(piece):  # the client leaves once 3 tokens (words, for this tokenizer) have come out
        pieces.append(piece)
        if len(engine.encode("".join(pieces))) >= 3:
            row.cancelled.set()

    row = GenerationRow(engine.encode(left), max_tokens=40, on_text=on_text)

    gone = GenerationRow(engine.encode(other), max_tokens=40)
    gone.cancelled.set()
    stays = GenerationRow(engine.encode(other), max_tokens=12)
    cancelled, never, done = engine.run([row, gone, stays])
    assert cancelled.finish_reason == "cancelled" and 3 <= cancelled.completion_tokens <= 5, cancelled
    assert (never.finish_reason, never.completion_tokens) == ("cancelled", 0)
    assert done.text == _alone(oracle, other, 12)["text"] and done.finish_reason != "cancelled"
    copy = pickle.loads(pickle.dumps(gone))
    assert not copy.cancelled.is_set() and copy.prompt_ids == gone.prompt_ids and copy.on_text is None


def test_rows_waiting_for_a_busy_model_merge_into_its_next_call():
    """What arrives while a call runs goes into the next one, oldest first, up to max_batch_size."""

    class BlockingEngine:  # stands in for CompletionEngine.run: holds its first call until released
        def __init__(self):
            self.calls, self.release = [], threading.Event()

        def run(self, rows):
            self.calls.append(list(rows))
            if len(self.calls) == 1:
                assert self.release.wait(timeout=60)
            return [RowResult(row, [], "length", 1, 1, [], batch_size=len(rows)) for row in rows]

    engine = BlockingEngine()

    async def scenario():
        runner = BatchRunner(engine, max_batch_size=3)
        first = asyncio.ensure_future(runner.submit(["a"]))
        for _ in range(600):  # until the first call holds the model (bounded: 60 s)
            if engine.calls:
                break
            await asyncio.sleep(0.1)
        later = [asyncio.ensure_future(runner.submit(rows)) for rows in (["b", "c"], ["d"], ["e"])]
        await asyncio.sleep(0.2)  # the submissions queue up behind the busy model
        engine.release.set()
        return runner, await asyncio.gather(first, *later)

    runner, results = asyncio.run(scenario())
    assert engine.calls == [["a"], ["b", "c", "d"], ["e"]]
    assert [[r.text for r in rs] for rs in results] == [["a"], ["b", "c"], ["d"], ["e"]]
    assert [r.batch_size for rs in results for r in rs] == [1, 3, 3, 3, 1]
    assert runner.call_sizes == {1: 2, 3: 1}


# --- protocol: every bad request is an APIError naming its field -------------------------------------

SERVED = ServedModels("tiny", ("alpha", "beta", "gamma"), max_context=128)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        ({"model": "tiny"}, 400, "prompt", None),
        ({"model": "tiny", "prompt": "  "}, 400, "prompt", None),
        ({"model": "tiny", "prompt": ["ok", ""]}, 400, "prompt[1]", None),
        ({"model": "tiny", "prompt": []}, 400, "prompt", None),
        ({"model": "tiny", "prompt": [1, 2]}, 400, "prompt[0]", None),
        ({"prompt": "x"}, 400, "model", None),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", None),
        ({"model": "tiny", "prompt": "x", "max_tokens": 128}, 400, "max_tokens", "context_length_exceeded"),
        ({"model": "tiny", "prompt": "x", "mixture": {"delta": 1}}, 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": {"alpha": 1e38}}, 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": {"alpha": 0}}, 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": {}}, 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": {"alpha": math.nan}}, 400, "mixture", None),
        (b'{"model": "tiny", "prompt": "x", "mixture": {"alpha": NaN}}', 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": [1]}, 400, "mixture", None),
        ({"model": "alpha", "prompt": "x", "mixture": {"beta": 1}}, 400, "mixture", None),
        ({"model": "tiny", "prompt": "x", "mixture": {"beta": 1}, "routing_top_p": 0.5}, 400, "routing_top_p",
         None),
        ({"model": "tiny", "prompt": "x", "routing_top_p": 0}, 400, "routing_top_p", None),
        ({"model": "tiny", "prompt": "x", "max_loras": 4}, 400, "max_loras", None),
        ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", None),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", None),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n", None),
        ({"model": "tiny", "prompt": "x", "logprobs": 1}, 400, "logprobs", None),
        ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop", None),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", None),
        ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
         None),
        ({"model": "tiny", "prompt": "x", "mixtures": {"alpha": 1}}, 400, "mixtures", None),
    ],
)
def test_bad_requests_name_their_field(body, status, param, code):
    with pytest.raises(APIError) as info:
        parse_completion_request(body, SERVED)
    error = info.value
    assert (error.status, error.param, error.code) == (status, param, code), error.message
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_good_requests_parse():
    request = parse_completion_request(
        b'{"model": "tiny", "prompt": ["a", "b"], "max_tokens": 5, "temperature": 0, "stop": "."}', SERVED)
    assert (request.prompts, request.max_tokens, request.temperature, request.stop) == (["a", "b"], 5, 0.0,
                                                                                          (".",))
    assert request.mixture is None and request.seed is None
    request = parse_completion_request({"model": "beta", "prompt": "x", "user": "u", "n": 1}, SERVED)
    assert request.mixture == {"beta": 1.0}  # an adapter's name as the model: that adapter alone
    request = parse_completion_request({"model": "tiny", "prompt": "x", "mixture": {"alpha": 1, "beta": 0}},
                                       SERVED)
    assert request.mixture == {"alpha": 1.0}  # zero weights are dropped (dlp_lora/mixture.py)
    with pytest.raises(APIError) as info:
        check_prompt_length(125, request, SERVED, 0)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    check_prompt_length(112, request, SERVED, 0)


CHAT_SERVED = ServedModels("tiny", ("alpha", "beta", "gamma"), max_context=128, chat_template=True)
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "tiny"}, "messages", None),
        ({"model": "tiny", "messages": []}, "messages", None),
        ({"model": "tiny", "messages": "hi"}, "messages", None),
        ({"model": "tiny", "messages": ["hi"]}, "messages[0]", None),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", None),
        ({"model": "tiny", "messages": [{"content": "hi"}]}, "messages[0].role", None),
        ({"model": "tiny", "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", None),
        ({"model": "tiny", "messages": [*USER, {"role": "user", "content": None}]}, "messages[1].content",
         None),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages[0].content[0]",
         None),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0]", None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0]",
         None),
        ({"model": "tiny", "messages": USER, "prompt": "hi"}, "prompt", None),
        ({"model": "tiny", "messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", None),
        ({"model": "tiny", "messages": USER, "max_completion_tokens": 128}, "max_completion_tokens",
         "context_length_exceeded"),
        ({"model": "tiny", "messages": USER, "max_completion_tokens": 8, "max_tokens": 9}, "max_tokens",
         None),
        ({"model": "tiny", "messages": USER, "n": 2}, "n", None),
        ({"model": "tiny", "messages": USER, "logprobs": True}, "logprobs", None),
        ({"model": "tiny", "messages": USER, "echo": True}, "echo", None),
        # the checks both endpoints share, reached through the chat request
        ({"model": "tiny", "messages": USER, "mixture": {"delta": 1}}, "mixture", None),
        ({"model": "tiny", "messages": USER, "temperature": 3}, "temperature", None),
        ({"model": "tiny", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options",
         None),
    ],
)
def test_bad_chat_requests_name_their_field(body, param, code):
    with pytest.raises(APIError) as info:
        parse_chat_request(body, CHAT_SERVED)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code), info.value.message


def test_chat_requests_parse_into_one_templated_prompt():
    with pytest.raises(APIError) as info:  # a tokenizer without a chat template serves no chat
        parse_chat_request({"model": "tiny", "messages": USER}, SERVED)
    assert info.value.param == "messages" and "chat template" in info.value.message
    parts = [{"type": "text", "text": "Solve 2 + 3."}, {"type": "text", "text": "Then double it."}]
    request = parse_chat_request(
        {"model": "beta", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": parts, "name": "ann"}],
         "max_completion_tokens": 7, "max_tokens": 7, "temperature": 0, "logprobs": False, "stream": True,
         "stream_options": {"include_usage": True}}, CHAT_SERVED)
    assert request.chat and request.prompts == [] and request.id.startswith("chatcmpl-")
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Solve 2 + 3.\nThen double it.", "name": "ann"}]
    assert (request.max_tokens, request.temperature, request.mixture) == (7, 0.0, {"beta": 1.0})
    assert request.stream and request.include_usage
    # no max_tokens: the rest of the context, as vLLM does
    request = parse_chat_request({"model": "tiny", "messages": USER, "max_tokens": None}, CHAT_SERVED)
    assert request.max_tokens is None
    assert check_prompt_length(100, request, CHAT_SERVED, 0) == 28
    with pytest.raises(APIError) as info:
        check_prompt_length(128, request, CHAT_SERVED, 0)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    assert "no room for a reply" in info.value.message


def test_chat_answers_have_openai_shapes():
    request = parse_chat_request({"model": "tiny", "messages": USER}, CHAT_SERVED)
    routing = [{"position": 0, "adapters": {"alpha": 1.0}, "reason": "prompt"}]
    assert choice(request, 0, "Hello.", "stop", routing) == {
        "index": 0, "message": {"role": "assistant", "content": "Hello."}, "logprobs": None,
        "finish_reason": "stop", "dlp_routing": routing}
    body = completion_response(request, [choice(request, 0, "Hello.", "stop", routing)], {}, batch_size=1)
    assert body["object"] == "chat.completion"
    chunks = [stream_choice(request, 0, "", first=True), stream_choice(request, 0, "Hel"),
              stream_choice(request, 0, "", "stop", routing)]
    assert [c["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {}]
    assert chunks[2]["finish_reason"] == "stop" and chunks[2]["dlp_routing"] == routing
    event = stream_chunk(request, chunks[:1])
    assert event.startswith("data: ") and json.loads(event[6:])["object"] == "chat.completion.chunk"
    plain = parse_completion_request({"model": "tiny", "prompt": "x"}, SERVED)
    assert stream_choice(plain, 0, "Hel") == choice(plain, 0, "Hel", None, None) == {
        "index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}


def test_importing_the_package_and_engine_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, dlp_lora, dlp_lora.serving.engine, dlp_lora.serving.protocol, "
            "dlp_lora.serving.loading; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
