"""Continuous batching served end to end: a real local Ray cluster on 127.0.0.1, one model replica.

Every answer equals generate() of its request alone (text and adapter choices exactly, routing
weights within a tolerance), however the requests arrive; a short request joins a running long one
and leaves long before it; a closed stream frees its row. Started once for the module (~20 s)."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.parse

import pytest
import serving_fixtures as sf

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

ray = pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")
serve = pytest.importorskip("ray.serve")

from test_serving import _get, _post  # noqa: E402

from dlp_lora.serving.app import APP_NAME, build_app  # noqa: E402
from dlp_lora.serving.loading import load_engine  # noqa: E402

LONG_TOKENS = 110  # as long as the fixture's 128-token context allows
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_serve):
    art = sf.build(tmp_path_factory.mktemp("serving_continuous"))
    app = build_app(model=art["model"], adapters=art["adapters"], router=art["router"], replicas=1,
                    max_batch_size=8)
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield {"base": f"http://127.0.0.1:{ray_serve['port']}", "art": art}
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def oracle(server):
    return load_engine(sf.config(server["art"]))


def _expected(oracle, body):
    mixture = {body["model"]: 1.0} if body["model"] != "model" else body.get("mixture")
    return sf.generate_alone(oracle.model, oracle.tokenizer, body["prompt"], body["max_tokens"], mixture,
                             body.get("routing_top_p"), body.get("max_loras"))


def _assert_alone(oracle, body, answer) -> None:
    (got,) = answer["choices"]
    want = _expected(oracle, body)
    assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"]), body
    spans, want_spans = got["dlp_routing"], want["routing"]
    assert [(s["position"], s["reason"], list(s["adapters"])) for s in spans] == \
        [(s["position"], s["reason"], list(s["adapters"])) for s in want_spans], body
    for g, w in zip(spans, want_spans, strict=True):
        for name, weight in w["adapters"].items():
            assert math.isclose(g["adapters"][name], weight, rel_tol=1e-4, abs_tol=1e-5), (body, g, w)


def _body(prompt, max_tokens, **options):
    return {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **options}


def _send_later(server, bodies_with_delays) -> list:
    """POST each body after its own delay (s), all in threads; answers in order."""
    answers = [None] * len(bodies_with_delays)

    def work(i, body, delay):
        time.sleep(delay)
        answers[i] = _post(server, body)

    threads = [threading.Thread(target=work, args=(i, b, d)) for i, (b, d) in enumerate(bodies_with_delays)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * TIMEOUT_S)
    return answers


def _running(server) -> int:
    return _get(server, "/health")["model_replica"]["running"]


OPTIONS = [{}, {"mixture": {"alpha": 0.6, "beta": 0.4}}, {"routing_top_p": 0.9, "max_loras": 2}, {},
           {"model": "gamma"}, {"mixture": {"beta": 1.0, "gamma": 0.5}}, {}, {"routing_top_p": 0.9}]


def test_staggered_requests_equal_generate_alone(server, oracle):
    bodies = [(_body(p, (5, 17, 40)[i % 3], **OPTIONS[i]), 0.05 * i) for i, p in enumerate(sf.PROMPTS)]
    answers = _send_later(server, bodies)
    for (body, _), (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        _assert_alone(oracle, body, answer)
    assert max(a["dlp_batch_size"] for _, a in answers) > 1  # they shared steps
    assert any(s["position"] >= 6 and s["reason"] == "sentence"  # re-routed while generating
               for _, a in answers for s in a["choices"][0]["dlp_routing"])


def _open_stream(server, body) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, dict]:
    """A stream once its first text has come: (connection, response, first event)."""
    url = urllib.parse.urlparse(server["base"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: {")  # its first text: it is generating
    return connection, response, json.loads(first[6:])


def _read_events(response) -> list[dict]:
    events = []
    for line in response:
        if line.startswith(b"data: {"):
            events.append(json.loads(line[6:]))
    return events


def test_a_short_request_joins_a_long_one_and_leaves_first(server, oracle):
    long_body, short_body = _body(sf.PROMPTS[1], LONG_TOKENS), _body(sf.PROMPTS[2], 8)
    connection, response, first = _open_stream(server, long_body)  # the long one runs
    status, short_answer = _post(server, short_body)
    short_done = time.monotonic()
    events = [first, *_read_events(response)]
    long_done = time.monotonic()
    connection.close()
    assert status == 200, short_answer
    final = [e for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert final and final[0]["choices"][0]["finish_reason"] == "length"  # the long one ran to the end
    assert short_done < long_done
    assert short_answer["dlp_batch_size"] == 2  # it joined the running batch, and left before it
    _assert_alone(oracle, short_body, short_answer)
    long_text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert long_text == _expected(oracle, long_body)["text"]


def test_identical_prompts_with_different_mixtures(server, oracle):
    prompt = sf.PROMPTS[0]
    bodies = [_body(prompt, 12, mixture=m) for m in ({"alpha": 1.0}, {"beta": 1.0}, {"gamma": 0.7})]
    bodies.append(_body(prompt, 12))  # routed
    together = _send_later(server, [(b, 0) for b in bodies])
    one_by_one = [_post(server, b) for b in bodies]
    for body, (s1, a1), (s2, a2) in zip(bodies, together, one_by_one, strict=True):
        assert s1 == s2 == 200
        _assert_alone(oracle, body, a1)
        _assert_alone(oracle, body, a2)
    assert len({a["choices"][0]["text"] for _, a in together}) > 1


def test_a_closed_stream_frees_its_row(server, oracle):
    other_body = _body(sf.PROMPTS[4], 40)
    other = threading.Thread(target=lambda: results.append(_post(server, other_body)))
    results = []
    cancelled = _get(server, "/health")["model_replica"]["cancelled_rows"]
    connection, _, _ = _open_stream(server, _body(sf.PROMPTS[3], LONG_TOKENS))
    other.start()
    deadline = time.monotonic() + TIMEOUT_S
    while _running(server) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    connection.close()  # the client goes away mid-stream
    seen = []
    while time.monotonic() < deadline:
        seen.append(_running(server))
        if seen[-1] == 0:
            break
        time.sleep(0.05)
    assert seen[-1] == 0, seen  # every row left: the closed stream's place was freed
    assert _get(server, "/health")["model_replica"]["cancelled_rows"] == cancelled + 1  # ended, not run out
    other.join(timeout=TIMEOUT_S)
    (status, answer), = results
    assert status == 200
    _assert_alone(oracle, other_body, answer)  # the neighbour was not disturbed
