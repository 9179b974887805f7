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


class TerminatorRule:
    """A SentenceRule stand-in: token 9 is a terminator; a sentence ends after a run of 9s when the
    next token is not a 9 (decided when it arrives). Token 7 is chat scaffolding (not content)."""

    def starts_sentence(self, tokens, j):
        return j > 0 and tokens[j - 1] == 9 and tokens[j] != 9

    def content(self, tokens):
        return [t for t in tokens if t != 7]


RULE = TerminatorRule()


class CountingRouter:
    """Routes a token list to adapter (len % 3) alone, weight 1; counts its calls."""

    label_names = ("a", "b", "c")

    def __init__(self):
        self.calls = []

    def route(self, input_ids, attention_mask, *, top_p, max_loras):
        self.calls.append((input_ids.shape[0], top_p, max_loras))
        lengths = attention_mask.sum(-1)
        return (lengths % 3).to(torch.int32)[:, None], torch.ones(len(lengths), 1)


def test_sentence_boundary_is_the_token_after_a_run_of_terminators():
    tokens = [1, 9, 9, 2, 9]
    assert [is_sentence_boundary(tokens, i, RULE) for i in range(5)] == [False, False, False, True, False]
    assert [is_sentence_boundary(tokens, i, None) for i in range(5)] == [False] * 5  # no tokenizer
    assert prompt_spans(tokens, "sentence", RULE) == [(0, 3), (3, 5)]
    assert prompt_spans(tokens, "prompt", RULE) == [(0, 5)]


def test_request_routing_prompt_spans_then_reroute_at_sentence_start():
    router = CountingRouter()
    mixer = MixtureRouter(["a", "b", "c"], router, top_p=0.6, max_loras=None, sentences=RULE)
    request = RequestRouting(Route(top_p=0.9), reroute="sentence", sentences=RULE)
    queries = request.start([1, 2, 9, 3])
    assert [tokens for tokens, _ in queries] == [[1, 2, 9], [1, 2, 9, 3]]  # the terminator ends span 0
    request.resolve(mixer.route(*zip(*queries, strict=True)))
    assert router.calls == [(2, 0.9, None)]  # both spans in one router call, with the request's own top_p
    assert request.spans == [Span(0, ((0,), (1.0,)), "sentence"), Span(3, ((1,), (1.0,)), "sentence")]
    assert request.push(4) == []  # no sentence end: keeps its mixture
    assert request.push(9) == []  # a terminator: the sentence ends only if the next token says so
    (tokens, route), = request.push(5)
    assert tokens == [1, 2, 9, 3, 4, 9, 5] and route == Route(top_p=0.9)
    request.resolve(mixer.route([tokens], [route]))
    assert request.spans[-1] == Span(6, ((1,), (1.0,)), "sentence")
    # the op's segments of forwards feeding history tokens [first, first + count)
    assert request.segments(0, 4) == [(0, ((0,), (1.0,))), (3, ((1,), (1.0,)))]
    assert request.segments(3, 2) == [(0, ((1,), (1.0,)))]
    assert request.segments(6, 1) == [(0, ((1,), (1.0,)))]


def test_router_reads_content_only():
    router = CountingRouter()
    mixer = MixtureRouter(["a", "b", "c"], router, top_p=0.6, max_loras=None, sentences=RULE)
    # scaffolding (7) is dropped: [7, 7, 1, 2] routes as [1, 2]; scaffolding alone is the base model
    assert mixer.route([[7, 7, 1, 2], [7, 7]], [Route(), Route()]) == [((2,), (1.0,)), ((), ())]
    assert router.calls == [(1, 0.6, None)]


def test_fixed_mixture_and_prompt_mode_never_reroute():
    fixed = RequestRouting(((1,), (0.5,)), reroute="sentence", sentences=RULE)
    assert fixed.start([1, 9, 2]) == [] and fixed.push(9) == [] and fixed.push(3) == []
    assert fixed.spans == [Span(0, ((1,), (0.5,)), "mixture")]
    prompt = RequestRouting(Route(), reroute="prompt", sentences=RULE)
    assert len(prompt.start([1, 9, 2])) == 1
    prompt.resolve([((0,), (1.0,))])
    assert prompt.push(9) == [] and prompt.push(3) == [] and prompt.spans[0].reason == "prompt"
    with pytest.raises(ValueError, match="empty prompt"):
        RequestRouting(Route(), reroute="prompt", sentences=RULE).start([])


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
