"""`dlp-lora serve` end to end: the session's local Ray cluster (conftest.ray_serve), the app with 2
replicas on 127.0.0.1, plain HTTP and the official `openai` client. Deployed once for the module."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import serving_fixtures as sf

# Ray Serve's own pydantic models warn on import; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

ray = pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")
serve = pytest.importorskip("ray.serve")

from dlp_lora.serving.app import APP_NAME, build_app  # noqa: E402
from dlp_lora.serving.loading import load_engine  # noqa: E402

TIMEOUT_S = 60  # per HTTP request


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_serve):
    art = sf.build(tmp_path_factory.mktemp("serving"))
    # A long batch wait, so that requests sent together surely meet in one batch.
    app = build_app(model=art["model"], adapters=art["adapters"], router=art["router"], replicas=2,
                    max_batch_size=8, batch_wait_ms=250)
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield {"base": f"http://127.0.0.1:{ray_serve['port']}", "art": art}
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def oracle(server):
    """An in-process engine on the same directories: generate() of one prompt alone is the reference."""
    return load_engine(sf.config(server["art"]))


def _expected(oracle, prompt, max_tokens, mixture=None, routing_top_p=None, max_loras=None):
    return sf.generate_alone(oracle.model, oracle.tokenizer, prompt, max_tokens, mixture, routing_top_p,
                             max_loras)


def _post(server, body, path="/v1/completions") -> tuple[int, dict | str]:
    return sf.http_request(server["base"] + path, body, timeout=TIMEOUT_S)


def _get(server, path) -> dict:
    with urllib.request.urlopen(server["base"] + path, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def _in_threads(fn, args_list: list) -> list:
    """Run fn(*args) for every args at once (released together by a barrier); results in order."""
    barrier = threading.Barrier(len(args_list))
    results = [None] * len(args_list)

    def work(i, args):
        barrier.wait(timeout=TIMEOUT_S)
        results[i] = fn(*args)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    return results


# Per client: our request fields (routed with the defaults, routed with its own options, manual).
CLIENT_OPTIONS = [{}, {"mixture": {"alpha": 0.6, "beta": 0.4}}, {"routing_top_p": 0.9, "max_loras": 2}, {},
                  {"model": "gamma"}, {"mixture": {"beta": 1.0, "gamma": 0.5}}, {}, {"routing_top_p": 0.9,
                                                                                     "max_loras": 2}]


def test_concurrent_clients_match_generate_alone(server, oracle):
    bodies = []
    for i, (prompt, options) in enumerate(zip(sf.PROMPTS, CLIENT_OPTIONS, strict=True)):
        bodies.append({"model": "model", "prompt": prompt, "max_tokens": 4 + i, "temperature": 0, **options})
    answers = _in_threads(lambda body: _post(server, body), [(b,) for b in bodies])
    sizes = []
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        (got,) = answer["choices"]
        mixture = {"gamma": 1.0} if body["model"] == "gamma" else body.get("mixture")
        expected = _expected(oracle, body["prompt"], body["max_tokens"], mixture, body.get("routing_top_p"),
                             body.get("max_loras"))
        assert {k: got[k] for k in ("text", "finish_reason")} == {k: expected[k] for k in
                                                                 ("text", "finish_reason")}, body
        sf.assert_routing_equal(got["dlp_routing"], expected["routing"], body)
        assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
        sizes.append(answer["dlp_batch_size"])
    assert max(sizes) > 1, sizes  # 8 requests sent together on 2 replicas shared generate() calls
    assert any(len(a["choices"][0]["dlp_routing"]) > 1 for _, a in answers)


def test_a_list_of_prompts_is_one_batch(server, oracle):
    body = {"model": "model", "prompt": sf.PROMPTS, "max_tokens": 5, "temperature": 0}
    status, answer = _post(server, body)
    assert status == 200, answer
    assert answer["dlp_batch_size"] == len(sf.PROMPTS)
    assert [c["index"] for c in answer["choices"]] == list(range(len(sf.PROMPTS)))
    for prompt, got in zip(sf.PROMPTS, answer["choices"], strict=True):
        assert got["text"] == _expected(oracle, prompt, 5)["text"]
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"][
        "completion_tokens"]


def test_the_openai_client_works(server, oracle):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=TIMEOUT_S,
                           max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert models == ["model", "alpha", "beta", "gamma"]

    prompt = sf.PROMPTS[2]
    done = client.completions.create(model="model", prompt=prompt, max_tokens=9, temperature=0,
                                     extra_body={"mixture": {"alpha": 0.5, "gamma": 0.5}})
    expected = _expected(oracle, prompt, 9, {"alpha": 0.5, "gamma": 0.5})
    assert done.choices[0].text == expected["text"]
    sf.assert_routing_equal(done.choices[0].model_extra["dlp_routing"], expected["routing"])
    assert done.object == "text_completion" and done.usage.completion_tokens >= 1

    listed = client.completions.create(model="model", prompt=sf.PROMPTS[:3], max_tokens=4, temperature=0,
                                       extra_body={"routing_top_p": 0.9, "max_loras": 2})
    assert [c.text for c in listed.choices] == [_expected(oracle, p, 4, None, 0.9, 2)["text"]
                                                for p in sf.PROMPTS[:3]]

    stream = client.completions.create(model="model", prompt=prompt, max_tokens=9, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"mixture": {"alpha": 0.5, "gamma": 0.5}})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(text_chunks) >= 2  # the text arrived in pieces
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == [expected["finish_reason"]]
    sf.assert_routing_equal(finals[0].model_extra["dlp_routing"], expected["routing"])
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="model", prompt="al1", extra_body={"mixture": {"delta": 1}})
    assert info.value.body["param"] == "mixture"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="al1")


LONG_PROMPT = " ".join(["al1"] * 130)  # 130 tokens: more than the model's 128 positions

BAD_REQUESTS = [  # (body, status, param, code)
    (b'{"model": "model", "prompt": ', 400, None, "invalid_json"),
    ({"model": "model"}, 400, "prompt", None),
    ({"model": "model", "prompt": ""}, 400, "prompt", None),
    ({"model": "model", "prompt": "al1", "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": "model", "prompt": "al1", "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "model", "prompt": "al1 al2", "max_tokens": 127}, 400, "prompt", "context_length_exceeded"),
    ({"model": "model", "prompt": LONG_PROMPT, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ({"model": "model", "prompt": "al1", "mixture": {"delta": 1}}, 400, "mixture", None),
    ({"model": "model", "prompt": "al1", "mixture": {"alpha": 101}}, 400, "mixture", None),
    (b'{"model": "model", "prompt": "al1", "mixture": {"alpha": NaN}}', 400, "mixture", None),
    ({"model": "llama-70b", "prompt": "al1"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error(server, body, status, param, code):
    got_status, answer = _post(server, body)
    assert got_status == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_chat_without_a_chat_template_is_a_400_naming_messages(server):
    """This model's word-level tokenizer has no chat template: /v1/chat/completions says so."""
    status, answer = _post(server, {"model": "model", "messages": [{"role": "user", "content": "al1"}]},
                           path="/v1/chat/completions")
    assert status == 400, answer
    assert (answer["error"]["param"], answer["error"]["type"]) == ("messages", "invalid_request_error")
    assert "no chat template" in answer["error"]["message"]


def test_good_and_bad_requests_sent_together(server, oracle):
    good = [{"model": "model", "prompt": p, "max_tokens": 6, "temperature": 0} for p in sf.PROMPTS[:4]]
    bad = [body for body, *_ in BAD_REQUESTS[1:5]]
    answers = _in_threads(lambda body: _post(server, body), [(b,) for b in good + bad])
    for body, (status, answer) in zip(good, answers[:4], strict=True):
        assert status == 200, answer
        assert answer["choices"][0]["text"] == _expected(oracle, body["prompt"], 6)["text"]
    assert [status for status, _ in answers[4:]] == [400] * 4
    assert _get(server, "/health")["status"] == "ok"  # no replica was taken down
    assert len(_model_replicas()) == 2


def _listed_replicas(server, want: set[str]) -> set[str]:
    """The replica ids /health lists, once they equal ``want`` (or after 20 s: what it lists then)."""
    deadline = time.monotonic() + 20
    while True:
        listed = {r["replica"] for r in _get(server, "/health")["model_replicas"] or []}
        if listed == want or time.monotonic() > deadline:
            return listed
        time.sleep(0.25)


def test_health_lists_each_model_replica(server):
    actors = _model_replicas()
    ids = {name.rsplit("#", 1)[1] for name in actors}
    assert len(ids) == 2 and _listed_replicas(server, ids) == ids
    for replica in _get(server, "/health")["model_replicas"]:
        assert {"running", "waiting", "generated_tokens", "cancelled_rows"} <= set(replica), replica
        assert replica["running"] >= 0 and replica["waiting"] >= 0 and replica["reported_s_ago"] < 5


def _model_replicas() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "#DLPLoRAModel#" in a["name"]}


def test_a_killed_replica_is_replaced_and_requests_fail_clearly(server):
    """ray.kill one model replica while 4 clients send; Serve starts another; every answer is 200 or a 503
    naming its cause (the front retries a request whose replica died, so none should be lost)."""
    replicas = _model_replicas()
    assert len(replicas) == 2, replicas
    victim = sorted(replicas)[0]
    outcomes: list[tuple[int, object]] = []
    lock = threading.Lock()
    stop = threading.Event()
    clients, per_client = 4, 15

    def client(i):
        for j in range(per_client):  # bounded in count and, through stop, in time
            if stop.is_set():
                return
            body = {"model": "model", "prompt": sf.PROMPTS[(i + j) % 8], "max_tokens": 6, "temperature": 0}
            result = _post(server, body)
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT_S
    while len(outcomes) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = len(outcomes)
    for t in threads:
        t.join(timeout=4 * TIMEOUT_S)
    stop.set()
    assert not any(t.is_alive() for t in threads)

    lost = [(status, answer) for status, answer in outcomes if status != 200]
    for status, answer in lost:
        assert status == 503 and answer["error"]["code"] == "replica_unavailable", (status, answer)
        assert "died" in answer["error"]["message"]
    # At most the requests on the victim when it died (the 4 clients' in-flight ones), each tried 3 times.
    assert len(lost) <= clients, lost
    assert len(outcomes) == clients * per_client and killed_at < len(outcomes)
    retries = _get(server, "/health")["front_retries"]
    print(f"killed replica: {len(lost)} of {len(outcomes)} requests lost, {retries} sent again")

    deadline = time.monotonic() + 90
    names: set[str] = set()
    while time.monotonic() < deadline:  # Serve starts a replacement
        status = serve.status().applications[APP_NAME].deployments["DLPLoRAModel"]
        if status.replica_states.get("RUNNING") == 2:
            names = _model_replicas()
            if len(names) == 2 and victim not in names:
                break
        time.sleep(0.5)
    assert len(names) == 2 and victim not in names, names
    ids = {name.rsplit("#", 1)[1] for name in names}
    assert _listed_replicas(server, ids) == ids  # the dead replica left /health, its replacement joined
    status, answer = _post(server, {"model": "model", "prompt": "al1", "max_tokens": 2, "temperature": 0})
    assert status == 200, answer
