"""`python -m dlp_lora.demo` (what `make demo` runs): the paper's composite-K experiment on a laptop.

No download: it builds a char-level tokenizer and a small Llama, pretrains it on string primitives,
trains one PEFT LoRA per synthetic task and a router, then compares base / oracle LoRA / DLP-LoRA on
a shuffled composite of all tasks. The first run builds everything (minutes, with progress bars);
later runs reuse the cache ($DLP_LORA_DEMO_DIR, default .cache/dlp_demo) and only evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def default_threads() -> int:
    """min(2, CPUs), but 1 when the load average already fills every CPU: the tiny matrices here gain
    little from a second thread, and OpenMP threads that spin on a busy machine can make a training
    step several times slower than one thread."""
    cpus = os.cpu_count() or 1
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cpus
    return 1 if busy else min(2, cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlp_lora.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--smoke", action="store_true", help="two tasks, a tiny model, a few steps (tests)")
    parser.add_argument("--cache-dir", default=None,
                        help="artifact cache (default: $DLP_LORA_DEMO_DIR or .cache/dlp_demo)")
    parser.add_argument("--out", default=None, help="results folder (default: demo_out, or demo_out/smoke)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every initialisation and data stream")
    parser.add_argument("--top-p", type=float, default=0.6, help="DLP-LoRA's top-p threshold (default 0.6)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: min(2, CPUs); 1 when the machine is already busy)")
    args = parser.parse_args(argv)

    import torch

    from .build import Recipe
    from .pipeline import run

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    print(f"torch CPU threads: {threads}")
    recipe = dataclasses.replace(Recipe.smoke() if args.smoke else Recipe(), seed=args.seed)
    out = args.out or ("demo_out/smoke" if args.smoke else "demo_out")
    start = time.perf_counter()
    run(recipe, cache=args.cache_dir, out=out, top_p=args.top_p)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
