"""`dlp-lora serve` under load: serial (max batch 1) against batched (8, 16) at 1-16 concurrent clients.

    python benchmarks/bench_serve.py --out benchmarks/results/serve_cpu.json     # ~10 min on 2 cores
    python benchmarks/bench_serve.py --table benchmarks/results/serve_cpu.json   # only the table

The server is the real one (build_app on a local Ray cluster, HTTP on 127.0.0.1, 1 model replica),
on the end-to-end benchmark's model: the 168M-parameter Llama of dlp_lora.bench (hidden 1024,
8 layers, random weights, fp32) with N random PEFT adapters (r=8, all seven projections) and a
Router trained on synthetic tasks. The tokenizer is a word-level one over the model's 32000 ids,
so every prompt is exactly its words. Each client sends its requests one after another (closed
loop), greedy, max_tokens new tokens, routed (no fixed mixture) on a prompt that mixes two tasks
of its own, so every client gets its own routed mixture. For each max batch size the deployment is
reconfigured in place (user_config), then every client count runs once after one warm-up request.

Reported per setting: tokens/s (completion tokens / wall time), requests/s, latency p50/p95/p99,
and the generate() sizes the server reports (dlp_batch_size). Goal on a 2-core CPU: at 16
clients, batched gives >= 3x the tokens/s of serial and a lower p50 latency. Not a test: numbers
depend on the machine and its load, which the file records.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
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


def post(base: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run_clients(base: str, prompts: list[str], clients: int, per_client: int, args) -> dict:
    """`clients` threads, each sending per_client requests in turn; returns the setting's row."""
    samples, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int):
        body = {"model": "model", "prompt": prompts[c], "max_tokens": args.new_tokens, "temperature": 0}
        barrier.wait(timeout=600)
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                answer = post(base, body, timeout=args.request_timeout)
            except Exception as e:  # noqa: BLE001 - counted and reported, never hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                samples.append((t0, time.perf_counter(), answer["usage"]["completion_tokens"],
                                answer["dlp_batch_size"]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    load = load_average()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(s[0] for s in samples)
    wall = max(s[1] for s in samples) - start
    latencies = sorted(s[1] - s[0] for s in samples)
    tokens = sum(s[2] for s in samples)
    return {
        "clients": clients,
        "requests": len(samples),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(samples) / wall,
        "latency_s": {"p50": _quantile(latencies, 0.5), "p95": _quantile(latencies, 0.95),
                      "p99": _quantile(latencies, 0.99), "mean": statistics.fmean(latencies)},
        "batch_sizes": dict(sorted(Counter(s[3] for s in samples).items())),
        "load_average": {"start": load, "end": load_average()},
    }


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (values sorted)."""
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def evaluate_goals(rows: list[dict]) -> list[dict]:
    goals = []
    top = max(r["clients"] for r in rows)
    serial = next((r for r in rows if r["max_batch_size"] == 1 and r["clients"] == top), None)
    for r in rows:
        if serial is None or r["max_batch_size"] == 1 or r["clients"] != top:
            continue
        speedup = r["tokens_per_s"] / serial["tokens_per_s"]
        goal = f"{top} clients, max batch {r['max_batch_size']}: >= 3x serial tokens/s, lower p50"
        goals.append({"goal": goal,
                      "tokens_per_s_ratio": round(speedup, 2),
                      "p50_s": [round(serial["latency_s"]["p50"], 2), round(r["latency_s"]["p50"], 2)],
                      "met": speedup >= 3 and r["latency_s"]["p50"] < serial["latency_s"]["p50"]})
    return goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (tabled by benchmarks/make_readme_tables.py)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="cpu: the 168M Llama (CPU default); gpu: ~1.1B (CUDA default); tiny: smoke")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--adapters", type=int, default=26)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica (CPU)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlp_lora_bench")
    parser.add_argument("--seed", type=int, default=0)
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
        for batch in args.batch_sizes:
            app = build_app(model=artifacts["model"], adapters=artifacts["adapters"],
                            router=artifacts["router"], replicas=1, device=args.device, dtype=args.dtype,
                            max_batch_size=batch, batch_wait_ms=args.batch_wait_ms,
                            cpus_per_replica=args.threads)
            serve.run(app, name=APP_NAME, route_prefix="/")  # a new batch size: user_config, in place
            post(base, {"model": "model", "prompt": prompts[0], "max_tokens": 4, "temperature": 0},
                 timeout=args.request_timeout)  # warm-up
            for clients in args.clients:
                measured = run_clients(base, prompts, clients, args.requests_per_client, args)
                row = {"max_batch_size": batch, **measured}
                rows.append(row)
                print(f"max batch {batch:2d}, {clients:2d} clients: {row['tokens_per_s']:6.1f} tokens/s, "
                      f"p50 {row['latency_s']['p50']:.2f} s, sizes {row['batch_sizes']}, "
                      f"load {row['load_average']['end']}", flush=True)
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
                   "new_tokens": args.new_tokens, "prompt_words": args.prompt_words,
                   "requests_per_client": args.requests_per_client, "batch_wait_ms": args.batch_wait_ms,
                   "threads": args.threads, "replicas": 1, "device": args.device, "ray": ray.__version__,
                   "routing": "router per request (top_p 0.6, reroute sentence), greedy"},
        "rows": rows,
        "goals": evaluate_goals(rows),
        "load_average": {"start": load_start, "end": load_average()},
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    for goal in result["goals"]:
        print(f"{'MET ' if goal['met'] else 'MISS'}  {goal['goal']}: {goal['tokens_per_s_ratio']}x, "
              f"p50 {goal['p50_s'][0]} s -> {goal['p50_s'][1]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
