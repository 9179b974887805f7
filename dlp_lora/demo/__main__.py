"""`python -m dlp_lora.demo` (what `make demo` runs): the paper's composite-K experiment on a laptop.

No download: it builds a char-level tokenizer and a small Llama, pretrains it on string primitives,
trains one PEFT LoRA per synthetic task and a router, then compares base / oracle LoRA / DLP-LoRA on
a shuffled composite of all tasks. The first run builds everything (minutes, with progress bars);
later runs reuse the cache ($DLP_LORA_DEMO_DIR, default .cache/dlp_demo) and only evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlp_lora.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--smoke", action="store_true", help="two tasks, a tiny model, a few steps (tests)")
    parser.add_argument("--cache-dir", default=None,
                        help="artifact cache (default: $DLP_LORA_DEMO_DIR or .cache/dlp_demo)")
    parser.add_argument("--out", default=None, help="results folder (default: demo_out, or demo_out/smoke)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every initialisation and data stream")
    parser.add_argument("--top-p", type=float, default=0.6, help="DLP-LoRA's top-p threshold (default 0.6)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a second one gains ~1.2x on an idle 2-core "
                             "machine and can cost 10-50x on a busy one)")
    args = parser.parse_args(argv)

    import torch

    from .build import Recipe
    from .pipeline import run

    # One thread by default. On 2 cores a second thread made these tiny matrices only ~1.2x faster
    # (pretraining: 0.094 vs 0.116 s/step), but on a machine that is busy with anything else its OpenMP
    # spin-waits made training steps 10-50x slower; one thread also makes the artifacts reproducible.
    torch.set_num_threads(args.threads)

    recipe = dataclasses.replace(Recipe.smoke() if args.smoke else Recipe(), seed=args.seed)
    out = args.out or ("demo_out/smoke" if args.smoke else "demo_out")
    start = time.perf_counter()
    run(recipe, cache=args.cache_dir, out=out, top_p=args.top_p)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
