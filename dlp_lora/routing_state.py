"""Routing inside forward() and generate(): which adapters each row of the batch uses.

A patched model holds one :class:`SequenceRouting`; before each forward its pre-forward hook on
the top-level model fills the calling thread's :class:`RoutingState`, which every patched Linear
reads (the hot path; see dlp_lora/patch.py). Per thread, so that concurrent callers of one model
(a server's worker threads) never see each other's mixtures, use_mixture rows or routing log.

Segments. The activations of a forward are flattened to rows [B*L, d]; row b*L + j is token j of
sequence b. A segment is a run of rows with one mixture: one per sequence with
``reroute="prompt"``, one per sentence span with ``reroute="sentence"``. Padding rows (left or
right) join their sequence's first / last span; attention never reads them, so padding changes
no sequence's result, and the router only sees real tokens (attention_mask == 1).

When the router runs (paper style, on the history):
- prefill (no cache yet): ``prompt`` routes each sequence on its whole prompt. ``sentence``
  splits the prompt into spans; a span starts at the first token of a sentence and is routed on
  the prompt up to the span's end, so the last span, which generation continues, is routed on the
  whole prompt.
- decode (cache present): ``prompt`` keeps each sequence's mixture (no host sync per step).
  ``sentence``: when the first token of a new sentence arrives, the sequence is routed again on
  its history up to that token, and its mixture changes from that row on.
Where a sentence ends is dlp_lora/sentences.py's rule (a terminator followed by whitespace or the
end of the text, decided when the next token arrives; abbreviations, numbers and URLs excepted):
the terminator stays in the span it ends. The router reads the conversation's content only: a
chat template's scaffolding (role markers, an injected system prompt) and special tokens are
dropped from its input; a history of scaffolding alone gets the base model.

Every routing decision is appended to ``model.dlp_routing_log`` as a :class:`RoutingRecord`;
the log is cleared at each prefill, so it always describes the latest generation.

Prefill vs decode is read from the cache: a forward whose cache holds no token is a prefill.
Without a cache (``use_cache=False``) every forward is therefore a prefill of the whole sequence
so far, routed afresh.

Limitations: beam search reorders the cache behind the hook's back, so ``sentence`` rerouting
follows rows, not beams (``prompt`` routing is unaffected: beams of one prompt share a mixture).

Compilation. Routing runs in Python before each forward (the hook is excluded from torch.compile),
so compile the forward, not the routing: ``model.forward = torch.compile(model.forward, ...)``
(fullgraph works), or generate() with a static cache, which compiles the model's call with
mode="reduce-overhead" (CUDA graphs) by default on a GPU. The traced forward reads the
RoutingState tensors as graph inputs, and the op runs as one registered node. A graph captured
by hand with torch.cuda.graph() would not run the router at replay.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import check_routing_values, resolve_backend
from .router.top_p import check_max_loras, check_top_p
from .sentences import SentenceRule

__all__ = ["REROUTE_MODES", "Route", "RoutingRecord", "RoutingState", "SequenceRouting"]

from .options import REROUTE_MODES  # noqa: E402 - re-exported: patch_model checks it

# A mixture in bank space: (adapter ids, weights), equal lengths; () = base model.
Mixture = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass(frozen=True)
class RoutingRecord:
    """One routing decision.

    step      forward pass since the last prefill (0 = the prefill itself)
    sequence  index of the sequence in the batch
    position  index, among the sequence's real (unpadded) tokens, of the first token whose rows
              use this mixture
    adapters  adapter names, weights their mixture weights (renormalised top-p output)
    reason    "prompt", "sentence" or "mixture" (use_mixture)
    """

    step: int
    sequence: int
    position: int
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    reason: str


class RoutingState:
    """What every patched Linear of one model reads during a forward (the hot path).

    seg_indptr [S+1] int32, lora_ids [S, K] int32, lora_weights [S, K] float32: the op's routing
    for the num_tokens = B*L rows of this forward. last_*: the same for a module that sees one
    row per sequence (e.g. lm_head with logits_to_keep=1): each sequence's current mixture.
    active is False when no row has an adapter: patched modules then skip the op entirely,
    so an empty mixture is exactly the base model. adapters: bit i set when some row of this
    forward uses adapter i; a module that none of those adapters targets skips the op (its delta
    would be exactly zero), so a q,v-only mixture costs nothing on the other projections.
    fast is True when the raw kernel may update a module's output in place: no autograd, no
    autocast (a forward traced by torch.compile takes the registered op instead, see dlp_lora.patch;
    this hook itself always runs eager).
    """

    __slots__ = (
        "active",
        "adapters",
        "fast",
        "num_tokens",
        "num_sequences",
        "seg_indptr",
        "lora_ids",
        "lora_weights",
        "last_seg_indptr",
        "last_lora_ids",
        "last_lora_weights",
        "backend",
    )

    def __init__(self, backend: str):
        self.active = self.fast = False
        self.adapters = 0
        self.num_tokens = self.num_sequences = -1
        self.seg_indptr = self.lora_ids = self.lora_weights = None
        self.last_seg_indptr = self.last_lora_ids = self.last_lora_weights = None
        self.backend = backend  # resolved op backend for the bank's device and dtype


def past_length(cache) -> int:
    """Tokens already in a transformers cache (Cache object or legacy tuple); 0 for None."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer, key [B, heads, past, head_dim]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


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


# What use_mixture gives each row: a fixed mixture in bank space, or a Route.
RowSpec = Mixture | Route


class _CallState(threading.local):
    """One thread's routing: the RoutingState the patched Linears read, and its generation so far.

    Thread-local, so concurrent forward() / generate() calls on one model never see each other's
    mixtures. (threading.local rather than a ContextVar: dynamo traces attribute reads of a
    threading.local inside a compiled forward, and ContextVar.get() breaks the graph.)
    """

    state: RoutingState | None = None  # None until this thread's first forward
    key: tuple | None = None  # (device, dtype) the state's tensors were built for
    rows: list[RowSpec] | None = None  # use_mixture's rows; None = route every row
    log: list[RoutingRecord]
    step = 0
    current: list[Mixture] | None = None  # the mixture of each sequence's open span
    histories: list[list[int] | None] | None = None  # sentence mode: each routed row's real tokens
    routes: list[RowSpec] | None = None  # each row's spec at the latest prefill
    seq_tensors = None  # (ids, weights, active) for ``current``, built when it changes

    def __init__(self):
        self.log = []
        self.seg_cache: dict = {}


class LogView(Sequence):
    """``model.dlp_routing_log``: the calling thread's routing records of its latest generation."""

    def __init__(self, routing: SequenceRouting):
        self._routing = routing

    def _records(self) -> list[RoutingRecord]:
        return self._routing.call.log

    def __getitem__(self, index):
        return self._records()[index]

    def __len__(self) -> int:
        return len(self._records())

    def __eq__(self, other) -> bool:
        return list(self._records()) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._records())


class SequenceRouting:
    """Fills the calling thread's RoutingState before each forward: router calls, sentence spans, rows.

    names: the bank's adapter names (bank ids index them); router: an object with ``label_names``
    and ``route(input_ids, attention_mask, *, top_p, max_loras) -> (ids [B,K] int32, weights [B,K])``
    or None (then only use_mixture applies adapters). sentences: the tokenizer's SentenceRule
    (dlp_lora.sentences: sentence ends and chat scaffolding), or None without a tokenizer.
    backend: the op backend asked for at patch time (None = automatic), resolved per device and dtype.

    The configuration is shared by every caller; everything a forward or a generation changes lives
    in ``call`` (one per thread). Picklable and deep-copyable: the per-thread state and the resolved
    kernel are dropped and rebuilt on first use.
    """

    def __init__(
        self,
        *,
        names: Sequence[str],
        router,
        top_p: float,
        max_loras: int | None,
        reroute: str,
        sentences: SentenceRule | None,
        backend: str | None,
        probe_module: torch.nn.Module,
        forward_signature: inspect.Signature,
    ):
        self.names = list(names)
        self.router = router
        self.top_p, self.max_loras, self.reroute = top_p, max_loras, reroute
        self.sentences = sentences
        self.backend = backend
        # One patched module, whose lora_a says where and in what dtype the bank is now. Modules and
        # bound methods (not closures) so that copy.deepcopy(model) copies a consistent patch.
        self._probe_module = probe_module
        self._signature = forward_signature
        self._label_to_bank = None
        if router is not None:
            to_bank = [self.names.index(label) for label in router.label_names]
            self._label_to_bank = None if to_bank == list(range(len(to_bank))) else to_bank
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.call = _CallState()
        self._backend_key: tuple | None = None
        self._backend_name: str | None = None
        self.log_view = LogView(self)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("call", "_backend_key", "_backend_name", "log_view"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # --- entry point (called by the pre-forward hook) ----------------------------------------------

    # Always eager: routing reads token ids and the cache length on the host, so dynamo would break
    # the graph here anyway. Under torch.compile(model) (e.g. generate()'s automatic compile with a
    # static cache) the hook runs in Python and the traced forward reads the RoutingState it filled.
    @torch.compiler.disable
    def pre_forward_hook(self, _model, args: tuple, kwargs: dict) -> None:
        """The top-level model's forward pre-hook (registered with_kwargs=True)."""
        inputs = kwargs if not args else self._signature.bind_partial(*args, **kwargs).arguments
        cache = inputs.get("cache", inputs.get("past_key_values"))
        self.before_forward(
            inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("inputs_embeds"), cache
        )

    def before_forward(self, input_ids: torch.Tensor | None, attention_mask, inputs_embeds, cache) -> None:
        if input_ids is not None:
            B, L = input_ids.shape[0], input_ids.shape[-1]
        elif inputs_embeds is not None:
            B, L = inputs_embeds.shape[0], inputs_embeds.shape[1]
        else:
            raise ValueError("dlp-lora: the forward got neither input_ids nor inputs_embeds")
        call = self.call
        probe = self._probe_module._buffers["dlp_lora_a"]
        device = probe.device
        key = (device, probe.dtype)
        if key != self._backend_key:  # first call, or the model was moved / cast
            self._backend_name = resolve_backend(device, self.backend, probe.dtype)
            self._backend_key = key
        if call.state is None or call.key != key:  # this thread's first call, or a move / cast
            call.state, call.key = RoutingState(self._backend_name), key
            call.seg_cache.clear()
            call.seq_tensors = None
        prefill = past_length(cache) == 0
        # Which tokens are real: from the prompt's mask at prefill; tokens fed while decoding are all real.
        attention_mask = token_mask(attention_mask, L) if prefill else None
        call.state.fast = not (torch.is_grad_enabled() or torch.is_autocast_enabled(device.type))
        if prefill:
            _check_not_empty(L, attention_mask)
            call.step = 0
            call.log = []
            self._prefill(call, self._rows(call.rows, B), input_ids, attention_mask, B, L, device)
        else:
            call.step += 1
            self._continue(call, input_ids, B, L, device)

    def _rows(self, rows: list[RowSpec] | None, B: int) -> list[RowSpec]:
        """Each row's spec for a batch of B: use_mixture's rows (one broadcast to all), else routed."""
        if rows is None:
            rows = [Route()]
        if len(rows) == 1 and B != 1:
            rows = rows * B
        if len(rows) != B:
            raise ValueError(
                f"use_mixture: `mixtures` holds {len(rows)} mixtures but the batch has {B} "
                "sequences (give one entry per sequence, or a single one for all)"
            )
        return rows

    # --- prefill and decode ----------------------------------------------------------------------------

    def _prefill(self, call: _CallState, rows: list[RowSpec], input_ids, attention_mask, B, L,
                 device) -> None:
        routed = [b for b, row in enumerate(rows) if isinstance(row, Route)]
        if routed:
            self._check_routable(input_ids)
        ids_host = input_ids.tolist() if routed else None
        mask_host = attention_mask.tolist() if routed and attention_mask is not None else None
        histories: list[list[int] | None] = [None] * B
        spans = []  # routed rows' spans: (sequence, first row j, history index, route end)
        for b in routed:
            cols = [j for j in range(L) if mask_host is None or mask_host[b][j]]
            tokens = [ids_host[b][j] for j in cols]
            histories[b] = tokens
            starts = [0]
            if self.reroute == "sentence" and self.sentences is not None:
                starts += [i for i in range(1, len(tokens)) if self._is_boundary(tokens, i)]
            for k, start in enumerate(starts):
                end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
                spans.append((b, 0 if k == 0 else cols[start], start, end))  # pads join the first span
        mixtures = self._route(
            [histories[b][:end] for b, _, _, end in spans], [rows[b] for b, _, _, _ in spans]
        )
        routed_spans: dict[int, list] = {}
        for (b, j, position, _), mixture in zip(spans, mixtures, strict=True):
            routed_spans.setdefault(b, []).append((j, position, mixture))
        reason = "sentence" if self.reroute == "sentence" else "prompt"
        segments, current = [], [None] * B
        for b, row in enumerate(rows):
            # a fixed mixture is one span from row 0, never re-routed
            for j, position, mixture in routed_spans.get(b, [(0, 0, row)]):
                segments.append((b * L + j, mixture))
                current[b] = mixture
                self._record(call, b, position, mixture, reason if b in routed_spans else "mixture")
        call.histories = histories if self.reroute == "sentence" else None
        call.routes = rows
        self._set_current(call, current)
        if len(segments) == B:
            self._use_sequence_segments(call, B, L, device)
        else:
            self._use_segments(call, segments, B, L, device)

    def _continue(self, call: _CallState, input_ids: torch.Tensor | None, B: int, L: int, device) -> None:
        if call.current is None or len(call.current) != B:
            raise RuntimeError(
                "dlp-lora: a forward with a filled cache but no matching prefill through the patched model "
                f"(batch {B}, routed batch {None if call.current is None else len(call.current)}); "
                "run the prompt through the patched model first"
            )
        if call.rows is not None:  # a use_mixture entered since the prefill sets the fixed rows from here on
            rows = self._rows(call.rows, B)
            self._set_current(call, [
                call.current[b] if isinstance(row, Route) else row for b, row in enumerate(rows)
            ])
        if call.histories is None or self.sentences is None or not any(h is not None for h in call.histories):
            self._use_sequence_segments(call, B, L, device)
            return
        self._check_routable(input_ids)
        boundaries = []  # (sequence, row j, history index)
        for b, new_tokens in enumerate(input_ids.tolist()):
            history = call.histories[b]
            if history is None:  # a row with a fixed mixture
                continue
            for j, token in enumerate(new_tokens):
                history.append(token)
                if self._is_boundary(history, len(history) - 1):
                    boundaries.append((b, j, len(history) - 1))
        if not boundaries:
            self._use_sequence_segments(call, B, L, device)
            return
        ends = []  # each span is routed on the history up to its end within this forward
        for k, (b, _, _) in enumerate(boundaries):
            nxt = boundaries[k + 1] if k + 1 < len(boundaries) else None
            ends.append(nxt[2] if nxt is not None and nxt[0] == b else len(call.histories[b]))
        mixtures = self._route(
            [call.histories[b][:end] for (b, _, _), end in zip(boundaries, ends, strict=True)],
            [call.routes[b] for b, _, _ in boundaries],
        )
        segments, current = [], list(call.current)
        opened = set()
        for (b, j, position), mixture in zip(boundaries, mixtures, strict=True):
            if b not in opened and j > 0:  # rows before the first boundary continue the open span
                segments.append((b * L, current[b]))
            opened.add(b)
            segments.append((b * L + j, mixture))
            current[b] = mixture
            self._record(call, b, position, mixture, "sentence")
        segments += [(b * L, call.current[b]) for b in range(B) if b not in opened]
        segments.sort(key=lambda seg: seg[0])
        self._set_current(call, current)
        self._use_segments(call, segments, B, L, device)

    def _check_routable(self, input_ids) -> None:
        if self.router is None:
            raise RuntimeError(
                "dlp-lora: this model was patched without a router; wrap the call in "
                "`with use_mixture(model, mixtures):` or patch with a Router"
            )
        if input_ids is None:
            raise ValueError(
                "dlp-lora: routing reads input_ids; inputs_embeds alone cannot be routed "
                "(use use_mixture to give the mixtures instead)"
            )

    def _is_boundary(self, tokens: list[int], i: int) -> bool:
        """Token i starts a new span: a sentence ended between tokens i-1 and i (reads tokens[: i + 1])."""
        return self.sentences.starts_sentence(tokens, i)

    def _route(self, token_lists: list[list[int]], routes: list[Route]) -> list[Mixture]:
        """Route each token list with its row's Route; one router call per distinct (top_p, max_loras).

        The router reads the conversation's content (without chat scaffolding); a list with no
        content gets the base model.
        """
        if self.sentences is not None:
            token_lists = [self.sentences.content(tokens) for tokens in token_lists]
        mixtures: list[Mixture] = [((), ())] * len(token_lists)
        groups: dict[tuple, list[int]] = {}
        for i, route in enumerate(routes):
            if token_lists[i]:
                top_p = self.top_p if route.top_p is None else route.top_p
                max_loras = self.max_loras if route.max_loras is None else route.max_loras
                groups.setdefault((top_p, max_loras), []).append(i)
        for (top_p, max_loras), members in groups.items():
            routed = self._route_group([token_lists[i] for i in members], top_p, max_loras)
            for i, mixture in zip(members, routed, strict=True):
                mixtures[i] = mixture
        return mixtures

    def _route_group(self, token_lists: list[list[int]], top_p: float, max_loras) -> list[Mixture]:
        router_device = _module_device(self.router)
        longest = max(len(tokens) for tokens in token_lists)
        ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
        mask = torch.zeros(len(token_lists), longest, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
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

    # --- building the op's routing tensors ---------------------------------------------------------

    def _set_current(self, call: _CallState, current: list[Mixture]) -> None:
        if current != call.current:
            call.current = current
            call.seq_tensors = None

    def _use_sequence_segments(self, call: _CallState, B: int, L: int, device) -> None:
        """One segment per sequence with its current mixture: the decode fast path (cached tensors)."""
        if call.seq_tensors is None:
            ids, weights = _mixture_tensors(call.current, device)
            call.seq_tensors = (ids, weights, adapter_mask(call.current))
            check_routing_values(
                self._seg_indptr(call, B, 1, device), ids, num_tokens=B, num_loras=len(self.names)
            )
        ids, weights, adapters = call.seq_tensors
        state = call.state
        state.seg_indptr = self._seg_indptr(call, B, L, device)
        state.lora_ids, state.lora_weights = ids, weights
        state.last_seg_indptr = self._seg_indptr(call, B, 1, device)
        state.last_lora_ids, state.last_lora_weights = ids, weights
        state.num_tokens, state.num_sequences = B * L, B
        state.adapters, state.active = adapters, adapters != 0

    def _use_segments(self, call: _CallState, segments: list[tuple[int, Mixture]], B: int, L: int,
                      device) -> None:
        """Arbitrary segments [(first row, mixture)], sorted, the first at row 0."""
        seg_indptr = torch.tensor([row for row, _ in segments] + [B * L], dtype=torch.int32)
        ids, weights = _mixture_tensors([mixture for _, mixture in segments], device)
        check_routing_values(seg_indptr, ids, num_tokens=B * L, num_loras=len(self.names))
        self._use_sequence_segments(call, B, L, device)  # fills last_* (each sequence's current mixture)
        state = call.state
        state.seg_indptr = seg_indptr.to(device)
        state.lora_ids, state.lora_weights = ids, weights
        state.adapters = adapter_mask([mixture for _, mixture in segments])
        state.active = state.adapters != 0

    def _seg_indptr(self, call: _CallState, B: int, L: int, device) -> torch.Tensor:
        key = (B, L)
        seg = call.seg_cache.get(key)
        if seg is None:
            if len(call.seg_cache) > 8:  # prompts of many lengths: keep the cache small
                call.seg_cache.clear()
            seg = (
                torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
                if L > 0
                else torch.zeros(B + 1, dtype=torch.int32, device=device)
            )
            call.seg_cache[key] = seg
        return seg

    def _record(self, call: _CallState, sequence: int, position: int, mixture: Mixture, reason: str) -> None:
        ids, weights = mixture
        call.log.append(
            RoutingRecord(
                call.step, sequence, position, tuple(self.names[i] for i in ids), tuple(weights), reason
            )
        )


def adapter_mask(mixtures: Sequence[Mixture]) -> int:
    """Bit i set when adapter i is in any of the mixtures (RoutingState.adapters)."""
    mask = 0
    for ids, _ in mixtures:
        for i in ids:
            mask |= 1 << i
    return mask


def _mixture_tensors(mixtures: Sequence[Mixture], device) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_ids [S, K] int32 (-1 padded) and lora_weights [S, K] float32 for S mixtures, K >= 1."""
    K = max(1, max(len(ids) for ids, _ in mixtures))
    ids = torch.full((len(mixtures), K), -1, dtype=torch.int32)
    weights = torch.zeros(len(mixtures), K, dtype=torch.float32)
    for s, (mix_ids, mix_weights) in enumerate(mixtures):
        if mix_ids:
            ids[s, : len(mix_ids)] = torch.tensor(mix_ids, dtype=torch.int32)
            weights[s, : len(mix_ids)] = torch.tensor(mix_weights, dtype=torch.float32)
    return ids.to(device), weights.to(device)


def token_mask(attention_mask, length: int) -> torch.Tensor | None:
    """[B, length] mask of the real tokens of a prefill from whatever mask the model got.

    2-D masks (1 = token) are used as they are. transformers builds 4-D masks [B, 1, L, L_kv]
    (bool: True = attend; float: 0 = attend) for compilable caches such as StaticCache: the last
    query row of a prefill attends to exactly the real prompt tokens, at key positions [0, L).
    A dict of masks (per attention type) is read through its full-attention entry.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -length:]
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and attention_mask.shape[-1] >= length
    ):
        last_row = attention_mask[:, 0, -1, :length]
        return last_row.long() if last_row.dtype == torch.bool else (last_row == 0).long()
    raise NotImplementedError(
        "dlp-lora: cannot tell padding from tokens with this attention_mask "
        f"({type(attention_mask).__name__}{tuple(getattr(attention_mask, 'shape', ()))}); "
        "pass a 2-D [batch, length] mask"
    )


def _check_not_empty(L: int, attention_mask) -> None:
    if L == 0:
        raise ValueError(
            "dlp-lora: empty prompt (input_ids has length 0); the router needs at least one token"
        )
    if attention_mask is not None:
        lengths = attention_mask.sum(-1).tolist()
        empty = [b for b, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(
                f"dlp-lora: empty prompt: sequence(s) {empty} have no tokens (attention_mask is all zero)"
            )


def _module_device(module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()) if isinstance(module, torch.nn.Module) else ():
        return tensor.device
    return torch.device("cpu")
