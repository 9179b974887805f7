"""The LoRA-Flow baseline (dlp_lora.bench.loraflow) computes what the method says, so the comparison is fair.

* the gate: softmax(h W^T / T) + b against a float64 recomputation;
* both forms (loop, op with one-token segments) against the float64 dense formula
  delta[t] = sum_j w[t,j] s[c_j] B[c_j] A[c_j] x[t], on k candidates of N;
* a patched tiny Llama: every adapted module's output against float64, with the weights recomputed
  from the decoder layer's *input* hidden state (output_hidden_states), both forms agree, zero gates
  equal DLP-LoRA's uniform mixture of the same adapters, unpatching restores the model bit for bit;
* gate training lowers the answer loss and touches nothing but the gates; saved gates reload to
  identical outputs; bad arguments leave the model untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_baselines import CPU_BACKENDS, TARGETS, assert_close_to, dense_delta, random_stack, tiny_stacks

from dlp_lora.bench.loraflow import (
    LoRAFlowGate,
    LoRAFlowLinear,
    answer_loss,
    apply_dense_loop,
    apply_loraflow_op,
    load_gates,
    loraflow_gates,
    patch_loraflow,
    save_gates,
    train_gates,
    unpatch_loraflow,
)

FORM_CASES = [("loop", None)] + [("op", b) for b in CPU_BACKENDS]


def gate_reference(h, weight, bias, temperature):
    logits = h.double().reshape(-1, h.shape[-1]) @ weight.double().T
    return torch.softmax(logits / temperature, dim=-1) + bias.double()


def random_gate(hidden, k, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = LoRAFlowGate(hidden, k, temperature=temperature)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(k, hidden, generator=g) / hidden**0.5)
        gate.bias.copy_(torch.randn(k, generator=g) * 0.3)
    return gate


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------ gate and forms

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, 26])
def test_gate_matches_float64(k, temperature):
    gate = random_gate(48, k, temperature)
    h = torch.randn(2, 7, 48) * 3
    w = gate(h)
    assert w.shape == (14, k) and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), gate_reference(h, gate.weight, gate.bias, temperature),
                               rtol=1e-5, atol=1e-6)
    # the bias is added after the softmax: rows sum to 1 + sum(bias), not to 1
    torch.testing.assert_close(w.sum(-1), torch.full((14,), 1 + gate.bias.sum().item()))


def test_gate_starts_uniform_and_rejects_bad_arguments():
    assert torch.equal(LoRAFlowGate(16, 4)(torch.randn(5, 16)), torch.full((5, 4), 0.25))
    assert torch.equal(LoRAFlowGate(16, 2, bias_init=[-0.5, 0.5])(torch.randn(3, 16)),
                       torch.tensor([[0.0, 1.0]] * 3))
    with pytest.raises(ValueError, match="temperature"):
        LoRAFlowGate(16, 2, temperature=0)
    with pytest.raises(ValueError, match="bias_init"):
        LoRAFlowGate(16, 3, bias_init=[0.0, 1.0])


@pytest.mark.parametrize("form,backend", FORM_CASES)
@pytest.mark.parametrize("T,n,candidates,r,d_in,d_out", [
    (1, 26, [0, 1, 2], 8, 72, 200), (9, 26, [5, 17, 2], 4, 64, 48), (6, 5, [0, 1, 2, 3, 4], 8, 40, 72),
    (33, 100, list(range(100)), 8, 24, 40), (4, 3, [2], 16, 24, 24)])
def test_form_matches_dense_float64(form, backend, T, n, candidates, r, d_in, d_out):
    stack = random_stack(n, r, d_in, d_out)
    x = torch.randn(T, d_in)
    weights = torch.randn(T, len(candidates))  # softmax + bias: any sign
    y0 = torch.randn(T, d_out)
    y = y0.clone()
    if form == "op":
        apply_loraflow_op(y, x, stack, torch.tensor(candidates, dtype=torch.int32), weights, backend=backend)
    else:
        apply_dense_loop(y, x, stack, candidates, weights)
    ids = torch.tensor(candidates).expand(T, -1)
    assert_close_to(y.double() - y0.double(), dense_delta(x, stack, ids, weights))


def test_linear_checks_its_arguments():
    base = torch.nn.Linear(16, 8)
    gate = LoRAFlowGate(16, 2)
    with pytest.raises(ValueError, match="stack"):
        LoRAFlowLinear(base, random_stack(3, 2, 8, 16), [0, 1], gate)
    with pytest.raises(ValueError, match="candidates"):
        LoRAFlowLinear(base, random_stack(3, 2, 16, 8), [0, 3], gate)
    with pytest.raises(ValueError, match="2 LoRAs"):
        LoRAFlowLinear(base, random_stack(3, 2, 16, 8), [0, 1, 2], gate)
    with pytest.raises(ValueError, match="form"):
        LoRAFlowLinear(base, random_stack(3, 2, 16, 8), [0, 1], gate, form="bmm")
    module = LoRAFlowLinear(base, random_stack(3, 2, 16, 8), [0, 1], gate)
    with pytest.raises(RuntimeError, match="pre-hook"):
        module(torch.randn(2, 16))


# ------------------------------------------------------------------------------ patched model

def _randomise_bias(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in loraflow_gates(model).values():
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.3)


@pytest.mark.parametrize("form,backend", FORM_CASES)
def test_patched_model_matches_float64_per_module(tiny_llama, form, backend):
    """Each adapted module's output = base + sum_j w s B A x, with w from its layer's input hidden state."""
    torch.manual_seed(3)
    stacks = tiny_stacks(tiny_llama, n=6)
    candidates = [4, 1, 5]
    model = patch_loraflow(copy.deepcopy(tiny_llama), stacks, candidates=candidates, form=form,
                           backend=backend, init="normal", temperature=0.7, seed=5)
    _randomise_bias(model, 6)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
             for name, m in model.named_modules() if isinstance(m, LoRAFlowLinear)]
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert len(seen) == len(stacks) == 7 * 2
    gates = loraflow_gates(model)
    for name, (x, y) in seen.items():
        layer = int(name.split(".")[2])
        # hidden_states[i] is decoder layer i's input, before its input layernorm
        w = gate_reference(out.hidden_states[layer], gates[layer].weight, gates[layer].bias, 0.7)
        flat = x.reshape(-1, x.shape[-1])
        module = model.get_submodule(name)
        expected = flat.double() @ module.base.weight.double().T
        expected += dense_delta(flat, stacks[name], torch.tensor(candidates).expand(flat.shape[0], -1), w)
        assert_close_to(y.reshape(flat.shape[0], -1).double(), expected)


def test_forms_agree_and_unpatch_restores(tiny_llama):
    torch.manual_seed(4)
    stacks = tiny_stacks(tiny_llama, n=26)
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        before = tiny_llama(ids).logits
        logits = {}
        for form, backend in FORM_CASES:
            patch_loraflow(tiny_llama, stacks, form=form, backend=backend, init="normal", seed=1)
            try:
                assert sum(isinstance(m, LoRAFlowLinear) for m in tiny_llama.modules()) == len(stacks)
                assert len(loraflow_gates(tiny_llama)) == 2
                logits[(form, backend)] = tiny_llama(ids).logits
            finally:
                unpatch_loraflow(tiny_llama)
            assert torch.equal(tiny_llama(ids).logits, before)
            assert not any("lora_flow_gate" in k for k in tiny_llama.state_dict())
    reference = logits[("loop", None)]
    assert not torch.allclose(reference, before, atol=1e-3)  # the adapters do change the output
    for other in logits.values():
        torch.testing.assert_close(other, reference, rtol=1e-4, atol=1e-5)


def test_two_threads_each_read_their_own_gate_weights(tiny_llama):
    """The gate weights are kept per thread: two callers of one patched model, run at once, get what
    each gets alone (a shared slot would hand one caller the other's [T, k] weights)."""
    import threading

    model = patch_loraflow(copy.deepcopy(tiny_llama), tiny_stacks(tiny_llama), init="normal", seed=2)
    inputs = [torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 5))]
    with torch.no_grad():
        alone = [model(ids).logits for ids in inputs]
    barrier, results, errors = threading.Barrier(2), [[], []], []

    def caller(i):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(20):
                    results[i].append(model(inputs[i]).logits)
        except Exception as e:  # reported below: an exception in a thread would otherwise pass
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not torch.allclose(alone[0], alone[1])
    for i in range(2):
        assert len(results[i]) == 20 and all(torch.equal(out, alone[i]) for out in results[i])


def _bank_and_stacks(model, n, seed):
    from dlp_lora.bank import LoRABank
    from dlp_lora.bench.baselines import stacks_from_bank

    g = torch.Generator().manual_seed(seed)
    adapters = {f"t{i}": {name: (torch.randn(4, m.in_features, generator=g) / m.in_features**0.5,
                                 torch.randn(m.out_features, 4, generator=g) * 0.2, 1.5)
                          for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS}
                for i in range(n)}
    bank = LoRABank.from_adapters(adapters)
    return bank, stacks_from_bank(bank)


@pytest.mark.parametrize("candidates", [[2], [0, 3]])
def test_zero_gates_equal_dlp_uniform_mixture(tiny_llama, candidates):
    """Zero gate and bias: every token weights its k candidates 1/k, which is DLP-LoRA's use_mixture
    of the same adapters at 1/k (the library path, another implementation of the same sum)."""
    from dlp_lora.patch import patch_model, use_mixture

    bank, stacks = _bank_and_stacks(tiny_llama, 4, seed=7)
    ids = torch.randint(0, 97, (2, 8))
    flow = patch_loraflow(copy.deepcopy(tiny_llama), stacks, candidates=candidates, form="op")
    dlp = patch_model(copy.deepcopy(tiny_llama), bank)
    mixture = {bank.names[c]: 1 / len(candidates) for c in candidates}
    with torch.no_grad():
        with use_mixture(dlp, [mixture, mixture]):
            expected = dlp(ids).logits
        got = flow(ids).logits
    assert not torch.allclose(got, tiny_llama(ids).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patch_errors_leave_model_untouched(tiny_llama):
    stacks = tiny_stacks(tiny_llama)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    modules_before = [type(m) for m in tiny_llama.modules()]
    with pytest.raises(ValueError, match="nonexistent"):
        patch_loraflow(tiny_llama, {**stacks, "model.layers.0.mlp.nonexistent": random_stack(6, 4, 32, 48)})
    with pytest.raises(ValueError, match="decoder layer"):
        patch_loraflow(tiny_llama, {"lm_head": random_stack(6, 4, 32, 97)})
    bad_shape = dict(stacks, **{"model.layers.1.mlp.down_proj": random_stack(6, 4, 32, 48)})
    with pytest.raises(ValueError, match="stack"):
        patch_loraflow(tiny_llama, bad_shape)
    with pytest.raises(ValueError, match="candidates"):
        patch_loraflow(tiny_llama, stacks, candidates=[0, 6])
    assert [type(m) for m in tiny_llama.modules()] == modules_before
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())
    assert not tiny_llama._forward_pre_hooks and not tiny_llama.model.layers[0]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_loraflow(tiny_llama)
    patch_loraflow(tiny_llama, stacks)
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            patch_loraflow(tiny_llama, stacks)
    finally:
        unpatch_loraflow(tiny_llama)


# ------------------------------------------------------------------------------ training, save / load

def _teacher_examples(model, stacks, n_examples=24, seed=0):
    """Answers greedily generated by the k=2 fusion with weights (0, 1), i.e. adapter 1 alone, and the
    teacher's own loss on them."""
    teacher = patch_loraflow(copy.deepcopy(model), stacks, candidates=[0, 1], bias_init=[-0.5, 0.5])
    g = torch.Generator().manual_seed(seed)
    examples = []
    with torch.no_grad():
        for _ in range(n_examples):
            prompt = torch.randint(1, 97, (1, 6), generator=g)
            out = teacher.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
            examples.append((prompt[0].tolist(), out[0, 6:].tolist()))
    return examples, answer_loss(teacher, examples)


def test_training_lowers_the_loss_and_touches_only_the_gates(tiny_llama):
    _, stacks = _bank_and_stacks(tiny_llama, 2, seed=11)
    examples, teacher_loss = _teacher_examples(tiny_llama, stacks)
    student = patch_loraflow(copy.deepcopy(tiny_llama), stacks, candidates=[0, 1], form="op")
    base_state = {k: v.clone() for k, v in student.state_dict().items() if "lora_flow_gate" not in k}
    before = answer_loss(student, examples)
    done = train_gates(student, examples, epochs=8, lr=5e-2, batch_size=4)
    after = answer_loss(student, examples)
    assert done.steps == 8 * 6 and len(done.epoch_losses) == 8
    # the untrained (uniform) fusion is worse than the teacher; training closes most of that gap
    assert teacher_loss < before - 0.1
    assert after < before - 0.5 * (before - teacher_loss), (teacher_loss, before, after)
    # the adapter the answers came from now weighs more, on average over layers
    bias = torch.stack([g.bias.detach() for g in loraflow_gates(student).values()])
    assert (bias[:, 1] - bias[:, 0]).mean() > 0
    assert all(torch.equal(v, base_state[k]) for k, v in student.state_dict().items() if k in base_state)
    assert all(not p.requires_grad for n, p in student.named_parameters() if "lora_flow_gate" not in n)
    assert all(m.form == "op" for m in student.modules() if isinstance(m, LoRAFlowLinear))


def test_save_load_round_trip_is_identical(tiny_llama, tmp_path):
    _, stacks = _bank_and_stacks(tiny_llama, 3, seed=12)
    trained = patch_loraflow(copy.deepcopy(tiny_llama), stacks, names=["a", "b", "c"], init="normal",
                             temperature=1.1, seed=3)
    _randomise_bias(trained, 9)
    save_gates(trained, tmp_path / "gates")
    fresh = patch_loraflow(copy.deepcopy(tiny_llama), stacks, names=["a", "b", "c"])
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, trained(ids).logits)
        load_gates(fresh, tmp_path / "gates")
        assert torch.equal(fresh(ids).logits, trained(ids).logits)
    assert all(g.temperature == 1.1 for g in loraflow_gates(fresh).values())
    with pytest.raises(ValueError, match="k="):
        load_gates(patch_loraflow(copy.deepcopy(tiny_llama), stacks, candidates=[0, 1]), tmp_path / "gates")
    with pytest.raises(ValueError, match="fuse"):
        load_gates(patch_loraflow(copy.deepcopy(tiny_llama), stacks, names=["a", "c", "b"]),
                   tmp_path / "gates")
    with pytest.raises(ValueError, match="missing"):
        load_gates(fresh, tmp_path / "nothing")


def test_full_recipe_keeps_the_epoch_with_the_lowest_dev_loss(tiny_llama):
    """The authors' recipe: warm-up + cosine, weight decay, clipping, and the dev split's best epoch kept."""
    _, stacks = _bank_and_stacks(tiny_llama, 2, seed=11)
    examples, _ = _teacher_examples(tiny_llama, stacks)
    train, dev = examples[:16], examples[16:]
    student = patch_loraflow(copy.deepcopy(tiny_llama), stacks, candidates=[0, 1], form="op")
    done = train_gates(student, train, epochs=5, lr=5e-1, batch_size=4, weight_decay=0.1, warmup_ratio=0.2,
                       clip=1.0, dev=dev)
    assert len(done.dev_losses) == 5 and done.steps == 5 * 4
    assert done.best_epoch == 1 + min(range(5), key=done.dev_losses.__getitem__)
    # the gates in the model are that epoch's: their dev loss is the best one recorded
    assert answer_loss(student, dev, batch_size=4) == pytest.approx(min(done.dev_losses), rel=1e-5)
