"""Per-request routing (no model) and the per-step mapping of requests to the op's routing tensors."""

from __future__ import annotations

import pytest
import torch

from dlp_lora.ops import multi_lora
from dlp_lora.ops.reference import multi_lora_reference
from dlp_lora.routing_policy import (
    MixtureRouter,
    RequestRouting,
    Route,
    Span,
    is_sentence_boundary,
    prompt_spans,
)
from dlp_lora.step_mapping import StepMapping

END = frozenset({9})  # token 9 ends a sentence


class CountingRouter:
    """Routes a token list to adapter (len % 3) alone, weight 1; counts its calls."""

    label_names = ("a", "b", "c")

    def __init__(self):
        self.calls = []

    def route(self, input_ids, attention_mask, *, top_p, max_loras):
        self.calls.append((input_ids.shape[0], top_p, max_loras))
        lengths = attention_mask.sum(-1)
        return (lengths % 3).to(torch.int32)[:, None], torch.ones(len(lengths), 1)


def test_sentence_boundary_is_the_first_of_a_run_of_enders():
    tokens = [1, 9, 9, 2, 9]
    assert [is_sentence_boundary(tokens, i, END) for i in range(5)] == [False, True, False, False, True]
    assert prompt_spans(tokens, "sentence", END) == [(0, 1), (1, 4), (4, 5)]
    assert prompt_spans(tokens, "prompt", END) == [(0, 5)]


def test_request_routing_prompt_spans_then_reroute_at_sentence_end():
    router = CountingRouter()
    mixer = MixtureRouter(["a", "b", "c"], router, top_p=0.6, max_loras=None)
    request = RequestRouting(Route(top_p=0.9), reroute="sentence", ender_ids=END)
    queries = request.start([1, 2, 9, 3])
    assert [tokens for tokens, _ in queries] == [[1, 2], [1, 2, 9, 3]]
    request.resolve(mixer.route(*zip(*queries, strict=True)))
    assert router.calls == [(2, 0.9, None)]  # both spans in one router call, with the request's own top_p
    assert request.spans == [Span(0, ((2,), (1.0,)), "sentence"), Span(2, ((1,), (1.0,)), "sentence")]
    assert request.push(4) == []  # no sentence end: keeps its mixture
    (tokens, route), = request.push(9)
    assert tokens == [1, 2, 9, 3, 4, 9] and route == Route(top_p=0.9)
    request.resolve(mixer.route([tokens], [route]))
    assert request.spans[-1] == Span(5, ((0,), (1.0,)), "sentence")
    # the op's segments of forwards feeding history tokens [first, first + count)
    assert request.segments(0, 4) == [(0, ((2,), (1.0,))), (2, ((1,), (1.0,)))]
    assert request.segments(3, 2) == [(0, ((1,), (1.0,)))]
    assert request.segments(5, 1) == [(0, ((0,), (1.0,)))]


def test_fixed_mixture_and_prompt_mode_never_reroute():
    fixed = RequestRouting(((1,), (0.5,)), reroute="sentence", ender_ids=END)
    assert fixed.start([1, 9, 2]) == [] and fixed.push(9) == []
    assert fixed.spans == [Span(0, ((1,), (0.5,)), "mixture")]
    prompt = RequestRouting(Route(), reroute="prompt", ender_ids=END)
    assert len(prompt.start([1, 9, 2])) == 1
    prompt.resolve([((0,), (1.0,))])
    assert prompt.push(9) == [] and prompt.spans[0].reason == "prompt"
    with pytest.raises(ValueError, match="empty prompt"):
        RequestRouting(Route(), reroute="prompt", ender_ids=END).start([])


def test_label_order_maps_to_bank_ids():
    mixer = MixtureRouter(["c", "b", "a"], CountingRouter(), top_p=0.6, max_loras=2)
    assert mixer.route([[1, 2]], [Route()]) == [((0,), (1.0,))]  # label 2 ("c") is bank id 0


def test_step_mapping_matches_each_sequence_alone_and_reuses_tensors():
    gen = torch.Generator().manual_seed(0)
    N, r, d_in, d_out, L = 4, 3, 8, 6, 5
    lora_a = torch.randn(N, r, d_in, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(N, d_out, r, generator=gen, dtype=torch.float64)
    sequences = [[(0, ((1, 3), (0.25, -0.75))), (3, ((2,), (1.0,)))], [(0, ((), ()))], [(0, ((0,), (2.0,)))]]
    mapping = StepMapping(num_loras=N, device=torch.device("cpu"))
    step = mapping.build(sequences, L)
    assert step.seg_indptr.tolist() == [0, 3, 5, 10, 15] and step.num_tokens == 15 and step.active
    x = torch.randn(3 * L, d_in, generator=gen, dtype=torch.float64)
    y = torch.zeros(3 * L, d_out, dtype=torch.float64)
    multi_lora_reference(y, x, lora_a, lora_b, step.seg_indptr, step.lora_ids, step.lora_weights)
    for b, segs in enumerate(sequences):  # each sequence alone, each segment its own mixture
        for k, (offset, (ids, weights)) in enumerate(segs):
            end = segs[k + 1][0] if k + 1 < len(segs) else L
            rows = x[b * L + offset: b * L + end]
            want = sum((w * rows @ lora_a[i].T @ lora_b[i].T for i, w in zip(ids, weights, strict=True)),
                       torch.zeros(end - offset, d_out, dtype=torch.float64))
            torch.testing.assert_close(y[b * L + offset: b * L + end], want)
    assert step.last_lora_ids[:, 0].tolist() == [2, -1, 0]
    assert mapping.build([list(s) for s in sequences], L) is step  # same layout: same tensors
    assert mapping.build(sequences[:2], L) is not step
    with pytest.raises(ValueError, match="offset 0"):
        mapping.build([[(1, ((), ()))]], L)
    y2 = torch.zeros_like(y)  # the one door accepts the mapping's tensors
    multi_lora(y2, x, lora_a, lora_b, step.seg_indptr, step.lora_ids, step.lora_weights, backend="reference")
    torch.testing.assert_close(y2, y)
