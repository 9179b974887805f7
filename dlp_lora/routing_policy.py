"""Routing per request: one request's token history in, its spans and their mixtures out.

No model and no batch here. A request is routed by its own history only, whatever else runs
beside it, so the same rules serve a ``generate()`` call (dlp_lora.routing_state, one request per
row) and the serving scheduler (dlp_lora.serving.engine, requests joining and leaving a batch).

- ``prompt_spans``: where a prompt's spans start, and how much of the prompt routes each one.
- ``is_sentence_boundary``: whether a token starts a new sentence span (dlp_lora.sentences' rule).
- ``MixtureRouter``: the router in bank space, many token lists per call; it reads their content
  only (a chat template's scaffolding and special tokens dropped, dlp_lora.sentences).
- ``RequestRouting``: one request over its whole life: its prompt spans, then a re-route each time
  a sentence ends while it generates; every decision is kept as a ``Span``.

A mixture in bank space is ``(adapter ids, weights)``, equal lengths; ``()`` is the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .options import REROUTE_MODES
from .router.top_p import check_max_loras, check_top_p
from .sentences import SentenceRule

__all__ = [
    "REROUTE_MODES",
    "Mixture",
    "MixtureRouter",
    "RequestRouting",
    "Route",
    "Span",
    "is_sentence_boundary",
    "prompt_spans",
]

# A mixture in bank space: (adapter ids, weights), equal lengths; () = base model.
Mixture = tuple[tuple[int, ...], tuple[float, ...]]
BASE: Mixture = ((), ())


def is_sentence_boundary(tokens: Sequence[int], i: int, sentences: SentenceRule | None) -> bool:
    """Whether a new sentence span starts at token i of ``tokens`` (reads tokens up to i only).

    The rule is dlp_lora.sentences': a sentence ended between tokens i-1 and i, decided once token i
    has arrived; the terminator stays in the span it ends. No rule (no tokenizer): never.
    """
    return sentences is not None and sentences.starts_sentence(tokens, i)


def prompt_spans(
    tokens: Sequence[int], reroute: str, sentences: SentenceRule | None
) -> list[tuple[int, int]]:
    """[(start, route_end)] of a prompt: each span's first token, and the prefix length routing it.

    ``prompt``: one span routed on the whole prompt. ``sentence``: a span at each sentence boundary,
    routed on the prompt up to its own end, so the last span (which generation continues) is
    routed on the whole prompt.
    """
    starts = [0]
    if reroute == "sentence":
        starts += [i for i in range(1, len(tokens)) if is_sentence_boundary(tokens, i, sentences)]
    ends = starts[1:] + [len(tokens)]
    return list(zip(starts, ends, strict=True))


@dataclass(frozen=True)
class Route:
    """A batch row that the router routes, in ``use_mixture``: its own top_p / max_loras, or the patch's.

    ``use_mixture(model, [Route(top_p=0.9), {"math": 1.0}])``: row 0 is routed (and re-routed at
    sentence ends when patched with reroute="sentence") with top_p 0.9, row 1 uses a fixed mixture.
    ``None`` in place of a Route means ``Route()``.
    """

    top_p: float | None = None
    max_loras: int | None = None  # None: the patch's max_loras

    def __post_init__(self):
        if self.top_p is not None:
            check_top_p(self.top_p)
        check_max_loras(self.max_loras)


class MixtureRouter:
    """The router in bank space: token lists, each with its Route, in; one Mixture each out.

    names: the bank's adapter names (mixture ids index them); router: an object with
    ``label_names`` and ``route(input_ids, attention_mask, *, top_p, max_loras) -> (ids [B,K] int32,
    weights [B,K])``; top_p / max_loras: the defaults a Route leaves open. One router call per
    distinct (top_p, max_loras) among the lists. sentences: the tokenizer's SentenceRule; the
    router then reads each list's content only, and a list with no content gets the base model.
    """

    def __init__(self, names: Sequence[str], router, top_p: float, max_loras: int | None,
                 sentences: SentenceRule | None = None):
        self.router, self.top_p, self.max_loras, self.sentences = router, top_p, max_loras, sentences
        to_bank = [list(names).index(label) for label in router.label_names]
        self._label_to_bank = None if to_bank == list(range(len(to_bank))) else to_bank

    def route(self, token_lists: Sequence[Sequence[int]], routes: Sequence[Route]) -> list[Mixture]:
        if self.sentences is not None:
            token_lists = [self.sentences.content(tokens) for tokens in token_lists]
        mixtures: list[Mixture] = [BASE] * len(token_lists)
        groups: dict[tuple, list[int]] = {}
        for i, route in enumerate(routes):
            if not token_lists[i]:
                continue
            top_p = self.top_p if route.top_p is None else route.top_p
            max_loras = self.max_loras if route.max_loras is None else route.max_loras
            groups.setdefault((top_p, max_loras), []).append(i)
        for (top_p, max_loras), members in groups.items():
            routed = self._route_group([token_lists[i] for i in members], top_p, max_loras)
            for i, mixture in zip(members, routed, strict=True):
                mixtures[i] = mixture
        return mixtures

    def _route_group(self, token_lists: list[Sequence[int]], top_p: float, max_loras) -> list[Mixture]:
        router_device = _module_device(self.router)
        longest = max(len(tokens) for tokens in token_lists)
        ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
        mask = torch.zeros(len(token_lists), longest, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
            mask[i, : len(tokens)] = 1
        with torch.no_grad():
            lora_ids, weights = self.router.route(
                ids.to(router_device), mask.to(router_device), top_p=top_p, max_loras=max_loras
            )
        mixtures = []
        for row_ids, row_weights in zip(lora_ids.tolist(), weights.tolist(), strict=True):
            kept = [(i, w) for i, w in zip(row_ids, row_weights, strict=True) if i >= 0]
            if self._label_to_bank is not None:
                kept = [(self._label_to_bank[i], w) for i, w in kept]
            mixtures.append((tuple(i for i, _ in kept), tuple(float(w) for _, w in kept)))
        return mixtures


@dataclass(frozen=True)
class Span:
    """A routing decision of one request: from token ``position`` (of its real tokens, prompt then
    generated) on, its rows use ``mixture``. reason: "prompt", "sentence" or "mixture" (fixed)."""

    position: int
    mixture: Mixture
    reason: str


class RequestRouting:
    """One request's routing over its life: a fixed mixture, or routed on its own history.

    spec: a fixed Mixture, or a Route. Call ``start(prompt)`` once, then ``push(token)`` for each
    token fed to the model after the prompt, in order; both return the queries to route
    ([(history prefix, Route)]), whose mixtures go back through ``resolve``. Routing is split from
    asking so that a scheduler routes the queries of every request of a step in one router call.
    ``spans`` holds every decision; ``current`` the mixture of the open span.
    """

    def __init__(self, spec: Mixture | Route, *, reroute: str, sentences: SentenceRule | None):
        self.spec, self.reroute, self.sentences = spec, reroute, sentences
        self.routed = isinstance(spec, Route)
        self.history: list[int] = []
        self.spans: list[Span] = []
        self._pending: list[tuple[int, str]] = []  # (position, reason) awaiting resolve

    @property
    def current(self) -> Mixture:
        return self.spans[-1].mixture

    def start(self, prompt: Sequence[int]) -> list[tuple[list[int], Route]]:
        if not prompt:
            raise ValueError("dlp-lora: empty prompt; the router needs at least one token")
        self.history = list(prompt)
        if not self.routed:
            self.spans.append(Span(0, self.spec, "mixture"))
            return []
        reason = "sentence" if self.reroute == "sentence" else "prompt"
        spans = prompt_spans(self.history, self.reroute, self.sentences)
        self._pending = [(start, reason) for start, _ in spans]
        return [(self.history[:end], self.spec) for _, end in spans]

    def push(self, token: int) -> list[tuple[list[int], Route]]:
        """Append one fed token; a re-route query when it starts a sentence span."""
        self.history.append(token)
        i = len(self.history) - 1
        if not (self.routed and self.reroute == "sentence"
                and is_sentence_boundary(self.history, i, self.sentences)):
            return []
        self._pending = [(i, "sentence")]
        return [(list(self.history), self.spec)]

    def resolve(self, mixtures: Sequence[Mixture]) -> list[Span]:
        """The mixtures of the latest queries, in order; returns the new spans."""
        new = [Span(position, mixture, reason)
               for (position, reason), mixture in zip(self._pending, mixtures, strict=True)]
        self._pending = []
        self.spans.extend(new)
        return new

    def segments(self, first: int, count: int) -> list[tuple[int, Mixture]]:
        """[(offset, mixture)] over history tokens [first, first + count): the op's segments of a
        forward that feeds them, offsets relative to ``first``, the first at 0."""
        out: list[tuple[int, Mixture]] = []
        for k, span in enumerate(self.spans):
            end = self.spans[k + 1].position if k + 1 < len(self.spans) else None
            if end is not None and end <= first:
                continue
            if span.position >= first + count:
                break
            out.append((max(span.position - first, 0), span.mixture))
        return out


def _module_device(module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()) if isinstance(module, torch.nn.Module) else ():
        return tensor.device
    return torch.device("cpu")
