"""Our ContinuousScheduler against transformers' ContinuousBatchingManager (generate_batch), in-process.

    nice python benchmarks/compare_cb_manager.py --out benchmarks/results/cb_manager_cpu.json

The same requests on the same model (the end-to-end benchmark's 168M Llama, random weights, fp32):
--requests prompts of --prompt-words tokens, greedy, --new-tokens each (generate_batch takes one
max_new_tokens for all). Ours runs on the patched model with the empty mixture (the base model:
the manager cannot give requests their own mixtures), max batch --max-batch-size; the manager with
its default attention (sdpa), its cache sized by --num-blocks / --max-batch-tokens (its default
sizing takes most of the RAM on CPU) and prefix block sharing off (it matches blocks on tokens
only, which would mix requests with different mixtures). Reported: wall time and tokens/s of each,
median of --rounds alternating rounds, and whether their greedy texts agree.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dlp_lora._atomic import atomic_write_text
from dlp_lora.bench.provenance import load_average, machine_info, timestamp, versions
from dlp_lora.bench.workload import MODELS, build_base_model, ensure_peft_adapters, shared_copy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default="cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from dlp_lora import LoRABank, patch_model
    from dlp_lora.serving.engine import CompletionEngine, GenerationRow
    from dlp_lora.serving.scheduler import ContinuousScheduler

    shape = MODELS[args.model]
    load_start = load_average()
    model = build_base_model(shape, device="cpu", dtype=torch.float32, seed=0).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, shape.vocab_size) for _ in range(args.prompt_words)]
               for _ in range(args.requests)]

    class Tok:  # the engine's tokenizer needs only these for greedy rows without stop strings
        pad_token_id = eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    patched = shared_copy(model)  # the same weights in a tree of its own
    adapter_dirs = ensure_peft_adapters(model, shape, 1, rank=8, alpha=16, seed=0,
                                        cache_dir=Path(tempfile.gettempdir()) / "dlp_lora_bench")
    bank = LoRABank.from_peft({d.name: str(d) for d in adapter_dirs}, dtype=torch.float32, device="cpu")
    patch_model(patched, bank)
    engine = CompletionEngine(patched, Tok())
    engine.eos_ids = frozenset()
    scheduler = ContinuousScheduler(engine, max_batch_size=args.max_batch_size)

    def ours():
        futures = [scheduler.submit(GenerationRow(p, max_tokens=args.new_tokens, mixture={}))
                   for p in prompts]
        return [f.result().token_ids for f in futures]

    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens,
                                  allow_block_sharing=False)

    def theirs():
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                   warmup=False)
        return [list(o.generated_tokens) for o in out.values()]

    times = {"ours": [], "manager": []}
    texts = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in (("ours", ours), ("manager", theirs)):
                t0 = time.perf_counter()
                texts[name] = fn()
                times[name].append(time.perf_counter() - t0)
    scheduler.close()
    tokens = args.requests * args.new_tokens
    result = {
        "benchmark": "cb_manager", "created": timestamp(), "arguments": sys.argv[1:],
        "machine": machine_info("cpu"), "versions": versions(), "config": vars(args) | {"out": str(args.out)},
        "wall_s": times, "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
        "same_greedy_tokens": sorted(texts["ours"]) == sorted(texts["manager"]),
        "load_average": {"start": load_start, "end": load_average()},
    }
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "same_greedy_tokens", "load_average")}))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
