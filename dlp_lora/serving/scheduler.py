"""Continuous batching: at every decode step finished rows leave the batch and waiting ones join.

    scheduler = ContinuousScheduler(engine, max_batch_size=8)    # starts its worker thread
    future = scheduler.submit(row)     # concurrent.futures.Future: a RowResult, or the row's exception
    scheduler.counts()                 # {"running": n, "waiting": m}
    scheduler.close()

One worker thread owns the model. Each step:

1. Rows that are done (EOS, a stop string, max_tokens) or cancelled (``row.cancelled`` set, or
   their future cancelled; they end with finish_reason "cancelled") leave: the surviving rows of
   the KV cache are selected and the left padding they all share is cut off.
2. Waiting rows are admitted while the batch has room (``max_batch_size`` rows, prefilling ones
   included), and routed on their prompts (one router call for all of them).
3. Admitted prompts are prefilled, each alone in its own cache, in chunks: a step prefills at most
   ``step_tokens`` minus the running rows' tokens, so one long prompt cannot stall the decoding
   rows for more than a chunk. A row whose prompt is complete samples its first token; its cache
   is left-padded to the batch's length and joins the batch.
4. One decode forward for every running row: each row's latest token is fed, with its own
   mixture; a row whose token ends a sentence is routed again on its own history first (all such
   rows in one router call). Each row then samples its next token with its own settings (greedy,
   or temperature / top_p with its own seeded ``torch.Generator``).

The running batch is one left-padded batch over transformers' ``DynamicCache`` (public API only:
built from per-layer key/value tensors, read back by iterating it), in the manner of TGI's
CausalLMBatch ``filter`` / ``concatenate``. The op's routing is given per forward
(``SequenceRouting.scheduled``) from each request's own routing (dlp_lora.routing_policy), so a
row's mixture history depends on its own tokens only, never on its neighbours. No KV is shared
between requests (no prefix cache), so two identical prompts with different mixtures never share
state. Models whose layers are not all full attention (sliding windows) are refused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import threading

import torch
import torch.nn.functional as F

from ..patch import routing_of, row_specs
from ..routing_policy import RequestRouting, Route
from ..step_mapping import StepMapping
from .engine import CompletionEngine, GenerationRow, RowResult, RowTracker, cancelled_result

__all__ = ["ContinuousScheduler"]

DEFAULT_STEP_TOKENS = 256


class _Request:
    """One row inside the scheduler: its routing, its progress and its own cache while it prefills."""

    def __init__(self, row: GenerationRow, engine: CompletionEngine):
        self.row = row
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.tracker = RowTracker(row, engine)
        self.routing: RequestRouting | None = None
        self.generator: torch.Generator | None = None
        self.prefilled = 0  # prompt tokens in its cache
        self.cache = None  # its own DynamicCache until it joins the batch
        self.next_token: int | None = None  # sampled, not yet fed
        self.batch_size = 1  # the most rows it shared a decode step with

    @property
    def abandoned(self) -> bool:
        return self.row.cancelled.is_set() or self.future.cancelled()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def cancel(self, names: list[str]) -> None:
        """End the row now: finish_reason "cancelled", with what it generated so far."""
        self.tracker.done, self.tracker.finish_reason = True, "cancelled"
        if self.routing is None:  # never admitted: it never runs
            if not self.future.done():
                self.future.set_result(cancelled_result(self.row))
            return
        self.finish(names)

    def finish(self, names: list[str]) -> None:
        tracker = self.tracker
        tracker.finish()
        # A span that starts at or after the last fed position influenced no returned token.
        end = len(self.row.prompt_ids) + tracker.generated - 1
        spans = [{"position": span.position,
                  "adapters": {names[i]: w for i, w in zip(*span.mixture, strict=True)},
                  "reason": span.reason}
                 for span in self.routing.spans if span.position < end]
        result = RowResult(
            text=tracker.text, token_ids=list(tracker.tokens),
            finish_reason=tracker.finish_reason or "length",
            prompt_tokens=len(self.row.prompt_ids), completion_tokens=tracker.generated, routing=spans,
            batch_size=self.batch_size,
        )
        if not self.future.done():
            self.future.set_result(result)


class ContinuousScheduler:
    """Iteration-level scheduling of GenerationRows on one engine's patched model (see the module doc)."""

    def __init__(self, engine: CompletionEngine, *, max_batch_size: int = 8,
                 step_tokens: int = DEFAULT_STEP_TOKENS):
        from transformers import DynamicCache

        self.engine, self.model = engine, engine.model
        self.max_batch_size, self.step_tokens = max_batch_size, step_tokens
        self.routing = routing_of(self.model)
        self._dynamic_cache = DynamicCache
        # transformers 5 renames the forward's past_key_values to cache; use whichever it takes
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        layer_types = set(getattr(self.model.config.get_text_config(decoder=True), "layer_types", None)
                          or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise NotImplementedError(
                "ContinuousScheduler: only full-attention models are supported, this one has "
                f"{sorted(layer_types)}"
            )
        device = engine.device
        self._prefill_mapping = StepMapping(len(self.routing.names), device)
        self._decode_mapping = StepMapping(len(self.routing.names), device)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefilling: list[_Request] = []
        self._running: list[_Request] = []
        self._cache = None  # DynamicCache of the running rows, keys [B, heads, T, head_dim]
        self._mask: torch.Tensor | None = None  # [B, T] 1 = a real token
        self._closed = False
        self.steps = 0
        self.cancelled_rows = 0  # rows ended because their caller stopped waiting
        self.generated_tokens = 0  # tokens sampled so far, cancelled rows' included
        self.step_sizes: collections.Counter[int] = collections.Counter()  # decode steps by rows
        self._thread = threading.Thread(target=self._loop, name="dlp-lora-scheduler", daemon=True)
        self._thread.start()

    # --- the callers' side (any thread) ---------------------------------------------------------------

    def submit(self, row: GenerationRow) -> concurrent.futures.Future:
        request = _Request(row, self.engine)
        with self._cond:
            if self._closed:
                raise RuntimeError("ContinuousScheduler: closed")
            self._waiting.append(request)
            self._cond.notify()
        return request.future

    def counts(self) -> dict:
        """Rows in the batch (prefilling included) and rows waiting for a place."""
        with self._cond:
            return {"running": len(self._running) + len(self._prefilling), "waiting": len(self._waiting)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # --- the worker thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._prefilling):
                    self._cond.wait()
                if self._closed:
                    stranded = [*self._waiting, *self._prefilling, *self._running]
                    self._waiting.clear()
            if self._closed:
                for request in stranded:
                    request.fail(RuntimeError("the model replica is shutting down"))
                return
            try:
                with self.engine.model_lock, torch.no_grad():
                    self.step()
            except Exception as error:  # noqa: BLE001 - a bug in a step: fail what is in flight, keep serving
                with self._cond:
                    in_flight = [*self._prefilling, *self._running]
                    self._prefilling, self._running = [], []
                self._cache = self._mask = None
                for request in in_flight:
                    request.fail(error)

    def step(self) -> None:
        """One iteration: leave, admit, prefill (chunked) and join, decode."""
        self._leave()
        self._admit()
        budget = max(self.step_tokens - len(self._running), 1)
        joined = self._prefill(budget)
        if joined:
            self._join(joined)
        if self._running:
            self._decode()
        self._leave()
        self.steps += 1

    def _leave(self) -> None:
        names = self.routing.names
        keep = []
        cancelled, ended_cancelled = [], 0
        for b, request in enumerate(self._running):
            if request.tracker.done:  # (the tracker itself ends a row whose cancelled event it sees)
                ended_cancelled += request.tracker.finish_reason == "cancelled"
                request.finish(names)
            elif request.abandoned:
                cancelled.append(request)
            else:
                keep.append(b)
        with self._cond:
            cancelled += [r for r in (*self._prefilling, *self._waiting) if r.abandoned]
            self._prefilling = [r for r in self._prefilling if not r.abandoned]
            self._waiting = collections.deque(r for r in self._waiting if not r.abandoned)
            self.cancelled_rows += len(cancelled) + ended_cancelled
        for request in cancelled:
            request.cancel(names)
        with self._cond:
            if len(keep) == len(self._running):
                return
            self._running = [self._running[b] for b in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask[index]
        trim = mask.shape[1] - int(mask.sum(-1).max())  # left padding every surviving row has
        self._mask = mask[:, trim:]
        self._cache = self._dynamic_cache(
            ddp_cache_data=[(k[index, :, trim:], v[index, :, trim:]) for k, v, *_ in self._cache]
        )

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            room = self.max_batch_size - len(self._running) - len(self._prefilling)
            while self._waiting and len(admitted) < room:
                admitted.append(self._waiting.popleft())
        queries = []  # (request, tokens, route)
        started = []
        for request in admitted:
            row = request.row
            try:
                self.engine.check_row(row)
                spec = row.mixture if row.mixture is not None else Route(row.routing_top_p, row.max_loras)
                (spec,) = row_specs(self.model, [spec])
                if isinstance(spec, Route) and self.routing.mixture_router is None:
                    raise ValueError("this model has no router: the request must give a mixture")
                request.routing = RequestRouting(spec, reroute=self.routing.reroute,
                                                 sentences=self.routing.sentences)
                queries += [(request, *query) for query in request.routing.start(row.prompt_ids)]
            except Exception as error:  # noqa: BLE001 - this row fails, the others go on
                request.fail(error)
                continue
            if row.temperature > 0 and row.seed is not None:
                request.generator = torch.Generator(self.engine.device).manual_seed(row.seed)
            started.append(request)
        self._resolve(queries)
        with self._cond:
            self._prefilling.extend(started)

    def _resolve(self, queries: list) -> None:
        """Route every request's queries of this step in one router call per (top_p, max_loras)."""
        if not queries:
            return
        mixtures = self.routing.mixture_router.route([q[1] for q in queries], [q[2] for q in queries])
        by_request: dict[int, tuple[_Request, list]] = {}
        for (request, _, _), mixture in zip(queries, mixtures, strict=True):
            by_request.setdefault(id(request), (request, []))[1].append(mixture)
        for request, request_mixtures in by_request.values():
            request.routing.resolve(request_mixtures)

    def _prefill(self, budget: int) -> list[_Request]:
        """Prefill chunks of the admitted prompts within the token budget; returns the rows that may join."""
        joined = []
        for request in list(self._prefilling):
            if budget <= 0:
                break
            prompt = request.row.prompt_ids
            start = request.prefilled
            count = min(len(prompt) - start, budget)
            device = self.engine.device
            if request.cache is None:
                request.cache = self._dynamic_cache()
            step = self._prefill_mapping.build([request.routing.segments(start, count)], count)
            try:
                with self.routing.scheduled(step):
                    out = self.model(
                        input_ids=torch.tensor([prompt[start:start + count]], device=device),
                        attention_mask=torch.ones(1, start + count, dtype=torch.long, device=device),
                        position_ids=torch.arange(start, start + count, device=device)[None],
                        **{self._cache_arg: request.cache}, use_cache=True, logits_to_keep=1,
                    )
            except Exception as error:  # noqa: BLE001 - this row fails, the others go on
                request.fail(error)
                with self._cond:
                    self._prefilling.remove(request)
                continue
            budget -= count
            request.prefilled += count
            if request.prefilled < len(prompt):
                continue
            with self._cond:
                self._prefilling.remove(request)
            self._accept([request], out.logits[:, -1])
            if request.tracker.done:
                self.cancelled_rows += request.tracker.finish_reason == "cancelled"
                request.finish(self.routing.names)
            else:
                joined.append(request)
        return joined

    def _join(self, joined: list[_Request]) -> None:
        """Left-pad the new rows' caches and the running batch's to one length, and concatenate them."""
        device = self.engine.device
        parts = [(self._cache, self._mask)] if self._running else []
        parts += [(r.cache, torch.ones(1, r.prefilled, dtype=torch.long, device=device)) for r in joined]
        length = max(mask.shape[1] for _, mask in parts)
        layers = [list(zip(*[(k, v) for k, v, *_ in cache], strict=True)) for cache, _ in parts]
        # layers[part] = (keys per layer, values per layer)
        data = []
        for layer in range(len(layers[0][0])):
            keys = [_left_pad(part[0][layer], length, dim=-2) for part in layers]
            values = [_left_pad(part[1][layer], length, dim=-2) for part in layers]
            data.append((torch.cat(keys), torch.cat(values)))
        self._cache = self._dynamic_cache(ddp_cache_data=data)
        self._mask = torch.cat([_left_pad(mask, length, dim=-1) for _, mask in parts])
        for request in joined:
            request.cache = None
        with self._cond:
            self._running.extend(joined)

    def _decode(self) -> None:
        running = self._running
        queries = []
        for request in running:  # the fed token enters the history; a sentence end re-routes the row
            queries += [(request, *q) for q in request.routing.push(request.next_token)]
        self._resolve(queries)
        B = len(running)
        step = self._decode_mapping.build(
            [r.routing.segments(len(r.routing.history) - 1, 1) for r in running], 1
        )
        device = self.engine.device
        mask = torch.cat([self._mask, torch.ones(B, 1, dtype=self._mask.dtype, device=device)], dim=1)
        with self.routing.scheduled(step):
            out = self.model(
                input_ids=torch.tensor([[r.next_token] for r in running], device=device),
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                **{self._cache_arg: self._cache}, use_cache=True, logits_to_keep=1,
            )
        self._mask = mask
        self.step_sizes[B] += 1
        for request in running:
            request.batch_size = max(request.batch_size, B)
        self._accept(running, out.logits[:, -1])

    def _accept(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Sample each row's next token from logits [B, vocab] with its own settings, and record it."""
        greedy = logits.argmax(-1).tolist()
        for b, request in enumerate(requests):
            row = request.row
            token = greedy[b] if row.temperature == 0 else _sample(logits[b], row, request.generator)
            request.next_token = token
            request.tracker.push(token)
        self.generated_tokens += len(requests)


def _sample(logits: torch.Tensor, row: GenerationRow, generator: torch.Generator | None) -> int:
    """One token from logits [vocab] with temperature and nucleus (top_p) sampling, as generate() does."""
    from transformers import TopPLogitsWarper

    scores = (logits.float() / row.temperature)[None]
    if row.top_p < 1.0:
        scores = TopPLogitsWarper(row.top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before ``tensor`` along dim (-1 or -2) up to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = (missing, 0) if dim == -1 else (0, 0, missing, 0)
    return F.pad(tensor, pad)
