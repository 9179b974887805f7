"""Routing inside forward() and generate(): which adapters each row of the batch uses.

A patched model holds one :class:`RoutingState` that every patched Linear reads (the hot path),
and one :class:`SequenceRouting` that fills it before each forward, from a pre-forward hook on
the top-level model (see dlp_lora/patch.py).

Segments. The activations of a forward are flattened to rows [B*L, d]; row b*L + j is token j of
sequence b. A segment is a run of rows with one mixture: one per sequence with
``reroute="prompt"``, one per sentence span with ``reroute="sentence"``. Padding rows (left or
right) join their sequence's first / last span; attention never reads them, so padding changes
no sequence's result, and the router only sees real tokens (attention_mask == 1).

When the router runs (paper style, on the history):
- prefill (no cache yet): ``prompt`` routes each sequence on its whole prompt. ``sentence``
  splits the prompt into spans; a span starts at a token that ends a sentence (its row computes
  the logits of the next sentence's first token) and is routed on the prompt up to the span's
  end, so the last span, which generation continues, is routed on the whole prompt.
- decode (cache present): ``prompt`` keeps each sequence's mixture (no host sync per step).
  ``sentence``: when a token that ends a sentence arrives (and the token before it did not),
  the sequence is routed again on its history up to that token, and its mixture changes from
  that row on.
A token ends a sentence when it decodes to text ending in . ! ? (or their CJK forms) or
containing a newline; the table is built once from the tokenizer.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .ops import check_routing_values

__all__ = ["RoutingRecord", "RoutingState", "SequenceRouting", "sentence_end_ids", "REROUTE_MODES"]

REROUTE_MODES = ("prompt", "sentence")
SENTENCE_END_CHARS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")

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
    so an empty mixture is exactly the base model. fast is True when the raw kernel may update
    a module's output in place: no autograd, no autocast (a forward traced by torch.compile takes
    the registered op instead, see dlp_lora.patch; this hook itself always runs eager).
    """

    __slots__ = (
        "active",
        "fast",
        "num_tokens",
        "num_sequences",
        "seg_indptr",
        "lora_ids",
        "lora_weights",
        "last_seg_indptr",
        "last_lora_ids",
        "last_lora_weights",
        "kernel",
        "backend",
    )

    def __init__(self, kernel: Callable[..., None], backend: str):
        self.active = self.fast = False
        self.num_tokens = self.num_sequences = -1
        self.seg_indptr = self.lora_ids = self.lora_weights = None
        self.last_seg_indptr = self.last_lora_ids = self.last_lora_weights = None
        self.kernel, self.backend = kernel, backend


def sentence_end_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that end a sentence (see the module docstring); special tokens never do."""
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return frozenset(
        i
        for i, text in enumerate(texts)
        if i not in special and ("\n" in text or text.rstrip().endswith(SENTENCE_END_CHARS))
    )


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


class SequenceRouting:
    """Fills a RoutingState before each forward: router calls, sentence spans, use_mixture overrides.

    names: the bank's adapter names (bank ids index them); router: an object with ``label_names``
    and ``route(input_ids, attention_mask, *, top_p, max_loras) -> (ids [B,K] int32, weights [B,K])``
    or None (then only use_mixture applies adapters). ender_ids: tokens that end a sentence.
    """

    def __init__(
        self,
        state: RoutingState,
        *,
        names: Sequence[str],
        router,
        top_p: float,
        max_loras: int | None,
        reroute: str,
        ender_ids: frozenset[int],
        resolve_kernel: Callable[[torch.device, torch.dtype], tuple[Callable, str]],
        probe_module: torch.nn.Module,
        forward_signature: inspect.Signature,
    ):
        self.state = state
        self.names = list(names)
        self.router = router
        self.top_p, self.max_loras, self.reroute = top_p, max_loras, reroute
        self.ender_ids = ender_ids
        self._resolve_kernel = resolve_kernel
        # One patched module, whose lora_a says where and in what dtype the bank is now. Modules and
        # bound methods (not closures) so that copy.deepcopy(model) copies a consistent patch.
        self._probe_module = probe_module
        self._signature = forward_signature
        self._kernel_key: tuple | None = None
        self.log: list[RoutingRecord] = []
        self.override: list[Mixture] | None = None  # per sequence; length 1 = every sequence
        self._step = 0
        self._current: list[Mixture] | None = None  # the mixture of each sequence's open span
        self._histories: list[list[int]] | None = None  # sentence mode: every real token so far
        self._label_to_bank = None
        if router is not None:
            to_bank = [self.names.index(label) for label in router.label_names]
            self._label_to_bank = None if to_bank == list(range(len(to_bank))) else to_bank
        self._seg_cache: dict = {}
        self._seq_tensors = None  # (ids, weights, active) for self._current, built when it changes

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
        probe = self._probe_module._buffers["dlp_lora_a"]
        device = probe.device
        if (device, probe.dtype) != self._kernel_key:  # first call, or the model was moved / cast
            self.state.kernel, self.state.backend = self._resolve_kernel(device, probe.dtype)
            self._kernel_key = (device, probe.dtype)
            self._seg_cache.clear()
            self._seq_tensors = None
        prefill = past_length(cache) == 0
        # Which tokens are real: from the prompt's mask at prefill; tokens fed while decoding are all real.
        attention_mask = token_mask(attention_mask, L) if prefill else None
        self.state.fast = not (torch.is_grad_enabled() or torch.is_autocast_enabled(device.type))
        if prefill:
            _check_not_empty(L, attention_mask)
            self._step = 0
            self.log.clear()
        else:
            self._step += 1
        if self.override is not None:
            self._apply_override(B, L, prefill, device)
        elif self.router is None:
            raise RuntimeError(
                "dlp-lora: this model was patched without a router; wrap the call in "
                "`with use_mixture(model, mixtures):` or patch with a Router"
            )
        elif input_ids is None:
            raise ValueError(
                "dlp-lora: routing reads input_ids; inputs_embeds alone cannot be routed "
                "(use use_mixture to give the mixtures instead)"
            )
        elif prefill:
            self._prefill(input_ids, attention_mask, device)
        else:
            self._continue(input_ids, device)

    # --- router paths ----------------------------------------------------------------------------------

    def _prefill(self, input_ids: torch.Tensor, attention_mask, device) -> None:
        B, L = input_ids.shape
        ids_host = input_ids.tolist()
        mask_host = attention_mask.tolist() if attention_mask is not None else None
        histories, spans = [], []  # spans: (sequence, first row j, history index, route end)
        for b in range(B):
            cols = [j for j in range(L) if mask_host is None or mask_host[b][j]]
            tokens = [ids_host[b][j] for j in cols]
            histories.append(tokens)
            starts = [0]
            if self.reroute == "sentence":
                starts += [i for i in range(1, len(tokens)) if self._is_boundary(tokens, i)]
            for k, start in enumerate(starts):
                end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
                spans.append((b, 0 if k == 0 else cols[start], start, end))  # pads join the first span
        mixtures = self._route([histories[b][:end] for b, _, _, end in spans])
        reason = "sentence" if self.reroute == "sentence" else "prompt"
        segments, current = [], [None] * B
        for (b, j, position, _), mixture in zip(spans, mixtures, strict=True):
            segments.append((b * L + j, mixture))
            current[b] = mixture
            self._record(b, position, mixture, reason)
        self._histories = histories if self.reroute == "sentence" else None
        self._set_current(current)
        if len(segments) == B:
            self._use_sequence_segments(B, L, device)
        else:
            self._use_segments(segments, B, L, device)

    def _continue(self, input_ids: torch.Tensor, device) -> None:
        B, L = input_ids.shape
        if self._current is None or len(self._current) != B:
            raise RuntimeError(
                "dlp-lora: a forward with a filled cache but no matching prefill through the patched model "
                f"(batch {B}, routed batch {None if self._current is None else len(self._current)}); "
                "run the prompt through the patched model first"
            )
        if self.reroute != "sentence" or not self.ender_ids:
            self._use_sequence_segments(B, L, device)
            return
        boundaries = []  # (sequence, row j, history index)
        for b, new_tokens in enumerate(input_ids.tolist()):
            history = self._histories[b]
            for j, token in enumerate(new_tokens):
                history.append(token)
                if self._is_boundary(history, len(history) - 1):
                    boundaries.append((b, j, len(history) - 1))
        if not boundaries:
            self._use_sequence_segments(B, L, device)
            return
        ends = []  # each span is routed on the history up to its end within this forward
        for k, (b, _, _) in enumerate(boundaries):
            nxt = boundaries[k + 1] if k + 1 < len(boundaries) else None
            ends.append(nxt[2] if nxt is not None and nxt[0] == b else len(self._histories[b]))
        mixtures = self._route(
            [self._histories[b][:end] for (b, _, _), end in zip(boundaries, ends, strict=True)]
        )
        segments, current = [], list(self._current)
        opened = set()
        for (b, j, position), mixture in zip(boundaries, mixtures, strict=True):
            if b not in opened and j > 0:  # rows before the first boundary continue the open span
                segments.append((b * L, current[b]))
            opened.add(b)
            segments.append((b * L + j, mixture))
            current[b] = mixture
            self._record(b, position, mixture, "sentence")
        segments += [(b * L, self._current[b]) for b in range(B) if b not in opened]
        segments.sort(key=lambda seg: seg[0])
        self._set_current(current)
        self._use_segments(segments, B, L, device)

    def _is_boundary(self, tokens: list[int], i: int) -> bool:
        # The first of a run of enders ("...", "!?", "\n\n") starts the span; the rest stay in it.
        return i > 0 and tokens[i] in self.ender_ids and tokens[i - 1] not in self.ender_ids

    def _route(self, token_lists: list[list[int]]) -> list[Mixture]:
        """Route each token list (one router call for all of them); returns bank-space mixtures."""
        router_device = _module_device(self.router)
        longest = max(len(tokens) for tokens in token_lists)
        ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
        mask = torch.zeros(len(token_lists), longest, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = 1
        with torch.no_grad():
            lora_ids, weights = self.router.route(
                ids.to(router_device), mask.to(router_device), top_p=self.top_p, max_loras=self.max_loras
            )
        mixtures = []
        for row_ids, row_weights in zip(lora_ids.tolist(), weights.tolist(), strict=True):
            kept = [(i, w) for i, w in zip(row_ids, row_weights, strict=True) if i >= 0]
            if self._label_to_bank is not None:
                kept = [(self._label_to_bank[i], w) for i, w in kept]
            mixtures.append((tuple(i for i, _ in kept), tuple(float(w) for _, w in kept)))
        return mixtures

    # --- use_mixture path ------------------------------------------------------------------------------

    def _apply_override(self, B: int, L: int, prefill: bool, device) -> None:
        mixtures = self.override
        if len(mixtures) == 1 and B != 1:
            mixtures = mixtures * B
        if len(mixtures) != B:
            raise ValueError(
                f"use_mixture: `mixtures` holds {len(mixtures)} mixtures but the batch has {B} "
                "sequences (give one dict per sequence, or a single dict for all)"
            )
        if prefill:
            for b, mixture in enumerate(mixtures):
                self._record(b, 0, mixture, "mixture")
        if mixtures != self._current:
            self._set_current(list(mixtures))
        self._use_sequence_segments(B, L, device)

    # --- building the op's routing tensors ---------------------------------------------------------

    def _set_current(self, current: list[Mixture]) -> None:
        self._current = current
        self._seq_tensors = None

    def _use_sequence_segments(self, B: int, L: int, device) -> None:
        """One segment per sequence with its current mixture: the decode fast path (cached tensors)."""
        if self._seq_tensors is None:
            ids, weights = _mixture_tensors(self._current, device)
            self._seq_tensors = (ids, weights, bool((ids >= 0).any()))
            check_routing_values(self._seg_indptr(B, 1, device), ids, num_tokens=B, num_loras=len(self.names))
        ids, weights, active = self._seq_tensors
        state = self.state
        state.seg_indptr = self._seg_indptr(B, L, device)
        state.lora_ids, state.lora_weights = ids, weights
        state.last_seg_indptr = self._seg_indptr(B, 1, device)
        state.last_lora_ids, state.last_lora_weights = ids, weights
        state.num_tokens, state.num_sequences, state.active = B * L, B, active

    def _use_segments(self, segments: list[tuple[int, Mixture]], B: int, L: int, device) -> None:
        """Arbitrary segments [(first row, mixture)], sorted, the first at row 0."""
        seg_indptr = torch.tensor([row for row, _ in segments] + [B * L], dtype=torch.int32)
        ids, weights = _mixture_tensors([mixture for _, mixture in segments], device)
        check_routing_values(seg_indptr, ids, num_tokens=B * L, num_loras=len(self.names))
        self._use_sequence_segments(B, L, device)  # fills last_* (each sequence's current mixture)
        state = self.state
        state.seg_indptr = seg_indptr.to(device)
        state.lora_ids, state.lora_weights = ids, weights
        state.active = bool((ids >= 0).any())

    def _seg_indptr(self, B: int, L: int, device) -> torch.Tensor:
        key = (B, L)
        seg = self._seg_cache.get(key)
        if seg is None:
            if len(self._seg_cache) > 8:  # prompts of many lengths: keep the cache small
                self._seg_cache.clear()
            seg = (
                torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)
                if L > 0
                else torch.zeros(B + 1, dtype=torch.int32, device=device)
            )
            self._seg_cache[key] = seg
        return seg

    def _record(self, sequence: int, position: int, mixture: Mixture, reason: str) -> None:
        ids, weights = mixture
        self.log.append(
            RoutingRecord(
                self._step, sequence, position, tuple(self.names[i] for i in ids), tuple(weights), reason
            )
        )


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
