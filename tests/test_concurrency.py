"""One patched model, many callers: per-thread routing, per-row routing options, pickling, bad weights.

A server runs one model for many callers, so routing state is per call: concurrent forward() and
generate() calls with different mixtures must give exactly the serial results.
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from peft_fixtures import (
    TASKS,
    CountingRouter,
    assert_same_routing,
    assert_same_snapshot,
    default_backend,
    left_pad,
    model_snapshot,
    tiny_model,
)

from dlp_lora import LoRABank, PatchError, Route, patch_model, unpatch_model, use_mixture

BACKEND = default_backend()
ATOL = 1e-5
THREADS = 4
ROUNDS = 6  # each thread repeats its calls; before routing state was per thread, 1-2 rounds failed


def _patched(task_adapters, tok, reroute="sentence", backend=BACKEND):
    base, adapters = task_adapters
    bank = LoRABank.from_peft({t: adapters[t] for t in TASKS})
    return patch_model(copy.deepcopy(base), bank, CountingRouter(tok), top_p=0.9, reroute=reroute,
                       backend=backend)


def _generate(model, prompt: list[int], new_tokens: int = 6):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0], torch.stack(out.logits, 1)[0]


def _forward(model, prompt: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0]


def _run_threads(jobs):
    """Run every job (a no-argument callable) in its own thread, together; returns their results."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(i):
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_threads_with_different_mixtures_equal_serial(task_adapters, tok):
    """4 threads, each in its own use_mixture: forward and generate() logits equal the serial ones."""
    model = _patched(task_adapters, tok)
    prompts = [tok(t)["input_ids"] for t in ("al1 al2 the", "be1 of be3 be4", "ga1 ga2", "the al3 be2")]
    mixtures = [{"alpha": 1.0}, {"beta": 0.6, "gamma": 0.4}, {"gamma": 2.0}, {"alpha": 1.5, "beta": -0.5}]

    def calls(i):
        with use_mixture(model, mixtures[i]) as log:
            forward = _forward(model, prompts[i])
            sequence, logits = _generate(model, prompts[i])
            return forward, sequence, logits, list(log)

    serial = [calls(i) for i in range(THREADS)]
    for _ in range(ROUNDS):
        for got, want in zip(_run_threads([lambda i=i: calls(i) for i in range(THREADS)]), serial,
                             strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert torch.equal(got[2], want[2]) and got[3] == want[3]


def test_threads_routed_by_the_router_equal_serial(task_adapters, tok):
    """4 threads of router-only generate() with sentence re-routing: outputs and logs equal serial."""
    model = _patched(task_adapters, tok)
    texts = ("al1 al2 . be1", "be1 be2 ! ga3 ga4", "ga1 . al1", "the be2 be3")
    prompts = [tok(t)["input_ids"] for t in texts]

    def calls(i):
        sequence, logits = _generate(model, prompts[i], new_tokens=8)
        return sequence, logits, list(model.dlp_routing_log)

    serial = [calls(i) for i in range(THREADS)]
    assert any(r.step > 0 or r.position > 0 for r in serial[0][2] + serial[1][2])  # spans were re-routed
    for _ in range(ROUNDS):
        for got, want in zip(_run_threads([lambda i=i: calls(i) for i in range(THREADS)]), serial,
                             strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_rows_mix_router_and_fixed_mixtures(task_adapters, tok):
    """One batch: a routed row, a fixed-mixture row and a row with its own top_p, each as if alone."""
    model = _patched(task_adapters, tok)
    prompts = [tok(t)["input_ids"] for t in ("al1 al2 . be1 be2", "be1 be2 be3", "ga1 al1 be1")]
    rows = [None, {"beta": 0.5, "alpha": 0.5}, Route(top_p=1.0)]
    ids, mask = left_pad(prompts)
    with torch.no_grad(), use_mixture(model, rows) as log:
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        batch_log = list(log)
    for b, prompt in enumerate(prompts):
        with use_mixture(model, [rows[b]]) as alone_log:
            alone = _forward(model, prompt)
            expected = [r.__class__(r.step, b, *list(r.__dict__.values())[2:]) for r in alone_log]
        torch.testing.assert_close(logits[b, -len(prompt):], alone, atol=ATOL, rtol=0)
        assert_same_routing([r for r in batch_log if r.sequence == b], expected)
    assert [r.reason for r in batch_log if r.sequence == 1] == ["mixture"]
    assert len([r for r in batch_log if r.sequence == 0]) == 2  # the "." starts a second span
    top_p_one = [r for r in batch_log if r.sequence == 2][0]
    assert len(top_p_one.adapters) == len(TASKS)  # top_p=1 keeps every adapter


def test_route_checks_its_options():
    with pytest.raises(ValueError, match="top_p"):
        Route(top_p=1.5)
    with pytest.raises(ValueError, match="max_loras"):
        Route(max_loras=0)


@pytest.mark.parametrize("backend", ["reference", BACKEND or "cpp"])
def test_pickled_patched_model_gives_identical_outputs(task_adapters, tok, backend):
    """torch.save / torch.load of a patched model: same outputs, routes itself, unpatches to the base."""
    model = _patched(task_adapters, tok, backend=backend)
    prompt = tok("al1 al2 . be1 be2")["input_ids"]
    expected = _generate(model, prompt)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    got = _generate(loaded, prompt)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert list(loaded.dlp_routing_log) == list(model.dlp_routing_log)
    unpatch_model(loaded)
    assert torch.equal(_forward(loaded, prompt), _forward(task_adapters[0], prompt))


def test_weight_beyond_float32_is_refused(task_adapters, tok):
    model = _patched(task_adapters, tok)
    with pytest.raises(ValueError, match=r"mixtures\[0\] weight of 'alpha' .*\|weight\| <= 100"):
        with use_mixture(model, {"alpha": 1e39}):
            pass


def test_module_shared_by_two_names_is_refused(tmp_path):
    """A module reachable under two names would get two LoRAs (and the delta twice): refused, unchanged."""
    from peft_fixtures import make_adapter

    base = tiny_model("llama", seed=3)
    adapter = make_adapter(base, tmp_path / "a", seed=30)
    shared = copy.deepcopy(base)
    shared.model.layers[1].self_attn.q_proj = shared.model.layers[0].self_attn.q_proj
    before = model_snapshot(shared)
    names = r"layers\.0\.self_attn\.q_proj.*layers\.1\.self_attn\.q_proj.*one module"
    with pytest.raises(PatchError, match=names):
        patch_model(shared, {"a": adapter}, backend=BACKEND)
    assert_same_snapshot(before, model_snapshot(shared))
