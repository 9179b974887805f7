"""Routing inside forward() / generate(): prompt routing, sentence spans, decode-time rerouting.

Mechanics are checked with a deterministic counting router (which adapter's words dominate the
history), exactness against a chunked computation with use_mixture; one test uses a real
Router trained with Router.fit.
"""

from __future__ import annotations

import pytest
import torch
from peft_fixtures import (
    TASKS,
    CountingRouter,
    assert_same_routing,
    cache_kwarg,
    default_backend,
    left_pad,
    task_sentence,
)
from transformers import LogitsProcessor, LogitsProcessorList

from dlp_lora import LoRABank, Router, patch_model, use_mixture

BACKEND = default_backend()
ATOL = 1e-5
TOP_P = 0.9  # the counting router's probabilities then often keep two adapters: weights matter


class ForceTokens(LogitsProcessor):
    """Greedy generation that emits forced[b][step] for every sequence b (raw logits stay visible)."""

    def __init__(self, forced: list[list[int]], prompt_length: int):
        self.forced, self.prompt_length = forced, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        out = torch.full_like(scores, float("-inf"))
        for b, tokens in enumerate(self.forced):
            out[b, tokens[step]] = 0.0
        return out


def _patched(task_adapters, router, reroute, label_order=TASKS):
    import copy

    base, adapters = task_adapters
    bank = LoRABank.from_peft({t: adapters[t] for t in label_order})
    return patch_model(copy.deepcopy(base), bank, router, top_p=TOP_P, reroute=reroute, backend=BACKEND)


def _generate(model, ids, mask, forced):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=len(forced[0]),
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([ForceTokens(forced, ids.shape[1])]),
        )
    return torch.stack(out.logits, dim=1)  # [B, steps, vocab], before the forcing


def _chunked_logits(model, tokens: list[int], pieces: list[tuple[int, dict]]) -> torch.Tensor:
    """Logits of ``tokens`` computed chunk by chunk with a KV cache, mixture m from position start on."""
    ids, cache, logits = torch.tensor([tokens]), None, []
    bounds = [start for start, _ in pieces] + [len(tokens)]
    with torch.no_grad():
        for (start, mixture), end in zip(pieces, bounds[1:], strict=True):
            with use_mixture(model, [mixture]):
                out = model(input_ids=ids[:, start:end], use_cache=True, **{cache_kwarg(): cache})
            cache = getattr(out, cache_kwarg())
            logits.append(out.logits[0])
    return torch.cat(logits)


def _records(model, sequence):
    return [r for r in model.dlp_routing_log if r.sequence == sequence]


def _top(record) -> str:
    return record.adapters[max(range(len(record.weights)), key=record.weights.__getitem__)]


def test_prompt_routing_with_padding_equals_alone(task_adapters, tok):
    """Prompt routing per sequence; left padding never reaches the router nor changes a result."""
    router = CountingRouter(tok)
    model = _patched(task_adapters, router, "prompt")
    prompts = [tok(t)["input_ids"] for t in ("al1 al2 al3 the", "be1 be2 . be4 be5 al3 of be6", "ga1")]
    forced = [tok("al1 . be2 ga3")["input_ids"]] * 3
    ids, mask = left_pad(prompts)
    batch_logits = _generate(model, ids, mask, forced)
    log = list(model.dlp_routing_log)  # each generate() below starts a new log
    assert router.calls == [prompts]  # one router call, real tokens only
    assert [(r.step, r.sequence, r.position, r.reason) for r in log] == [
        (0, b, 0, "prompt") for b in range(3)
    ]  # prompt mode never reroutes while decoding, though "." was generated
    assert [_top(r) for r in log] == ["alpha", "beta", "gamma"]
    for b, prompt in enumerate(prompts):
        expected = router.mixture(prompt, TOP_P)
        record = log[b]
        assert dict(zip(record.adapters, record.weights, strict=True)) == pytest.approx(expected)
        alone = _generate(model, torch.tensor([prompt]), None, [forced[b]])
        torch.testing.assert_close(batch_logits[b], alone[0], atol=ATOL, rtol=0)
        # exactness: the same as use_mixture with the routed mixture
        reference = _chunked_logits(model, prompt + forced[b][:-1], [(0, expected)])
        torch.testing.assert_close(alone[0], reference[len(prompt) - 1 :], atol=ATOL, rtol=0)


def test_sentence_spans_in_the_prompt(task_adapters, tok):
    """reroute='sentence': each prompt sentence is a segment, routed on the prompt up to its end."""
    router = CountingRouter(tok)
    model = _patched(task_adapters, router, "sentence")
    prompt = tok("al1 al2 al3 . . be1 be2 be3 be4 be5 be6 ! ga1")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]
    # a span starts at the token after a sentence's end: the terminator stays in the sentence it ends,
    # and the 2nd "." continues its run
    spans = [(0, prompt[:5]), (5, prompt[:12]), (12, prompt)]
    assert [(r.step, r.position, r.reason) for r in model.dlp_routing_log] == [
        (0, s, "sentence") for s, _ in spans
    ]
    assert [_top(r) for r in model.dlp_routing_log] == ["alpha", "beta", "beta"]
    pieces = [(start, router.mixture(history, TOP_P)) for start, history in spans]
    reference = _chunked_logits(model, prompt, pieces)
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("label_order", [TASKS, TASKS[::-1]])
def test_sentence_rerouting_while_decoding(task_adapters, tok, label_order):
    """At a generated sentence end the sequence is routed again on its history; batch == alone == chunked.

    label_order reverses the bank against the router's labels: routing must map names, not indices.
    """
    router = CountingRouter(tok)
    model = _patched(task_adapters, router, "sentence", label_order)
    prompts = [tok("al1 al2 al3 al4 al5")["input_ids"], tok("ga1 ga2 ga3")["input_ids"]]
    forced = [
        tok("be1 be2 be3 be4 be5 be6 be7 be0 . ga1 ga2")["input_ids"],
        tok("ga4 ! ! al1 al2 al3 al4 al5 al6 al7 ?")["input_ids"],
    ]
    ids, mask = left_pad(prompts)
    batch_logits = _generate(model, ids, mask, forced)
    log = list(model.dlp_routing_log)
    # A new span starts at the first token after a sentence end, decided when that token arrives.
    # sequence 0: "." is forced[0][8]; "ga1", forced[0][9], is processed at step 10, position 5 + 9 = 14
    # sequence 1: "!" is forced[1][1], the second "!" continues its run; "al1", forced[1][3], is processed
    # at step 4, position 3 + 3 = 6; the final "?" is emitted by the last step, never processed
    assert [(r.step, r.sequence, r.position) for r in log] == [(0, 0, 0), (0, 1, 0), (4, 1, 6), (10, 0, 14)]
    assert [_top(r) for r in log] == ["alpha", "gamma", "gamma", "beta"]
    for b, (prompt, tokens) in enumerate(zip(prompts, forced, strict=True)):
        alone = _generate(model, torch.tensor([prompt]), None, [tokens])
        assert_same_routing(list(model.dlp_routing_log), [r for r in log if r.sequence == b])
        torch.testing.assert_close(batch_logits[b], alone[0], atol=ATOL, rtol=0)
        sequence = prompt + tokens[:-1]
        boundary = next(r.position for r in log if r.sequence == b and r.step > 0)
        pieces = [
            (0, router.mixture(prompt, TOP_P)),
            (boundary, router.mixture(sequence[: boundary + 1], TOP_P)),
        ]
        reference = _chunked_logits(model, sequence, pieces)
        torch.testing.assert_close(alone[0], reference[len(prompt) - 1 :], atol=ATOL, rtol=0)


def test_continuation_without_prefill_is_refused(task_adapters, tok):
    base, _ = task_adapters
    with torch.no_grad():
        cache = getattr(base(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True), cache_kwarg())
    model = _patched(task_adapters, CountingRouter(tok), "sentence")
    with pytest.raises(RuntimeError, match="no matching prefill"), torch.no_grad():
        model(input_ids=torch.tensor([[8]]), **{cache_kwarg(): cache})


def test_trained_router_routes_held_out_prompts_and_reroutes(task_adapters, tok):
    """5. A Router trained on separable tasks routes held-out prompts right, and with
    reroute='sentence' a prompt that switches task mid-way changes mixture at the boundary."""
    gen = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for task in TASKS:
        for _ in range(120):
            texts.append(task_sentence(task, gen, length=int(torch.randint(4, 12, (1,), generator=gen))))
            labels.append(task)
    router = Router.fit(
        texts,
        labels,
        tok,
        epochs=5,
        lr=5e-3,
        batch_size=16,
        num_buckets=2**14,
        embed_dim=32,
        hidden=64,
        verbose=False,
    )
    held_out = [
        (task, task_sentence(task, gen, length=n)) for n in (5, 9) for _ in range(5) for task in TASKS
    ]
    truth = [task for task, _ in held_out]
    predicted = router.predict([text for _, text in held_out])
    assert predicted == truth

    # Inside the patched model (padded batch, prompt routing) every prompt goes where the router says.
    model = _patched(task_adapters, router, "prompt")
    ids, mask = left_pad([tok(text)["input_ids"] for _, text in held_out])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [_top(r) for r in model.dlp_routing_log] == predicted
    assert all(abs(sum(r.weights) - 1) < 1e-5 for r in model.dlp_routing_log)

    model = _patched(task_adapters, router, "sentence")
    first = task_sentence("alpha", gen, length=6, p_task=1.0)
    switch = tok(first + " . " + task_sentence("gamma", gen, length=16, p_task=1.0))["input_ids"]
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([switch]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    prefill = [r for r in model.dlp_routing_log if r.step == 0]
    # the second sentence starts after the "."
    second = len(tok(first)["input_ids"]) + 1
    assert [(r.position, _top(r)) for r in prefill] == [(0, "alpha"), (second, "gamma")]


def test_static_cache_4d_mask_routes_like_dynamic(task_adapters, tok):
    """generate() with a StaticCache hands the model 4-D masks: padding is still read correctly."""
    router = CountingRouter(tok)
    model = _patched(task_adapters, router, "sentence")
    prompts = [tok("al1 al2 . be1 be2 be3")["input_ids"], tok("ga1 ga2")["input_ids"]]
    ids, mask = left_pad(prompts)
    kwargs = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        dynamic_log = list(model.dlp_routing_log)
        static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert model.dlp_routing_log == dynamic_log
    assert [(r.sequence, r.position) for r in dynamic_log if r.step == 0] == [(0, 0), (0, 3), (1, 0)]
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=ATOL, rtol=0)
