"""The `dlp-lora` CLI on tiny artifacts built with the demo's builders: happy paths and bad input.

Bad input must give exit status != 0, exactly one line on stderr, no traceback and no output written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlp_lora.cli import main
from dlp_lora.demo import build, tasks
from dlp_lora.router import Router

TASK_NAMES = ("reverse", "caesar")


def _save_adapter(base_dir: Path, out: Path, recipe: build.Recipe, seed: int) -> Path:
    """A PEFT LoRA with random non-zero lora_B (untrained), saved by PEFT itself."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(base, build.lora_config(recipe))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(out))
    return out


def _save_model(out: Path, recipe: build.BaseRecipe) -> Path:
    tokenizer = build.build_tokenizer(out)
    build.build_base_model(tokenizer, recipe).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny model dir, two adapters for it, one adapter for a wider model, a task JSONL, a router."""
    root = tmp_path_factory.mktemp("cli")
    recipe = build.Recipe.smoke()
    model = _save_model(root / "model", build.BaseRecipe(hidden_size=96, num_layers=2, num_heads=4,
                                                         intermediate_size=192))
    adapters = {name: _save_adapter(model, root / name, recipe, seed=i) for i, name in enumerate(TASK_NAMES)}
    wider = build.BaseRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    other_model = _save_model(root / "other_model", wider)
    foreign = _save_adapter(other_model, root / "foreign", recipe, seed=5)

    data = root / "tasks.jsonl"
    rows = tasks.held_out_set([tasks.TASKS[n] for n in TASK_NAMES], 30, seed=3)
    data.write_text("".join(json.dumps({"text": p, "task": t}) + "\n" for t, p, _ in rows))
    tokenizer = build.load_tokenizer(model)
    routers = {}
    for key, names in (("router", TASK_NAMES), ("router_reverse_sort", ("reverse", "sort"))):
        rows = tasks.held_out_set([tasks.TASKS[n] for n in names], 30, seed=6)
        router = Router.fit([p for _, p, _ in rows], [t for t, _, _ in rows], tokenizer, verbose=False)
        routers[key] = router.save(root / key)
    return {"root": root, "model": model, "adapters": adapters, "foreign": foreign, "data": data, **routers}


def _adapter_args(adapters: dict) -> list[str]:
    return [f"{name}={path}" for name, path in adapters.items()]


def _assert_one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code != 0
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in err, err
    assert captured.out == ""
    return err


# ---- happy paths -----------------------------------------------------------------------------------


def test_train_router_reports_accuracy_and_saves(art, capsys):
    out = art["root"] / "router_happy"
    code = main(["train-router", "--data", str(art["data"]), "--tokenizer", str(art["model"]),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "held-out accuracy" in captured.out
    router = Router.load(out)
    assert sorted(router.label_names) == sorted(TASK_NAMES)
    # the prompt styles are disjoint, so even 27 training prompts per task separate them
    assert router.predict(["reverse abcd=", "caesar abcd="]) == ["reverse", "caesar"]


def test_generate_shows_routing_per_sentence(art, capsys):
    code = main(["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"]),
                 "--router", str(art["router"]), "--prompt", "reverse abc=", "--prompt", "caesar abcdef=",
                 "--max-new-tokens", "4", "--show-routing"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("[0] reverse abc=")
    assert any(line.startswith("[1] caesar abcdef=") for line in lines)
    routing = [line for line in lines if "routing:" in line]
    assert len(routing) >= 2
    assert "'reverse abc=" in routing[0] and "-> reverse 1.00" in routing[0]
    assert any("'caesar abcdef=" in line and "-> caesar" in line for line in routing)


def test_generate_with_fixed_mixture_needs_no_router(art, capsys):
    code = main(["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"]),
                 "--mixture", "reverse=0.7,caesar=0.3", "--prompt", "sort cba=", "--max-new-tokens", "3",
                 "--show-routing"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "-> reverse 0.70, caesar 0.30" in captured.out


def test_inspect_lists_adapters_ranks_scaling_memory(art, capsys):
    assert main(["inspect", "--adapters", *_adapter_args(art["adapters"])]) == 0
    out = capsys.readouterr().out
    for needle in ("2 adapters", "reverse", "caesar", "rank 8", "scaling 2", "MiB", "q_proj", "down_proj"):
        assert needle in out, needle
    assert ".layers.0." not in out  # a line per module kind, not per module
    assert main(["inspect", "--verbose", "--adapters", *_adapter_args(art["adapters"])]) == 0
    verbose = capsys.readouterr().out
    assert set(out.splitlines()) < set(verbose.splitlines()) and ".layers.0.self_attn.q_proj:" in verbose


def test_console_entry_point_runs_without_traceback(art):
    """`python -m dlp_lora.cli` as a user runs it: a bad path gives one stderr line and exit 2."""
    argv = [sys.executable, "-m", "dlp_lora.cli", "inspect", "--adapters", "x=/nonexistent/dir"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "dlp-lora inspect: error: --adapters x: directory not found: /nonexistent/dir\n"


# ---- bad input: one line, non-zero exit, nothing written ------------------------------------------


@pytest.mark.parametrize("flag", ["--model", "--adapters", "--router"])
def test_generate_missing_directory(art, capsys, flag):
    missing = str(art["root"] / "does_not_exist")
    args = {"--model": str(art["model"]), "--adapters": _adapter_args(art["adapters"]),
            "--router": str(art["router"])}
    if flag == "--adapters":
        args[flag] = [f"reverse={missing}", f"caesar={art['adapters']['caesar']}"]
    else:
        args[flag] = missing
    argv = ["generate", "--prompt", "reverse ab="]
    for key, value in args.items():
        argv += [key, *value] if isinstance(value, list) else [key, value]
    _assert_one_line_error(capsys, main(argv), "directory not found", "does_not_exist")


def test_train_router_missing_tokenizer_dir_writes_nothing(art, capsys):
    out = art["root"] / "never_router"
    code = main(["train-router", "--data", str(art["data"]), "--tokenizer", str(art["root"] / "nope"),
                 "--out", str(out)])
    _assert_one_line_error(capsys, code, "--tokenizer", "directory not found")
    assert not out.exists()


def test_directories_of_the_wrong_kind(art, capsys):
    adapter_dir = str(art["adapters"]["reverse"])  # exists, but is neither a model nor a tokenizer
    code = main(["generate", "--model", adapter_dir, "--adapters", *_adapter_args(art["adapters"]),
                 "--mixture", "reverse=1", "--prompt", "reverse ab="])
    _assert_one_line_error(capsys, code, "has no config.json")
    out = art["root"] / "never_router4"
    code = main(["train-router", "--data", str(art["data"]), "--tokenizer", adapter_dir, "--out", str(out)])
    _assert_one_line_error(capsys, code, "no Hugging Face tokenizer could be loaded")
    assert not out.exists()
    code = main(["inspect", "--adapters", f"reverse={art['model']}"])
    _assert_one_line_error(capsys, code, "adapter_config.json")


def test_train_router_malformed_jsonl_names_the_line(art, capsys):
    bad = art["root"] / "bad.jsonl"
    good = art["data"].read_text().splitlines()
    bad.write_text("\n".join(good[:4] + ['{"text": "sort ab=", "task": "sort"'] + good[4:]) + "\n")
    out = art["root"] / "never_router2"
    code = main(["train-router", "--data", str(bad), "--tokenizer", str(art["model"]), "--out", str(out)])
    _assert_one_line_error(capsys, code, "line 5", "not valid JSON")
    assert not out.exists()


def test_train_router_missing_field_names_the_line(art, capsys):
    bad = art["root"] / "nofield.jsonl"
    bad.write_text('{"text": "reverse ab=", "task": "reverse"}\n\n{"text": "caesar ab="}\n')
    code = main(["train-router", "--data", str(bad), "--tokenizer", str(art["model"]),
                 "--out", str(art["root"] / "never_router3")])
    _assert_one_line_error(capsys, code, "line 3", "'task'")
    assert not (art["root"] / "never_router3").exists()


def test_generate_adapter_for_a_different_model(art, capsys):
    adapters = {"reverse": art["adapters"]["reverse"], "caesar": art["foreign"]}
    code = main(["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(adapters),
                 "--mixture", "reverse=1", "--prompt", "reverse ab="])
    err = _assert_one_line_error(capsys, code)
    assert "shape" in err and "caesar" in err


def test_generate_router_labels_do_not_match_adapters(art, capsys):
    code = main(["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"]),
                 "--router", str(art["router_reverse_sort"]), "--prompt", "reverse ab="])
    _assert_one_line_error(capsys, code, "--router", "['reverse', 'sort']", "['caesar', 'reverse']")


def test_bad_mixture_and_prompt(art, capsys):
    base = ["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"])]
    code = main([*base, "--mixture", "sort=1", "--prompt", "x"])
    _assert_one_line_error(capsys, code, "--mixture: names unknown adapter(s) ['sort']")
    _assert_one_line_error(capsys, main([*base, "--mixture", "reverse=1", "--prompt", " "]), "empty prompt")
    _assert_one_line_error(capsys, main([*base, "--prompt", "x"]), "--router")


def test_bench_dispatches_to_the_benchmark(capsys):
    """`dlp-lora bench --help` shows the benchmark's own options (parsed by dlp_lora.bench)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "dlp-lora bench" in capsys.readouterr().out
