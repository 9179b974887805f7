"""The server under hostile or unlucky clients, through real HTTP on 127.0.0.1: every bad request gets
its 4xx in OpenAI's error body, every stream ends with `data: [DONE]`, a client that leaves stops
costing, the API key is checked, /health answers at once.

Two applications on the session's Ray cluster: the real one (1 model replica, an API key, a served
model name) and the real front bound to a stub model deployment whose rows fail, whose replica dies
mid-stream and whose health never answers (paths the real model cannot be made to take on demand).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import serving_fixtures as sf

# Ray Serve's own pydantic models warn on import; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

ray = pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")
serve = pytest.importorskip("ray.serve")

from dlp_lora.serving.app import DLPLoRAServer, build_app  # noqa: E402
from dlp_lora.serving.protocol import MAX_PROMPTS_PER_REQUEST, MAX_REQUEST_BYTES  # noqa: E402

TIMEOUT_S = 60
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-served"


@serve.deployment
class StubModel:
    """Stands in for DLPLoRAModel behind the real front: every row fails; prompt "die" kills the replica
    after its first text; health() never answers in time."""

    async def complete(self, rows):
        return [ValueError("the stub refuses every row") for _ in rows]

    async def stream(self, rows):
        import asyncio

        yield ("text", 0, "partial")
        if rows[0].max_tokens == 13:  # the test's signal: die once the text has reached the front
            await asyncio.sleep(2)
            os._exit(1)
        yield ("done", 0, RuntimeError("the stub failed this row"))

    async def health(self):
        import asyncio

        await asyncio.sleep(120)
        return {}


@pytest.fixture(scope="module")
def apps(tmp_path_factory, ray_serve):
    art = sf.build(tmp_path_factory.mktemp("hardening"))
    real = build_app(model=art["model"], adapters=art["adapters"], router=art["router"], replicas=1,
                     max_batch_size=8, batch_wait_ms=10, api_key=KEY, model_name=NAME)
    serve.run(real, name="hardened", route_prefix="/h")
    stub = DLPLoRAServer.options(ray_actor_options={"num_cpus": 0}).bind(
        sf.config(art), StubModel.options(ray_actor_options={"num_cpus": 0}).bind())
    serve.run(stub, name="stub", route_prefix="/stub")
    try:
        yield {"port": ray_serve["port"], "real": f"http://127.0.0.1:{ray_serve['port']}/h",
               "stub": f"http://127.0.0.1:{ray_serve['port']}/stub", "art": art}
    finally:
        serve.delete("hardened")
        serve.delete("stub")


def _request(url, body=None, headers=None, method=None) -> tuple[int, object]:
    return sf.http_request(url, body, headers, method, timeout=TIMEOUT_S)


def _completion(apps, body, **kwargs):
    return _request(apps["real"] + "/v1/completions", body, headers=AUTH, **kwargs)


def _events(text: str) -> list:
    """The data of every server-sent event: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _assert_openai_error(answer, status_type="invalid_request_error", param=None, code=None):
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == status_type, error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


# --- a row that fails inside generate(), streamed or not ---------------------------------------------


def test_a_failed_row_is_a_json_error_and_a_stream_ends_with_its_error_and_done(apps):
    body = {"model": "model", "prompt": "al1 al2", "max_tokens": 4}
    status, answer = _request(apps["stub"] + "/v1/completions", body)
    assert status == 400, answer
    _assert_openai_error(answer)
    assert "the stub refuses every row" in answer["error"]["message"]

    status, text = _request(apps["stub"] + "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = _events(text)
    assert events[0]["choices"][0]["text"] == "partial"
    _assert_openai_error(events[1], status_type="server_error")
    assert "the stub failed this row" in events[1]["error"]["message"]
    assert events[2:] == ["[DONE]"]


def test_a_stream_whose_replica_dies_after_text_ends_with_an_error_and_done(apps):
    body = {"model": "model", "prompt": "al1 al2", "max_tokens": 13, "stream": True}
    status, text = _request(apps["stub"] + "/v1/completions", body)
    assert status == 200
    events = _events(text)
    assert events[0]["choices"][0]["text"] == "partial", events
    _assert_openai_error(events[1], status_type="server_error", code="replica_unavailable")
    assert events[2:] == ["[DONE]"]


def test_health_answers_503_at_once_when_no_replica_answers(apps):
    start = time.monotonic()
    status, answer = _request(apps["stub"] + "/health")
    print(f"/health answered {status} after {time.monotonic() - start:.1f} s")
    assert status == 503, answer
    _assert_openai_error(answer, status_type="server_error", code="replica_unavailable")


def test_health_shows_counts_not_internals(apps):
    status, answer = _request(apps["real"] + "/health")  # open: load balancers probe it without a key
    assert status == 200, answer
    assert answer["status"] == "ok"
    counts = answer["model_replica"]
    assert {"running", "waiting"} <= set(counts) and all(
        isinstance(v, (int, dict)) for v in counts.values()), counts
    assert "SERVE_REPLICA" not in json.dumps(answer) and "#" not in json.dumps(answer)


ROUTES = [("/v1/nothing", "GET", 404), ("/v1/completions", "GET", 405), ("/health", "POST", 405)]


@pytest.mark.parametrize(("path", "method", "status"), ROUTES)
def test_unknown_routes_and_methods_get_an_openai_error(apps, path, method, status):
    got, answer = _request(apps["real"] + path, b"{}" if method == "POST" else None, headers=AUTH,
                           method=method)
    assert got == status, answer
    _assert_openai_error(answer)


# --- the API key and the served name -----------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_a_missing_or_wrong_api_key_is_a_401(apps, headers):
    body = {"model": NAME, "prompt": "al1", "max_tokens": 2}
    for url, data in ((apps["real"] + "/v1/completions", body), (apps["real"] + "/v1/models", None)):
        status, answer = _request(url, data, headers=headers)
        assert status == 401, answer
        _assert_openai_error(answer, code="invalid_api_key")


def test_the_key_and_the_served_name_let_a_request_through(apps):
    status, models = _request(apps["real"] + "/v1/models", headers=AUTH)
    assert status == 200 and [m["id"] for m in models["data"]][0] == NAME
    body = {"model": NAME, "prompt": "al1 al2", "max_tokens": 3, "temperature": 0}
    status, answer = _completion(apps, body)
    assert status == 200, answer
    assert answer["model"] == NAME and answer["choices"][0]["finish_reason"] in ("stop", "length")


# --- hostile input: 400, never a 500 -------------------------------------------------------------------

BIG_INT = "9" * 5000  # beyond Python's int-to-str limit (4300 digits)
GOOD = '"model": "tiny-served", "prompt": "al1 al2", "max_tokens": 2'

HOSTILE = [  # (raw body, param or None)
    (f'{{{GOOD}, "seed": {BIG_INT}}}', None),
    (f'{{"model": "tiny-served", "prompt": "al1", "max_tokens": {BIG_INT}}}', None),
    (f'{{{GOOD}, "temperature": {"9" * 400}}}', "temperature"),  # an int that overflows a float
    (f'{{{GOOD}, "mixture": {{"alpha": {"9" * 400}}}}}', "mixture"),
    ('{"model": "tiny-served", "prompt": "al1", "user": ' + "[" * 1000 + "]" * 1000 + "}", None),
    ('{"model": "tiny-served", "prompt": "al1", "user": ' + "[" * 100 + "]" * 100 + "}", None),
    ('{"model": "tiny-served", "prompt": "al1 \\ud800", "max_tokens": 2}', None),
    ('{"model": "tiny-served", "prompt": "al1 \\ud800", "max_tokens": 2, "stream": true}', None),
    (f'{{{GOOD}, "x\\udc00y": 1}}', None),
    (f'{{{GOOD}, "seed": {2**64}, "temperature": 1}}', "seed"),
    (f'{{{GOOD}, "seed": {-(2**63) - 1}, "temperature": 1}}', "seed"),
    (f'{{{GOOD}, "mixture": {{"alpha": 1e38}}, "temperature": 1}}', "mixture"),
    (f'{{{GOOD}, "mixture": {{"alpha": 1e300}}}}', "mixture"),
    (json.dumps({"model": NAME, "prompt": ["al1"] * (MAX_PROMPTS_PER_REQUEST + 1)}), "prompt"),
]


@pytest.mark.parametrize(("raw", "param"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_gets_a_400(apps, raw, param):
    status, answer = _completion(apps, raw.encode())
    assert status == 400, answer
    _assert_openai_error(answer, param=param)
    assert len(answer["error"]["message"]) < 1000


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_vanishing_temperature_is_greedy(apps, temperature):
    body = {"model": NAME, "prompt": sf.PROMPTS[0], "max_tokens": 6}
    status, greedy = _completion(apps, {**body, "temperature": 0})
    assert status == 200, greedy
    status, tiny = _completion(apps, {**body, "temperature": temperature})
    assert status == 200, tiny
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


# --- request size -------------------------------------------------------------------------------------


def _raw_http(apps, head: bytes, body_parts=(), timeout=TIMEOUT_S) -> tuple[int, dict]:
    """Send a hand-made request on a socket; return (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", apps["port"]), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed before reading all of it
                break
        data = b""
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_text.lower():
        body = _unchunk(body)
    return status, json.loads(body)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2:]
    return out


def _head(apps, extra: str) -> bytes:
    return (f"POST /h/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def test_a_body_over_the_limit_is_a_413_before_it_is_read(apps):
    # Headers only: the body never comes, so an answer proves nobody waited for it.
    status, answer = _raw_http(apps, _head(apps, f"Content-Length: {64 * MAX_REQUEST_BYTES}\r\n"))
    assert status == 413, answer
    _assert_openai_error(answer, code="request_too_large")


def test_a_chunked_body_is_cut_at_the_limit(apps):
    chunk = b"x" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_REQUEST_BYTES // len(chunk) + 2) + [b"0\r\n\r\n"]
    status, answer = _raw_http(apps, _head(apps, "Transfer-Encoding: chunked\r\n"), parts)
    assert status == 413, answer
    _assert_openai_error(answer, code="request_too_large")


def test_a_prompt_near_the_body_limit_is_refused_by_its_length(apps):
    prompt = " ".join(["al1"] * (MAX_REQUEST_BYTES // 5))
    status, answer = _completion(apps, {"model": NAME, "prompt": prompt, "max_tokens": 2})
    assert status == 400, answer
    _assert_openai_error(answer, param="prompt", code="context_length_exceeded")


# --- clients that leave ---------------------------------------------------------------------------------


def _health_counts(apps) -> dict:
    status, answer = _request(apps["real"] + "/health")
    assert status == 200, answer
    return answer["model_replica"]


def _wait_idle(apps) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = _health_counts(apps)
        if counts["running"] == 0 and counts["waiting"] == 0:
            return counts
        time.sleep(0.2)
    raise AssertionError(f"the model replica never went idle: {counts}")


PROMPTS_32 = [sf.PROMPTS[i % len(sf.PROMPTS)] for i in range(32)]
MAX_TOKENS = 100


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_rows(apps, stream):
    """32 prompts of 100 tokens (4 calls of 8 rows), the client gone after the first event (or once the
    model runs its rows): the rows still running end, those not started never run."""
    before = _wait_idle(apps)
    body = json.dumps({"model": NAME, "prompt": PROMPTS_32, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "stream": stream}).encode()
    head = _head(apps, f"Content-Length: {len(body)}\r\n")
    with socket.create_connection(("127.0.0.1", apps["port"]), timeout=TIMEOUT_S) as sock:
        sock.sendall(head + body)
        if stream:
            received = b""
            while b"data: " not in received:  # the first event: the model runs (recv times out at 60 s)
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
        else:  # leave once the model runs the request
            deadline = time.monotonic() + TIMEOUT_S
            while _health_counts(apps)["running"] == 0:
                assert time.monotonic() < deadline, "the request never reached the model"
                time.sleep(0.05)
    after = _wait_idle(apps)
    generated = after["generated_tokens"] - before["generated_tokens"]
    cancelled = after["cancelled_rows"] - before["cancelled_rows"]
    print(f"client left (stream={stream}): {generated} of {32 * MAX_TOKENS} tokens generated, "
          f"{cancelled} rows cancelled")
    assert cancelled >= 16, (cancelled, generated)
    assert generated < 32 * MAX_TOKENS // 2, (cancelled, generated)
    status, answer = _completion(apps, {"model": NAME, "prompt": "al1", "max_tokens": 4, "temperature": 0})
    assert status == 200, answer


def test_rows_that_finish_are_not_counted_as_cancelled(apps):
    before = _wait_idle(apps)
    status, answer = _completion(apps, {"model": NAME, "prompt": sf.PROMPTS[:4], "max_tokens": 5,
                                        "temperature": 0})
    assert status == 200, answer
    assert {c["finish_reason"] for c in answer["choices"]} <= {"stop", "length"}
    after = _wait_idle(apps)
    assert after["cancelled_rows"] == before["cancelled_rows"]
    assert after["generated_tokens"] - before["generated_tokens"] == answer["usage"]["completion_tokens"]
