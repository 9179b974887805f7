"""Host overhead of the op's public door and of a patched model's decode step (CPU, one thread).

    python benchmarks/bench_call_overhead.py --out benchmarks/results/call_overhead_cpu.json

Two numbers that the routing and dispatch code, not the kernels, decide:
* one eager ``dlp_lora.ops.multi_lora`` call at a decode shape (one row, d=1024, r=8, N=26 adapters,
  K=3 per row), validated (the documented call), unvalidated (what a patched Linear runs) and the
  backend's raw kernel, against a per-adapter loop of plain torch ops computing the same delta
  (``--op-only``: just these); the ratio loop / validated op is taken per round, in one run;
* one decode step of a Llama (``--model cpu``: the end-to-end benchmark's, hidden 1024, 8 layers;
  ``narrow``: hidden 128, 8 layers, mostly host work) in fp32, patched with 26 synthetic adapters
  on all seven projections, as a ratio to the same step of the base model, measured in interleaved
  rounds so that load drift cancels.
Run it from two checkouts to compare them: the JSON records the commit it ran on.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dlp_lora import LoRABank, ops, patch_model, use_mixture
from dlp_lora.bench.provenance import load_average, machine_info, versions

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (hidden, intermediate, layers, heads): the end-to-end benchmark's CPU Llama, and a narrow one whose
# decode step is mostly host work, so that routing overhead shows in its ratio.
SHAPES = {"cpu": (1024, 2816, 8, 16), "narrow": (128, 352, 8, 4)}


def op_inputs():
    """One decode row, d=1024, r=8, N=26 adapters, K=3 per row (fp32, CPU)."""
    g = torch.Generator().manual_seed(0)
    n, r, d = 26, 8, 1024
    x = torch.randn(1, d, generator=g)
    a, b = torch.randn(n, r, d, generator=g), torch.randn(n, d, r, generator=g)
    seg, ids = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([[3, 7, 11]], dtype=torch.int32)
    w, y = torch.tensor([[0.5, 0.3, 0.2]]), torch.zeros(1, d)
    return y, x, a, b, seg, ids, w


def torch_loop(y, x, a, b, seg, ids, w):
    """The same delta as a per-adapter loop of plain torch ops: y += w_k (x A_k^T) B_k^T, k = 1..K.

    It reads the adapter ids and weights of its one segment on the host, as a loop must."""
    for i, weight in zip(ids[0].tolist(), w[0].tolist(), strict=True):
        y.addmm_(x @ a[i].T, b[i].T, alpha=weight)


def call_variants() -> dict:
    """name -> a call of one decode row's delta; every one adds the same delta to y."""
    args = op_inputs()
    backend = ops.resolve_backend(args[1].device)
    raw = ops.get_kernel(backend)
    return {
        "torch_loop": lambda: torch_loop(*args),
        "op_validated": lambda: ops.multi_lora(*args),
        "op_unvalidated": lambda: ops.multi_lora(*args, backend=backend, validate=False),
        # the door's work when the checks run in Python (ops/validate.py), as for reference and triton
        "python_checks_then_kernel": lambda: (ops.check_multi_lora_args(*args), raw(*args)),
        "raw_kernel": lambda: raw(*args),
    }


def op_call_us(calls: int = 2000, rounds: int = 15) -> dict:
    """Per-call time of each variant in interleaved rounds (the order alternates), and per round the
    ratio torch_loop / op_validated, so that load drift cancels in the ratio."""
    variants = call_variants()
    for call in variants.values():  # warm-up; grad mode stays on, as in a plain call
        for _ in range(200):
            call()
    per_round = {name: [] for name in variants}
    ratios = []
    for i in range(rounds):
        order = list(variants.items())[:: 1 if i % 2 == 0 else -1]
        for name, call in order:
            start = time.perf_counter()
            for _ in range(calls):
                call()
            per_round[name].append((time.perf_counter() - start) / calls * 1e6)
        ratios.append(per_round["torch_loop"][-1] / per_round["op_validated"][-1])
    out = {name: _spread(times, "us") for name, times in per_round.items()}
    out["ratio_torch_loop_to_op_validated"] = _spread(ratios, "")
    out.update(shape={"rows": 1, "d_in": 1024, "d_out": 1024, "r": 8, "N": 26, "K": 3, "dtype": "float32"},
               calls_per_round=calls, rounds=rounds)
    return out


def _spread(values: list[float], unit: str) -> dict:
    q = statistics.quantiles(values, n=4)
    suffix = f"_{unit}" if unit else ""
    return {f"median{suffix}": statistics.median(values), f"min{suffix}": min(values),
            f"max{suffix}": max(values), f"q1{suffix}": q[0], f"q3{suffix}": q[2]}


def build_models(shape: str, num_adapters: int = 26, rank: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, inter, layers, heads = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    adapters = {}
    for i in range(num_adapters):
        modules = {}
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                modules[name] = (torch.randn(rank, module.in_features, generator=g) * 0.02,
                                 torch.randn(module.out_features, rank, generator=g) * 0.02, 2.0)
        adapters[f"task{i}"] = modules
    patched = patch_model(copy.deepcopy(base), LoRABank.from_adapters(adapters))
    return base, patched


def decode_step_ms(model, mixture, prompt: torch.Tensor, steps: int) -> float:
    """Mean decode step: (generate steps+1 tokens - generate 1 token) / steps."""
    def run(new_tokens):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - start

    with torch.no_grad(), (use_mixture(model, mixture) if mixture is not None else _nothing()):
        return (run(steps + 1) - run(1)) / steps * 1e3


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--op-rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--model", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--op-only", action="store_true", help="only the op call, no decode step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"what": "one eager call of the public op at a decode shape (validated: the default; "
                      "unvalidated: what a patched Linear runs; raw_kernel: the backend's kernel alone; "
                      "python_checks_then_kernel: ops/validate.py's checks, then the kernel) against a "
                      "per-adapter loop of torch ops computing the same delta; interleaved rounds, the ratio "
                      "torch_loop / op_validated taken per round",
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "machine": machine_info(), "versions": versions(), "threads": 1, "load_start": load_average()}
    result["op_call"] = op_call_us(rounds=args.op_rounds)
    if not args.op_only:
        result["decode_step"] = decode_step(args)
    result["load_end"] = load_average()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def decode_step(args) -> dict:
    base, patched = build_models(args.model)
    prompt = torch.randint(3, 32000, (1, 32), generator=torch.Generator().manual_seed(2))
    mixture = {"task3": 0.5, "task7": 0.3, "task11": 0.2}
    for model, mix in ((base, None), (patched, mixture)):  # warm-up
        decode_step_ms(model, mix, prompt, 2)
    ratios, base_ms, patched_ms = [], [], []
    for i in range(args.rounds):
        order = [(base, None), (patched, mixture)][:: 1 if i % 2 == 0 else -1]
        times = {id(m): decode_step_ms(m, mix, prompt, args.steps) for m, mix in order}
        base_ms.append(times[id(base)])
        patched_ms.append(times[id(patched)])
        ratios.append(times[id(patched)] / times[id(base)])
    return {
        "base_ms_median": statistics.median(base_ms), "patched_ms_median": statistics.median(patched_ms),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "model": args.model, "shape": SHAPES[args.model], "rounds": args.rounds, "steps": args.steps,
        "adapters": 26, "rank": 8, "mixture_k": 3,
    }


if __name__ == "__main__":
    raise SystemExit(main())
