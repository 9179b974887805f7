"""The MeteoRA-style token-gating baselines (dlp_lora.bench.baselines) are right, so the benchmark is fair.

* the gate: top-k of x @ G.T and softmax(top / T), against a float64 recomputation;
* forms 1 (loop), 2 (gather + bmm) and 3 (our op, one-token segments) against a float64 dense
  formula  delta[t] = (sum_k w[t,k] s[i] B[i] A[i]) x[t]  and against each other;
* the patched Linear and a patched tiny Llama: same output for every form, errors leave the
  model untouched, unpatching restores it bit for bit.

Tolerances: fp32 inputs against float64 references, relative to the reference's scale,
rtol 1e-5 / atol 1e-5 * max|ref| (sums of a few hundred fp32 products).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlp_lora import ops
from dlp_lora.bench.baselines import (
    FORMS,
    LoRAStack,
    TokenGatedLoRALinear,
    apply_segmented_op,
    gate_top_k,
    patch_token_gating,
    stacks_from_bank,
    unpatch_token_gating,
)

CPU_BACKENDS = [b for b in ops.available_backends("cpu") if b in ("reference", "cpp")]


def random_stack(n, r, d_in, d_out, dtype=torch.float32) -> LoRAStack:
    return LoRAStack(torch.randn(n, r, d_in, dtype=dtype) / d_in**0.5,
                     torch.randn(n, d_out, r, dtype=dtype) / r**0.5,
                     torch.rand(n) * 2 + 0.5)


def gate_reference(x, gate_weight, top_k, temperature):
    """float64: sort the logits, keep top_k, softmax(top / T)."""
    logits = x.double() @ gate_weight.double().T
    order = torch.argsort(logits, dim=-1, descending=True)[:, :min(top_k, gate_weight.shape[0])]
    top = torch.gather(logits, 1, order)
    return order, torch.softmax(top / temperature, dim=-1)


def dense_delta(x, stack, lora_ids, weights):
    """float64 dense formula: one [d_out, d_in] matrix per token, sum_k w s B A, times x[t]."""
    coeff = weights.double() * stack.scaling.double()[lora_ids]                      # [T, k]
    per_token = torch.einsum("tk,tkor,tkri->toi", coeff, stack.lora_b.double()[lora_ids],
                             stack.lora_a.double()[lora_ids])                         # [T, d_out, d_in]
    return torch.einsum("toi,ti->to", per_token, x.double())


def assert_close_to(actual, expected):
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def run_form(form, backend, y, x, stack, lora_ids, weights):
    if form == "op":
        apply_segmented_op(y, x, stack, lora_ids, weights, backend=backend)
    else:
        FORMS[form](y, x, stack, lora_ids, weights)


FORM_CASES = [("loop", None), ("bmm", None)] + [("op", b) for b in CPU_BACKENDS]


# ------------------------------------------------------------------------------ the gate

@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("top_k,n", [(2, 26), (2, 100), (1, 8), (3, 5), (2, 1)])
def test_gate_top_k_matches_float64(top_k, n, temperature):
    x, gate = torch.randn(37, 48), torch.randn(n, 48)
    ids, weights = gate_top_k(x, gate, top_k=top_k, temperature=temperature)
    ref_ids, ref_weights = gate_reference(x, gate, top_k, temperature)
    assert ids.shape == (37, min(top_k, n)) and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(37))


def test_gate_temperature_sharpens_weights():
    x, gate = torch.randn(64, 32), torch.randn(10, 32)
    _, w_hot = gate_top_k(x, gate, temperature=5.0)
    _, w_cold = gate_top_k(x, gate, temperature=0.2)
    # the larger logit always gets the larger weight; a lower temperature makes it larger still
    assert (w_cold[:, 0] >= w_hot[:, 0]).all() and (w_hot[:, 0] >= 0.5).all()


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_gate_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        gate_top_k(torch.randn(3, 4), torch.randn(5, 4), temperature=temperature)


# ------------------------------------------------------------------------------ the three forms

@pytest.mark.parametrize("form,backend", FORM_CASES)
@pytest.mark.parametrize("T,n,r,d_in,d_out", [(1, 26, 8, 72, 200), (7, 3, 4, 64, 48), (33, 100, 8, 40, 72),
                                               (16, 1, 16, 24, 24)])
def test_form_matches_dense_float64(form, backend, T, n, r, d_in, d_out):
    stack = random_stack(n, r, d_in, d_out)
    x = torch.randn(T, d_in)
    ids, weights = gate_top_k(x, torch.randn(n, d_in))
    y0 = torch.randn(T, d_out)
    y = y0.clone()
    run_form(form, backend, y, x, stack, ids, weights)
    assert_close_to(y.double() - y0.double(), dense_delta(x, stack, ids, weights))


@pytest.mark.parametrize("form,backend", FORM_CASES)
def test_form_handles_repeated_and_shared_ids(form, backend):
    """Every token on one adapter pair, and a token whose two slots hold the same adapter."""
    stack = random_stack(5, 8, 32, 24)
    x = torch.randn(9, 32)
    ids = torch.tensor([[3, 1]] * 8 + [[2, 2]])
    weights = torch.rand(9, 2)
    y0 = torch.randn(9, 24)
    y = y0.clone()
    run_form(form, backend, y, x, stack, ids, weights)
    assert_close_to(y.double() - y0.double(), dense_delta(x, stack, ids, weights))


def test_forms_agree_with_each_other():
    stack = random_stack(26, 8, 64, 96)
    x = torch.randn(20, 64)
    ids, weights = gate_top_k(x, torch.randn(26, 64), temperature=0.7)
    y0 = torch.randn(20, 96)
    outs = []
    for form, backend in FORM_CASES:
        y = y0.clone()
        run_form(form, backend, y, x, stack, ids, weights)
        outs.append(y)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ patched Linear / model

@pytest.mark.parametrize("form", sorted(FORMS))
def test_token_gated_linear_matches_reference(form):
    base = nn.Linear(40, 56, bias=True)
    stack = random_stack(12, 4, 40, 56)
    module = TokenGatedLoRALinear(base, stack, form=form, temperature=0.8,
                                  generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        out = module(x)
        flat = x.reshape(-1, 40)
        ids, weights = gate_reference(flat, module.gate.weight, 2, 0.8)
        expected = base(flat).double() + dense_delta(flat, stack, ids, weights)
    assert out.shape == (2, 5, 56)
    assert_close_to(out.reshape(-1, 56).double(), expected)


def test_token_gated_linear_rejects_bad_arguments():
    base = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="form"):
        TokenGatedLoRALinear(base, random_stack(3, 2, 16, 8), form="fused")
    with pytest.raises(ValueError, match="stack"):
        TokenGatedLoRALinear(base, random_stack(3, 2, 8, 16))
    with pytest.raises(ValueError, match="temperature"):
        TokenGatedLoRALinear(base, random_stack(3, 2, 16, 8), temperature=0)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_stacks(model, n=6, r=4):
    return {name: random_stack(n, r, m.in_features, m.out_features)
            for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS}


def test_patched_model_forms_agree_and_unpatch_restores(tiny_llama):
    torch.manual_seed(1)
    stacks = tiny_stacks(tiny_llama)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = tiny_llama(ids).logits
        logits = {}
        for form in sorted(FORMS):
            patch_token_gating(tiny_llama, stacks, form=form, temperature=0.5, seed=7)
            try:
                assert sum(isinstance(m, TokenGatedLoRALinear) for m in tiny_llama.modules()) == len(stacks)
                logits[form] = tiny_llama(ids).logits
            finally:
                unpatch_token_gating(tiny_llama)
            assert torch.equal(tiny_llama(ids).logits, before)
    assert not torch.allclose(logits["op"], before, atol=1e-3)  # the adapters do change the output
    for form in ("loop", "bmm"):
        torch.testing.assert_close(logits[form], logits["op"], rtol=1e-4, atol=1e-5)


def test_patch_errors_leave_model_untouched(tiny_llama):
    stacks = tiny_stacks(tiny_llama)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    modules_before = [type(m) for m in tiny_llama.modules()]
    bad_name = dict(stacks, **{"model.layers.0.mlp.nonexistent": next(iter(stacks.values()))})
    with pytest.raises(ValueError, match="nonexistent"):
        patch_token_gating(tiny_llama, bad_name)
    bad_shape = dict(stacks)
    bad_shape["model.layers.1.mlp.down_proj"] = random_stack(6, 4, 32, 48)  # transposed shapes
    with pytest.raises(ValueError, match="stack"):
        patch_token_gating(tiny_llama, bad_shape)
    assert [type(m) for m in tiny_llama.modules()] == modules_before
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_token_gating(tiny_llama)
    patch_token_gating(tiny_llama, stacks)
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            patch_token_gating(tiny_llama, stacks)
    finally:
        unpatch_token_gating(tiny_llama)


def test_stacks_from_bank_share_tensors_and_match_bank(tiny_llama):
    """A LoRABank folds scaling into lora_b: its stacks apply scaling 1 and add the same delta."""
    from dlp_lora.bank import LoRABank

    torch.manual_seed(2)
    adapters = {f"t{i}": {name: (torch.randn(4, m.in_features), torch.randn(m.out_features, 4), 0.5 + i)
                          for name, m in tiny_llama.named_modules() if name.endswith(("q_proj", "down_proj"))}
                for i in range(3)}
    bank = LoRABank.from_adapters(adapters)
    stacks = stacks_from_bank(bank)
    assert set(stacks) == set(bank.modules)
    name = "model.layers.1.mlp.down_proj"
    assert stacks[name].lora_a is bank.modules[name].lora_a
    assert stacks[name].lora_b is bank.modules[name].lora_b
    x = torch.randn(5, 48)
    ids, weights = torch.tensor([[2, 0]] * 5), torch.full((5, 2), 0.5)
    expected = sum(0.5 * (0.5 + i) * x.double() @ adapters[f"t{i}"][name][0].double().T
                   @ adapters[f"t{i}"][name][1].double().T for i in (2, 0))
    y = torch.zeros(5, 32)
    FORMS["bmm"](y, x, stacks[name], ids, weights)
    assert_close_to(y, expected)
