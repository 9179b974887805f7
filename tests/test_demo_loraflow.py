"""LoRA-Flow in the demo (dlp_lora.demo.loraflow_gates and evaluate_composite's fourth method).

A tiny random Llama over the demo's char tokenizer and random task adapters (no training of the
demo's own artifacts): the gate examples come from the training streams, never the held-out
prompts; trained gates reload to identical answers; in the composite evaluation a one-adapter
LoRA-Flow (its only weight is 1) answers exactly as the oracle does.
"""

from __future__ import annotations

import pytest
import torch

from dlp_lora.demo import build, tasks
from dlp_lora.demo.evaluate import LORAFLOW, METHODS, evaluate_composite, shuffled_composite
from dlp_lora.demo.loraflow_gates import gate_examples, train_demo_gates, trained_loraflow_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tokenizer():
    return build.build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def random_bank(model, names, seed=0):
    from dlp_lora.bank import LoRABank

    g = torch.Generator().manual_seed(seed)
    return LoRABank.from_adapters({
        name: {m_name: (torch.randn(4, m.in_features, generator=g) / m.in_features**0.5,
                        torch.randn(m.out_features, 4, generator=g) * 0.5, 2.0)
               for m_name, m in model.named_modules() if m_name.rsplit(".", 1)[-1] in TARGETS}
        for name in names})


def test_gate_examples_come_from_the_training_streams(tokenizer):
    held_out = tasks.held_out_set([tasks.TASKS["reverse"], tasks.TASKS["add"]], 20, 1000)
    exclude = {prompt for _, prompt, _ in held_out}
    pairs = gate_examples(tokenizer, ["reverse", "add"], seed=0, exclude=exclude, per_task=30)
    assert len(pairs) == 60
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p, _ in pairs]
    assert not set(prompts) & exclude
    assert all(a[-1] == tokenizer.eos_token_id and p[0] == tokenizer.bos_token_id for p, a in pairs)


def test_trained_gates_reload_to_identical_answers(tiny, tokenizer, tmp_path):
    bank = random_bank(tiny, ["reverse", "caesar"])
    pairs = gate_examples(tokenizer, ["reverse", "caesar"], seed=0, exclude=set(), per_task=8)
    note = train_demo_gates(tiny, bank, tokenizer, pairs, tmp_path / "gates", epochs=2, lr=1e-2)
    assert note.startswith("16 examples, 8 steps")
    assert not any("lora_flow_gate" in k for k in tiny.state_dict())  # the demo's model is left as it was
    flow = trained_loraflow_model(tiny, bank, tmp_path / "gates")
    fresh = trained_loraflow_model(tiny, bank, tmp_path / "gates")
    gates = [p for n, p in flow.named_parameters() if "lora_flow_gate" in n]
    assert gates and any(p.abs().sum() > 0 for p in gates)  # trained: no longer the zero start
    enc = tokenizer(["reverse abc=", "caesar xyz="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(flow(**enc).logits, fresh(**enc).logits)


def test_composite_one_adapter_loraflow_answers_as_the_oracle(tiny, tokenizer):
    from dlp_lora.demo.loraflow_gates import loraflow_model
    from dlp_lora.router import Router

    bank = random_bank(tiny, ["reverse"], seed=3)
    rows = shuffled_composite(tasks.held_out_set([tasks.TASKS["reverse"]], 6, 1000), 1000)
    flow = loraflow_model(tiny, bank)  # zero gates over one adapter: its weight is exactly 1
    router = Router(["reverse"]).eval()
    router.tokenizer = tokenizer
    result = evaluate_composite(tiny, tokenizer, bank, router, rows, batch_size=4, progress=False,
                                loraflow=flow)
    assert result.methods == (*METHODS, LORAFLOW)
    assert set(result.table_rows()[0]) == {"task", "n", *METHODS, LORAFLOW, "router"}
    assert result.decode_ms_per_token[LORAFLOW] > 0 and "loraflow" in result.to_json()["methods"]
    assert result.examples and all(e[LORAFLOW] == e["oracle"] for e in result.examples)
    assert any(e["oracle"] != e["base"] for e in result.examples)  # the adapter does change the answers
    assert result.accuracy[LORAFLOW] == result.accuracy["oracle"]
    # without a LoRA-Flow model the evaluation is the three methods it always was
    plain = evaluate_composite(tiny, tokenizer, bank, router, rows[:2], progress=False)
    assert plain.methods == METHODS and LORAFLOW not in plain.accuracy
