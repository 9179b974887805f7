"""`dlp-lora serve` as a user runs it: bad arguments fail in one line before Ray starts; a real server
prints its URL, answers, and stops cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

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
def test_bad_arguments_fail_in_one_line_before_ray_starts(art, capsys, change, needle):
    import ray

    assert main(change(_args(art))) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("dlp-lora serve: error: ") and needle in captured.err, captured.err
    assert not ray.is_initialized()


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(art):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "dlp_lora.cli", *_args(art, "--port", str(port), "--replicas", "1")]
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
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
        body = json.dumps({"model": "model", "prompt": "al1 al2", "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("dlp-lora serve: stopping" in line for line in rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
