"""`python -m dlp_lora.demo` (what `make demo` runs): the paper's composite-K experiment on a laptop.

No download: it starts from the small char-level Llama shipped in dlp_lora/demo/base-model/ (pretrained on
string primitives, checked against its recorded sha256), trains one PEFT LoRA per synthetic task and
a router, then compares base / oracle LoRA / DLP-LoRA on a shuffled composite of all tasks. The first
run trains the adapters and the router (~2 min on one core); later runs reuse them from the cache
($DLP_LORA_DEMO_DIR, default .cache/dlp_demo) and only evaluate.

Its exact-match and router columns are the same on every run on one machine, cached or not: every
artifact is trained with one torch thread, deterministic algorithms and its own seed
(build.reproducible), so the same bytes come out, and decoding is greedy. Another CPU or torch build
may round differently, stop an adapter at another step and so differ by a prompt or two; `--threads`
above 1 may too, as it changes the evaluation's sums. Decode times are measured, so they vary.
`--rebuild-base` pretrains the shipped base again (~5 min) and checks its files' sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..options import DEFAULT_TOP_P


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlp_lora.demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--smoke", action="store_true", help="two tasks, a few adapter steps (tests)")
    parser.add_argument("--cache-dir", default=None,
                        help="artifact cache (default: $DLP_LORA_DEMO_DIR or .cache/dlp_demo)")
    parser.add_argument("--out", default=None, help="results folder (default: demo_out, or demo_out/smoke)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the adapters, the router and their data streams (the base is fixed)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help=f"DLP-LoRA's top-p threshold (default {DEFAULT_TOP_P})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the evaluation (default 1: a second one gains ~1.2x on an "
                             "idle 2-core machine and can cost 10-50x on a busy one); training always uses 1")
    parser.add_argument("--rebuild-base", nargs="?", const="", default=None, metavar="DIR",
                        help="pretrain the base model again into DIR (default: the shipped "
                             "dlp_lora/demo/base-model/) and compare its files' sha256 with the shipped "
                             "ones; with DIR, exit 1 if any differs")
    args = parser.parse_args(argv)

    import torch

    from .._atomic import check_output_dir, unwritable_reason
    from . import shipped

    # Outputs are checked before minutes of work: --rebuild-base replaces DIR, so only ever a demo base.
    try:
        if args.rebuild_base:
            check_output_dir(args.rebuild_base, kind="a demo base", overwrite=True,
                             holds_one=lambda d: (d / shipped.MANIFEST).is_file())
    except ValueError as e:
        print(f"{parser.prog}: error: --rebuild-base: {e}", file=sys.stderr)
        return 2
    reason = args.out and unwritable_reason(args.out, directory=True)
    if reason:
        print(f"{parser.prog}: error: --out: {reason}", file=sys.stderr)
        return 2

    # One thread by default: on a machine that is busy with anything else, OpenMP spin-waits made
    # steps 10-50x slower, for ~1.2x on an idle one.
    torch.set_num_threads(args.threads)
    prog = parser.prog
    start = time.perf_counter()
    try:
        if args.rebuild_base is not None:
            out = Path(args.rebuild_base).resolve() if args.rebuild_base else shipped.BASE_DIR
            differ = shipped.rebuild(out)
            print(f"rebuilt in {time.perf_counter() - start:.0f} s: "
                  + (f"{len(differ)} file(s) differ from the shipped base" if differ
                     else "every file is byte for byte the shipped one"))
            return 1 if differ and out != shipped.BASE_DIR else 0
        from .build import Recipe
        from .pipeline import run

        recipe = dataclasses.replace(Recipe.smoke() if args.smoke else Recipe(), seed=args.seed)
        out = args.out or ("demo_out/smoke" if args.smoke else "demo_out")
        run(recipe, cache=args.cache_dir, out=out, top_p=args.top_p)
    except shipped.BaseModelError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
