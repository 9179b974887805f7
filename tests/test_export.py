"""export_mixture / `dlp-lora export-mixture`: a mixture written as one PEFT LoRA is the same model.

Oracles: use_mixture on the patched model, PEFT's add_weighted_adapter(combination_type="cat"), and
the exported directory read back by PeftModel and by LoRABank.from_peft. Bad input must fail before
anything is written, and a failed write must leave no half-written directory behind.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from peft_fixtures import default_backend, left_pad, make_adapter, peft_oracle, tiny_model, word_tokenizer

import dlp_lora._atomic as atomic_module
from dlp_lora import LoRABank, export_mixture, patch_model, use_mixture
from dlp_lora.cli import main
from dlp_lora.export import MIXTURE_NAME, VLLM_MAX_LORA_RANKS, ExportError, content_hash
from dlp_lora.router import Router

BACKEND = default_backend()
ATOL = 1e-5
MIXTURES = {
    "four": {"plain": 0.5, "rslora": 0.3, "pattern": 0.2, "layer0": 0.4},
    "two": {"rslora": 0.7, "plain": 0.3},  # not in bank order: the export orders by the bank
    "one": {"pattern": 1.3},
    "negated": {"plain": 1.0, "rslora": -0.6},  # task negation: negative weights are allowed
}


QV = {"target_modules": ["q_proj", "v_proj"]}


def _adapters(base, root) -> dict:
    """Different ranks, alphas, rslora, rank/alpha patterns and target module sets (one layer only)."""
    return {
        "plain": make_adapter(base, root / "plain", seed=31, r=4, lora_alpha=8),
        "rslora": make_adapter(base, root / "rslora", seed=32, r=2, lora_alpha=16, use_rslora=True, **QV),
        "pattern": make_adapter(
            base,
            root / "pattern",
            seed=33,
            r=8,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"v_proj": 3, "layers.1.self_attn.q_proj": 5},
            alpha_pattern={"o_proj": 32},
        ),
        "layer0": make_adapter(
            base,
            root / "layer0",
            seed=34,
            r=3,
            lora_alpha=6,
            target_modules=["gate_proj", "up_proj"],
            layers_to_transform=[0],
        ),
    }


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(arch) -> {base, adapters, bank, model (patched copy of base)}, built once per arch."""
    cache = {}

    def _build(arch: str) -> dict:
        if arch not in cache:
            base = tiny_model(arch, seed=3)
            adapters = _adapters(base, tmp_path_factory.mktemp(f"export_{arch}"))
            bank = LoRABank.from_peft(adapters)
            model = patch_model(copy.deepcopy(base), bank, backend=BACKEND)
            cache[arch] = dict(base=base, adapters=adapters, bank=bank, model=model)
        return cache[arch]

    return _build


@pytest.fixture(params=("llama", "qwen2"))
def case(request, build):
    return build(request.param)


@pytest.fixture
def llama(build):
    return build("llama")


IDS, MASK = left_pad([[5, 9, 17, 3, 44, 60, 12], [7, 30, 21, 8]])


def _logits(model, mixture=None) -> torch.Tensor:
    with torch.no_grad(), use_mixture(model, mixture) if mixture is not None else _nothing():
        return model(input_ids=IDS, attention_mask=MASK).logits


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _peft_load(base, directory):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def _read(directory) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    record = json.loads((directory / MIXTURE_NAME).read_text())
    return config, load_file(str(directory / "adapter_model.safetensors")), record


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", list(MIXTURES))
def test_export_equals_use_mixture_and_peft_cat(case, tmp_path, which):
    mixture = MIXTURES[which]
    out = export_mixture(case["bank"], mixture, tmp_path / "mix")
    assert out == tmp_path / "mix"
    expected = _logits(case["model"], mixture)
    assert (expected - _logits(case["base"])).abs().max() > 1e-2  # the mixture does change the model
    torch.testing.assert_close(_logits(_peft_load(case["base"], out)), expected, atol=ATOL, rtol=0)

    config, tensors, record = _read(out)
    sum_of_ranks = sum(a["rank"] for a in record["adapters"])
    assert config["r"] == config["lora_alpha"] == record["rank"] <= sum_of_ranks
    assert [a["name"] for a in record["adapters"]] == [n for n in case["bank"].names if n in mixture]
    if len(mixture) > 1:
        # PEFT's cat copies use_rslora from its first adapter, so give it the bank order (plain first)
        order = [n for n in case["bank"].names if n in mixture]
        oracle = peft_oracle(case["base"], {n: case["adapters"][n] for n in order})
        oracle.add_weighted_adapter(order, [mixture[n] for n in order], "cat", combination_type="cat")
        oracle.set_adapter("cat")
        torch.testing.assert_close(_logits(oracle), expected, atol=ATOL, rtol=0)


def test_modules_no_adapter_targets_are_left_out(llama, tmp_path):
    config, tensors, _ = _read(export_mixture(llama["bank"], {"rslora": 1.0, "layer0": 0.5}, tmp_path / "m"))
    modules = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors}
    assert modules == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")} | {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    }
    # layer0 targets one layer only: type names would select layer 1's MLP too, so full names are listed
    assert sorted(config["target_modules"]) == sorted(modules)
    config, _, _ = _read(export_mixture(llama["bank"], {"rslora": 1.0, "plain": 0.5}, tmp_path / "n"))
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_config_passes_vllm_checks(llama, tmp_path):
    """The checks vLLM applies when it loads a LoRA, on the file itself.

    From vllm/lora/peft_helper.py (PEFTHelper.from_dict, __post_init__, _validate_features,
    validate_legal) and vllm/config/lora.py (MaxLoRARanks, the allowed --max-lora-rank values).
    """
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    mixture = MIXTURES["four"]
    for pad_rank in (None, 16, 64):
        config, tensors, record = _read(
            export_mixture(llama["bank"], mixture, tmp_path / f"pad{pad_rank}", pad_rank=pad_rank)
        )
        assert {"r", "lora_alpha", "target_modules"} <= config.keys()  # from_dict: required fields
        assert isinstance(config["r"], int) and config["r"] > 0  # __post_init__
        assert isinstance(config["target_modules"], list)
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        # _validate_features
        assert not config.get("modules_to_save")
        assert config.get("use_dora") is False
        assert config.get("lora_bias") is False
        assert config.get("init_lora_weights") is True  # no PiSSA / OLoRA / LoftQ-style init
        for variant in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
            assert not config.get(variant), variant
        # validate_legal: bias, rank (incl. rank_pattern) within max_lora_rank
        assert config["bias"] == "none"
        assert "rank_pattern" not in config and "alpha_pattern" not in config
        # __post_init__: scaling lora_alpha / r (no rslora) is exactly 1
        assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
        if pad_rank is None:
            assert config["r"] == record["mixture_rank"] == 14  # q_proj of layer 0: 4 + 2 + 8
        else:
            assert config["r"] == pad_rank in VLLM_MAX_LORA_RANKS and record["mixture_rank"] == 14
        for key, tensor in tensors.items():
            assert key.startswith("base_model.model.model.layers.")
            assert key.endswith((".lora_A.weight", ".lora_B.weight"))
            assert tensor.shape[0 if key.endswith("lora_A.weight") else 1] == config["r"]


def test_pad_rank_and_round_trip_through_the_bank(case, tmp_path):
    mixture = MIXTURES["four"]
    expected = _logits(case["model"], mixture)
    out = export_mixture(case["bank"], mixture, tmp_path / "mix", pad_rank=32)
    assert _read(out)[0]["r"] == 32
    torch.testing.assert_close(_logits(_peft_load(case["base"], out)), expected, atol=ATOL, rtol=0)
    bank = LoRABank.from_peft({"mix": out})
    alone = patch_model(copy.deepcopy(case["base"]), bank, backend=BACKEND)
    torch.testing.assert_close(_logits(alone, {"mix": 1.0}), expected, atol=ATOL, rtol=0)


def test_hash_names_the_content(llama, tmp_path):
    bank = llama["bank"]
    a = export_mixture(bank, {"plain": 0.25, "pattern": 0.75}, tmp_path / "a")
    b = export_mixture(bank, {"pattern": 0.75, "plain": 0.25, "rslora": 0.0}, tmp_path / "b")
    c = export_mixture(bank, {"plain": 0.25, "pattern": 0.5}, tmp_path / "c")
    (config_a, tensors_a, rec_a), (_, _, rec_b), (_, _, rec_c) = _read(a), _read(b), _read(c)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert rec_a["content_sha256"] == rec_b["content_sha256"] != rec_c["content_sha256"]
    assert rec_a["content_sha256"] == content_hash(tensors_a, config_a)  # recomputable from the files
    assert rec_a["suggested_name"] == "mix-" + rec_a["content_sha256"][:12]
    assert rec_b["dropped_zero_weight"] == ["rslora"] and rec_a["dropped_zero_weight"] == []
    assert [(x["name"], x["weight"], x["rank"]) for x in rec_a["adapters"]] == [
        ("plain", 0.25, 4),
        ("pattern", 0.75, 8),
    ]
    assert rec_a["adapters"][0]["path"] == str(llama["adapters"]["plain"].resolve())
    # another dtype or base model is another adapter
    d = export_mixture(
        bank,
        {"plain": 0.25, "pattern": 0.75},
        tmp_path / "d",
        dtype=torch.bfloat16,
        base_model_name_or_path="org/tiny",
    )
    config_d, tensors_d, rec_d = _read(d)
    assert config_d["base_model_name_or_path"] == "org/tiny" and rec_d["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in tensors_d.values())
    assert rec_d["content_sha256"] != rec_a["content_sha256"]


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mixture", "pad_rank", "arg", "needle"),
    [
        ({"nope": 1.0}, None, "mixture", "unknown adapter(s) ['nope']"),
        ({}, None, "mixture", "is empty"),
        ({"plain": math.nan}, None, "mixture", "finite"),
        ({"plain": math.inf}, None, "mixture", "finite"),
        ({"plain": True}, None, "mixture", "finite"),
        ({"plain": 1e38}, None, "mixture", "|weight| <= 100"),
        ({"plain": 0.0, "rslora": 0}, None, "mixture", "only zero weights"),
        ({"plain": 1.0, "rslora": 1.0}, 5, "pad_rank", "5 is smaller than the mixture's rank 6"),
        ({"plain": 1.0}, 0, "pad_rank", "positive int"),
        ([("plain", 1.0)], None, "mixture", "must be a mapping"),
    ],
)
def test_bad_input_raises_before_writing(llama, tmp_path, mixture, pad_rank, arg, needle):
    with pytest.raises(ExportError) as info:
        export_mixture(llama["bank"], mixture, tmp_path / "out" / "mix", pad_rank=pad_rank)
    assert info.value.arg == arg and isinstance(info.value, ValueError)
    assert needle in str(info.value) and f"`{arg}`" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_or_replaced_whole(llama, tmp_path):
    bank = llama["bank"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # not an adapter: never deleted, even with overwrite
        with pytest.raises(ExportError, match="out_dir"):
            export_mixture(bank, {"plain": 1.0}, busy, overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_mixture(bank, {"plain": 1.0}, tmp_path / "file", overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"

    first = export_mixture(bank, {"plain": 1.0}, tmp_path / "mix")
    before = (first / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="not empty"):
        export_mixture(bank, {"rslora": 1.0}, first)
    assert (first / "adapter_model.safetensors").read_bytes() == before
    export_mixture(bank, {"rslora": 1.0}, first, overwrite=True)
    assert _read(first)[2]["adapters"][0]["name"] == "rslora"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file", "mix"]  # no temp dirs left
    (tmp_path / "empty").mkdir()
    export_mixture(bank, {"plain": 1.0}, tmp_path / "empty")  # an empty directory is filled in
    assert (tmp_path / "empty" / MIXTURE_NAME).is_file()


def test_failed_write_leaves_nothing_half_written(llama, tmp_path, monkeypatch):
    bank = llama["bank"]
    out = export_mixture(bank, {"plain": 1.0}, tmp_path / "mix")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, text, *args, **kwargs):  # the weights are written, the config only in part
        self.write_bytes(text[:10].encode())
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", disk_full)
        with pytest.raises(OSError, match="disk full"):
            export_mixture(bank, {"rslora": 1.0}, out, overwrite=True)
        with pytest.raises(OSError, match="disk full"):
            export_mixture(bank, {"rslora": 1.0}, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]
    real_rename, calls = os.rename, []

    def rename_fails_second(src, dst):  # moving the new directory into place fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename refused")
        real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(atomic_module.os, "rename", rename_fails_second)
        with pytest.raises(OSError, match="rename refused"):
            export_mixture(bank, {"rslora": 1.0}, out, overwrite=True)
    assert len(calls) == 3  # old moved aside, new refused, old moved back
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]


def test_files_get_the_users_umask(llama, tmp_path):
    old = os.umask(0o027)
    try:
        out = export_mixture(llama["bank"], {"plain": 1.0}, tmp_path / "mix")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


# --- CLI -------------------------------------------------------------------------------------------


def _cli(adapters: dict, *extra: str) -> int:
    specs = [f"{name}={path}" for name, path in adapters.items()]
    return main(["export-mixture", "--adapters", *specs, *extra])


def test_cli_exports_a_mixture(llama, tmp_path, capsys):
    adapters = {n: llama["adapters"][n] for n in ("plain", "rslora")}
    out = tmp_path / "mix"
    assert (
        _cli(
            adapters,
            "--mixture",
            "plain=0.7,rslora=0.3",
            "--out",
            str(out),
            "--pad-rank",
            "16",
            "--base-model",
            "org/tiny",
        )
        == 0
    )
    config, _, record = _read(out)
    stdout = capsys.readouterr().out
    assert f"content sha256: {record['content_sha256']}" in stdout
    assert f"suggested name: {record['suggested_name']}" in stdout
    assert f"--lora-modules {record['suggested_name']}={out} --max-lora-rank 16" in stdout
    assert config["r"] == 16 and config["base_model_name_or_path"] == "org/tiny"
    assert [(a["name"], a["weight"]) for a in record["adapters"]] == [("plain", 0.7), ("rslora", 0.3)]


def test_cli_exports_the_routed_mixture(llama, tmp_path, capsys):
    adapters = {n: llama["adapters"][n] for n in ("plain", "rslora", "pattern")}
    router = Router(list(adapters), num_buckets=64, embed_dim=8, hidden=16, num_layers=2)
    with torch.no_grad():
        router.mlp[-1].bias.copy_(torch.tensor([1.0, 0.6, -3.0]))  # plain and rslora share the mass
    router.tokenizer = word_tokenizer()
    router.save(tmp_path / "router")
    prompt = "al0 be1 the ga2 ."
    enc = router.tokenizer([prompt], return_tensors="pt")
    ids, weights = Router.load(tmp_path / "router").route(enc["input_ids"], enc["attention_mask"], top_p=0.9)
    chosen = {
        router.label_names[i]: w for i, w in zip(ids[0].tolist(), weights[0].tolist(), strict=True) if i >= 0
    }
    assert len(chosen) == 2

    out = tmp_path / "mix"
    assert (
        _cli(
            adapters,
            "--router",
            str(tmp_path / "router"),
            "--prompt",
            prompt,
            "--top-p",
            "0.9",
            "--out",
            str(out),
        )
        == 0
    )
    record = _read(out)[2]
    assert {a["name"]: a["weight"] for a in record["adapters"]} == chosen
    stdout = capsys.readouterr().out
    assert stdout.startswith("routed: plain ") and record["content_sha256"] in stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--mixture", "nope=1"], "--mixture: names unknown adapter(s) ['nope']"),
        (["--mixture", ""], "--mixture: is empty"),
        (["--mixture", "plain=-101"], "--mixture: weight of 'plain' must be a finite number"),
        (["--mixture", "plain=nan"], "--mixture: weight of 'plain' must be a finite number"),
        (["--mixture", "plain=inf"], "--mixture: weight of 'plain' must be a finite number"),
        (
            ["--mixture", "plain=1,rslora=1", "--pad-rank", "4"],
            "--pad-rank: 4 is smaller than the mixture's rank 6",
        ),
        ([], "give exactly one of --mixture"),
        (["--router", "{root}"], "--prompt goes with --router"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(llama, tmp_path, capsys, extra, needle):
    adapters = {n: llama["adapters"][n] for n in ("plain", "rslora")}
    extra = [e.replace("{root}", str(tmp_path)) for e in extra]
    code = _cli(adapters, *extra, "--out", str(tmp_path / "out" / "mix"))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert needle in captured.err, captured.err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_out(llama, tmp_path, capsys):
    adapters = {"plain": llama["adapters"]["plain"]}
    out = tmp_path / "mix"
    assert _cli(adapters, "--mixture", "plain=1", "--out", str(out)) == 0
    before = (out / MIXTURE_NAME).read_bytes()
    capsys.readouterr()
    assert _cli(adapters, "--mixture", "plain=0.5", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlp-lora export-mixture: error: --out:") and "--overwrite" in err
    assert (out / MIXTURE_NAME).read_bytes() == before
    assert _cli(adapters, "--mixture", "plain=0.5", "--out", str(out), "--overwrite") == 0
    assert json.loads((out / MIXTURE_NAME).read_text())["adapters"][0]["weight"] == 0.5
