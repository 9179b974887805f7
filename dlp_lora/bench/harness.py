"""End-to-end decode benchmark: DLP-LoRA against the base model, PEFT, MeteoRA-style gating and LoRA-Flow.

    dlp-lora bench --out benchmarks/results/e2e_cpu.json            # short preset (~3 min, 2 idle cores)
    dlp-lora bench --full --out benchmarks/results/e2e_cpu.json     # the complete configuration
    python -m dlp_lora.bench --help

The short preset keeps the model, prompt and batch sizes but runs only N=26, MeteoRA's strongest
form (op), 16 new tokens and 2 rounds, without the scaling sweep or LoRA-Flow. ``--full``: N in
{1, 26, 100}, all three MeteoRA forms, LoRA-Flow (both forms, K = 3 and K = N), 64 new tokens,
9 rounds, plus the sweep (~60 min at 1 thread without LoRA-Flow, whose K = N loop form alone is the
slowest variant; with 5 rounds, one or two disturbed rounds moved a median by 30% on a shared 2-core
machine).
On a machine shared with other work, use ``--threads 1``: two OpenMP threads whose barriers wait
on descheduled threads made decode ~15x slower here, and the ratios meaningless.

What one run does (every number it reports comes from this run):

* builds a Llama model from a config (no download): on CPU hidden 1024, 8 layers, intermediate
  2816, fp32; on CUDA a ~1.1B TinyLlama-shaped model in bf16;
* writes N random, non-zero PEFT adapters (r=8, all seven projections) with ``get_peft_model`` +
  ``save_pretrained`` into a cache directory (reused by later runs);
* builds the variants on one set of shared base weights: ``base``; PEFT ``peft_single`` (one
  adapter, unmerged), ``peft_merged`` (merge_and_unload), ``peft_mixed`` (``adapter_names=``, one
  adapter per sequence, batch > 1 only); for every N, DLP-LoRA as ``dlp_N`` (patch_model, every
  sequence its own mixture of K=3 adapters through use_mixture) and ``dlp_router_N`` (patch_model
  with a Router, top_p=0.6, max_loras=3), and ``meteora_{loop,bmm,op}_N`` (dlp_lora.bench.baselines,
  top-2 token gating); on a GPU with both kernels, ``dlp_cuda_N`` too (``dlp_N`` with the compiled
  CUDA kernel instead of the automatic Triton one); with ``--loraflow`` (or ``--full``),
  ``loraflow_{loop,op}_k{K}_N`` (dlp_lora.bench.loraflow: a gate per decoder layer, token-level
  weights over adapters 0..K-1, K = 3 and K = N);
* greedy ``generate()`` of ``new_tokens`` tokens after a ``prompt_len``-token random prompt, every
  sequence of a batch its own prompt (so its own mixture); one warm-up per variant, then
  ``reps`` rounds that visit every variant once (round-robin, the order rotated each round);
* times every generation step with a LogitsProcessor clock: decode time per token = the median
  interval between steps (the mean is reported too), so prefill is reported apart;
* reports medians and interquartile ranges, and ratios to ``base`` and to ``peft_single`` as the
  median over rounds of the paired ratio (same round, so load drift cancels); the project's
  decode-time goals (dlp_lora.bench.report.GOALS) are checked on those ratios (the MeteoRA one
  on the ratio of median decode times);
* with ``--compile``: every variant generates with a static KV cache and transformers' automatic
  torch.compile of the decode steps (inductor; mode="reduce-overhead", i.e. CUDA graphs on a GPU);
  the warm-up compiles, and the prefill runs eager as transformers does;
* optional scaling sweep (``--full`` or ``--scaling``): N in {1,10,26,50,100} x K in {1..4}
  adapters per sequence through ``use_mixture`` at batch 1, plus MeteoRA (op form) per N,
  plotted as time ratio to base against N (PNG).

Routing, honestly: ``dlp_N`` fixes the mixtures (sequence i: adapters 3i..3i+2, weights 4/7, 2/7,
1/7), so the 8 sequences of a batch have 8 different mixtures; the router is
bypassed. ``dlp_router_N`` runs the real path with a Router of random (untrained) weights: its
nearly uniform softmax makes top_p=0.6 keep max_loras=3 adapters, but different prompts often
share one set. The JSON records the mixtures each sequence used. The MeteoRA and LoRA-Flow gates are
random (their speed does not depend on what a gate learned).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .._atomic import check_output_file
from .provenance import load_average, machine_info, timestamp, versions
from .report import evaluate_goals, plot_scaling, print_summary, save_result, summarize
from .timing import generate_options, run_interleaved, time_generate
from .variants import Variant, loraflow_ks, main_variants, meteora_variant, mixture_variant, used_mixtures
from .workload import (
    FORMS,
    FULL,
    GPU_MODEL,
    MODELS,
    SHORT,
    TARGET_MODULES,
    BenchSettings,
    build_base_model,
    ensure_peft_adapters,
    load_banks,
    random_prompts,
)

# ----------------------------------------------------------------------------- model & adapters


# ----------------------------------------------------------------------------- variants

# ----------------------------------------------------------------------------- timing

# ----------------------------------------------------------------------------- the runs



def run_e2e(base, banks: dict, adapter_dirs, settings: BenchSettings, progress,
            on_batch_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The main table: every variant, every batch size, ratios to base, peft_single and dlp_N<n>.

    ``on_batch_done(rows so far)`` runs after each batch size (run() saves a partial result there).
    """
    variants = main_variants(base, banks, adapter_dirs, settings, settings.meteora_forms)
    if settings.variants:
        variants = [v for v in variants if v.name == "base"
                    or any(fnmatch.fnmatchcase(v.name, pattern) for pattern in settings.variants)]
    options = generate_options(settings)
    rows = []
    for batch in settings.batch_sizes:
        active = [v for v in variants if v.batch_sizes is None or batch in v.batch_sizes]
        prompts = random_prompts(batch, settings, base.config.vocab_size)
        progress.set_description(f"e2e batch {batch}")
        samples = run_interleaved(active, prompts, new_tokens=settings.new_tokens, reps=settings.reps,
                                  warmup_tokens=settings.warmup_tokens, progress=progress, options=options)
        # paired ratios to DLP-LoRA too, so token-level baselines compare with it round by round
        references = ("base", "peft_single", *(f"dlp_N{n}" for n in settings.adapter_counts))
        batch_rows = summarize(active, samples, batch, references=references)
        for row, v in zip(batch_rows, active, strict=True):
            if v.family == "dlp":
                mixtures = used_mixtures(v)
                row["mixtures"] = mixtures
                row["distinct_mixtures"] = len({tuple(sorted(m)) for m in mixtures})
        rows += batch_rows
        if on_batch_done is not None:
            on_batch_done(rows)
    return rows


def run_scaling(base, banks: dict, settings: BenchSettings, progress) -> list[dict]:
    """N x K sweep at batch 1: DLP-LoRA (use_mixture, K adapters) and MeteoRA (op form) vs base."""
    rows = []
    prompts = random_prompts(1, settings, base.config.vocab_size)
    options = generate_options(settings)
    for n in settings.scaling_adapter_counts:
        progress.set_description(f"scaling N={n}")
        variants = [Variant("base", "base", base)]
        variants += [mixture_variant(base, banks[n], n, k) for k in settings.scaling_ks if k <= n]
        variants.append(meteora_variant(base, banks[n], n, "op", settings.seed))
        samples = run_interleaved(variants, prompts, new_tokens=settings.scaling_new_tokens,
                                  reps=settings.scaling_reps, warmup_tokens=settings.warmup_tokens,
                                  progress=progress, options=options)
        rows += [dict(row, n_adapters=n) for row in summarize(variants, samples, 1, references=("base",))]
    return rows



# ----------------------------------------------------------------------------- plot


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--full", action="store_true",
                        help="the complete configuration: 64 new tokens, N in {1,26,100}, all "
                             "three MeteoRA forms, 9 rounds, plus the N x K scaling sweep (tens of "
                             "minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="scaling plot PNG (default: next to --out, <stem>_scaling.png)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="model shape (default: cpu on CPU, gpu = ~1.1B bf16 on CUDA; tiny = smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--adapters", type=int, nargs="+", default=None,
                        help="bank sizes N for the main table")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=None, help="MeteoRA forms to run")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                        help="run the N x K scaling sweep (default: only with --full)")
    parser.add_argument("--scaling-adapters", type=int, nargs="+", default=None,
                        help="bank sizes N of the scaling sweep (default 1 10 26 50 100)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlp_lora_bench",
                        help="where the random PEFT adapters are written once and reused")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="every variant generates with a static KV cache and transformers' automatic "
                             "torch.compile of the decode steps (inductor, mode='reduce-overhead': CUDA "
                             "graphs on a GPU); the first generate() of each variant compiles")
    parser.add_argument("--loraflow", action=argparse.BooleanOptionalAction, default=None,
                        help="add the LoRA-Flow variants loraflow_{loop,op}_k{3,N}_N (default: only with "
                             "--full)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="PATTERN",
                        help="run only the variants matching these fnmatch patterns (e.g. 'dlp_N*' "
                             "'meteora_op_*'); base always runs (the ratios need it)")
    parser.add_argument("--profile", metavar="VARIANT", default=None,
                        help="instead of benchmarking, profile one variant (e.g. dlp_N26, base) at batch "
                             "--batch-sizes[0] with torch.profiler and print the top operators")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the main table, break one decode step down per variant at batch 1 "
                             "(base, peft_single, dlp_N, meteora_<form>_N): weight bytes read, operator "
                             "calls and profiled time by category, plus unprofiled paired ratios "
                             "(dlp_lora/decode_breakdown.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = dict(FULL if args.full else SHORT)
    preset.update(device=device, seed=args.seed)
    if device.startswith("cuda"):
        preset.update(dtype="bfloat16", model=GPU_MODEL)
    if args.model:
        preset.update(model=MODELS[args.model])
    overrides = {"reps": args.reps, "new_tokens": args.new_tokens, "scaling": args.scaling,
                 "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
                 "adapter_counts": tuple(args.adapters) if args.adapters else None,
                 "meteora_forms": tuple(args.forms) if args.forms else None, "compile": args.compile,
                 "loraflow": args.loraflow,
                 "variants": tuple(args.variants) if args.variants else None,
                 "scaling_adapter_counts": tuple(args.scaling_adapters) if args.scaling_adapters else None}
    changed = {k: v for k, v in overrides.items() if v is not None and preset.get(k) != v}
    if changed:  # result files and README tables must not call an edited run by a preset's name
        preset["preset"] = f"{preset['preset']} + " + ", ".join(f"{k}={v}" for k, v in changed.items())
    preset.update(changed)
    settings = BenchSettings(**preset)
    if settings.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is measured between steps)")
    return settings



def check_output(path: Path | None, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written at the end of a long run
    (a directory, an unwritable place, a dangling symlink; a symlink to a file is written through)."""
    if path is None:
        return
    try:
        check_output_file(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    check_output(args.out, "--out")
    check_output(args.plot, "--plot")
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, settings.dtype)
    load_start = load_average()
    if settings.device == "cpu" and load_start and load_start[0] > 0.5 and torch.get_num_threads() > 1:
        # Measured here: at load ~3 on 2 cores, 2 OpenMP threads made decode ~15x slower than 1
        # thread (each barrier waits for a descheduled thread). Ratios then mean little.
        warnings.warn(f"dlp-lora bench: load average is {load_start[0]} on a {os.cpu_count()}-core machine "
                      f"and torch uses {torch.get_num_threads()} threads: timings will be noisy and slow; "
                      "prefer an idle machine, or --threads 1", RuntimeWarning, stacklevel=2)
    base = build_base_model(settings.model, device=settings.device, dtype=dtype, seed=settings.seed)
    counts = set(settings.adapter_counts)
    if settings.scaling:
        counts |= set(settings.scaling_adapter_counts)
    adapter_dirs = ensure_peft_adapters(base, settings.model, max(max(counts), max(settings.batch_sizes)),
                                        rank=settings.rank, alpha=settings.lora_alpha, seed=settings.seed,
                                        cache_dir=args.cache_dir)
    banks = load_banks(counts, adapter_dirs, dtype, settings.device)

    if args.profile:
        return profile_variant(args.profile, base, banks, adapter_dirs, settings)

    result = {
        "benchmark": "end-to-end greedy decode",
        "created": timestamp(),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(settings.device), "versions": versions(),
        "config": {**{k: v for k, v in asdict(settings).items() if k != "model"},
                   "model": {**asdict(settings.model), "architecture": "LlamaForCausalLM",
                             "parameters": sum(p.numel() for p in base.parameters())},
                   "target_modules": list(TARGET_MODULES),
                   "routing": "dlp_N*: use_mixture, sequence i mixes adapters 3i..3i+2 (mod N) with "
                              "weights 4/7, 2/7, 1/7 (K=min(3, N)); dlp_router_N*: a Router with random "
                              "(untrained) weights, top_p and max_loras as above, routed once per prompt "
                              f"(reroute={settings.reroute!r}); scaling sweep: use_mixture with K adapters",
                   "meteora": "one random gate Linear(d_in, N) per module, top-2, softmax(top2 / 1.0)",
                   "loraflow": "one random gate Linear(hidden, K) per decoder layer on its input hidden "
                               "state, softmax + bias (0), every token its own weights over adapters "
                               "0..K-1, K in {min(3, N), N}",
                   "generation": ("static KV cache; decode steps compiled by transformers' automatic "
                                  "torch.compile (CompileConfig defaults: inductor, reduce-overhead)"
                                  if settings.compile else "dynamic KV cache, eager"),
                   "timing": "decode time per token = median of the intervals between generation steps "
                             "of one generate() (decode_mean_ms_per_token: their mean); ratios = median "
                             "over rounds of the paired ratio within a round"},
    }
    if args.breakdown:
        return run_breakdown_file(args, settings, result, base, banks, adapter_dirs, load_start)

    per_n = {n: 2 + len(settings.meteora_forms)
             + settings.loraflow * len(loraflow_ks(settings, n)) * len(settings.loraflow_forms)
             for n in settings.adapter_counts}
    total = sum((3 + (b > 1) + sum(per_n.values())) * (settings.reps + 1) for b in settings.batch_sizes)
    if settings.scaling:
        total += sum((2 + sum(k <= n for k in settings.scaling_ks)) * (settings.scaling_reps + 1)
                     for n in settings.scaling_adapter_counts)

    def finish(complete: bool) -> None:
        result["complete"] = complete
        result["goals"] = evaluate_goals(result.get("e2e", []), settings.device)
        save_result(result, args.out, load_start)

    def batch_done(rows: list[dict]) -> None:
        # Saved after every batch size: a run stopped by a time limit (gpu_check.sh gives each step
        # a few minutes of a borrowed GPU) still leaves the batch sizes it finished, marked incomplete.
        result["e2e"] = rows
        finish(complete=False)

    with tqdm(total=total, unit="gen", disable=None) as progress:  # no bar in a log file
        result["e2e"] = run_e2e(base, banks, adapter_dirs, settings, progress, on_batch_done=batch_done)
        if settings.scaling:
            result["scaling"] = run_scaling(base, banks, settings, progress)
    if settings.scaling and (args.out or args.plot):
        plot = args.plot or args.out.with_name(args.out.stem + "_scaling.png")
        result["plot"] = str(plot_scaling(result, plot))
    finish(complete=True)
    print_summary(result)
    return result


def run_breakdown_file(args, settings: BenchSettings, result: dict, base, banks, adapter_dirs,
                       load_start) -> dict:
    """``--breakdown``: dlp_lora.bench.breakdown's rows, with the run's provenance, to --out."""
    from tqdm.auto import tqdm

    from .breakdown import run_breakdown

    result["benchmark"] = "decode-step breakdown at batch 1"
    # run_breakdown sets the total once it knows the variants
    with tqdm(unit="gen", disable=None) as progress:
        result["breakdown"] = run_breakdown(base, banks, adapter_dirs, settings, progress)
    save_result(result, args.out, load_start)
    for row in result["breakdown"]:
        prof, weights = row["profile_per_decode_step"], row["weights_mb_per_token"]
        print(f"{row['variant']:>18}: {row['decode_ms_per_token']['median']:7.2f} ms/token "
              f"(x base {row['ratio_to_base']['median']:.3f}); "
              f"weights x base {weights['ratio_to_base']:.3f}; "
              f"{prof['calls']:.0f} op calls/step; profiled ms/step "
              + " ".join(f"{k} {v:.2f}" for k, v in prof["cpu_ms"].items()))
    return result


def profile_variant(name: str, base, banks, adapter_dirs, settings: BenchSettings) -> dict:
    """torch.profiler over one generate() of one variant; prints the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    variants = {v.name: v for v in main_variants(base, banks, adapter_dirs, settings, FORMS)}
    if name not in variants:
        raise SystemExit(f"--profile: unknown variant {name!r}; choose from {sorted(variants)}")
    prompts = random_prompts(settings.batch_sizes[0], settings, base.config.vocab_size)
    options = generate_options(settings)
    time_generate(variants[name], prompts, settings.new_tokens if options else 4, options)
    activities = [ProfilerActivity.CPU]
    if settings.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        timing = time_generate(variants[name], prompts, settings.new_tokens, options)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"{name}: decode {timing['decode_s'] * 1e3:.2f} ms/token (under the profiler)")
    return {"profile": name, **timing}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlp-lora bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
