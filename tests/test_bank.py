"""LoRABank.from_peft against PEFT itself: ranks, scaling, padding, absent modules, refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft_fixtures import make_adapter, peft_oracle, tiny_model

from dlp_lora import LoRABank
from dlp_lora.bank import AdapterLoadError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    """Three adapters with different ranks, scalings and module sets (built by PEFT)."""
    root = tmp_path_factory.mktemp("bank_adapters")
    return {
        "plain": make_adapter(
            llama, root / "plain", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        # regex target_modules (full match) plus per-module rank / alpha overrides
        "pattern": make_adapter(
            llama,
            root / "pattern",
            seed=2,
            r=4,
            lora_alpha=4,
            target_modules=r".*\.(q_proj|k_proj|up_proj)",
            rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"up_proj": 12, r"layers\.0\.self_attn\.q_proj": 3},
        ),
        "rslora": make_adapter(
            llama,
            root / "rslora",
            seed=3,
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["q_proj", "o_proj"],
        ),
    }


def test_from_peft_matches_peft_layers(llama, adapters):
    """Every module's rank, scaling and weights equal what PEFT builds from the same directories."""
    bank = LoRABank.from_peft(adapters)
    oracle = peft_oracle(llama, adapters)
    assert bank.names == list(adapters)
    expected_modules = {
        name.removeprefix("base_model.model.")
        for name, m in oracle.named_modules()
        if hasattr(m, "lora_A") and len(m.lora_A)
    }
    assert set(bank.modules) == expected_modules
    for module_name, entry in bank.modules.items():
        layer = oracle.get_submodule("base_model.model." + module_name)
        assert entry.lora_a.shape == (3, max(entry.ranks), layer.in_features)
        assert entry.lora_b.shape == (3, layer.out_features, max(entry.ranks))
        for i, name in enumerate(bank.names):
            if name not in layer.lora_A:  # absent adapter: zeros, rank 0
                assert entry.ranks[i] == 0 and float(entry.scaling[i]) == 0.0
                assert not entry.lora_a[i].any() and not entry.lora_b[i].any()
                continue
            r = layer.r[name]
            assert entry.ranks[i] == r
            assert float(entry.scaling[i]) == pytest.approx(layer.scaling[name], rel=1e-6)
            torch.testing.assert_close(entry.lora_a[i, :r], layer.lora_A[name].weight, rtol=0, atol=0)
            torch.testing.assert_close(
                entry.lora_b[i, :, :r], layer.scaling[name] * layer.lora_B[name].weight
            )
            assert not entry.lora_a[i, r:].any() and not entry.lora_b[i, :, r:].any()  # zero padding


def test_pattern_and_rslora_scalings(adapters):
    """The patterns really change rank and alpha per module (so the oracle test above is not vacuous)."""
    bank = LoRABank.from_peft(adapters)
    p = bank.names.index("pattern")
    q0, q1 = bank.modules["model.layers.0.self_attn.q_proj"], bank.modules["model.layers.1.self_attn.q_proj"]
    k0, up = bank.modules["model.layers.0.self_attn.k_proj"], bank.modules["model.layers.0.mlp.up_proj"]
    for entry, rank, scaling in ((q0, 4, 3 / 4), (q1, 6, 4 / 6), (k0, 2, 4 / 2), (up, 4, 12 / 4)):
        assert entry.ranks[p] == rank and float(entry.scaling[p]) == pytest.approx(scaling)
    s = bank.names.index("rslora")
    assert float(q0.scaling[s]) == pytest.approx(4 / 8**0.5)
    assert "model.layers.0.mlp.down_proj" in bank.modules and bank.modules[
        "model.layers.0.mlp.down_proj"
    ].ranks == (4, 0, 0)


def test_list_of_dirs_dtype_to_summary(adapters):
    bank = LoRABank.from_peft(list(adapters.values()), dtype=torch.float64)
    assert bank.names == [p.name for p in adapters.values()]
    assert bank.dtype == torch.float64
    half = bank.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and bank.dtype == torch.float64
    same = bank.to(torch.float64)
    entry = next(iter(bank.modules))
    assert same.modules[entry].lora_a is bank.modules[entry].lora_a  # no copy when nothing changes
    assert bank.nbytes == sum(e.lora_a.numel() + e.lora_b.numel() for e in bank.modules.values()) * 8
    assert half.nbytes * 4 == bank.nbytes
    text = bank.summary()
    for name in bank.names:
        assert name in text
    assert "self_attn.q_proj: layers 0-1" in text and "MiB" in text
    assert "model.layers.1.self_attn.q_proj" not in text  # one line per module kind, not per module
    assert "model.layers.1.self_attn.q_proj" in bank.summary(verbose=True)


def test_summary_per_module_kind_and_verbose_in_layer_order():
    """A 12-layer bank: kinds with their layer runs; --verbose lists layers.2 before layers.10."""
    layers = [0, 1, 2, 3, 10, 11]
    modules = {f"model.layers.{i}.{kind}": (torch.randn(4, 8), torch.randn(8, 4), 1.0)
               for i in layers for kind in ("self_attn.q_proj", "mlp.down_proj")}
    other = {k: v for k, v in modules.items() if ".mlp." in k and not k.startswith("model.layers.1")}
    bank = LoRABank.from_adapters({"a": modules, "b": other})
    lines = bank.summary().splitlines()
    assert len(lines) == 6, lines  # the header, 2 adapters, the kinds' title, 2 kinds
    assert "mlp.down_proj (layers 0-3, 10-11), self_attn.q_proj (layers 0-3, 10-11)" in lines[1]
    assert "[1] b: 3 modules" in lines[2] and "mlp.down_proj (layers 0, 2-3)" in lines[2]
    assert lines[4].startswith("    mlp.down_proj: layers 0-3, 10-11, 8 -> 8, r_max 4")
    full = bank.summary(verbose=True).splitlines()[6:]
    assert [line.split(":")[0].strip() for line in full[1:]] == sorted(
        modules, key=lambda name: (int(name.split(".")[2]), name))


def _bin_copy(source, directory):
    """The adapter re-saved as an older PEFT checkpoint (adapter_model.bin)."""
    from safetensors.torch import load_file

    directory.mkdir()
    (directory / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    torch.save(load_file(str(source / "adapter_model.safetensors")), directory / "adapter_model.bin")
    return directory


def test_bin_checkpoint(llama, adapters, tmp_path):
    """Older PEFT checkpoints (adapter_model.bin) load to the same bank."""
    directory = _bin_copy(adapters["plain"], tmp_path / "bin")
    a, b = LoRABank.from_peft({"x": adapters["plain"]}), LoRABank.from_peft({"x": directory})
    for name, entry in a.modules.items():
        assert torch.equal(entry.lora_b, b.modules[name].lora_b)


def test_weights_outside_target_modules_are_ignored(adapters, tmp_path):
    directory = tmp_path / "narrowed"
    directory.mkdir()
    config = json.loads((adapters["plain"] / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(
        (adapters["plain"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.warns(UserWarning, match="not selected by its target_modules"):
        bank = LoRABank.from_peft([directory])
    assert sorted(bank.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def _with_config(source, tmp_path, **changes):
    directory = tmp_path / "edited"
    directory.mkdir(exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    return directory


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"init_lora_weights": "olora"}, "rewrites the base weights"),
        ({"alora_invocation_tokens": [5]}, "variant"),
        ({"r": 16}, "config gives rank 16"),
        ({"peft_type": "IA3"}, "only LoRA"),
    ],
)
def test_refused_configs(adapters, tmp_path, changes, match):
    directory = _with_config(adapters["plain"], tmp_path, **changes)
    with pytest.raises(AdapterLoadError, match=match) as info:
        LoRABank.from_peft({"bad_one": directory})
    assert "bad_one" in str(info.value)


def test_refuses_dora_and_modules_to_save(llama, tmp_path):
    dora = make_adapter(llama, tmp_path / "dora", seed=4, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(AdapterLoadError, match="use_dora"):
        LoRABank.from_peft([dora])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = make_adapter(
            llama, tmp_path / "mts", seed=5, target_modules=["q_proj"], modules_to_save=["lm_head"]
        )
    with pytest.raises(AdapterLoadError, match="modules_to_save") as info:
        LoRABank.from_peft([saved])
    assert "lm_head" in str(info.value)


def test_bad_arguments(adapters, tmp_path):
    with pytest.raises(TypeError, match="single path"):
        LoRABank.from_peft(str(adapters["plain"]))
    with pytest.raises(ValueError, match="unique"):
        LoRABank.from_peft([adapters["plain"], adapters["plain"]])
    with pytest.raises(ValueError, match="empty"):
        LoRABank.from_peft({})
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        LoRABank.from_peft({"ghost": tmp_path / "nowhere"})
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "adapter_config.json").write_text((adapters["plain"] / "adapter_config.json").read_text())
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
        LoRABank.from_peft([empty])


def test_from_adapters_checks_shapes():
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="disagree"):
        LoRABank.from_adapters({"x": {"m": (a, b, 1.0)}, "y": {"m": (torch.randn(2, 9), b, 1.0)}})
    with pytest.raises(ValueError, match=r"\[r, d_in\]"):
        LoRABank.from_adapters({"x": {"m": (a, torch.randn(6, 3), 1.0)}})
    bank = LoRABank.from_adapters(
        {"x": {"m": (a, b, 0.5)}, "y": {"m": (torch.randn(4, 8), torch.randn(6, 4), 2.0)}}
    )
    entry = bank.modules["m"]
    assert entry.ranks == (2, 4) and entry.rank == 4
    torch.testing.assert_close(entry.lora_b[0, :, :2], 0.5 * b)


# ---- damaged files and bad values: AdapterLoadError naming the adapter and the file ----------------


def _copy_adapter(source, directory):
    directory.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (directory / name).write_bytes((source / name).read_bytes())
    return directory


def _rewrite_tensors(directory, edit):
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage, file_name, match", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:300]), "adapter_model.safetensors", "not readable"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2, 3]"), "adapter_config.json", "JSON object"),
    (lambda d: (d / "adapter_config.json").write_text("{\"r\": 4,"), "adapter_config.json", "not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "adapter_config.json", "UTF-8"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "four"}'),
     "adapter_config.json", "r"),
    (lambda d: _rewrite_tensors(d, lambda t: (t * 100).to(torch.int32)), "adapter_model.safetensors",
     "floating"),
    (lambda d: _rewrite_tensors(d, lambda t: t.index_fill(1, torch.tensor([0]), float("inf"))),
     "adapter_model.safetensors", "non-finite"),
])
def test_damaged_adapter_files(adapters, tmp_path, damage, file_name, match):
    directory = _copy_adapter(adapters["plain"], tmp_path / "damaged")
    damage(directory)
    with pytest.raises(AdapterLoadError, match=match) as info:
        LoRABank.from_peft({"bad_one": directory})
    assert "bad_one" in str(info.value) and file_name in str(info.value)


def test_truncated_bin_checkpoint(adapters, tmp_path):
    directory = _bin_copy(adapters["plain"], tmp_path / "bin")
    (directory / "adapter_model.bin").write_bytes((directory / "adapter_model.bin").read_bytes()[:200])
    with pytest.raises(AdapterLoadError, match="adapter_model.bin") as info:
        LoRABank.from_peft({"bad_one": directory})
    assert "bad_one" in str(info.value)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_scaling_is_refused(adapters, tmp_path, alpha):
    directory = _with_config(adapters["plain"], tmp_path, lora_alpha=alpha)
    with pytest.raises(AdapterLoadError, match="lora_alpha") as info:
        LoRABank.from_peft({"bad_one": directory})
    assert "bad_one" in str(info.value) and "adapter_config.json" in str(info.value)
    pattern = _with_config(adapters["plain"], tmp_path, alpha_pattern={"q_proj": alpha})
    with pytest.raises(AdapterLoadError, match="q_proj"):
        LoRABank.from_peft({"bad_one": pattern})


def test_from_adapters_checks_values():
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="'x'.*'m'.*floating"):
        LoRABank.from_adapters({"x": {"m": (a.to(torch.int64), b, 1.0)}})
    with pytest.raises(ValueError, match="'x'.*'m'.*scaling"):
        LoRABank.from_adapters({"x": {"m": (a, b, float("nan"))}})
    with pytest.raises(ValueError, match="'x'.*'m'.*lora_B.*non-finite"):
        LoRABank.from_adapters({"x": {"m": (a, b.index_fill(0, torch.tensor([1]), float("nan")), 1.0)}})
