"""torch.compile on a patched model: the traced forward runs the registered op and matches eager.

Users compile a patched model in one of two ways (dlp_lora/generation.py, "Compilation"):
  - ``model.forward = torch.compile(model.forward, fullgraph=True)``: the routing hook stays eager;
  - generate() with a static cache and a CompileConfig: transformers compiles the model's call
    (hooks included); the routing hook is excluded with torch.compiler.disable, so no graph break.
Here on CPU (inductor generates C++); tests/test_ops_gpu.py runs the second with CUDA graphs.

What must hold: the same tokens and logits as eager; new mixtures reach the compiled graph as
inputs (never baked in as constants), with no recompilation while shapes stay the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import requires_cuda
from peft_fixtures import (
    CountingRouter,
    default_backend,
    left_pad,
)
from transformers import CompileConfig

from dlp_lora import LoRABank, ops, patch_model, use_mixture
from dlp_lora.bench.baselines import TokenGatedLoRALinear, stacks_from_bank

BACKEND = default_backend()
ATOL = 1e-5
TOP_P = 0.9
GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                return_dict_in_generate=True, cache_implementation="static")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def base_and_bank(task_adapters):
    base, adapters = task_adapters
    return base, LoRABank.from_peft(adapters)


@pytest.fixture(scope="module")
def prompts(tok):
    return left_pad([tok("al1 al2 . be1 be2 be3")["input_ids"], tok("ga1 ga2 the ga3")["input_ids"]])


def _generate(model, prompts, **kwargs):
    ids, mask = prompts
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE, **kwargs)
    return out.sequences, torch.stack(out.logits)


def _assert_same(compiled, eager):
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "compiler, backend",
    [
        ("aot_eager", BACKEND),  # the compiled extension's C++ op (cpp), once it is built
        ("aot_eager", "reference"),  # the Python-registered op, as for triton
        pytest.param("inductor", BACKEND, marks=pytest.mark.slow),
    ],
)
def test_compiled_forward_matches_eager(base_and_bank, tok, prompts, compiler, backend):
    base, bank = base_and_bank
    model = patch_model(copy.deepcopy(base), bank, CountingRouter(tok), top_p=TOP_P, reroute="sentence",
                        backend=backend)
    mixtures = [[{"alpha": 0.7, "gamma": 0.3}, {"beta": 1.0, "alpha": -0.5}],
                [{"gamma": 1.5, "beta": 0.25}, {"alpha": 0.2, "gamma": 0.8}]]  # same K = 2, other values
    eager_routed = _generate(model, prompts)
    eager_log = list(model.dlp_routing_log)
    eager_mixed = []
    for mixture in mixtures:
        with use_mixture(model, mixture):
            eager_mixed.append(_generate(model, prompts))
    unpatched = _generate(base, prompts)
    # the adapters change the result, and the two mixtures differ, so matching eager below says
    # something about the LoRA path and about new routing values reaching the compiled graphs
    assert (eager_routed[1] - unpatched[1]).abs().max() > 100 * ATOL
    assert (eager_mixed[0][1] - eager_mixed[1][1]).abs().max() > 100 * ATOL

    model.forward = torch.compile(model.forward, fullgraph=True, backend=compiler)
    _assert_same(_generate(model, prompts), eager_routed)
    assert model.dlp_routing_log == eager_log
    with use_mixture(model, mixtures[0]):
        _assert_same(_generate(model, prompts), eager_mixed[0])  # compiles the K=2 graphs
    with torch.compiler.set_stance("fail_on_recompile"), use_mixture(model, mixtures[1]):
        _assert_same(_generate(model, prompts), eager_mixed[1])  # new values, same graphs


def test_generate_auto_compile_matches_eager(base_and_bank, tok, prompts):
    """transformers' automatic compile (its defaults: inductor, reduce-overhead), forced on CPU."""
    base, bank = base_and_bank
    model = patch_model(copy.deepcopy(base), bank, CountingRouter(tok), top_p=TOP_P, reroute="sentence",
                        backend=BACKEND)
    eager = _generate(model, prompts)
    eager_log = list(model.dlp_routing_log)
    config = CompileConfig()
    config._compile_all_devices = True  # transformers' switch for compiling generate() off-GPU
    _assert_same(_generate(model, prompts, compile_config=config), eager)
    assert model.dlp_routing_log == eager_log
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, "generate() compiled nothing"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_forward_with_grad_adds_out_of_place(base_and_bank, tok):
    """Grad enabled: the delta is added out of place (no gradient through the adapters), as in eager."""
    base, bank = base_and_bank
    model = patch_model(copy.deepcopy(base), bank, backend=BACKEND)
    model.requires_grad_(True)
    ids = torch.tensor([tok("al1 be2 ga3 the . al4")["input_ids"]])
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    with use_mixture(model, {"beta": 0.6, "gamma": 0.4}):
        eager_logits = model(input_ids=ids).logits
        logits = compiled(input_ids=ids).logits
    torch.testing.assert_close(logits, eager_logits, atol=ATOL, rtol=0)
    logits.square().mean().backward()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert not model.model.layers[0].self_attn.q_proj.dlp_lora_a.requires_grad


def test_meteora_op_form_compiles(base_and_bank):
    """The MeteoRA baseline's strongest form goes through the registered op under torch.compile."""
    base, bank = base_and_bank
    name = "model.layers.1.mlp.down_proj"
    linear = base.get_submodule(name)
    gated = TokenGatedLoRALinear(linear, stacks_from_bank(bank)[name], form="op", backend=BACKEND,
                                 generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 7, linear.in_features)
    with torch.no_grad():
        eager = gated(x)
        compiled = torch.compile(gated, fullgraph=True, backend="aot_eager")(x)
        assert (eager - linear(x)).abs().max() > 100 * ATOL
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_generate_cuda_graphs_match_eager(base_and_bank, tok, prompts, backend):
    """On a GPU, generate() with a static cache compiles with mode="reduce-overhead": CUDA graphs."""
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not usable here (available: {ops.available_backends('cuda')})")
    base, bank = base_and_bank
    model = patch_model(copy.deepcopy(base).cuda(), bank, CountingRouter(tok), top_p=TOP_P,
                        reroute="sentence", backend=backend)
    on_gpu = tuple(t.cuda() for t in prompts)
    eager = _generate(model, on_gpu, disable_compile=True)
    eager_log = list(model.dlp_routing_log)
    graphed = _generate(model, on_gpu)  # transformers compiles on its own here (static cache, CUDA)
    torch.testing.assert_close(graphed[1], eager[1], atol=1e-4, rtol=0)
    assert torch.equal(graphed[0], eager[0])
    assert model.dlp_routing_log == eager_log
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, "generate() compiled nothing"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["inductor"]["cudagraph_skips"], "inductor skipped CUDA graphs (see its log)"
