"""Many prompts, each with its own mixture and settings, as few fused generate() calls as possible.

    engine = CompletionEngine(model, tokenizer)           # model: patched with patch_model
    results = engine.run([GenerationRow(engine.encode("..."), max_tokens=16), ...])

Rows that can share a call (the same decoding: greedy, or sampling with one temperature and
top_p and no seed) become one left-padded ``generate()``; every row keeps its own mixture (manual,
or routed on its own prompt with its own routing options), its own ``max_tokens`` and its own stop
strings. The call runs until every row is done: a per-row stopping criterion ends a row at its
``max_tokens``, at EOS or when its text contains one of its stop strings (it is then fed padding,
as generate() does for a finished row); the call ends with its last row. A seeded sampled row
runs alone, so its text depends only on its seed, not on what else was in the batch.

A row that fails inside a call (an error nothing checked before) is retried alone, so only the
bad row fails. BatchRunner feeds an engine from an asyncio loop, every waiting row into the next
call. No web framework or Ray here: the server (app.py) wraps this.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..patch import is_patched, use_mixture
from ..routing_state import Route

__all__ = [
    "BatchRunner", "CompletionEngine", "GenerationRow", "RowResult", "RowTracker", "cancelled_result",
    "routing_spans",
]


@dataclass
class GenerationRow:
    """One prompt to complete. prompt_ids: its token ids (no padding), as CompletionEngine.encode gives.

    mixture: {adapter: weight} used for the whole row, or None to route the row on its own prompt
    (and again at sentence ends when the model was patched with reroute="sentence"), with
    routing_top_p / max_loras instead of the patch's defaults when given. temperature 0 = greedy.
    on_text: called from the generating thread with each new piece of the row's text, as soon as
    it is final (text that could still turn out to start a stop string is held back).
    cancelled: set it (from any thread) when nobody waits for the row any more (its client left):
    the row then ends within a step, finish_reason "cancelled", and a row not yet started never runs.
    Neither on_text nor cancelled travels when the row is pickled (sent to a model replica).
    """

    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    mixture: dict[str, float] | None = None
    routing_top_p: float | None = None
    max_loras: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_text: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("on_text", "cancelled")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, on_text=None, cancelled=threading.Event())


@dataclass
class RowResult:
    """The completion of one row.

    text: the generated text (stop string and EOS excluded); token_ids: the generated tokens the
    text comes from; finish_reason: "stop" (EOS or a stop string), "length" (max_tokens) or
    "cancelled" (its cancelled event was set);
    routing: dlp_routing spans (see routing_spans); batch_size: rows of the generate() call.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    routing: list[dict]
    batch_size: int


class CompletionEngine:
    """Runs GenerationRows on one patched model; thread-safe (calls take turns on the model)."""

    def __init__(self, model, tokenizer, *, max_context: int | None = None):
        if not is_patched(model):
            raise ValueError("CompletionEngine: the model must be patched with dlp_lora.patch_model first")
        self.model, self.tokenizer = model, tokenizer
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        # One generate() at a time: a seeded call reseeds torch's global RNG, and the device is the
        # bottleneck anyway (routing itself is per call, so the lock is not needed for it).
        # (The continuous scheduler's worker takes it for each step, for the same reason.)
        self.model_lock = threading.Lock()
        # A fast tokenizer is not safe to call from two threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self.calls = 0  # generate() calls so far

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def check_row(self, row: GenerationRow) -> None:
        """ValueError naming what is wrong with a row before it runs."""
        if not row.prompt_ids:
            raise ValueError("empty prompt: it has no tokens")
        if row.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {row.max_tokens}")
        if len(row.prompt_ids) + row.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(row.prompt_ids)} tokens) + max_tokens ({row.max_tokens}) exceed the "
                f"model's context of {self.max_context} tokens"
            )

    # --- batching ----------------------------------------------------------------------------------

    def run(self, rows: Sequence[GenerationRow]) -> list[RowResult | Exception]:
        """Complete every row (blocking); returns, in order, a RowResult or the exception of each row."""
        results: list[RowResult | Exception | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self._call_key(row, i), []).append(i)
        for indices in groups.values():
            for i in [i for i in indices if rows[i].cancelled.is_set()]:
                results[i] = cancelled_result(rows[i])
            indices = [i for i in indices if results[i] is None]
            if not indices:
                continue
            group = [rows[i] for i in indices]
            try:
                outputs = self._generate(group)
            except Exception as error:  # noqa: BLE001 - one bad row must not fail the others
                if len(group) == 1:
                    outputs = [error]
                else:
                    outputs = [self._run_alone(row) for row in group]
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
        return results

    def _run_alone(self, row: GenerationRow) -> RowResult | Exception:
        try:
            return self._generate([row])[0]
        except Exception as error:  # noqa: BLE001
            return error

    @staticmethod
    def _call_key(row: GenerationRow, index: int) -> tuple:
        """Rows with equal keys share one generate() call (mixtures and routing options never matter)."""
        if row.temperature == 0:
            return ("greedy",)
        if row.seed is not None:
            return ("seeded", index)  # alone: its text depends on its seed only
        return ("sample", row.temperature, row.top_p)

    def _generate(self, rows: list[GenerationRow]) -> list[RowResult]:
        """One left-padded generate() for rows that share a call key."""
        first = rows[0]
        lengths = [len(row.prompt_ids) for row in rows]
        width = max(lengths)
        for row in rows:
            self.check_row(row)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention_mask[b, width - len(row.prompt_ids):] = 1
        trackers = [RowTracker(row, self) for row in rows]
        options = dict(
            max_new_tokens=max(row.max_tokens for row in rows),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            stopping_criteria=_stopping_criteria(trackers),
        )
        if first.temperature == 0:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            options.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
        device = self.device
        # Each row its own routing: a fixed mixture, or the router on the row's own prompt.
        entries = [row.mixture if row.mixture is not None else Route(row.routing_top_p, row.max_loras)
                   for row in rows]
        with self.model_lock:
            with use_mixture(self.model, entries) as log, _seeded(
                first.seed if first.temperature > 0 else None, device
            ):
                with torch.no_grad():
                    self.model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
                    )
                records = list(log)
            self.calls += 1
        results = []
        for b, (row, tracker) in enumerate(zip(rows, trackers, strict=True)):
            tracker.finish()
            spans = routing_spans(records, b, len(row.prompt_ids) + tracker.generated - 1)
            results.append(
                RowResult(
                    text=tracker.text,
                    token_ids=list(tracker.tokens),
                    finish_reason=tracker.finish_reason or "length",
                    prompt_tokens=len(row.prompt_ids),
                    completion_tokens=tracker.generated,
                    routing=spans,
                    batch_size=len(rows),
                )
            )
        return results


class BatchRunner:
    """Feeds one engine from an asyncio loop: whenever the model is free, every pending row goes in.

        runner = BatchRunner(engine, max_batch_size=16)
        results = await runner.submit(rows)        # RowResult or exception per row, in order

    Rows submitted while a call runs wait for the next call, which takes all of them (oldest first,
    up to max_batch_size), so a busy model always gets the fullest batch there is. (Ray Serve's
    @serve.batch alone forms the next batch from what arrives within its wait while a batch runs,
    and queues it: under load that chopped the waiting requests into small batches.) The engine
    runs in a worker thread, so the loop keeps taking requests meanwhile.
    """

    def __init__(self, engine: CompletionEngine, max_batch_size: int):
        self.engine, self.max_batch_size = engine, max_batch_size
        self._pending: collections.deque = collections.deque()  # (row, future)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.call_sizes: collections.Counter[int] = collections.Counter()  # generate() calls by rows
        self.running = 0  # rows in the engine now
        self.generated_tokens = 0  # tokens generated so far, cancelled rows' included
        self.cancelled_rows = 0  # rows ended (or never started) because they were cancelled

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def submit(self, rows: Sequence[GenerationRow]) -> list:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run())
        futures = [loop.create_future() for _ in rows]
        self._pending.extend(zip(rows, futures, strict=True))
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            take = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            if not self._pending:
                self._wakeup.clear()
            take = [(row, future) for row, future in take if not future.cancelled()]
            if not take:
                continue
            self.running = len(take)
            try:
                results = await asyncio.to_thread(self.engine.run, [row for row, _ in take])
            except Exception as error:  # noqa: BLE001 - engine.run reports rows; this is a bug, told to each
                results = [error] * len(take)
            finally:
                self.running = 0
            done = [r for r in results if isinstance(r, RowResult)]
            self.generated_tokens += sum(r.completion_tokens for r in done)
            self.cancelled_rows += sum(r.finish_reason == "cancelled" for r in done)
            rows_by_size = collections.Counter(r.batch_size for r in done if r.batch_size)
            for size, count in rows_by_size.items():  # every row of a call is in this run
                self.call_sizes[size] += count // size
            for (_, future), result in zip(take, results, strict=True):
                if not future.done():
                    future.set_result(result)


def routing_spans(records, sequence: int, end: int) -> list[dict]:
    """The dlp_routing of one row: [{"position", "adapters": {name: weight}, "reason"}], by position.

    records: RoutingRecords of one generate() call; sequence: the row; end: the last position whose
    token's forward computed a returned token (prompt length + generated tokens - 1). A span that
    starts later influenced nothing returned (its row ran after the row was done) and is left out.
    position indexes the row's real tokens, prompt then generated: the span's mixture is used from
    that token's forward on, i.e. for every token generated after it.
    """
    spans = [
        {"position": r.position, "adapters": dict(zip(r.adapters, r.weights, strict=True)),
         "reason": r.reason}
        for r in records
        if r.sequence == sequence and r.position < end
    ]
    return sorted(spans, key=lambda s: s["position"])


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sample with torch's RNG seeded, and restore the RNG afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class RowTracker:
    """Follows one row's new tokens: EOS, max_tokens, stop strings, and the text to stream."""

    def __init__(self, row: GenerationRow, engine: CompletionEngine):
        self.row, self.engine = row, engine
        self.tokens: list[int] = []  # kept tokens (EOS excluded)
        self.generated = 0  # tokens generated for this row, EOS included
        self.done = False
        self.finish_reason: str | None = None
        self.text = ""
        self._sent = 0  # characters of text already given to on_text
        self._watch_text = bool(row.stop) or row.on_text is not None

    def push(self, token: int) -> None:
        if self.done:
            return  # generate() feeds a finished row padding
        self.generated += 1
        if self.row.cancelled.is_set():  # nobody reads this row any more: end it, free the call
            self.done, self.finish_reason = True, "cancelled"
            return
        if token in self.engine.eos_ids:
            self._end("stop")
            return
        self.tokens.append(token)
        if self._watch_text:
            self.text = self.engine.decode(self.tokens)
            cut = _first_stop(self.text, self.row.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self._end("stop")
                return
        if len(self.tokens) >= self.row.max_tokens:
            self._end("length")
        elif self.row.on_text is not None:
            self._emit(len(self.text) - _held_back(self.text, self.row.stop))

    def _end(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason
        if not self._watch_text:
            self.text = self.engine.decode(self.tokens)
        self._emit(len(self.text))

    def finish(self) -> None:
        """After generate(): a row that never saw its last token pushed (cannot happen) still ends."""
        if not self.done:
            self._end("length")

    def _emit(self, upto: int) -> None:
        if self.row.on_text is not None and upto > self._sent:
            self.row.on_text(self.text[self._sent:upto])
            self._sent = upto


def cancelled_result(row: GenerationRow) -> RowResult:
    """A row cancelled before its call started: it never runs."""
    return RowResult(text="", token_ids=[], finish_reason="cancelled", prompt_tokens=len(row.prompt_ids),
                     completion_tokens=0, routing=[], batch_size=0)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that may still become a stop string, or an incomplete character."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-k:]):
                held = k
                break
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
        held = max(held, 1)
    return held


def _stopping_criteria(trackers: list[RowTracker]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class RowStops(StoppingCriteria):
        """Marks each row done at its own max_tokens, EOS or stop string (generate() then pads it)."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            for tracker, token in zip(trackers, input_ids[:, -1].tolist(), strict=True):
                tracker.push(token)
            return torch.tensor([t.done for t in trackers], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([RowStops()])
