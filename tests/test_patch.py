"""patch_model / use_mixture / unpatch_model against PEFT and the base model (fp32, tiny models).

Exactness against PEFT and the base model, plus every bad input (the model must be left exactly as
it was). A trained router and sentence re-routing are tested in test_generation.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_fixtures import (
    ARCHS,
    assert_same_snapshot,
    default_backend,
    left_pad,
    make_adapter,
    model_snapshot,
    peft_oracle,
    targets,
    tiny_model,
)

from dlp_lora import LoRABank, patch_model, unpatch_model, use_mixture
from dlp_lora.patch import PatchError

BACKEND = default_backend()
ATOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tmp_path_factory):
    """(arch, base model, adapters): a plain one, one with rank/alpha patterns and a regex, one rslora."""
    arch = request.param
    base = tiny_model(arch, seed=1)
    root = tmp_path_factory.mktemp(f"adapters_{arch}")
    t = targets(arch)
    adapters = {
        "plain": make_adapter(base, root / "plain", seed=11, r=4, lora_alpha=8, target_modules=t),
        "pattern": make_adapter(
            base,
            root / "pattern",
            seed=12,
            r=4,
            lora_alpha=6,
            target_modules=rf".*\.({'|'.join(t[:3])})",
            rank_pattern={t[0]: 6, t[1]: 2},
            alpha_pattern={t[2]: 20, ("h.1.attn." if arch == "gpt2" else "layers.1.self_attn.") + t[0]: 3},
        ),
        "rslora": make_adapter(
            base, root / "rslora", seed=13, r=8, lora_alpha=5, use_rslora=True, target_modules=t[1:]
        ),
    }
    return arch, base, adapters


def _patched(base, adapters):
    """A patched copy of ``base`` (the fixture's model stays unpatched)."""
    return patch_model(copy.deepcopy(base), LoRABank.from_peft(adapters), backend=BACKEND)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, mask=None):
    """Forward logits; with a mask, positions count real tokens only (as generate() does)."""
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def test_single_adapter_matches_peft(arch_case):
    """1. Forcing one adapter gives PeftModel's logits with that adapter active."""
    arch, base, adapters = arch_case
    ids = _ids(2, 9, seed=0)
    oracle = peft_oracle(base, adapters)
    model = _patched(base, adapters)
    base_logits = _logits(base, ids)
    for name in adapters:
        oracle.set_adapter(name)
        expected = _logits(oracle, ids)
        with use_mixture(model, [{name: 1.0}, {name: 1.0}]):
            got = _logits(model, ids)
        assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the output
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_mixture_matches_peft_cat(arch_case):
    """2. {a: 0.7, b: 0.3} equals PEFT add_weighted_adapter(combination_type="cat")."""
    arch, base, adapters = arch_case
    ids = _ids(1, 7, seed=1)
    oracle = peft_oracle(base, adapters)
    oracle.add_weighted_adapter(["plain", "rslora"], [0.7, 0.3], "mix", combination_type="cat")
    oracle.set_adapter("mix")
    expected = _logits(oracle, ids)
    model = _patched(base, adapters)
    with use_mixture(model, {"plain": 0.7, "rslora": 0.3}):
        got = _logits(model, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_empty_entry_is_exactly_base(arch_case):
    """{} (no adapter) is the base model, bit for bit, alone and next to a sequence that has adapters."""
    arch, base, adapters = arch_case
    ids = _ids(2, 6, seed=2)
    base_logits = _logits(base, ids)
    model = _patched(base, adapters)
    with use_mixture(model, [{}, {}]):
        assert torch.equal(_logits(model, ids), base_logits)
    with use_mixture(model, [{}, {"plain": 1.0}]):
        got = _logits(model, ids)
    assert torch.equal(got[0], base_logits[0])
    assert not torch.allclose(got[1], base_logits[1])


def test_zero_weights_are_dropped(arch_case):
    """3. A zero weight adds nothing: {plain: 1, rslora: 0} is {plain: 1} bit for bit. A mixture of zero
    weights only is the base model, not a mixture: refused (the rule of dlp_lora/mixture.py)."""
    arch, base, adapters = arch_case
    ids = _ids(2, 6, seed=2)
    model = _patched(base, adapters)
    with use_mixture(model, {"plain": 1.0}):
        expected = _logits(model, ids)
    with use_mixture(model, {"plain": 1.0, "rslora": 0}) as log:
        got = _logits(model, ids)
        assert {r.adapters for r in log} == {("plain",)}
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"mixtures\[0\] has only zero weights"):
        with use_mixture(model, [{"plain": 0.0, "rslora": 0}, {"plain": 1.0}]):
            pass


def test_unpatch_is_bit_identical(arch_case):
    """6. After unpatch_model: same classes, state_dict, buffers, hooks, repr and bit-identical outputs."""
    arch, base, adapters = arch_case
    model = copy.deepcopy(base)
    ids = _ids(2, 6, seed=3)
    before_logits, before = _logits(model, ids), model_snapshot(model)
    patch_model(model, LoRABank.from_peft(adapters), backend=BACKEND)
    assert model.state_dict().keys() == before["state"].keys()  # patching never changes state_dict
    text = repr(model)
    assert ("DLPLoRALinear" if arch != "gpt2" else "DLPLoRAConv1D") in text and "dlp_lora=(loras=3" in text
    with use_mixture(model, {"pattern": 1.0}):
        assert not torch.allclose(_logits(model, ids), before_logits)
    unpatch_model(model)
    assert_same_snapshot(before, model_snapshot(model))
    assert torch.equal(_logits(model, ids), before_logits)
    assert not hasattr(model, "dlp_routing_log")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_with_left_padding_equals_each_alone(arch, tmp_path):
    """4. Three sequences, three mixtures, left padding: generate() and logits match each sequence alone."""
    base = tiny_model(arch, seed=2)
    adapters = {
        n: make_adapter(base, tmp_path / n, seed=20 + i, target_modules=targets(arch))
        for i, n in enumerate(("a", "b", "c"))
    }
    model = patch_model(base, LoRABank.from_peft(adapters), backend=BACKEND)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    mixtures = [{"a": 1.0}, {"b": 0.4, "c": 0.6}, {"a": 0.5, "c": -0.25}]
    ids, mask = left_pad(prompts)

    def generate(input_ids, attention_mask):
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)

    with use_mixture(model, mixtures):
        batch_tokens, batch_logits = generate(ids, mask)
        batch_forward = _logits(model, ids, mask)
    for b, (prompt, mixture) in enumerate(zip(prompts, mixtures, strict=True)):
        alone = torch.tensor([prompt])
        with use_mixture(model, [mixture]):
            tokens, logits = generate(alone, torch.ones_like(alone))
            forward = _logits(model, alone)
        assert torch.equal(batch_tokens[b], tokens[0])
        torch.testing.assert_close(batch_logits[b], logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            batch_forward[b, ids.shape[1] - len(prompt) :], forward[0], atol=ATOL, rtol=0
        )


def test_lm_head_adapter_with_logits_to_keep(tmp_path):
    """An adapter on lm_head: generate() (logits_to_keep=1, one row per sequence) still matches PEFT."""
    base = tiny_model("llama", seed=3)
    adapter = make_adapter(base, tmp_path / "head", seed=30, target_modules=["q_proj", "lm_head"])
    oracle = peft_oracle(base, {"head": adapter})
    with pytest.warns(UserWarning, match=r"base-layer weights of \['lm_head'\]"):  # PEFT saves a copy
        bank = LoRABank.from_peft({"head": adapter})
    model = patch_model(copy.deepcopy(base), bank, backend=BACKEND)
    ids = _ids(2, 6, seed=5)
    kwargs = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        expected = oracle.generate(input_ids=ids, **kwargs)
        with use_mixture(model, {"head": 1.0}):
            got = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=ATOL, rtol=0)


def test_grad_mode_and_dtype_follow_model(arch_case):
    """A forward with autograd on gives the no_grad result; model.double() after patching still works."""
    arch, base, adapters = arch_case
    model = _patched(base, adapters)
    ids = _ids(1, 5, seed=6)
    with use_mixture(model, {"plain": 1.0}):
        expected = _logits(model, ids)
        with torch.enable_grad():
            got = model(input_ids=ids).logits
        assert got.requires_grad
        torch.testing.assert_close(got.detach(), expected, atol=0, rtol=0)
        model.double()
        assert (
            model.get_submodule(next(iter(model._dlp_lora_patch.module_names))).dlp_lora_a.dtype
            == torch.float64
        )
        torch.testing.assert_close(_logits(model, ids).float(), expected, atol=ATOL, rtol=0)


def test_use_mixture_nesting_and_errors(arch_case):
    arch, base, adapters = arch_case
    model = _patched(base, adapters)
    ids = _ids(2, 5, seed=7)
    with use_mixture(model, {"plain": 1.0}):
        outer = _logits(model, ids)
        with pytest.raises(
            ValueError, match=r"unknown adapter\(s\) \['nope'\].*\['plain', 'pattern', 'rslora'\]"
        ):
            with use_mixture(model, [{"plain": 1.0}, {"nope": 1.0}]):
                pass
        with use_mixture(model, {"rslora": 1.0}):
            assert not torch.equal(_logits(model, ids), outer)
        assert torch.equal(_logits(model, ids), outer)  # the outer mixture is back
        with (
            use_mixture(model, [{"plain": 1.0}] * 3),
            pytest.raises(ValueError, match="3 mixtures but the batch has 2"),
        ):
            _logits(model, ids)
        for bad in ([{"plain": float("nan")}], [{"plain": "1"}], [], "plain", [["plain"]]):
            with pytest.raises(ValueError, match="use_mixture"), use_mixture(model, bad):
                pass
    with pytest.raises(RuntimeError, match="without a router"):  # no router and no mixture
        _logits(model, ids)
    with pytest.raises(PatchError, match="not patched"), use_mixture(base, {"plain": 1.0}):
        pass


def test_empty_prompt_is_refused(arch_case):
    arch, base, adapters = arch_case
    model = _patched(base, adapters)
    with use_mixture(model, {"plain": 1.0}):
        with pytest.raises(ValueError, match="empty prompt"):
            _logits(model, torch.zeros(1, 0, dtype=torch.long))
        ids, mask = torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]])
        with pytest.raises(ValueError, match=r"empty prompt: sequence\(s\) \[1\]"):
            _logits(model, ids, mask)


# --- bad input at patch time: a clear error and the model exactly as it was ---------------------


class _LabelsOnly:
    """Router stand-in for patch-time validation (its route() is never reached)."""

    tokenizer = None

    def __init__(self, label_names):
        self.label_names = label_names

    def route(self, input_ids, attention_mask=None, *, top_p=0.6, max_loras=None):
        raise AssertionError("not reached")


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    base = tiny_model("llama", seed=4)
    root = tmp_path_factory.mktemp("bad_input")
    adapters = {"a": make_adapter(base, root / "a", seed=40), "b": make_adapter(base, root / "b", seed=41)}
    wide = make_adapter(tiny_model("llama", seed=5, hidden=64), root / "wide", seed=42)
    gpt2 = make_adapter(tiny_model("gpt2", seed=6), root / "gpt2", seed=43)
    return base, adapters, wide, gpt2


def _refused(model, call, exc, match):
    ids = _ids(1, 5, seed=8)
    before, before_logits = model_snapshot(model), _logits(model, ids)
    with pytest.raises(exc, match=match):
        call()
    assert_same_snapshot(before, model_snapshot(model))
    assert torch.equal(_logits(model, ids), before_logits)


def test_bad_patch_inputs_leave_model_unchanged(llama_case):
    base, adapters, wide, gpt2 = llama_case
    model = copy.deepcopy(base)
    bank = LoRABank.from_peft(adapters)
    _refused(
        model,
        lambda: patch_model(model, LoRABank.from_peft({"wide": wide})),
        PatchError,
        r"shapes do not fit.*model 64 -> 32, adapters 128 -> 64; adapters \['wide'\]",
    )
    _refused(
        model,
        lambda: patch_model(model, LoRABank.from_peft({"a": adapters["a"], "g": gpt2})),
        PatchError,
        r"no module named transformer\.h\.0\.attn\.c_attn.*adapters \['g'\]",
    )
    _refused(
        model,
        lambda: patch_model(model, bank, _LabelsOnly(["a", "c"])),
        PatchError,
        r"router does not fit the bank: its labels \['a', 'c'\] do not match the adapters \['a', 'b'\]",
    )
    for top_p in (0, 0.0, -0.1, 1.5, float("nan"), "0.5", True):
        _refused(model, lambda top_p=top_p: patch_model(model, bank, top_p=top_p), ValueError, "top_p")
    for max_loras in (0, -1, 1.5, True):
        _refused(model, lambda m=max_loras: patch_model(model, bank, max_loras=m), ValueError, "max_loras")
    _refused(model, lambda: patch_model(model, bank, reroute="token"), PatchError, "reroute")
    _refused(
        model,
        lambda: patch_model(model, bank, _LabelsOnly(["b", "a"]), reroute="sentence"),
        PatchError,
        "needs a tokenizer",
    )
    _refused(model, lambda: patch_model(model, bank, backend="cuda"), RuntimeError, "not usable")
    # patching twice: the second call fails and the model stays patched once, still working
    patch_model(model, bank, backend=BACKEND)
    with use_mixture(model, {"a": 1.0}):
        _refused(model, lambda: patch_model(model, bank), PatchError, "already patched")
    unpatch_model(model)
    with pytest.raises(PatchError, match="not patched"):
        unpatch_model(model)


def test_call_styles(llama_case):
    """Positional input_ids, inputs_embeds with use_mixture, a dict of directories as `loras`."""
    base, adapters, _, _ = llama_case
    model = patch_model(copy.deepcopy(base), adapters, backend=BACKEND)  # LoRABank.from_peft inside
    ids = _ids(2, 5, seed=9)
    with use_mixture(model, {"b": 1.0}):
        expected = _logits(model, ids)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
            embeds = model.get_input_embeddings()(ids)
            torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, atol=0, rtol=0)
    unpatch_model(model)
    model = patch_model(model, adapters, _LabelsOnly(["b", "a"]), reroute="prompt", backend=BACKEND)
    with pytest.raises(ValueError, match="inputs_embeds alone cannot be routed"), torch.no_grad():
        model(inputs_embeds=embeds)


def test_deepcopy_of_a_patched_model(llama_case):
    """copy.deepcopy copies a consistent patch: the copy routes itself and unpatches on its own."""
    base, adapters, _, _ = llama_case
    model = patch_model(copy.deepcopy(base), adapters, backend=BACKEND)
    twin = copy.deepcopy(model)
    ids = _ids(2, 5, seed=10)
    with use_mixture(model, [{"a": 1.0}, {"b": 1.0}]):
        expected = _logits(model, ids)
    with use_mixture(twin, [{"a": 1.0}, {"b": 1.0}]):
        assert torch.equal(_logits(twin, ids), expected)
        with use_mixture(model, {"b": -1.0}):  # the original's routing does not leak into the copy
            assert torch.equal(_logits(twin, ids), expected)
    unpatch_model(twin)
    assert torch.equal(_logits(twin, ids), _logits(base, ids))
    with use_mixture(model, [{"a": 1.0}, {"b": 1.0}]):
        assert torch.equal(_logits(model, ids), expected)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_every_cpu_backend_gives_the_same_model(llama_case, backend):
    """The patched model through each usable backend matches the reference backend (batch, 2 mixtures)."""
    from dlp_lora.ops import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not usable on this CPU")
    base, adapters, _, _ = llama_case
    ids, mask = left_pad([_ids(1, 6, seed=11)[0].tolist(), _ids(1, 3, seed=12)[0].tolist()])
    mixtures = [{"a": 0.7, "b": 0.3}, {"b": 1.0}]
    results = {}
    for name in ("reference", backend):
        model = patch_model(copy.deepcopy(base), adapters, backend=name)
        with use_mixture(model, mixtures):
            results[name] = _logits(model, ids, mask)
    torch.testing.assert_close(results[backend], results["reference"], atol=ATOL, rtol=0)


def test_modules_no_adapter_of_the_step_targets_skip_the_op(llama_case, tmp_path, monkeypatch):
    """A q,v-only mixture calls the op on q_proj and v_proj only, and still equals PEFT; a mixture with a
    7-projection adapter calls it everywhere. Tolerances relative to the logits' scale in float32, and
    against PEFT in float64 (where rounding cannot hide a missing delta)."""
    import dlp_lora.patch as patch_module

    base, adapters = llama_case[0], dict(llama_case[1])
    adapters["qv"] = make_adapter(base, tmp_path / "qv", seed=21, r=8, lora_alpha=16,
                                  target_modules=["q_proj", "v_proj"])
    called: list[int] = []
    real_op = patch_module.ops.multi_lora
    monkeypatch.setattr(patch_module.ops, "multi_lora",
                        lambda y, *args, **kw: called.append(y.shape[-1]) or real_op(y, *args, **kw))
    model = _patched(base, adapters)
    names = {m: n for n, m in model.named_modules()}
    calls_per_forward, modules = {}, []
    for mixture in ({"qv": 1.0}, {"qv": 0.5, "a": 0.5}):
        called.clear()
        modules.clear()
        hooks = [m.register_forward_hook(lambda mod, i, o: modules.append(names[mod]))
                 for m in model.modules() if hasattr(m, "dlp_lora_adapters")]
        with use_mixture(model, mixture):
            _logits(model, _ids(1, 5, seed=3))
        for h in hooks:
            h.remove()
        calls_per_forward[tuple(mixture)] = len(called)
        assert len(modules) == 14  # every patched module ran (2 layers x 7 projections)
    assert calls_per_forward[("qv",)] == 4  # q_proj and v_proj of 2 layers
    assert calls_per_forward[("qv", "a")] == 14

    ids = _ids(2, 9, seed=4)
    for dtype, rel in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        oracle = peft_oracle(base, {"qv": adapters["qv"]}).to(dtype)
        expected = _logits(oracle, ids)
        patched = patch_model(copy.deepcopy(base).to(dtype), LoRABank.from_peft({"qv": adapters["qv"]}),
                              backend="reference" if dtype == torch.float64 else BACKEND)
        with use_mixture(patched, {"qv": 1.0}):
            got = _logits(patched, ids)
        scale = expected.abs().max().item()
        assert (expected - _logits(copy.deepcopy(base).to(dtype), ids)).abs().max() > 1e-2 * scale
        torch.testing.assert_close(got, expected, atol=rel * scale, rtol=0)
