"""The `dlp-lora` command line, for any local Hugging Face model directory and PEFT adapters.

    dlp-lora train-router --data tasks.jsonl --tokenizer MODEL_DIR --out router/
    dlp-lora generate --model MODEL_DIR --adapters math=adapters/math code=adapters/code \\
                      --router router/ --prompt "..." [--show-routing]
    dlp-lora inspect --adapters math=adapters/math code=adapters/code
    dlp-lora bench [--full] [--out result.json]
    dlp-lora serve --model MODEL_DIR --adapters math=... code=... --router router/ [--replicas 2]

Bad input (a missing directory, a malformed JSONL line, an adapter made for another model, a router
trained for other adapters) ends with one line on stderr and exit status 2, before anything is
written. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .artifacts import check_router_matches, load_tokenizer
from .options import BATCHING_MODES, DEFAULT_BATCHING, DEFAULT_REROUTE, DEFAULT_TOP_P, REROUTE_MODES

EXIT_BAD_INPUT = 2
DEBUG_HELP = "show the full traceback on errors"
TOP_P_HELP = f"router top-p threshold (default {DEFAULT_TOP_P})"
REROUTE_HELP = "route again at every new sentence or once per prompt (default %(default)s)"


class CLIError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


# ---- argument checks (all run before anything is loaded or written) ---------------------------------


def existing_dir(path: str | Path, flag: str, kind: str = "directory") -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag}: {kind} not found: {path}")
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        raise CLIError(f"{flag}: not a {kind}: {path}")
    return path


def output_dir(path: str | Path, flag: str, *, kind: str, marker: str, overwrite: bool) -> Path:
    """The directory to write for ``flag`` (a symlink followed), checked before any work: new or empty,
    or, with --overwrite, one holding ``kind`` (its file ``marker``); never a directory of other files."""
    from ._atomic import check_output_dir

    try:
        return check_output_dir(path, kind=kind, holds_one=lambda d: (d / marker).is_file(),
                                overwrite=overwrite)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None


def parse_device(spec: str | None, flag: str = "--device"):
    """`cpu`, `cuda` or `cuda:N` -> torch.device, checked against this machine (default: cuda if any)."""
    import torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"{flag}: not a device: {spec!r} (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"{flag}: {spec!r} is not supported; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU found"
            raise CLIError(f"{flag}: {spec!r} asked for, but CUDA is not available here "
                           f"(torch {torch.__version__}, {why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"{flag}: {spec!r} asked for, but this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s)")
    return device


def check_top_p_arg(top_p: float, flag: str = "--top-p") -> None:
    from .router.top_p import check_top_p

    try:
        check_top_p(top_p)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`name=DIR` or `DIR` (named by its folder) -> {name: directory}; every directory must exist."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise CLIError(f"--adapters: expected name=DIR or DIR, got {spec!r}")
        if name in adapters:
            raise CLIError(f"--adapters: the name {name!r} is given twice")
        adapters[name] = existing_dir(path, f"--adapters {name}")
    return adapters


def parse_mixture(spec: str, names: list[str]):
    """`math=0.7,code=-0.3` -> a Mixture of the bank's adapters, under the rule of dlp_lora/mixture.py."""
    from .mixture import Mixture, MixtureError

    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or value is None:
            raise CLIError(f"--mixture: expected name=weight[,name=weight...], got {spec!r}")
        if name in weights:
            raise CLIError(f"--mixture: the adapter {name!r} is given twice")
        weights[name] = value
    try:
        return Mixture(weights, names)
    except MixtureError as e:
        raise CLIError(f"--mixture: {e.detail}") from None


def read_task_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """Every non-blank line must be {"text": str, "task": str}; the first bad one is named by number."""
    texts, tasks = [], []
    with path.open("rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CLIError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise CLIError(f"{where}: nested too deeply (expected one flat object)") from None
            except ValueError as e:  # e.g. an integer beyond Python's int-to-str limit
                raise CLIError(f"{where}: not valid JSON ({_one_line(e)[:120]})") from None
            if not isinstance(row, dict):
                raise CLIError(f'{where}: expected an object {{"text": ..., "task": ...}}, '
                               f"got {type(row).__name__}")
            for key in ("text", "task"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise CLIError(f"{where}: {key!r} must be a non-empty string, got "
                                   f"{repr(row.get(key))[:80]}")
                try:
                    row[key].encode("utf-8")
                except UnicodeEncodeError:
                    raise CLIError(f"{where}: {key!r} holds a lone surrogate (\\ud800-\\udfff), "
                                   "which is not valid Unicode") from None
            texts.append(row["text"])
            tasks.append(row["task"])
    if not texts:
        raise CLIError(f"{path}: no examples (expected one JSON object per line)")
    if len(set(tasks)) < 2:
        raise CLIError(f"{path}: a router needs at least 2 tasks, found {sorted(set(tasks))}")
    return texts, tasks


# ---- commands -------------------------------------------------------------------------------------


def cmd_train_router(args) -> int:
    from .router import Router
    from .router.model import CONFIG_NAME

    data = existing_dir(args.data, "--data", kind="file")
    tokenizer_dir = existing_dir(args.tokenizer, "--tokenizer")
    out = output_dir(args.out, "--out", kind="a router", marker=CONFIG_NAME, overwrite=args.overwrite)
    if not 0.0 <= args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    texts, tasks = read_task_jsonl(data)
    tokenizer = load_tokenizer(tokenizer_dir, "--tokenizer")
    print(f"training a router on {len(texts)} texts, {len(set(tasks))} tasks ({data})")
    router = Router.fit(texts, tasks, tokenizer, val_fraction=args.val_fraction, epochs=args.epochs,
                          seed=args.seed, verbose=True)
    try:
        router.save(out)
    except OSError as e:  # a full disk, a read-only file system: the old --out is left as it was
        raise CLIError(f"--out: {_one_line(e)}") from None
    print(f"router saved to {args.out}/ (labels: {', '.join(router.label_names)})")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .artifacts import load_patched_model, load_tokenizer
    from .patch import use_mixture

    model_dir = existing_dir(args.model, "--model")
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model: {model_dir} has no config.json (not a Hugging Face model directory)")
    adapters = parse_adapters(args.adapters)
    router_dir = existing_dir(args.router, "--router") if args.router else None
    if router_dir is None and args.mixture is None:
        raise CLIError("give --router DIR (routed mixtures) or --mixture name=weight,... (a fixed one)")
    mixture = parse_mixture(args.mixture, list(adapters)) if args.mixture is not None else None
    prompts = list(args.prompt)
    if any(not p.strip() for p in prompts):
        raise CLIError("--prompt: empty prompt")
    check_top_p_arg(args.top_p)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = parse_device(args.device)

    # checked before the model loads: --chat on a tokenizer without a template is bad input
    chat = use_chat_template(args.chat, load_tokenizer(model_dir, "--model"))
    model, tokenizer = load_patched_model(model_dir, adapters, router_dir, device=device, dtype=args.dtype,
                                          top_p=args.top_p, max_loras=args.max_loras, reroute=args.reroute)

    texts = [chat_text(tokenizer, p) for p in prompts] if chat else prompts
    # a chat template writes its own special tokens (e.g. <|im_start|>): the tokenizer must not add more
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
    routing = use_mixture(model, mixture) if mixture is not None else contextlib.nullcontext()
    with torch.no_grad(), routing:
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    for b, prompt in enumerate(prompts):
        text = tokenizer.decode(new_tokens[b], skip_special_tokens=True)
        sep = "\n" if chat else ""  # a chat reply is a turn of its own, not a continuation
        print(f"[{b}] {prompt}{sep}{text}" if len(prompts) > 1 else f"{prompt}{sep}{text}")
        if args.show_routing:
            prompt_ids = enc["input_ids"][b][enc["attention_mask"][b].bool()]
            real = prompt_ids.tolist() + new_tokens[b].tolist()
            for line in routing_lines(model.dlp_routing_log, b, real, tokenizer):
                print(line)
    return 0


def use_chat_template(flag: bool | None, tokenizer) -> bool:
    """--chat / --no-chat / neither: whether prompts go through the tokenizer's chat template.

    Without either flag the template is applied when the tokenizer has one, and a note says so on
    stderr: an instruct model given raw text often ends its answer at once.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if flag and not has_template:
        raise CLIError("--chat: the model's tokenizer has no chat template "
                       "(give plain prompts without --chat)")
    if flag is None and has_template:
        print("dlp-lora generate: each prompt is a user message in the model's chat template "
              "(--no-chat for raw text)", file=sys.stderr)
        return True
    return bool(flag)


def chat_text(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def routing_lines(log, sequence: int, token_ids: list[int], tokenizer) -> list[str]:
    """One line per routed span of `sequence`: its text and the adapters with their weights.

    log: model.dlp_routing_log (records with sequence, position, adapters, weights, reason);
    token_ids: the sequence's real (unpadded) prompt + generated ids, which positions index.
    """
    records = sorted((r for r in log if r.sequence == sequence), key=lambda r: r.position)
    lines = []
    for i, rec in enumerate(records):
        end = records[i + 1].position if i + 1 < len(records) else len(token_ids)
        text = tokenizer.decode(token_ids[rec.position:end], skip_special_tokens=True)
        pairs = zip(rec.adapters, rec.weights, strict=True)
        mix = ", ".join(f"{name} {w:.2f}" for name, w in pairs) or "base model"
        lines.append(f"  routing: sentence {i + 1} ({rec.reason}, tokens {rec.position}-{end - 1}) "
                     f"{text!r} -> {mix}")
    return lines


def cmd_inspect(args) -> int:
    from .bank import LoRABank

    bank = LoRABank.from_peft(parse_adapters(args.adapters))
    print(bank.summary(verbose=args.verbose))
    for name, cfg in bank.configs.items():
        targets = cfg.get("target_modules")
        print(f"  {name}: target_modules={targets!r}, r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}, "
              f"base_model={cfg.get('base_model_name_or_path')!r}")
    return 0


def cmd_export_mixture(args) -> int:
    import torch

    from .adapters import CONFIG_NAME as ADAPTER_CONFIG
    from .bank import LoRABank
    from .export import MIXTURE_NAME, VLLM_MAX_LORA_RANKS, ExportError, export_mixture

    adapters = parse_adapters(args.adapters)
    if (args.mixture is None) == (args.router is None):
        raise CLIError("give exactly one of --mixture name=weight,... or --router DIR --prompt TEXT")
    router_dir = existing_dir(args.router, "--router") if args.router else None
    if (router_dir is None) != (args.prompt is None):
        raise CLIError("--prompt goes with --router: the router routes the prompt, its choice is exported")
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("--prompt: empty prompt")
    check_top_p_arg(args.top_p)
    out = output_dir(args.out, "--out", kind="an adapter", marker=ADAPTER_CONFIG, overwrite=args.overwrite)

    bank = LoRABank.from_peft(adapters)
    if router_dir is None:
        mixture = parse_mixture(args.mixture, bank.names)
    else:
        mixture = route_prompt(router_dir, args, bank.names)
    flags = {"mixture": "--router" if router_dir else "--mixture", "pad_rank": "--pad-rank",
             "out_dir": "--out"}
    try:
        path = export_mixture(bank, mixture, out, base_model_name_or_path=args.base_model,
                              dtype=getattr(torch, args.dtype) if args.dtype else None,
                              pad_rank=args.pad_rank, overwrite=args.overwrite)
    except ExportError as e:
        raise CLIError(f"{flags.get(e.arg, e.arg)}: {e.detail}") from None

    record = json.loads((path / MIXTURE_NAME).read_text())
    rank, name = record["rank"], record["suggested_name"]
    mix = ", ".join(f"{a['name']} {a['weight']:.4g}" for a in record["adapters"])
    print(f"{'routed' if router_dir else 'mixture'}: {mix}")
    print(f"exported one rank-{rank} PEFT LoRA adapter to {path}/")
    print(f"content sha256: {record['content_sha256']}")
    print(f"suggested name: {name}")
    max_lora_rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
    if max_lora_rank is None:
        print(f"note: rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    else:
        print(f"serve: vllm serve {args.base_model or 'BASE'} --enable-lora --lora-modules {name}={path} "
              f"--max-lora-rank {max_lora_rank}")
    return 0


def route_prompt(router_dir: Path, args, names: list[str]) -> dict[str, float]:
    """The mixture the router picks for args.prompt: {adapter: weight}, tokenized like the model does."""
    from .router import Router

    router = Router.load(router_dir)
    base_dir = Path(args.base_model) if args.base_model and Path(args.base_model).is_dir() else None
    if base_dir is not None:
        tokenizer = load_tokenizer(base_dir, "--base-model")
    elif router.tokenizer is not None:
        tokenizer = router.tokenizer
    else:
        raise CLIError("--router: it was saved without its tokenizer; give --base-model MODEL_DIR "
                       "(a local model directory) to tokenize the prompt")
    check_router_matches(router, names, tokenizer)
    enc = tokenizer([args.prompt], return_tensors="pt")
    ids, weights = router.route(enc["input_ids"], enc["attention_mask"], top_p=args.top_p,
                                max_loras=args.max_loras)
    pairs = zip(ids[0].tolist(), weights[0].tolist(), strict=True)
    return {router.label_names[i]: w for i, w in pairs if i >= 0}


def cmd_bench(args) -> int:
    try:
        from . import bench
    except ImportError as e:
        raise CLIError(f"the end-to-end benchmark is not available in this install "
                       f"({_one_line(e)})") from None
    if not hasattr(bench, "add_arguments") or not hasattr(bench, "run"):
        raise CLIError("the end-to-end benchmark is not available in this install (dlp_lora.bench lacks run)")
    parser = argparse.ArgumentParser(prog="dlp-lora bench", description=(bench.__doc__ or "").split("\n")[0])
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(args.bench_args))
    return result if isinstance(result, int) else 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible server on Ray Serve until Ctrl-C or SIGTERM; every argument is checked first.

    Without --address it starts a private local Ray cluster (never one found through RAY_ADDRESS or
    `ray start`), and stopping shuts that cluster down; with --address it joins that cluster and
    stopping deletes only this application.
    """
    from ._env import API_KEY_ENV
    from ._env import api_key as api_key_from_env

    model_dir = existing_dir(args.model, "--model")
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model: {model_dir} has no config.json (not a Hugging Face model directory)")
    adapters = parse_adapters(args.adapters)
    router_dir = existing_dir(args.router, "--router") if args.router else None
    for flag, value in (("--replicas", args.replicas), ("--max-batch-size", args.max_batch_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.batch_wait_ms < 0:
        raise CLIError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    check_top_p_arg(args.top_p)
    if args.address is None:  # a cluster's GPUs are on its nodes, not necessarily here
        parse_device(args.device)
    api_key = args.api_key or api_key_from_env()
    if api_key is None and not _is_loopback(args.host):
        print(f"dlp-lora serve: warning: --host {args.host} accepts requests from other machines and no API "
              f"key is set: anyone who can reach port {args.port} can use the server; give --api-key or "
              f"{API_KEY_ENV}", file=sys.stderr, flush=True)
    try:
        import ray
        from ray import serve

        from .serving.app import APP_NAME, build_app
    except ImportError as e:
        raise CLIError(f"dlp-lora serve needs Ray Serve: pip install 'dlp-lora[serve]' "
                       f"({_one_line(e)})") from None
    app = build_app(model=model_dir, adapters=adapters, router=router_dir, replicas=args.replicas,
                    device=args.device, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    reroute=args.reroute, top_p=args.top_p, max_loras=args.max_loras,
                    model_name=args.served_model_name, api_key=api_key,
                    batching=args.batching)  # ValueError: one line

    import os
    import signal
    import time

    if args.address is None:
        os.environ.pop("RAY_ADDRESS", None)  # our private cluster's processes must not look elsewhere
    # "local": a new cluster of our own, even where RAY_ADDRESS or `ray start` names another one.
    ray.init(address=args.address or "local")
    # After ray.init(), which installs its own SIGTERM handler: `kill` stops as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:  # a replica that cannot load (e.g. adapters for another model)
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise CLIError(f"the server did not start: {lines[-1] if lines else type(e).__name__}") from None
        host, port = _serve_http_address(args.host, args.port)
        print(f"dlp-lora serve: ready at http://{host}:{port}/v1 ({args.replicas} replica(s), "
              f"max batch {args.max_batch_size}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("dlp-lora serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.address:  # a cluster of others: remove only this app
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_http_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's HTTP proxy really listens: on a cluster where Serve already ran, its own options
    win over --host/--port. A wildcard host is shown as 127.0.0.1 (a URL that works here)."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        host, port = config.host, config.port
    except Exception:  # noqa: BLE001 - a Ray without this (private) accessor: what we asked for
        pass
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


# ---- parser and entry point -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlp-lora",
        description="Sentence-level dynamic multi-LoRA fusion (DLP-LoRA) for Hugging Face models.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-router", help="train the mini-MLP router on (text, task) pairs",
                       description='Train a router from a JSONL file of {"text": ..., "task": ...} lines, on '
                                   "the token ids of the base model's tokenizer; prints held-out accuracy.")
    p.add_argument("--data", required=True, help='JSONL, one {"text": ..., "task": ...} per line')
    p.add_argument("--tokenizer", required=True, metavar="MODEL_DIR", help="the base model's directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the router")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out (default 0.1)")
    p.add_argument("--epochs", type=int, default=6, help="passes over the training texts (default 6)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the held-out split and the shuffling (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a router already in --out (a directory holding anything else is refused)")
    p.set_defaults(func=cmd_train_router)

    p = sub.add_parser("generate", help="generate with routed (or fixed) adapter mixtures",
                       description="Greedy generation; every prompt gets its own adapter mixture.")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="base model dir (with tokenizer)")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR", help="PEFT LoRA adapter dirs")
    p.add_argument("--router", metavar="DIR", help="a router saved by train-router")
    p.add_argument("--mixture", metavar="NAME=W,...", help="one fixed mixture for all prompts")
    p.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--show-routing", action="store_true", help="print the adapters chosen per sentence")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="each prompt is a user message in the tokenizer's chat template (default: when the "
                        "tokenizer has one; the router then reads the messages, not the template)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=TOP_P_HELP)
    p.add_argument("--max-loras", type=int, default=None, help="cap on adapters per mixture")
    p.add_argument("--reroute", choices=REROUTE_MODES, default=DEFAULT_REROUTE, help=REROUTE_HELP)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="show adapters, target modules, ranks, scaling and bank memory")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR")
    p.add_argument("--verbose", action="store_true", help="also list every module, in layer order")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (Ray Serve) batching concurrent requests",
                       description="POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                                   "GET /health; concurrent requests are batched at every decode step, "
                                   "each with its own routed or given mixture.")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="base model dir (with tokenizer)")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR", help="PEFT LoRA adapter dirs")
    p.add_argument("--router", metavar="DIR", help="a router saved by train-router (else requests give a "
                                                    "mixture or name an adapter as their model)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most rows in a replica's batch (default 8)")
    p.add_argument("--batching", choices=BATCHING_MODES, default=DEFAULT_BATCHING,
                   help="continuous (default): rows join and leave the batch at every decode step; "
                        "static: requests that arrive together share one generate() to its longest row")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="static batching: how long a batch waits to fill (default 10)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--reroute", choices=REROUTE_MODES, default=DEFAULT_REROUTE, help=REROUTE_HELP)
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=TOP_P_HELP)
    p.add_argument("--max-loras", type=int, default=None, help="cap on adapters per mixture")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per replica")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster ('auto', or HOST:PORT); without it a private local "
                        "cluster is started")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/ routes (default: $DLP_LORA_API_KEY; "
                        "none: no check)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-mixture", help="write one mixture as a single PEFT LoRA (for vLLM, SGLang)",
                       description="Export a fixed or routed mixture as one exact PEFT LoRA adapter of rank "
                                   "sum_k r_k (see docs/serving_with_vllm.md).")
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR", help="PEFT LoRA adapter dirs")
    p.add_argument("--mixture", metavar="NAME=W,...", help="the mixture to export (negative weights allowed)")
    p.add_argument("--router", metavar="DIR", help="a router saved by train-router, instead of --mixture")
    p.add_argument("--prompt", help="with --router: the prompt whose routed mixture is exported")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=TOP_P_HELP)
    p.add_argument("--max-loras", type=int, default=None, help="cap on adapters in the routed mixture")
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    p.add_argument("--pad-rank", type=int, default=None, metavar="R",
                   help="zero-pad to rank R (e.g. the engine's --max-lora-rank)")
    p.add_argument("--base-model", metavar="NAME", help="base_model_name_or_path to record (a local model "
                   "directory also tokenizes --prompt)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the exported weights (default: the adapters')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter in --out")
    p.set_defaults(func=cmd_export_mixture)

    p = sub.add_parser("bench", help="end-to-end decode benchmark (dlp-lora bench --help for its options)",
                       add_help=False)
    p.set_defaults(func=cmd_bench)  # its options are dlp_lora.bench's own, parsed in cmd_bench

    # `--debug` also after the command, for every command (added last, so new commands get it too).
    # SUPPRESS: a command's parser must not reset a `--debug` given before the command to False.
    for command in dict.fromkeys(sub.choices.values()):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except Exception as e:  # user errors become one line unless --debug; bugs keep their traceback
        if args.debug or not _is_user_error(e):
            raise
        print(f"dlp-lora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _is_user_error(e: Exception) -> bool:
    """Errors about the user's input: ours, and the library's validation errors (ValueError family:
    AdapterLoadError, PatchError) or unreadable files. Anything else is a bug and keeps its traceback."""
    return isinstance(e, (CLIError, ValueError, OSError))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
