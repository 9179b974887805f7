"""Smoke test of the benchmark harness (dlp_lora.bench) and the README table generator.

A tiny Llama, 2 rounds of 3 tokens: the numbers mean nothing, the test checks that every variant
runs, that the JSON holds what the README and the lead need (machine, versions, medians, spread,
paired ratios, goals, the mixtures used), that the plot is written, and that
benchmarks/make_readme_tables.py puts the tables between the markers and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import requires_cuda

from dlp_lora.bench import harness as bench

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
    assert bench.main(argv) == 0
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


def test_stopped_run_keeps_its_finished_batch_sizes(tmp_path, monkeypatch):
    """A run killed by a time limit (gpu_check.sh's steps) leaves the batch sizes it finished, marked."""
    out = tmp_path / "results" / "e2e_cpu.json"
    original = bench.run_interleaved
    calls = []

    def stop_at_second_batch(variants, input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("time limit")  # what `timeout` does to the process, in effect
        return original(variants, input_ids, **kwargs)

    monkeypatch.setattr(bench, "run_interleaved", stop_at_second_batch)
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "1", "--new-tokens", "2",
            "--batch-sizes", "1", "2", "--adapters", "3", "--forms", "op",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
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
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["breakdown"]}
    assert list(rows) == ["base", "peft_single", "dlp_N6", "meteora_bmm_N6", "meteora_op_N6"]

    shape = bench.MODELS["tiny"]
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
        assert prof["calls"] > 0 and prof["wall_ms"] > 0 and row["ratio_to_base"]["n"] == 2
        # only the variants that call the multi-LoRA op spend time in it
        assert (prof["cpu_ms"]["lora_op"] > 0) == (name in ("dlp_N6", "meteora_op_N6")), name
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
    assert bench.main(argv) == 0
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

    settings = bench.BenchSettings(model=bench.TINY_MODEL, compile=True)
    base = bench.build_base_model(settings.model, device="cpu", dtype=torch.float32, seed=0)
    dirs = bench.ensure_peft_adapters(base, settings.model, 4, rank=4, alpha=8, seed=0, cache_dir=tmp_path)
    banks = bench.load_banks([4], dirs, torch.float32, "cpu")
    variant = bench.mixture_variant(base, banks[4], 4, 2)
    options = bench.generate_options(settings)
    assert options["cache_implementation"] == "static" and options["compile_config"]._compile_all_devices
    assert torch._dynamo.config.recompile_limit >= 256  # 20 module trees share the traced code objects
    ids = bench.random_prompts(2, settings, settings.model.vocab_size)[:, :12]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    timing = bench.time_generate(variant, ids, 4, options)
    assert timing["decode_s"] > 0 and timing["prefill_s"] > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert bench.generate_options(bench.BenchSettings()) == {}
    torch._dynamo.reset()


def test_variants_filter_keeps_base(tmp_path):
    """--variants runs only the matching variants, plus base (every ratio needs it)."""
    argv = ["--model", "tiny", "--device", "cpu", "--reps", "1", "--new-tokens", "2", "--batch-sizes", "1",
            "--adapters", "3", "--variants", "dlp_N*", "meteora_op_*", "--cache-dir", str(tmp_path)]
    result = bench.run(bench.add_arguments(argparse.ArgumentParser()).parse_args(argv))
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
    cpu = {g["goal"]: g for g in bench.evaluate_goals(rows, "cpu")}
    gpu = {g["goal"]: g for g in bench.evaluate_goals(rows, "cuda")}
    assert [(g["limit"], g["met"]) for g in cpu.values() if "N=26, batch 1" in g["goal"]] == [(1.10, False)]
    assert [(g["limit"], g["met"]) for g in gpu.values() if "N=26, batch 1" in g["goal"]] == [(1.15, True)]
    for goals in (cpu, gpu):
        meteora = goals["MeteoRA best form >= 2x dlp_N26 time (batch 1)"]
        assert meteora["best_form"] == "op" and meteora["measured"] == pytest.approx(15.0 / 11.2, abs=1e-4)
        assert not any("N=100" in text for text in goals)  # not measured: not reported
