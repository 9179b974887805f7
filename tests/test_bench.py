"""Smoke test of the benchmark harness (dlp_lora.bench) and the docs table generator.

A tiny Llama, 2 rounds of 3 tokens: the numbers mean nothing, the test checks that every variant
runs, that the JSON holds what the generated tables need (machine, versions, medians, spread,
paired ratios, goals, the mixtures used), that the plot is written, and that
benchmarks/make_readme_tables.py puts the tables between the markers and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import requires_cuda

from dlp_lora.bench import harness, report, timing, variants, workload

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """benchmarks/<name>.py as a module (the benchmarks folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_tables_script():
    return _load_script("make_readme_tables")


@pytest.mark.slow
def test_bench_harness_and_readme_tables(tmp_path):
    out = tmp_path / "results" / "e2e_cpu.json"
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "2", "--new-tokens", "3",
            "--batch-sizes", "1", "2", "--adapters", "6", "--forms", "bmm", "op",
            "--scaling", "--scaling-adapters", "2",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert harness.main(argv) == 0
    result = json.loads(out.read_text())

    assert {"cpu", "cpu_count"} <= set(result["machine"])
    assert {"torch", "transformers", "peft", "dlp_lora", "python"} <= set(result["versions"])
    assert len(result["load_average"]["start"]) == 3
    # an edited run is not called by the preset's name alone
    assert result["config"]["preset"].startswith("short + ") and "new_tokens=3" in result["config"]["preset"]
    rows = {(r["variant"], r["batch"]): r for r in result["e2e"]}
    expected = {"base", "peft_single", "peft_merged", "dlp_N6", "dlp_router_N6"}
    expected |= {f"meteora_{form}_N6" for form in ("bmm", "op")}
    assert {name for name, batch in rows if batch == 1} == expected
    assert {name for name, batch in rows if batch == 2} == expected | {"peft_mixed"}
    for row in result["e2e"]:
        d = row["decode_ms_per_token"]
        assert d["n"] == 2 and 0 < d["q1"] <= d["median"] <= d["q3"]
        assert row["ratio_to_base"]["n"] == 2 and row["tokens_per_s"] > 0
    assert rows[("base", 1)]["ratio_to_base"]["median"] == pytest.approx(1.0)
    # each of the 2 sequences has its own 3-adapter mixture (adapters 0-2 and 3-5)
    assert rows[("dlp_N6", 2)]["distinct_mixtures"] == 2
    assert [sorted(m) for m in rows[("dlp_N6", 2)]["mixtures"]] == [
        [f"task_{i:03d}" for i in range(3)], [f"task_{i:03d}" for i in range(3, 6)]]
    assert len(rows[("dlp_router_N6", 1)]["mixtures"]) == 1

    scaling = {(r["variant"], r["n_adapters"]) for r in result["scaling"]}
    assert scaling == {("base", 2), ("dlp_N2_K1", 2), ("dlp_N2_K2", 2), ("meteora_op_N2", 2)}  # K <= N
    assert Path(result["plot"]).stat().st_size > 0
    assert any(g["goal"].startswith("MeteoRA best form") for g in result["goals"])
    assert result["complete"] is True

    tables = _load_tables_script()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BENCH:e2e -->\nold\n<!-- /BENCH:e2e -->\noutro\n")
    assert tables.main(["--readme", str(readme), "--results", str(out.parent)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- BENCH:e2e -->\n") and text.endswith("<!-- /BENCH:e2e -->\noutro\n")
    assert "old" not in text and "| 2 | peft_mixed |" in text and "N=2" in text
    assert "Incomplete" not in text


def test_bench_loraflow_variants_and_table(tmp_path):
    """--loraflow adds LoRA-Flow at K = max_loras and K = N in both forms to the same interleaved run,
    with paired ratios to DLP-LoRA, and its table is generated between its own markers."""
    out = tmp_path / "results" / "loraflow_e2e_cpu.json"
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "2", "--new-tokens", "3", "--loraflow",
            "--batch-sizes", "1", "2", "--adapters", "6", "--variants", "peft_single", "dlp_N*", "loraflow*",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert harness.main(argv) == 0
    result = json.loads(out.read_text())
    assert "loraflow=True" in result["config"]["preset"]
    flow = {f"loraflow_{form}_k{k}_N6" for form in ("loop", "op") for k in (3, 6)}
    rows = {(r["variant"], r["batch"]): r for r in result["e2e"]}
    for batch in (1, 2):
        assert {name for name, b in rows if b == batch} == {"base", "peft_single", "dlp_N6"} | flow
    for name in flow:
        row = rows[(name, 2)]
        assert row["family"] == "loraflow" and row["k"] == int(name.split("_k")[1].split("_")[0])
        assert row["ratio_to_dlp_N6"]["n"] == 2 and row["ratio_to_base"]["n"] == 2
    assert rows[("dlp_N6", 1)]["ratio_to_dlp_N6"]["median"] == pytest.approx(1.0)

    readme = tmp_path / "README.md"
    readme.write_text("<!-- BENCH:loraflow -->\n<!-- /BENCH:loraflow -->\n"
                      "<!-- BENCH:e2e -->\n<!-- /BENCH:e2e -->\n")
    assert _load_tables_script().main(["--readme", str(readme), "--results", str(out.parent)]) == 0
    text = readme.read_text()
    loraflow_part = text.split("<!-- /BENCH:loraflow -->")[0]
    assert "| 2 | loraflow_op_k6_N6 | 6 | 6 |" in loraflow_part and "| 1 | dlp_N6 | 6 | 3 |" in loraflow_part
    # the LoRA-Flow file is not an e2e_*.json: the e2e section (and README's headline) never read it
    assert text.endswith("<!-- BENCH:e2e -->\n<!-- /BENCH:e2e -->\n")


def test_stopped_run_keeps_its_finished_batch_sizes(tmp_path, monkeypatch):
    """A run killed by a time limit (gpu_check.sh's steps) leaves the batch sizes it finished, marked."""
    out = tmp_path / "results" / "e2e_cpu.json"
    original = harness.run_interleaved
    calls = []

    def stop_at_second_batch(variants, input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("time limit")  # what `timeout` does to the process, in effect
        return original(variants, input_ids, **kwargs)

    monkeypatch.setattr(harness, "run_interleaved", stop_at_second_batch)
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "1", "--new-tokens", "2",
            "--batch-sizes", "1", "2", "--adapters", "3", "--forms", "op",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        harness.main(argv)
    result = json.loads(out.read_text())
    assert calls == [1, 2] and result["complete"] is False
    assert {r["batch"] for r in result["e2e"]} == {1} and "dlp_N3" in {r["variant"] for r in result["e2e"]}
    assert any(g["goal"].startswith("MeteoRA best form") for g in result["goals"])

    readme = tmp_path / "README.md"
    readme.write_text("<!-- BENCH:e2e -->\n<!-- /BENCH:e2e -->\n")
    assert _load_tables_script().main(["--readme", str(readme), "--results", str(out.parent)]) == 0
    text = readme.read_text()
    assert "**Incomplete run**" in text and "batch sizes [1] were measured" in text


def test_decode_breakdown_rows_weights_model_and_table(tmp_path):
    """--breakdown: one row per compared variant, the weight-bytes model checked against the model's
    shapes by hand, per-step profiles without the prefill, and the README table generated from it."""
    from dlp_lora.bench import breakdown as decode_breakdown

    out = tmp_path / "results" / "decode_breakdown_cpu.json"
    argv = ["--model", "tiny", "--device", "cpu", "--breakdown", "--reps", "2", "--new-tokens", "3",
            "--adapters", "6", "--forms", "bmm", "op",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert harness.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["breakdown"]}
    assert list(rows) == ["base", "peft_single", "dlp_N6", "meteora_bmm_N6", "meteora_op_N6"]

    shape = workload.MODELS["tiny"]
    h, inter, kv = shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads * (
        shape.hidden_size // shape.num_attention_heads)
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (d_in, d_out)
    base_floats = shape.num_hidden_layers * sum(i * o for i, o in per_layer) + h * shape.vocab_size
    adapter_floats = shape.num_hidden_layers * sum(8 * (i + o) for i, o in per_layer)
    gate_floats = 6 * shape.num_hidden_layers * sum(i for i, _ in per_layer)
    expected = {"base": base_floats, "peft_single": base_floats + adapter_floats,
                "dlp_N6": base_floats + 3 * adapter_floats,
                "meteora_op_N6": base_floats + 2 * adapter_floats + gate_floats}
    for name, floats in expected.items():
        assert rows[name]["weights_mb_per_token"]["total_mb"] == pytest.approx(floats * 4 / 1e6)

    for name, row in rows.items():
        prof = row["profile_per_decode_step"]
        assert set(prof["cpu_ms"]) == {*decode_breakdown.CATEGORIES, "ops_total", "outside_ops"}
        # times are differences of two runs: at this tiny size only their presence is checked
        assert prof["calls"] > 0 and math.isfinite(prof["wall_ms"]) and row["ratio_to_base"]["n"] == 2
        # only the variants that call the multi-LoRA op call it (its time at this tiny size is noise)
        assert (prof["calls_by_category"]["lora_op"] > 0) == (name in ("dlp_N6", "meteora_op_N6")), name
    # MeteoRA gates every module at every step: more operator calls than DLP-LoRA's one op per module
    calls = {name: row["profile_per_decode_step"]["calls"] for name, row in rows.items()}
    assert calls["meteora_op_N6"] > calls["dlp_N6"]

    readme = tmp_path / "README.md"
    readme.write_text("<!-- BENCH:breakdown -->\n<!-- /BENCH:breakdown -->\n")
    assert _load_tables_script().main(["--readme", str(readme), "--results", str(out.parent)]) == 0
    assert "| meteora_op_N6 | 6 |" in readme.read_text() and "K=3" in readme.read_text()


def test_breakdown_categories():
    from dlp_lora.bench.breakdown import category, kernel_category

    assert [category(n) for n in ("aten::mm", "aten::addmm", "aten::bmm", "dlp_lora::multi_lora",
                                  "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::topk")] == [
        "matmul", "matmul", "matmul", "lora_op", "attention", "other"]
    kernels = {
        "_shrink_kernel": "lora_op",  # Triton names a kernel after its function
        "void dlp_lora::cuda::(anonymous namespace)::expand_kernel<c10::BFloat16>(c10::BFloat16*)": "lora_op",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_hsh_64x8_64x16_2x1_v_bz_TNT": "matmul",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4, false>": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other",
        "Memcpy HtoD (Pageable -> Device)": "other",
    }
    assert {name: kernel_category(name) for name in kernels} == kernels


@requires_cuda
def test_decode_breakdown_on_gpu_counts_kernels(tmp_path):
    """On a GPU the breakdown also reports kernels per step and their device time by category."""
    out = tmp_path / "decode_breakdown_gpu.json"
    argv = ["--model", "tiny", "--device", "cuda", "--breakdown", "--reps", "1", "--new-tokens", "3",
            "--adapters", "6", "--forms", "op", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert harness.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["breakdown"]}
    for name, row in rows.items():
        prof = row["profile_per_decode_step"]
        assert prof["kernels"] > 0 and prof["device_ms"]["total"] > 0, name
        assert (prof["device_ms"]["lora_op"] > 0) == (name in ("dlp_N6", "meteora_op_N6")), name
    assert rows["meteora_op_N6"]["profile_per_decode_step"]["kernels"] > rows["dlp_N6"][
        "profile_per_decode_step"]["kernels"]


def test_readme_tables_ops_section_and_missing_markers(tmp_path, capsys):
    """The ops table comes from summarize_ops.py's JSON; a README without a marker gets it printed."""
    timing = {"median_us": 12.5, "iqr_us": 0.5, "achieved_GBps": 40.0}
    shape = {"phase": "decode", "dtype": "fp32", "T": 1, "S": 1, "N": 26, "K": 3, "r": 8, "d_in": 2048,
             "d_out": 2048, "roofline": {"bytes": 420000}, "best_baseline": "peft_loop",
             "speedup_vs_best_baseline": 5.0, "goal_speedup": 2.0, "meets_goal": True,
             "impls": {"cpp": timing, "peft_loop": dict(timing, median_us=62.5)}}
    results = tmp_path / "results"
    results.mkdir()
    ops = {"what": "op", "machine": {"cpu": "x"}, "shapes": [shape]}
    (results / "ops_cpu.json").write_text(json.dumps(ops))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BENCH:ops -->\n<!-- /BENCH:ops -->\n")
    tables = _load_tables_script()
    assert tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    row = "| decode | fp32 | 1 | 1 | 26 | 3 | 8 | 2048x2048 | 12.5 [0.5] | 62.5 [0.5] (peft_loop) | 5.00 |"
    assert row in readme.read_text()
    readme.write_text("no markers here\n")
    assert tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == "no markers here\n"
    captured = capsys.readouterr()
    assert "has no <!-- BENCH:ops -->" in captured.err and "| decode | fp32 |" in captured.out



def test_headline_table_goes_to_the_readme_and_every_table_to_the_docs(tmp_path):
    """The README's one headline table: DLP-LoRA against the base model, PEFT and token-level gating
    (from the full end-to-end run) and the demo's accuracy, each with its goal in words; the same
    run's full tables go to the other target (docs/benchmarks.md), whose markers the README lacks."""
    def row(variant, family, n, to_base, to_peft):
        ratio = lambda m: {"median": m, "iqr": 0.05, "n": 3}
        return {"variant": variant, "family": family, "batch": 1, "n_adapters": n, "form": None,
                "decode_ms_per_token": {"median": 10 * to_base, "iqr": 0.1}, "tokens_per_s": 100 / to_base,
                "ratio_to_base": ratio(to_base), "ratio_to_peft_single": ratio(to_peft)}

    model = {"hidden_size": 64, "num_hidden_layers": 2, "parameters": 1e6}
    e2e = {"machine": {"cpu": "some cpu"}, "config": {
               "preset": "full", "model": model, "dtype": "float32", "prompt_len": 8, "new_tokens": 4,
               "rank": 8, "target_modules": ["q_proj"], "top_p": 0.6, "max_loras": 3, "reps": 3},
           "e2e": [row("base", "base", None, 1.0, 0.9), row("peft_single", "peft", 1, 1.1, 1.0),
                   row("dlp_N26", "dlp", 26, 1.0432, 0.9512), row("meteora_op_N26", "meteora", 26, 1.3, 1.2)],
           "goals": [{"goal": "DLP-LoRA N=26, batch 1: <= 1.10x base decode time", "measured": 1.0432,
                      "limit": 1.1, "met": True},
                     {"goal": "MeteoRA best form >= 2x dlp_N26 time (batch 1)", "measured": 1.2462,
                      "limit": 2.0, "met": False, "best_form": "op"}]}
    demo = {"machine": {"cpu": "some cpu"}, "tasks": ["a", "b"], "top_p": 0.6, "decode_ratio_to_base": {},
            "rows": [{"task": "average", "n": 20, "base": 5.0, "oracle": 95.0, "dlp": 95.0, "router": 100.0}]}
    results = tmp_path / "results"
    results.mkdir()
    (results / "e2e_cpu.json").write_text(json.dumps(e2e))
    (results / "demo_composite.json").write_text(json.dumps(demo))
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text("intro\n<!-- BENCH:headline -->\n<!-- /BENCH:headline -->\noutro\n")
    docs.write_text("<!-- BENCH:e2e -->\n<!-- /BENCH:e2e -->\n")
    tables = _load_tables_script()
    argv = ["--target", str(readme), "--target", str(docs), "--results", str(results)]
    assert tables.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /BENCH:headline -->\noutro\n")
    assert ("| DLP-LoRA decode time / base model; 3 of 26 adapters fused | at most 10% slower than the "
            "model without adapters | 1.04x [0.05] | yes |") in text
    assert "| DLP-LoRA decode time / PEFT serving one adapter; 3 of 26 adapters fused |" in text
    assert "| 0.95x [0.05] | - |" in text
    assert "| 1.25x | **no** |" in text and "at least 2x" in text
    assert "| 95.0% (oracle 95.0%, base 5.0%, router accuracy 100.0%) | yes |" in text
    assert "e2e_cpu.json" in text and "demo_composite.json" in text
    assert "BENCH:e2e" not in text and "| dlp_N26 |" not in text  # the full tables are the docs' job
    body = docs.read_text()
    assert "| 1 | dlp_N26 | 26 |" in body and "BENCH:headline" not in body
    # every goal row says its goal in words beside the measured value
    assert "one sequence fusing 3 of a bank of 26 adapters decodes at most 10% slower per token" in body
    assert "takes at least 2x DLP-LoRA's decode time per token" in body


def test_demo_table_with_loraflow(tmp_path):
    """A demo file that evaluated LoRA-Flow gets its accuracy and decode-time columns, and the README's
    demo row names its accuracy; older files (no "methods") keep their three methods."""
    scores = {"base": 0.0, "oracle": 90.0, "dlp": 90.0, "loraflow": 70.0, "router": 100.0}
    rows = [{"task": "a", "n": 10, **scores}, {"task": "average", "n": 10, **scores}]
    demo = {"machine": {"cpu": "some cpu"}, "tasks": ["a"], "top_p": 0.6, "rows": rows,
            "methods": ["base", "oracle", "dlp", "loraflow"],
            "decode_ratio_to_base": {"base": 1.0, "oracle": 1.1, "dlp": 1.2, "loraflow": 2.5}}
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo_composite.json").write_text(json.dumps(demo))
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text("<!-- BENCH:headline -->\n<!-- /BENCH:headline -->\n")
    docs.write_text("<!-- BENCH:demo -->\n<!-- /BENCH:demo -->\n")
    assert _load_tables_script().main(["--target", str(readme), "--target", str(docs),
                                       "--results", str(results)]) == 0
    body = docs.read_text()
    assert "| LoRA-Flow EM % |" in body and "| **70.0** |" in body and "**2.50x** |" in body
    assert "LoRA-Flow 70.0%" in readme.read_text()
    del demo["methods"]
    (results / "demo_composite.json").write_text(json.dumps(demo))
    assert _load_tables_script().main(["--target", str(docs), "--results", str(results)]) == 0
    assert "LoRA-Flow" not in docs.read_text()


def test_layer_summary_drops_samples_and_adds_ratios(tmp_path):
    """summarize_layer.py keeps statistics, drops pytest-benchmark's samples and computes the ratios to
    the bare Linear and (MeteoRA forms) to DLP-LoRA with the same N; the README table shows them."""
    summarize_layer = _load_script("summarize_layer")

    def case(variant, n, median):
        stats = {"median": median, "iqr": median / 10, "q1": median * 0.95, "q3": median * 1.05,
                 "rounds": 5, "data": [median] * 5}
        return {"group": "up decode_b1", "name": f"test_layer[{variant}-{n}]", "stats": stats,
                "extra_info": {"variant": variant, "n_adapters": n, "threads": 1}}

    raw = {"datetime": "2026-11-26T00:00:00", "machine_info": {"cpu": {"brand_raw": "some cpu"}},
           "benchmarks": [case("base", 26, 2e-4), case("dlp", 26, 2.5e-4), case("meteora_op", 26, 5e-4),
                          case("dlp", 100, 3e-4), case("meteora_op", 100, 4.5e-4)]}
    summary = summarize_layer.summarize(raw)
    by_name = {b["name"]: b for b in summary["benchmarks"]}
    assert all("data" not in b["stats"] for b in summary["benchmarks"])
    assert by_name["test_layer[dlp-26]"]["x_base"] == pytest.approx(1.25)
    assert by_name["test_layer[meteora_op-26]"]["x_dlp"] == pytest.approx(2.0)
    assert by_name["test_layer[meteora_op-100]"]["x_dlp"] == pytest.approx(1.5)
    assert "x_dlp" not in by_name["test_layer[dlp-26]"]

    path = tmp_path / "layer_cpu.json"
    path.write_text(json.dumps(summary))
    text = _load_tables_script().render_layer(path)
    assert "| up decode_b1 | meteora_op | 100 | 450.0 [45.0] | 2.25 | 1.50 |" in text
    assert "some cpu" in text


@pytest.mark.slow
def test_compile_option_times_compiled_decode(tmp_path):
    """--compile: generate() gets a static cache and a CompileConfig, and the timed decode is compiled."""
    import torch

    settings = workload.BenchSettings(model=workload.TINY_MODEL, compile=True)
    base = workload.build_base_model(settings.model, device="cpu", dtype=torch.float32, seed=0)
    dirs = workload.ensure_peft_adapters(base, settings.model, 4, rank=4, alpha=8, seed=0, cache_dir=tmp_path)
    banks = workload.load_banks([4], dirs, torch.float32, "cpu")
    variant = variants.mixture_variant(base, banks[4], 4, 2)
    options = timing.generate_options(settings)
    assert options["cache_implementation"] == "static" and options["compile_config"]._compile_all_devices
    assert torch._dynamo.config.recompile_limit >= 256  # 20 module trees share the traced code objects
    ids = workload.random_prompts(2, settings, settings.model.vocab_size)[:, :12]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    timed = timing.time_generate(variant, ids, 4, options)
    assert timed["decode_s"] > 0 and timed["prefill_s"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert timing.generate_options(workload.BenchSettings()) == {}
    torch._dynamo.reset()


def test_variants_filter_keeps_base(tmp_path):
    """--variants runs only the matching variants, plus base (every ratio needs it)."""
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "1", "--new-tokens", "2", "--batch-sizes", "1",
            "--adapters", "3", "--variants", "dlp_N*", "meteora_op_*", "--cache-dir", str(tmp_path)]
    result = harness.run(harness.add_arguments(argparse.ArgumentParser()).parse_args(argv))
    assert [r["variant"] for r in result["e2e"]] == ["base", "dlp_N3", "meteora_op_N3"]
    assert "variants=('dlp_N*', 'meteora_op_*')" in result["config"]["preset"]


def test_goals_use_the_device_limits():
    """CPU runs are held to the CPU limits, CUDA runs to the GPU ones; MeteoRA's factor in both."""
    def row(variant, family, ratio, ms, n=26, form=None):
        return {"variant": variant, "family": family, "batch": 1, "n_adapters": n, "form": form,
                "ratio_to_base": {"median": ratio}, "decode_ms_per_token": {"median": ms}}

    rows = [row("base", "base", 1.0, 10.0, n=None), row("dlp_N26", "dlp", 1.12, 11.2),
            row("meteora_op_N26", "meteora", 1.5, 15.0, form="op"),
            row("meteora_bmm_N26", "meteora", 2.5, 25.0, form="bmm")]
    cpu = {g["goal"]: g for g in report.evaluate_goals(rows, "cpu")}
    gpu = {g["goal"]: g for g in report.evaluate_goals(rows, "cuda")}
    assert [(g["limit"], g["met"]) for g in cpu.values() if "N=26, batch 1" in g["goal"]] == [(1.10, False)]
    assert [(g["limit"], g["met"]) for g in gpu.values() if "N=26, batch 1" in g["goal"]] == [(1.15, True)]
    for goals in (cpu, gpu):
        meteora = goals["MeteoRA best form >= 2x dlp_N26 time (batch 1)"]
        assert meteora["best_form"] == "op" and meteora["measured"] == pytest.approx(15.0 / 11.2, abs=1e-4)
        assert not any("N=100" in text for text in goals)  # not measured: not reported


def test_serve_goals_are_the_median_of_paired_rounds():
    """bench_serve's goals: each round pairs the modes measured in it; the median over rounds decides."""
    bench_serve = _load_script("bench_serve")

    def row(mode, round_, tokens_per_s, p99):
        return {"mode": mode, "load": "closed", "clients": 16, "round": round_, "tokens_per_s": tokens_per_s,
                "ttft_s": {"p99": p99}}

    rows = [row("serial", 0, 10.0, 50.0), row("static", 0, 20.0, 30.0), row("continuous", 0, 40.0, 10.0),
            row("continuous", 1, 25.0, 12.0), row("serial", 1, 10.0, 40.0), row("static", 1, 20.0, 35.0),
            row("static", 2, 10.0, 20.0), row("continuous", 2, 35.0, 11.0), row("serial", 2, 10.0, 45.0),
            {**row("continuous", 0, 99.0, 1.0), "clients": 4}]  # not the goals' setting
    goals = {g["goal"].split(": ")[1]: g for g in bench_serve.evaluate_goals(rows)}
    serial, static = goals["continuous >= 3.0x serial tokens/s"], goals["continuous >= 1.3x static tokens/s"]
    assert serial["per_round"] == [4.0, 2.5, 3.5] and serial["ratio"] == 3.5 and serial["met"]
    assert static["per_round"] == [2.0, 1.25, 3.5] and static["ratio"] == 2.0 and static["met"]
    ttft = goals["continuous p99 time to first token below static's"]
    assert ttft["p99_ttft_s"] == [30.0, 11.0] and ttft["met"]


def test_real_model_section_renders_every_stage(tmp_path):
    """make real-model's file: composite with LoRA-Flow and its ceilings, fusion named from its adapters
    with LoRA-Flow's seeds, speed with the decode-step profile, run time; a partial file says so."""
    per_task = {"json": 1.0, "date": 0.5}
    flow_run = {"exact_match": 0.5}
    profile = {"calls": 4000, "wall_ms": 52.0, "rounds": 3, "cpu_ms": {
        "matmul": 40.0, "attention": 1.0, "lora_op": 2.5, "other": 5.0, "outside_ops": 3.5}}
    ceilings = {"oracle_weights": 0.8, "oracle_weights_except_layer0": 0.8, "uniform": 0.2}
    stages = {
        "adapters": {"json": {"steps": 12, "seconds": 70.0}, "date": {"steps": 19, "seconds": 80.0}},
        "composite": {"prompts": 60, "router_accuracy": 1.0, "methods": {
            m: {"exact_match": 0.75, "per_task": per_task} for m in ("base", "oracle", "dlp_lora")}},
        "fusion": {"prompts": 60, "k_distribution": {"1": 50, "2": 10},
                   "routed_sets": {"date": 50, "date+json": 10},
                   "methods": {m: {"exact_match": e} for m, e in (
                       ("base", 0.0), ("only_json", 0.0), ("only_date", 0.1), ("fixed_50_50", 0.2),
                       ("fixed_sum", 0.3), ("dlp_lora", 0.1), ("composite_lora_ceiling", 0.9))}},
        "speed": {"new_tokens": 64, "threads": 1, "rounds": 5, "prompt_tokens": 40, "patched_modules": 210,
                  "load_average_start": [1.0], "load_average_end": [1.1], "rows": [
                      {"variant": v, "decode_ms_per_token": {"median": 50.0},
                       "ratio_to_base": {"median": 1.05, "iqr": 0.01},
                       "ratio_to_peft_single": {"median": 0.9, "iqr": 0.01},
                       **({"profile_per_decode_step": profile} if v != "peft_single" else {})}
                      for v in ("base", "peft_single", "dlp_tasks_K3")]},
        "loraflow": {
            "composite": {"runs": [flow_run] * 3, "exact_match": {"mean": 0.5, "stdev": 0.01},
                          "ceilings": ceilings},
            "unit_seconds": {"composite seed 0": None, "fusion seed 0": 900.0},
            "fusion": {"candidates": ["json", "date"], "train_examples": 200,
                       "runs": [{"exact_match": 0.6}] * 3,
                       "exact_match": {"mean": 0.6, "stdev": 0.0}, "uniform_ceiling": {"exact_match": 0.05}}},
    }
    data = {"complete": True, "recipe": {"lora_rank": 8, "lora_targets": ["q_proj"], "top_p": 0.6},
            "machine": {"cpu": "some cpu", "cpu_count": 2}, "versions": {"torch": "2.13"}, "stages": stages,
            "stage_seconds": {"adapters": 150.0, "loraflow": 1800.0}}
    path = tmp_path / "real_model_cpu.json"
    path.write_text(json.dumps(data))
    tables = _load_tables_script()
    text = tables.render_real_model(path)
    assert "Partial run" not in text and "Time of the stages as computed: 32 min" in text
    assert "LoRA-Flow's counts only its units with a recorded time (not: composite seed 0)" in text
    assert "(the json and date adapters); adapters top-p keeps per prompt: K=1: 50, K=2: 10" in text
    assert "| the date adapter alone | 10.0 |" in text and "| fixed mixture, 1 each | 30.0 |" in text
    assert "| LoRA-Flow gates over json and date, trained on 200 examples of the skill (mean of 3 seeds, " \
           "sd 0.0; seeds 60.0, 60.0, 60.0) | 60.0 |" in text
    assert "| LoRA-Flow path, uniform weights | 5.0 |" in text
    assert "| dlp_tasks_K3 | 4000 | 40.00 | 1.00 | 2.50 | 5.00 | 3.50 | 52.00 |" in text
    headline = tables._real_model_headline(data)
    assert headline[-1][2] == ("10.0% (LoRA-Flow 60.0%, fixed 1/2 each 20.0%, a LoRA trained on the skill "
                               "90.0%)") and headline[-1][3] == "**no**"
    del stages["loraflow"], data["stage_seconds"]
    path.write_text(json.dumps(data))
    text = tables.render_real_model(path)
    assert "**Partial run**: not run yet: loraflow" in text and "LoRA-Flow gates" not in text
