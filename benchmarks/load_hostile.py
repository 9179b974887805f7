"""`dlp-lora serve` under mixed good and hostile traffic: do good clients still get their answers, and how
much later?

    python benchmarks/load_hostile.py --out benchmarks/results/serve_hostile_cpu.json   # ~2 min, 2 cores

The real server (build_app on a private local Ray cluster, HTTP on 127.0.0.1 only, 1 model replica,
an API key) on bench_serve.py's artifacts (default: the harness's tiny Llama with 4 adapters and a
router: the server's own work, not the model's, is what is measured). Two phases of the same good
traffic, `--good-clients` threads each sending `--requests-per-client` requests in turn (greedy,
routed, every other one streamed):

1. good traffic alone (the baseline);
2. the same with `--hostile-clients` threads sending hostile requests in turn until the good clients
   are done (each kind below, bounded in count and time).

Hostile kinds and the answer expected: a Content-Length of 64 MiB with no body (413 at once), a
chunked body past the limit (413), JSON nested 1,000 deep, a 5,000-digit integer, a lone surrogate,
a seed beyond int64, a mixture weight of 1e300, 65 prompts (400), no API key (401), a 1 MB prompt
(400 context_length_exceeded, after tokenising off the event loop), a stream of 32 prompts x the
context abandoned after its first event, and a slow client that sends its headers and stalls.

Recorded: good requests' latency p50/p99 per phase and how many were lost (not a 200 with its
choices, or a stream without `data: [DONE]`), every hostile kind's answers by status, the server's
/health counts, the machine, the versions and the load average. Not a test: numbers depend on the
machine and its load, which the file records.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

# bench_serve.py (this folder) builds the artifacts and the client prompts; the harness the provenance.
from bench_serve import _quantile, build_artifacts, client_prompts

from dlp_lora._atomic import atomic_write_text
from dlp_lora.bench.harness import check_output
from dlp_lora.bench.provenance import load_average, machine_info, timestamp, versions

KEY = "sk-load-test"


def http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
         timeout: float = 120.0, stream_first_event_only: bool = False) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own socket: (status, body); status 0 when the socket failed."""
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close",
            "Content-Length": str(len(body)), **(headers or {})}
    head = {k: v for k, v in head.items() if v is not None}
    data = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            received = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if stream_first_event_only and b"data: " in received:
                    break  # the client leaves: the socket closes here
    except OSError:
        return 0, b""
    status_line, _, rest = received.partition(b"\r\n")
    parts = status_line.split(b" ")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), rest


def good_request(port: int, prompt: str, stream: bool, new_tokens: int, timeout: float) -> tuple[bool, float]:
    """(answered in full, seconds) of one good request."""
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                       "stream": stream}).encode()
    start = time.perf_counter()
    status, rest = http(port, "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"},
                        timeout=timeout)
    seconds = time.perf_counter() - start
    if status != 200:
        return False, seconds
    if stream:
        return b"data: [DONE]" in rest and b'"error"' not in rest, seconds
    return b'"choices"' in rest and b'"text_completion"' in rest, seconds


def hostile_kinds(port: int, prompt: str) -> dict:
    """{kind: (callable returning a status, the status expected)}."""
    auth = {"Authorization": f"Bearer {KEY}"}
    valid = {"model": "model", "prompt": prompt, "max_tokens": 4}

    def post(body: bytes | str, headers=None, **kwargs):
        body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        return http(port, "POST", "/v1/completions", body, {**auth, **(headers or {})}, **kwargs)[0]

    def huge_content_length():
        return http(port, "POST", "/v1/completions", b"", {**auth, "Content-Length": str(64 << 20)})[0]

    def chunked_over_limit():
        chunk = b"x" * 65536
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
        return http(port, "POST", "/v1/completions", body,
                    {**auth, "Content-Length": None, "Transfer-Encoding": "chunked"})[0]

    def abandoned_stream():
        body = json.dumps({"model": "model", "prompt": [prompt] * 32, "max_tokens": 256, "temperature": 0,
                           "stream": True}).encode()
        return post(body, stream_first_event_only=True)

    def slow_client():  # headers and half a body, then nothing for 3 s, then gone
        body = json.dumps(valid).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(3)
        return -1  # no answer expected

    deep = "[" * 1000 + "]" * 1000
    return {
        "content_length_64MiB": (huge_content_length, 413),
        "chunked_over_limit": (chunked_over_limit, 413),
        "nested_1000": (lambda: post(f'{{"model": "model", "prompt": "a", "user": {deep}}}'), 400),
        "int_5000_digits": (lambda: post(f'{{"model": "model", "prompt": "a", "seed": {"9" * 5000}}}'), 400),
        "lone_surrogate": (lambda: post('{"model": "model", "prompt": "a \\ud800", "max_tokens": 2}'), 400),
        "seed_beyond_int64": (lambda: post(json.dumps({**valid, "seed": 2**64, "temperature": 1})), 400),
        "mixture_1e300": (lambda: post(json.dumps({**valid, "mixture": {"a": 1e300}})), 400),
        "prompts_65": (lambda: post(json.dumps({**valid, "prompt": [prompt] * 65})), 400),
        "no_api_key": (lambda: http(port, "POST", "/v1/completions", json.dumps(valid).encode())[0], 401),
        "prompt_1MB": (lambda: post(json.dumps({**valid, "prompt": "w1 " * 330_000})), 400),
        "abandoned_stream": (abandoned_stream, 200),
        "slow_client": (slow_client, -1),
    }


def run_phase(port: int, prompts: list[str], args, hostile: bool) -> dict:
    latencies: list[float] = []
    lost: list[str] = []
    outcomes: dict[str, Counter] = defaultdict(Counter)
    lock = threading.Lock()
    good_done = threading.Event()
    deadline = time.monotonic() + args.phase_timeout

    def good_client(c: int):
        for j in range(args.requests_per_client):
            if time.monotonic() > deadline:
                with lock:
                    lost.append("not sent: the phase ran out of time")
                continue
            ok, seconds = good_request(port, prompts[c], stream=bool(j % 2), new_tokens=args.new_tokens,
                                       timeout=args.request_timeout)
            with lock:
                latencies.append(seconds)
                if not ok:
                    lost.append(f"client {c} request {j}")

    def hostile_client(h: int):
        kinds = list(hostile_kinds(port, prompts[0]).items())
        i = h
        while not good_done.is_set() and time.monotonic() < deadline and i < h + args.hostile_per_client:
            name, (send, _) = kinds[i % len(kinds)]
            try:
                status = send()
            except OSError as e:
                status = f"socket error {type(e).__name__}"
            with lock:
                outcomes[name][str(status)] += 1
            i += 1

    good = [threading.Thread(target=good_client, args=(c,)) for c in range(args.good_clients)]
    bad = [threading.Thread(target=hostile_client, args=(h,)) for h in range(args.hostile_clients if hostile
                                                                                 else 0)]
    load = load_average()
    start = time.perf_counter()
    for t in bad + good:
        t.start()
    for t in good:
        t.join()
    good_done.set()
    wall = time.perf_counter() - start
    for t in bad:
        t.join()
    latencies.sort()
    expected = {name: str(status) for name, (_, status) in hostile_kinds(port, prompts[0]).items()}
    return {
        "hostile": hostile,
        "good_requests": args.good_clients * args.requests_per_client,
        "good_lost": len(lost),
        "lost": lost[:20],
        "good_latency_s": {"p50": _quantile(latencies, 0.5), "p99": _quantile(latencies, 0.99),
                           "max": latencies[-1]} if latencies else None,
        "wall_s": wall,
        "hostile_answers": {name: dict(counts) for name, counts in sorted(outcomes.items())},
        "hostile_unexpected": {name: {s: n for s, n in counts.items() if s != expected[name]}
                               for name, counts in sorted(outcomes.items())
                               if any(s != expected[name] for s in counts)},
        "load_average": {"start": load, "end": load_average()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="result JSON")
    parser.add_argument("--model", default="tiny", choices=("tiny", "cpu"), help="bench_serve's model")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--good-clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=40)
    parser.add_argument("--hostile-clients", type=int, default=8)
    parser.add_argument("--hostile-per-client", type=int, default=60,
                        help="hostile requests per thread, at most")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="a phase sends nothing after this")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlp_lora_bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.dtype, args.clients = "float32", [args.good_clients]
    if args.out:
        check_output(args.out, "--out")
    import ray
    from ray import serve

    from dlp_lora.serving.app import APP_NAME, build_app

    load_start = load_average()
    artifacts = build_artifacts(args)
    prompts = client_prompts(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(model=artifacts["model"], adapters=artifacts["adapters"], router=artifacts["router"],
                        replicas=1, max_batch_size=8, batch_wait_ms=10, api_key=KEY, model_name="model")
        serve.run(app, name=APP_NAME, route_prefix="/")
        good_request(port, prompts[0], False, 4, args.request_timeout)  # warm-up
        phases = []
        for hostile in (False, True):
            phase = run_phase(port, prompts, args, hostile)
            phases.append(phase)
            print(f"{'mixed' if hostile else 'good only'}: p50 {phase['good_latency_s']['p50']:.3f} s, "
                  f"p99 {phase['good_latency_s']['p99']:.3f} s, {phase['good_lost']} of "
                  f"{phase['good_requests']} good requests lost, unexpected {phase['hostile_unexpected']}, "
                  f"load {phase['load_average']['end']}", flush=True)
        health = json.loads(http(port, "GET", "/health")[1].partition(b"\r\n\r\n")[2] or b"{}")
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_hostile",
        "created": timestamp(),
        "arguments": sys.argv[1:],
        "machine": machine_info("cpu"),
        "versions": versions(),
        "config": {"model": args.model, "adapters": args.adapters, "good_clients": args.good_clients,
                   "requests_per_client": args.requests_per_client, "hostile_clients": args.hostile_clients,
                   "hostile_per_client": args.hostile_per_client, "new_tokens": args.new_tokens,
                   "replicas": 1, "max_batch_size": 8, "ray": ray.__version__,
                   "good_traffic": "greedy, routed, every other request streamed, each client in turn"},
        "phases": phases,
        "health_after": health,
        "load_average": {"start": load_start, "end": load_average()},
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
