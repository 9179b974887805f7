"""`dlp-lora serve` under load: serial, static batching and continuous batching, in one run.

    python benchmarks/bench_serve.py --out benchmarks/results/serve_cpu.json     # ~25 min on 2 cores
    make readme-tables                                                           # its table

The server is the real one (build_app on a local Ray cluster, HTTP on 127.0.0.1, 1 model replica),
on the end-to-end benchmark's model: the 168M-parameter Llama of dlp_lora.bench (hidden 1024,
8 layers, random weights, fp32) with N random PEFT adapters (r=8, all seven projections) and a
Router trained on synthetic tasks. The tokenizer is a word-level one over the model's 32000 ids,
so every prompt is exactly its words. Every request is greedy, streamed (for the time to its first
token), routed (no fixed mixture, sentence re-routing on) on a prompt that mixes two tasks of its
client's own, and asks for max_tokens drawn from {8, 32, 128} (the same draws in every mode).

Modes, each a reconfiguration of the same deployment (user_config, in place): ``serial`` (static
batching, max batch 1), ``static`` (today's static batching, max batch --max-batch-size) and
``continuous`` (continuous batching, max batch --max-batch-size). Loads: closed loop, 1/4/8/16
clients each sending its requests one after another; open loop, Poisson arrivals at each --rates
requests/s. Reported per setting: tokens/s (completion tokens / wall time), requests/s, time to
first token and latency p50/p95/p99, and the batch sizes the server reports (dlp_batch_size).
Goals on a 2-core CPU at 16 clients: continuous >= 3x serial tokens/s and >= 1.3x static's, with a
lower p99 time to first token than static, judged on the median over rounds: the sweep, then
--goal-rounds rounds of 16 clients with the three modes back to back (a drift in the machine's load
then moves all three). Not a test: numbers depend on the machine and its load,
which the file records.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

# Everything this script takes from the benchmark harness, in one place.
from dlp_lora._atomic import atomic_write_text
from dlp_lora.bench.harness import check_output
from dlp_lora.bench.provenance import load_average, machine_info, timestamp, versions
from dlp_lora.bench.workload import MODELS, build_base_model, ensure_peft_adapters

PUNCT = [".", "!", "?", ","]
SPECIAL = ["<pad>", "<unk>", "<eos>"]
WORDS_PER_TASK = 100


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer covering all of the model's ids: specials, punctuation, w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + PUNCT + [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(PUNCT))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", padding_side="left")


def task_words(task: int) -> list[str]:
    return [f"w{task * WORDS_PER_TASK + i}" for i in range(WORDS_PER_TASK)]


def task_text(rng: random.Random, tasks: list[int], shares: list[float], words: int) -> str:
    """`words` words drawn from the tasks' vocabularies by share, a full stop every ~8 words."""
    out = []
    for i in range(words):
        task = rng.choices(tasks, shares)[0]
        out.append(rng.choice(task_words(task)))
        if i % 8 == 7 and i + 1 < words:
            out.append(".")
    return " ".join(out)


def build_artifacts(args) -> dict:
    """The model, tokenizer, adapters and router as directories, written once into --cache-dir."""
    import torch

    from dlp_lora.router import Router

    shape = MODELS[args.model]
    root = args.cache_dir / f"serve-{args.model}-{args.dtype}-{args.adapters}"
    model_dir = root / "model"
    base = build_base_model(shape, device="cpu", dtype=getattr(torch, args.dtype), seed=args.seed)
    if not (model_dir / "config.json").is_file():
        base.save_pretrained(str(model_dir))
        word_tokenizer(shape.vocab_size).save_pretrained(str(model_dir))
    adapter_dirs = ensure_peft_adapters(base, shape, args.adapters, rank=8, alpha=16, seed=args.seed,
                                        cache_dir=args.cache_dir)
    adapters = {d.name: str(d) for d in adapter_dirs}
    router_dir = root / "router"
    if not (router_dir / "router_config.json").is_file():
        rng = random.Random(args.seed)
        names = list(adapters)
        texts, labels = [], []
        for t, name in enumerate(names):
            for _ in range(40):
                texts.append(task_text(rng, [t], [1.0], 16))
                labels.append(name)
        Router.fit(texts, labels, word_tokenizer(shape.vocab_size), epochs=4, verbose=False).save(router_dir)
    return {"model": str(model_dir), "adapters": adapters, "router": str(router_dir)}


def client_prompts(args) -> list[str]:
    """One prompt per client: 70% of its words from task c, 30% from task 7c+3 (mod N)."""
    rng = random.Random(args.seed + 1)
    n = args.adapters
    return [task_text(rng, [c % n, (7 * c + 3) % n], [0.7, 0.3], args.prompt_words)
            for c in range(max(args.clients))]


MAX_TOKENS_CHOICES = (8, 32, 128)
MODES = {"serial": ("static", 1), "static": ("static", None), "continuous": ("continuous", None)}


def post(base: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stream(base: str, body: dict, timeout: float) -> dict:
    """One streamed request: {"start", "first", "end" (perf_counter), "tokens", "batch_size"}."""
    url = urllib.parse.urlparse(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    start = time.perf_counter()
    first = None
    tokens = batch_size = None
    try:
        connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                           body=json.dumps({**body, "stream": True,
                                            "stream_options": {"include_usage": True}}))
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event.get("choices") and event["choices"][0]["text"]:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if "dlp_batch_size" in event:
                batch_size = event["dlp_batch_size"]
    finally:
        connection.close()
    end = time.perf_counter()
    return {"start": start, "first": first or end, "end": end, "tokens": tokens, "batch_size": batch_size}


def request_body(prompts: list[str], client: int, index: int, seed: int) -> dict:
    """The index-th request of a client: its prompt, and max_tokens drawn the same way in every mode."""
    max_tokens = random.Random(f"{seed}-{client}-{index}").choice(MAX_TOKENS_CHOICES)
    return {"model": "model", "prompt": prompts[client % len(prompts)], "max_tokens": max_tokens,
            "temperature": 0}


def run_closed_loop(base: str, prompts: list[str], clients: int, args) -> dict:
    """`clients` threads, each sending its requests one after another; returns the setting's row."""
    barrier = threading.Barrier(clients)

    def client(c: int, record):
        barrier.wait(timeout=600)
        for i in range(args.requests_per_client):
            body = request_body(prompts, c, i, args.seed)
            record(lambda body=body: stream(base, body, args.request_timeout))

    return {"load": "closed", "clients": clients, **_measure(clients, client)}


def run_poisson(base: str, prompts: list[str], rate: float, args) -> dict:
    """Requests arriving at exponential intervals (rate per second), each on its own."""
    rng = random.Random(f"{args.seed}-poisson-{rate}")
    arrivals, t = [], 0.0
    for _ in range(args.poisson_requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    origin = time.perf_counter() + 0.05

    def one(i: int, record):
        time.sleep(max(0.0, origin + arrivals[i] - time.perf_counter()))
        record(lambda: stream(base, request_body(prompts, i, 0, args.seed), args.request_timeout))

    return {"load": "poisson", "rate_per_s": rate, **_measure(len(arrivals), one)}


def _measure(workers: int, work) -> dict:
    samples, errors = [], []
    lock = threading.Lock()

    def record(send):
        try:
            sample = send()
        except Exception as e:  # noqa: BLE001 - counted and reported, never hidden
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
            return
        with lock:
            samples.append(sample)

    threads = [threading.Thread(target=work, args=(w, record)) for w in range(workers)]
    load = load_average()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(s["start"] for s in samples)
    wall = max(s["end"] for s in samples) - start
    tokens = sum(s["tokens"] or 0 for s in samples)
    return {
        "requests": len(samples),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(samples) / wall,
        "ttft_s": _summary(sorted(s["first"] - s["start"] for s in samples)),
        "latency_s": _summary(sorted(s["end"] - s["start"] for s in samples)),
        "batch_sizes": dict(sorted(Counter(s["batch_size"] for s in samples).items())),
        "load_average": {"start": load, "end": load_average()},
    }


def _summary(values: list[float]) -> dict:
    return {"p50": _quantile(values, 0.5), "p95": _quantile(values, 0.95), "p99": _quantile(values, 0.99),
            "mean": statistics.fmean(values)}


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (values sorted)."""
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def evaluate_goals(rows: list[dict]) -> list[dict]:
    """At the most clients: continuous >= 3x serial and >= 1.3x static tokens/s, lower p99 TTFT.

    Each round (the sweep is round 0) gives paired figures, the modes measured in that round; a goal
    is judged on their median over rounds, and the per-round figures are kept beside it.
    """
    closed = [r for r in rows if r["load"] == "closed"]
    if not closed:
        return []
    top = max(r["clients"] for r in closed)
    rounds: dict[int, dict[str, dict]] = {}
    for r in closed:
        if r["clients"] == top:
            rounds.setdefault(r.get("round", 0), {})[r["mode"]] = r
    goals = []
    for mode, factor in (("serial", 3.0), ("static", 1.3)):
        ratios = [at["continuous"]["tokens_per_s"] / at[mode]["tokens_per_s"]
                  for at in rounds.values() if "continuous" in at and mode in at]
        if ratios:
            ratio = statistics.median(ratios)
            goals.append({"goal": f"{top} clients: continuous >= {factor}x {mode} tokens/s",
                          "ratio": round(ratio, 2), "per_round": [round(x, 2) for x in ratios],
                          "met": ratio >= factor})
    pairs = [(at["static"]["ttft_s"]["p99"], at["continuous"]["ttft_s"]["p99"])
             for at in rounds.values() if "continuous" in at and "static" in at]
    if pairs:
        ttft = [statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)]
        goals.append({"goal": f"{top} clients: continuous p99 time to first token below static's",
                      "p99_ttft_s": [round(t, 2) for t in ttft],
                      "per_round": [[round(a, 2), round(b, 2)] for a, b in pairs],
                      "met": all(b < a for a, b in pairs)})
    return goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (tabled by benchmarks/make_readme_tables.py)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="cpu: the 168M Llama (CPU default); gpu: ~1.1B (CUDA default); tiny: smoke")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--adapters", type=int, default=26)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--max-batch-size", type=int, default=8, help="static and continuous (the default)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--serial-clients", type=int, nargs="+", default=[1, 16],
                        help="closed-loop client counts for serial (slow: it sees every request alone)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.5, 1.0],
                        help="Poisson arrival rates (requests/s) of the open-loop series")
    parser.add_argument("--poisson-requests", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica (CPU)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlp_lora_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal-rounds", type=int, default=2,
                        help="extra rounds of the goals' setting (the most clients), modes back to back")
    args = parser.parse_args(argv)
    args.model = args.model or ("gpu" if args.device == "cuda" else "cpu")
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.out:
        check_output(args.out, "--out")
    import ray
    from ray import serve

    from dlp_lora.serving.app import APP_NAME, build_app

    load_start = load_average()
    artifacts = build_artifacts(args)
    prompts = client_prompts(args)
    shape = MODELS[args.model]
    params = shape.vocab_size * shape.hidden_size * 2 + shape.num_hidden_layers * (
        4 * shape.hidden_size**2 + 3 * shape.hidden_size * shape.intermediate_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    rows = []
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        def deploy(mode: str) -> int:
            batching, batch = MODES[mode]
            batch = batch or args.max_batch_size
            app = build_app(model=artifacts["model"], adapters=artifacts["adapters"],
                            router=artifacts["router"], replicas=1, device=args.device, dtype=args.dtype,
                            max_batch_size=batch, batch_wait_ms=args.batch_wait_ms,
                            cpus_per_replica=args.threads, batching=batching)
            serve.run(app, name=APP_NAME, route_prefix="/")  # another mode: user_config, in place
            post(base, {"model": "model", "prompt": prompts[0], "max_tokens": 4, "temperature": 0},
                 timeout=args.request_timeout)  # warm-up
            return batch

        def measure(mode: str, batch: int, load: str, value, round_: int) -> None:
            if load == "closed":
                measured = run_closed_loop(base, prompts, value, args)
            else:
                measured = run_poisson(base, prompts, value, args)
            row = {"mode": mode, "max_batch_size": batch, "round": round_, **measured}
            rows.append(row)
            what = f"{value:2d} clients" if load == "closed" else f"Poisson {value}/s"
            print(f"{mode:10s} {what} (round {round_}): {row['tokens_per_s']:6.1f} tokens/s, "
                  f"TTFT p50/p99 {row['ttft_s']['p50']:.2f}/{row['ttft_s']['p99']:.2f} s, "
                  f"latency p50/p99 {row['latency_s']['p50']:.2f}/{row['latency_s']['p99']:.2f} s, "
                  f"sizes {row['batch_sizes']}, errors {len(row['errors'])}, "
                  f"load {row['load_average']['end']}", flush=True)

        for mode in args.modes:  # round 0: every setting, mode after mode
            batch = deploy(mode)
            settings = [("closed", c) for c in (args.serial_clients if mode == "serial" else args.clients)]
            settings += [("poisson", rate) for rate in args.rates]
            for load, value in settings:
                measure(mode, batch, load, value, 0)
        # Rounds 1..R: only the goals' setting (the most clients), the modes back to back in a rotated
        # order, so that each round's ratios compare modes measured minutes apart, not a sweep apart.
        top = max(args.clients)
        for round_ in range(1, args.goal_rounds + 1):
            order = args.modes[round_ % len(args.modes):] + args.modes[:round_ % len(args.modes)]
            for mode in order:
                measure(mode, deploy(mode), "closed", top, round_)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve",
        "created": timestamp(),
        "arguments": sys.argv[1:],
        "machine": machine_info(args.device),
        "versions": versions(),
        "config": {"model": args.model, "dtype": args.dtype, "model_parameters": params,
                   "adapters": args.adapters,
                   "max_tokens_choices": list(MAX_TOKENS_CHOICES), "prompt_words": args.prompt_words,
                   "requests_per_client": args.requests_per_client, "batch_wait_ms": args.batch_wait_ms,
                   "poisson_requests": args.poisson_requests, "max_batch_size": args.max_batch_size,
                   "threads": args.threads, "replicas": 1, "goal_rounds": args.goal_rounds,
                   "device": args.device, "ray": ray.__version__,
                   "routing": "router per request (top_p 0.6, reroute sentence), greedy"},
        "rows": rows,
        "goals": evaluate_goals(rows),
        "load_average": {"start": load_start, "end": load_average()},
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    for goal in result["goals"]:
        figures = goal.get("ratio", goal.get("p99_ttft_s"))
        print(f"{'MET ' if goal['met'] else 'MISS'}  {goal['goal']}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
