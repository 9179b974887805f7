"""`dlp-lora serve` as a user runs it: bad arguments fail in one line before Ray starts; a real server
on its own cluster prints its URL, answers, and stops cleanly on SIGTERM as on Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import serving_fixtures as sf
import torch

from dlp_lora.cli import main

# Ray Serve's own pydantic models warn on import; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return sf.build(tmp_path_factory.mktemp("serving_cli"))


def _args(art, *extra) -> list[str]:
    adapters = [f"{name}={path}" for name, path in art["adapters"].items()]
    return ["serve", "--model", str(art["model"]), "--adapters", *adapters, "--router", str(art["router"]),
            *extra]


def _forbid_ray_start(monkeypatch):
    import ray

    def never(*args, **kwargs):
        pytest.fail("Ray started before the arguments were checked")

    monkeypatch.setattr(ray, "init", never)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda a: a[:2] + ["/nonexistent/model"] + a[3:], "--model: directory not found"),
        (lambda a: a[:4] + ["alpha=/nonexistent/alpha"] + a[5:], "--adapters alpha: directory not found"),
        (lambda a: a[:4] + a[5:], "--router: its labels ['alpha', 'beta', 'gamma'] do not match"),
        (lambda a: a + ["--replicas", "0"], "--replicas must be >= 1"),
        (lambda a: a + ["--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
        (lambda a: a + ["--port", "70000"], "--port must be in 1..65535"),
        (lambda a: a + ["--top-p", "0"], "--top-p: top_p must be in (0, 1]"),
        pytest.param(lambda a: a + ["--device", "cuda"], "CUDA is not available here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")),
    ],
)
def test_bad_arguments_fail_in_one_line_before_ray_starts(art, capsys, monkeypatch, change, needle):
    _forbid_ray_start(monkeypatch)
    assert main(change(_args(art))) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("dlp-lora serve: error: ") and needle in captured.err, captured.err


@pytest.mark.parametrize(("extra", "env_key", "warned"), [
    (["--host", "0.0.0.0"], None, True),
    (["--host", "0.0.0.0", "--api-key", "k"], None, False),
    (["--host", "0.0.0.0"], "k", False),
    (["--host", "127.0.0.1"], None, False),
])
def test_a_non_loopback_host_without_a_key_is_warned_about(art, capsys, monkeypatch, extra, env_key, warned):
    _forbid_ray_start(monkeypatch)
    monkeypatch.delenv("DLP_LORA_API_KEY", raising=False)
    if env_key:
        monkeypatch.setenv("DLP_LORA_API_KEY", env_key)
    args = _args(art, *extra)
    assert main(args[:4] + args[5:]) == 2  # then fails on the router (before Ray starts)
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("dlp-lora serve: error: ")
    assert (len(err) == 2 and "warning" in err[0] and "DLP_LORA_API_KEY" in err[0]) == warned, err


@pytest.mark.parametrize(("extra", "batching"), [([], "continuous"), (["--batching", "static"], "static")])
def test_batching_reaches_the_app(art, capsys, monkeypatch, extra, batching):
    from dlp_lora.serving import app

    _forbid_ray_start(monkeypatch)
    seen = {}

    def build_app(**kwargs):
        seen.update(kwargs)
        raise ValueError("stopped here")  # the CLI reports a ValueError from build_app in one line

    monkeypatch.setattr(app, "build_app", build_app)
    assert main(_args(art, *extra)) == 2
    assert seen["batching"] == batching and "stopped here" in capsys.readouterr().err


KEY = "sk-cli-test"


def test_serve_on_its_own_cluster_answers_and_stops_on_sigterm(art, ray_serve):
    """RAY_ADDRESS names another cluster (the session's, running a bystander app): `dlp-lora serve` starts
    its own anyway, listens on --port, checks the key from DLP_LORA_API_KEY, answers to
    --served-model-name; SIGTERM stops it like Ctrl-C (exit 0, "stopping", none of its processes left)
    and the bystander app still answers."""
    import psutil
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Bystander:
        async def __call__(self, request):
            return "alive"

    serve.run(Bystander.bind(), name="bystander", route_prefix="/bystander")
    bystander = f"http://127.0.0.1:{ray_serve['port']}/bystander"
    port = sf.free_port()
    argv = [sys.executable, "-m", "dlp_lora.cli",
            *_args(art, "--port", str(port), "--replicas", "1", "--served-model-name", "served")]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", RAY_ADDRESS=ray_serve["address"], DLP_LORA_API_KEY=KEY)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        ready, deadline = None, time.monotonic() + 120
        while ready is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("dlp-lora serve: ready at "):
                ready = line
        assert ready is not None, "the server never said it was ready"
        assert f"http://127.0.0.1:{port}/v1" in ready
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "served", "prompt": "al1 al2", "max_tokens": 3, "temperature": 0}
        status, answer = sf.http_request(url, body, {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
        status, answer = sf.http_request(url, body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", answer
        processes = psutil.Process(proc.pid).children(recursive=True)
        assert processes, "no Ray processes were started"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("dlp-lora serve: stopping" in line for line in rest), rest[-20:]
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert sf.http_request(bystander) == (200, "alive")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        serve.delete("bystander")
