"""The demo: its shipped base model, and the smoke run (`python -m dlp_lora.demo --smoke`).

The smoke run trains two adapters for a few steps on the shipped base and a router in a temporary
cache, evaluates the shuffled composite and checks the table's shape and that the oracle adapter beats
the base model. The full demo (`make demo`) is the same code with the full recipe. Rebuilding the
shipped base itself takes minutes: `make demo-base-check` does it and compares the sha256.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch

from dlp_lora.demo import build, pipeline, shipped, tasks
from dlp_lora.demo.__main__ import main
from dlp_lora.demo.evaluate import LORAFLOW, METHODS

ALL_METHODS = (*METHODS, LORAFLOW)  # the demo evaluates LoRA-Flow too


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    quiet = lambda _: None
    result, out = pipeline.run(build.Recipe.smoke(), cache=root / "cache", out=root / "out", log=quiet)
    return root, result, out


def test_shipped_base_matches_its_sha256_and_loads():
    from transformers import AutoModelForCausalLM

    base = shipped.verified_base()
    manifest = shipped.read_manifest()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert sorted(p.name for p in base.iterdir()) == sorted([*manifest["files"], shipped.MANIFEST])
    recipe = build.BaseRecipe()
    assert manifest["recipe"] == {k: getattr(recipe, k) for k in manifest["recipe"]}
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    assert model.config.hidden_size == recipe.hidden_size
    tokenizer = build.load_tokenizer(base)
    prompt, _ = tasks.PRIMITIVES["copy"].make(random.Random(0))
    assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) == prompt


def test_a_changed_base_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    base, original = tmp_path / "base", shipped.BASE_DIR
    shutil.copytree(original, base)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(shipped.BaseModelError, match="model.safetensors: sha256"):
        shipped.verified_base(base)
    monkeypatch.setattr(shipped, "BASE_DIR", base)
    assert main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(weights) in err and "--rebuild-base" in err
    shutil.copy(original / "model.safetensors", weights)
    shipped.verified_base(base)
    (base / "tokenizer.json").unlink()
    with pytest.raises(shipped.BaseModelError, match="tokenizer.json: missing"):
        shipped.verified_base(base)


def test_training_is_reproducible_whatever_ran_before(tmp_path):
    """The same bytes from the same recipe, whatever the thread count and global RNG state before:
    a few pretraining steps of a tiny base, then a few adapter steps on it."""
    tiny = build.BaseRecipe(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            pretrain_steps=3, batch_size=8)
    recipe = dataclasses.replace(build.Recipe.smoke(), adapter_steps=3, batch_size=8)
    task = tasks.TASKS["reverse"]
    hashes = []
    threads = torch.get_num_threads()
    for i, (n_threads, seed) in enumerate([(1, 0), (2, 123)]):
        torch.set_num_threads(n_threads)
        torch.manual_seed(seed)
        manifest = shipped.build_base(tmp_path / f"base{i}", tiny, log=lambda _: None)
        tokenizer = build.load_tokenizer(tmp_path / f"base{i}")
        build.train_adapter(tmp_path / f"base{i}", tokenizer, task, tasks.stream([task], 0), recipe,
                            tmp_path / f"adapter{i}")
        adapter = shipped.sha256(tmp_path / f"adapter{i}" / "adapter_model.safetensors")
        hashes.append((manifest["files"], adapter))
    torch.set_num_threads(threads)
    assert hashes[0] == hashes[1]


def test_table_has_one_row_per_task_plus_average(smoke):
    _, result, _ = smoke
    recipe = build.Recipe.smoke()
    rows = result.table_rows()
    assert [r["task"] for r in rows] == [*result.tasks, "average"]
    assert sorted(result.tasks) == sorted(recipe.tasks)
    assert result.methods == ALL_METHODS
    assert all(set(r) == {"task", "n", *ALL_METHODS, "router"} for r in rows)
    assert [r["n"] for r in rows] == [recipe.eval_per_task] * len(recipe.tasks) + [recipe.eval_per_task * 2]
    text = pipeline.format_table(result)
    for title in ("base EM%", "oracle LoRA EM%", "DLP-LoRA EM%", "LoRA-Flow EM%", "router acc%",
                  "DLP-LoRA time", "LoRA-Flow time"):
        assert title in text
    assert all(result.decode_ms_per_token[m] > 0 for m in ALL_METHODS)


def test_oracle_beats_base(smoke):
    _, result, _ = smoke
    assert result.average(result.accuracy["oracle"]) > result.average(result.accuracy["base"])


def test_results_written_and_second_run_reuses_the_cache(smoke, capsys):
    root, result, out = smoke
    payload = json.loads((out / "composite.json").read_text())
    assert payload["rows"] == result.table_rows()
    assert payload["base_model"]["sha256"] == shipped.read_manifest()["files"]["model.safetensors"]
    assert payload["loraflow"]["candidates"] == list(result.tasks)
    assert "loraflow gates" in payload["build_log"]
    assert (out / "composite.png").stat().st_size > 0
    # the second run through the command line finds every artifact cached and only evaluates
    assert main(["--smoke", "--cache-dir", str(root / "cache"), "--out", str(root / "out2")]) == 0
    printed = capsys.readouterr().out
    assert "all cached" in printed and "average" in printed
    second = json.loads((root / "out2" / "composite.json").read_text())
    assert all(v is None for v in second["seconds"]["build"].values())
    # ... and still reports how long the first run took to build each artifact
    assert second["seconds"]["first_build"] == payload["seconds"]["first_build"]
    assert set(payload["seconds"]["first_build"]) == set(payload["seconds"]["build"])
    assert all(v > 0 for v in payload["seconds"]["first_build"].values())
    # greedy decoding of the same artifacts: the same exact-match table
    assert [{k: r[k] for k in ("task", *ALL_METHODS)} for r in second["rows"]] == \
        [{k: r[k] for k in ("task", *ALL_METHODS)} for r in payload["rows"]]


def test_readme_table_from_the_demo_json(smoke):
    """benchmarks/make_readme_tables.py renders the demo's JSON: provenance, one row per task plus the
    average, and the decode-time ratios on the average row."""
    import importlib.util
    from pathlib import Path

    _, result, out = smoke
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_readme_tables.py"
    spec = importlib.util.spec_from_file_location("make_readme_tables", script)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)

    payload = json.loads((out / "composite.json").read_text())
    assert payload["machine"]["cpu_count"] >= 1 and payload["versions"]["torch"]
    text = tables.render_demo(out / "composite.json")
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(result.tasks) + 1  # header, tasks, average
    assert "DLP-LoRA decode time" in lines[0]
    average = lines[-1]
    assert f"**{result.decode_ratio('dlp'):.2f}x**" in average and "**1.00x**" in average
    assert payload["machine"]["cpu"] in text
    assert f"hidden {build.BaseRecipe().hidden_size}" in text
