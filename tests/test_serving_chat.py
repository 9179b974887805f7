"""POST /v1/chat/completions end to end: the session's local Ray cluster (conftest.ray_serve), the app on
an instruct model's tokenizer (SmolLM2's BPE and chat template, tests/fixtures) with an API key, plain
HTTP and the official `openai` client. Answers are compared with generate() of the templated prompt
alone, in-process; routing with the same content sent to /v1/completions."""

from __future__ import annotations

import json

import pytest
import serving_fixtures as sf

# Ray Serve's own pydantic models warn on import; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

ray = pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from dlp_lora.serving.app import DLPLoRAServer, build_app  # noqa: E402
from dlp_lora.serving.loading import load_engine  # noqa: E402

TIMEOUT_S = 60
KEY = "sk-chat-test"
NAME = "smol-chat"
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 7 + 9?"},
    {"role": "assistant", "content": "16."},
    {"role": "user", "content": [{"type": "text", "text": "Translate cat to French."},
                                 {"type": "text", "text": "Then add 1 + 2."}]},
]
# The same conversation as the chat template gets it: text parts joined by newlines.
TEMPLATED = [*CONVERSATION[:3], {"role": "user", "content": "Translate cat to French.\nThen add 1 + 2."}]


@serve.deployment
class FailingModel:
    """Stands in for DLPLoRAModel behind the real front: every row fails, a stream after its first text."""

    async def complete(self, rows):
        return [ValueError("the stub refuses every row") for _ in rows]

    async def stream(self, rows):
        yield ("text", 0, "partial")
        yield ("done", 0, RuntimeError("the stub failed this row"))


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, ray_serve):
    art = sf.build_chat(tmp_path_factory.mktemp("chat"))
    app = build_app(model=art["model"], adapters=art["adapters"], router=art["router"], replicas=1,
                    max_batch_size=8, batch_wait_ms=10, api_key=KEY, model_name=NAME)
    serve.run(app, name="chat", route_prefix="/c")
    failing = DLPLoRAServer.options(ray_actor_options={"num_cpus": 0}).bind(
        sf.config(art, model_name=NAME), FailingModel.options(ray_actor_options={"num_cpus": 0}).bind())
    serve.run(failing, name="chat-failing", route_prefix="/cf")
    try:
        yield {"base": f"http://127.0.0.1:{ray_serve['port']}/c", "art": art,
               "failing": f"http://127.0.0.1:{ray_serve['port']}/cf"}
    finally:
        serve.delete("chat")
        serve.delete("chat-failing")


@pytest.fixture(scope="module")
def oracle(chat_server):
    return load_engine(sf.config(chat_server["art"]))


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server["base"] + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)


def _expected(oracle, messages, max_tokens, mixture=None) -> dict:
    """generate() alone of the conversation in the chat template (whose special tokens are its own)."""
    prompt = oracle.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = sf.generate_alone(oracle.model, oracle.tokenizer, prompt, max_tokens, mixture,
                                 add_special_tokens=False)
    expected["prompt_tokens"] = len(oracle.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return expected


def test_openai_client_chat_matches_generate_alone(client, oracle):
    done = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_completion_tokens=9,
                                          temperature=0)
    expected = _expected(oracle, TEMPLATED, 9)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    (got,) = done.choices
    assert (got.message.role, got.message.content, got.finish_reason) == (
        "assistant", expected["text"], expected["finish_reason"])
    sf.assert_routing_equal(got.model_extra["dlp_routing"], expected["routing"])
    assert done.usage.prompt_tokens == expected["prompt_tokens"]
    assert done.usage.completion_tokens == 9 and expected["text"]

    stream = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and not deltas[0].content
    pieces = [d.content for d in deltas[1:] if d.content]
    assert len(pieces) >= 2 and "".join(pieces) == expected["text"]  # the text arrived in pieces
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == [expected["finish_reason"]]
    sf.assert_routing_equal(finals[0].model_extra["dlp_routing"], expected["routing"])
    assert chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices


def test_chat_takes_our_fields_and_defaults_to_the_rest_of_the_context(client, oracle):
    mixture = {"french": 0.5, "math": 0.5}
    done = client.chat.completions.create(model=NAME, messages=CONVERSATION[:2], max_tokens=6,
                                          temperature=0, extra_body={"mixture": mixture})
    expected = _expected(oracle, CONVERSATION[:2], 6, mixture)
    assert done.choices[0].message.content == expected["text"]
    sf.assert_routing_equal(done.choices[0].model_extra["dlp_routing"], expected["routing"])
    assert expected["routing"] == [{"position": 0, "adapters": mixture, "reason": "mixture"}]

    adapter = client.chat.completions.create(model="math", messages=CONVERSATION[:2], max_tokens=6,
                                             temperature=0)  # an adapter's name: that adapter alone
    assert adapter.choices[0].message.content == _expected(oracle, CONVERSATION[:2], 6, {"math": 1.0})["text"]

    # no max_tokens: the reply may fill the context, as vLLM does (this tiny model never emits EOS)
    rest = client.chat.completions.create(model=NAME, messages=CONVERSATION[:2], temperature=0)
    context = oracle.max_context
    assert rest.usage.prompt_tokens + rest.usage.completion_tokens == context
    assert rest.choices[0].finish_reason == "length"


def test_the_router_reads_the_conversation_not_the_template(chat_server):
    """The chat request's prompt spans get the adapters that the same content gets as a plain prompt."""
    content = "Translate cat to French. What is 12 + 30?"
    auth = {"Authorization": f"Bearer {KEY}"}
    status, chat = sf.http_request(chat_server["base"] + "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0,
    }, auth, timeout=TIMEOUT_S)
    assert status == 200, chat
    status, plain = sf.http_request(chat_server["base"] + "/v1/completions", {
        "model": NAME, "prompt": content, "max_tokens": 2, "temperature": 0}, auth, timeout=TIMEOUT_S)
    assert status == 200, plain

    def spans(answer):
        return [(s["adapters"], s["reason"]) for s in answer["choices"][0]["dlp_routing"]]

    # The template's system prompt and role line (30 tokens) ride in the first sentence's span; the end
    # of the user's message ends its last sentence, so the reply is routed on the whole conversation,
    # as the plain prompt's continuation is (its span starts at the first generated token, which the
    # second step reads: hence 2 tokens).
    assert chat["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20
    assert spans(chat) == spans(plain)
    assert [list(adapters) for adapters, _ in spans(chat)] == [["french"], ["math"], ["math"]]


BAD_CHATS = [  # (body, status, param, code)
    ({"model": NAME}, 400, "messages", None),
    ({"model": NAME, "messages": []}, 400, "messages", None),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400,
     "messages[0].content[0]", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "cat " * 200}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "mixture": {"german": 1}}, 400,
     "mixture", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_CHATS)
def test_bad_chat_requests_get_an_openai_error(chat_server, body, status, param, code):
    got_status, answer = sf.http_request(chat_server["base"] + "/v1/chat/completions", body,
                                         {"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S)
    assert got_status == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_chat_needs_the_api_key_and_the_client_sees_errors(chat_server, client):
    status, answer = sf.http_request(chat_server["base"] + "/v1/chat/completions",
                                     {"model": NAME, "messages": [{"role": "user", "content": "hi"}]},
                                     timeout=TIMEOUT_S)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"


def test_a_failed_chat_row_is_an_error_as_in_completions(chat_server):
    """A row failing inside generation: a 400 whole, or in a stream the role, the text so far, the error
    event and `data: [DONE]`."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = sf.http_request(chat_server["failing"] + "/v1/chat/completions", body, timeout=TIMEOUT_S)
    assert status == 400 and "the stub refuses every row" in answer["error"]["message"]
    status, text = sf.http_request(chat_server["failing"] + "/v1/chat/completions", {**body, "stream": True},
                                   timeout=TIMEOUT_S)
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""},
                                                             {"content": "partial"}]
    assert chunks[2]["error"]["type"] == "server_error" and "the stub failed" in chunks[2]["error"]["message"]
    assert len(chunks) == 3


def test_a_template_that_refuses_the_conversation_is_a_400_naming_messages():
    """Templates may raise (e.g. on roles out of order): the front answers with that reason."""
    import asyncio

    from transformers import AutoTokenizer

    from dlp_lora.serving.app import _Tokenizers
    from dlp_lora.serving.protocol import APIError

    tokenizer = AutoTokenizer.from_pretrained(str(sf.SMOLLM2_TOKENIZER))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System messages are not supported') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    tokenizers = _Tokenizers(tokenizer, threads=1)
    ids = asyncio.run(tokenizers.encode_chat([{"role": "user", "content": "Hello there."}]))
    assert tokenizer.decode(ids) == "Hello there."
    with pytest.raises(APIError) as info:
        asyncio.run(tokenizers.encode_chat([{"role": "system", "content": "Be brief."}]))
    assert info.value.param == "messages" and "System messages are not supported" in info.value.message
