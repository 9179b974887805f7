"""The Ray Serve application: an OpenAI-compatible front and model replicas that batch its requests.

    from ray import serve
    from dlp_lora.serving import build_app
    serve.run(build_app(model="llama/", adapters={"math": "a/math", "code": "a/code"}, router="router/"))

Two deployments:

* ``DLPLoRAServer`` (the HTTP ingress, no model): parses and validates every request (OpenAI's
  shapes, protocol.py), tokenises the prompts and checks them against the context, then hands the
  rows to a model replica. Routes: POST /v1/completions and POST /v1/chat/completions (whose
  messages become one prompt through the tokenizer's chat template; server-sent events with
  "stream": true), GET /v1/models, GET /health.
* ``DLPLoRAModel`` (``replicas`` of them): each loads the model, the adapters (LoRABank) and the
  router once and patches the model. By default its rows are scheduled continuously
  (ContinuousScheduler, in a worker thread): at every decode step finished rows leave the batch and
  waiting rows join it, up to max_batch_size rows, each with its own mixture and routing. With
  ``batching="static"``, requests that arrive together (``@serve.batch``, waiting at most
  batch_wait_ms) and all those that arrived while the model was busy (BatchRunner) become one
  CompletionEngine.run instead. A request's prompts go to one replica together.

If a model replica dies under a request (a crash, a lost node, ``ray.kill``), the front sends the
request again to another replica, so the client sees the answer, only later; a stream that had
already sent text ends with an error event instead. Only when every try fails does the client get
a 503 naming the cause. Ray Serve starts a replacement replica meanwhile.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. Request) at runtime.
# Everything the routes call is defined above the class: `@serve.ingress(api)` takes the routes as they
# are when the class body is defined, so a helper defined further down would be a NameError there.

import asyncio
import concurrent.futures
import copy
import json
import math
import secrets
import threading
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from ..options import BATCHING_MODES, DEFAULT_BATCHING, DEFAULT_REROUTE, DEFAULT_TOP_P, REROUTE_MODES
from .engine import BatchRunner, GenerationRow, RowResult
from .loading import ServeConfig, check_artifacts, load_engine, load_front
from .protocol import (
    MAX_REQUEST_BYTES,
    STREAM_DONE,
    APIError,
    CompletionRequest,
    check_prompt_length,
    choice,
    completion_response,
    models_list,
    parse_chat_request,
    parse_completion_request,
    replica_error,
    row_error,
    stream_choice,
    stream_chunk,
    template_error,
    usage,
)
from .replica_counts import CountsReporter, open_board
from .scheduler import ContinuousScheduler

__all__ = ["APP_NAME", "DLPLoRAModel", "DLPLoRAServer", "build_app"]

APP_NAME = "dlp-lora"
# Ray Serve's default (5) let a replica hold only 2-3 requests, so batches never filled.
MIN_ONGOING_REQUESTS = 64
# @serve.batch batches that may wait at once for the BatchRunner (their rows merge there).
BATCHES_IN_FLIGHT = 8
FRONT_ONGOING_REQUESTS = 1024
REPLICA_COUNTS = ("running", "waiting", "generated_tokens", "cancelled_rows")  # per replica in /health
ATTEMPTS = 3  # tries of a request whose model replica died under it
# A replica that died, or cannot be reached: the request may run again elsewhere.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
HEALTH_TIMEOUT_S = 2.0  # /health answers 503 when no model replica answers within this
TOKENIZER_THREADS = 2  # tokenising runs in these threads, never on the front's event loop

api = FastAPI(title="dlp-lora", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 (no such route) and 405 (wrong method) in OpenAI's error body, not FastAPI's {"detail"}."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    error = APIError(str(message), status=exc.status_code, code=codes.get(exc.status_code))
    return _error_response(error, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: OpenAI's 500 body naming the exception's type, never a traceback or a path."""
    error = APIError(f"internal error ({type(exc).__name__})", status=500, type="server_error")
    return _error_response(error)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 when over ``limit`` bytes: by Content-Length before reading anything,
    and while reading a body without one (chunked), as soon as the limit is passed."""
    too_large = APIError(f"the request body exceeds {limit} bytes", status=413, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError("Content-Length is not a number", code="invalid_request")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _check_api_key(request: Request, api_key: str | None) -> None:
    """OpenAI's `Authorization: Bearer KEY` (vLLM's --api-key): 401 unless it carries the key."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError("incorrect or missing API key; send the header `Authorization: Bearer <key>`",
                       status=401, code="invalid_api_key")


class _Tokenizers:
    """Tokenises prompts in a few threads, so a huge prompt never blocks the front's event loop.

    Each thread has its own copy of the tokenizer: a fast tokenizer is not safe to call from two
    threads at once ("Already borrowed").
    """

    def __init__(self, tokenizer, threads: int = TOKENIZER_THREADS):
        self._tokenizer, self._local = tokenizer, threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dlp-tokenize")

    def _thread_tokenizer(self):
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return tokenizer

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._thread_tokenizer()(prompts)["input_ids"]]

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self._thread_tokenizer()
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a Jinja error the template raised on this conversation
            raise template_error(error) from None
        # the template writes its own special tokens (e.g. <|im_start|>): the tokenizer must not add more
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def encode(self, prompts: list[str]) -> list[list[int]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode, prompts)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        """The conversation in the chat template, ready for the assistant's reply, as token ids."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._encode_chat, messages)


async def _awaited(response):
    """A DeploymentResponse as a coroutine (asyncio.wait_for takes coroutines, not awaitables)."""
    return await response


def _task_result(task: asyncio.Task):
    if task.cancelled():
        return RuntimeError("the generation was cancelled")
    return task.exception() or task.result()


@serve.deployment
class DLPLoRAModel:
    """One model replica. user_config: {"max_batch_size": int, "batch_wait_ms": float, "batching": str}.

    batching "continuous" (the default): rows join and leave the running batch at every decode step
    (ContinuousScheduler). "static": the rows that arrive together become one generate() that runs
    until its longest row ends (BatchRunner; batch_wait_ms applies only here).

    A call that Ray Serve cancels (its HTTP client disconnected) or a stream that is closed sets
    its rows' ``cancelled`` event: they end within a step (finish_reason "cancelled") and free
    their places; rows not started never run.
    """

    def __init__(self, config: ServeConfig):
        self.engine = load_engine(config)
        self.runner = BatchRunner(self.engine, max_batch_size=8)
        self.scheduler: ContinuousScheduler | None = None
        self.batching = DEFAULT_BATCHING
        context = serve.get_replica_context()
        self.reporter = CountsReporter(context.app_name, context.replica_id.unique_id, self.counts)

    def counts(self) -> dict:
        """What /health lists for each replica (read from the reporter's thread)."""
        health = self.health()
        return {key: health[key] for key in REPLICA_COUNTS}

    def reconfigure(self, user_config: dict) -> None:
        size = int(user_config["max_batch_size"])
        self.batching = user_config.get("batching", DEFAULT_BATCHING)
        self.runner.max_batch_size = size
        self._generate.set_max_batch_size(size)
        self._generate.set_batch_wait_timeout_s(float(user_config["batch_wait_ms"]) / 1000.0)
        if self.batching == "continuous":
            if self.scheduler is None:
                self.scheduler = ContinuousScheduler(self.engine, max_batch_size=size)
            self.scheduler.max_batch_size = size

    async def complete(self, rows: list[GenerationRow]) -> list:
        """The RowResult (or the exception) of every row, each row batched with whatever else runs."""
        try:
            return list(await asyncio.gather(*(self._one(row) for row in rows)))
        except asyncio.CancelledError:  # the client left: nobody reads these rows any more
            for row in rows:
                row.cancelled.set()
            raise

    async def stream(self, rows: list[GenerationRow]):
        """Yields ("text", row index, piece) as text is generated and ("done", row index, result) per row.

        Closing the stream (the client went away) cancels its rows: the scheduler frees their places.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            # Called from the generating thread; the queue belongs to this event loop, which runs the
            # callbacks in order, so a row's last text comes before its "done".
            row.on_text = lambda text, i=index: loop.call_soon_threadsafe(
                events.put_nowait, ("text", i, text)
            )
        for index, row in enumerate(rows):
            task = asyncio.ensure_future(self._one(row))
            task.add_done_callback(lambda t, i=index: events.put_nowait(("done", i, _task_result(t))))
        finished: set[int] = set()
        try:
            while len(finished) < len(rows):
                event = await events.get()
                if event[0] == "done":
                    finished.add(event[1])
                yield event
        finally:  # closed or cancelled before every row was done: its client left
            for index, row in enumerate(rows):
                if index not in finished:
                    row.cancelled.set()

    async def _one(self, row: GenerationRow):
        """One row's RowResult, or its exception as a value."""
        if self.scheduler is None or self.batching != "continuous":
            return await self._generate(row)
        future = self.scheduler.submit(row)
        try:
            # shield: a cancelled call sets row.cancelled (above); the scheduler then ends the row
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            row.cancelled.set()
            raise
        except Exception as error:  # noqa: BLE001 - reported per row, as the static path does
            return error

    def health(self) -> dict:
        """Counts only: rows in the batch now, rows waiting, tokens generated, rows cancelled, and
        how many rows its steps (continuous) or generate() calls (static) had."""
        if self.scheduler is not None and self.batching == "continuous":
            scheduler = self.scheduler
            return {**scheduler.counts(), "steps": scheduler.steps,
                    "generated_tokens": scheduler.generated_tokens,
                    "cancelled_rows": scheduler.cancelled_rows,
                    "step_sizes": {str(k): v for k, v in sorted(scheduler.step_sizes.items())}}
        return {
            "running": self.runner.running,
            "waiting": self.runner.waiting,
            "generate_calls": self.engine.calls,
            "generated_tokens": self.runner.generated_tokens,
            "cancelled_rows": self.runner.cancelled_rows,
            "call_sizes": {str(k): v for k, v in sorted(self.runner.call_sizes.items())},
        }

    # Collects the rows that arrive together (within batch_wait_ms); batches formed while the model
    # is busy do not queue one behind another but merge in the runner (see BatchRunner).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _generate(self, rows: list[GenerationRow]) -> list:
        return await self.runner.submit(rows)


@serve.deployment
@serve.ingress(api)
class DLPLoRAServer:
    """The HTTP front: OpenAI's routes; validates, tokenises, and sends rows to a DLPLoRAModel replica."""

    def __init__(self, config: ServeConfig, model: DeploymentHandle):
        tokenizer, self.served = load_front(config)
        self.app_name = serve.get_replica_context().app_name
        self.board = open_board(self.app_name)
        self.tokenizers = _Tokenizers(tokenizer)
        self.api_key, self.max_request_bytes = config.api_key, config.max_request_bytes
        self.model = model
        self.created = int(time.time())
        self.retries = 0  # requests sent again because their model replica died

    @api.get("/health")
    async def health(self):
        """At once: 200 with the model replica's counts, or 503 when no replica answers in time."""
        response = self.model.health.remote()
        try:
            counts = await asyncio.wait_for(_awaited(response), HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - a timeout, a dead or restarting replica: not serving
            response.cancel()
            timed_out = isinstance(error, asyncio.TimeoutError)
            cause = f"no answer within {HEALTH_TIMEOUT_S:g} s" if timed_out else type(error).__name__
            return _error_response(APIError(f"no model replica can serve now ({cause})", status=503,
                                            type="server_error", code="replica_unavailable"))
        return {"status": "ok", "model_replica": counts, "model_replicas": await self._replica_counts(),
                "front_retries": self.retries}

    async def _replica_counts(self) -> list[dict] | None:
        """Each model replica's counts from the board (None when the board does not answer in time:
        /health stays quick); a board that died with a replaced front is made again."""
        try:
            return await asyncio.wait_for(_awaited(self.board.snapshot.remote()), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - reported as "unknown"; the next call asks a new board
            self.board = open_board(self.app_name)
            return None

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            _check_api_key(request, self.api_key)
        except APIError as error:
            return _error_response(error)
        return models_list(self.served, self.created)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, parse_completion_request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, parse_chat_request)

    async def _answer(self, request: Request, parse):
        """Check the key, parse the body with ``parse``, tokenise, then answer whole or streamed."""
        try:
            _check_api_key(request, self.api_key)
            parsed = parse(await _read_body(request, self.max_request_bytes), self.served)
            rows = await self._rows(parsed)
        except APIError as error:
            return _error_response(error)
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, rows), media_type="text/event-stream")
        last = None
        for _ in range(ATTEMPTS):
            response = self.model.complete.remote(rows)
            try:
                results = await response
                break
            except REPLICA_LOST as error:
                last = error
                self.retries += 1
            except asyncio.CancelledError:  # the client disconnected: stop its rows on the replica
                response.cancel()
                raise
        else:
            return _error_response(replica_error(last, ATTEMPTS))
        for result in results:
            if not isinstance(result, RowResult):
                return _error_response(row_error(result))
        choices = [choice(parsed, i, r.text, r.finish_reason, r.routing) for i, r in enumerate(results)]
        tokens = usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
        body = completion_response(parsed, choices, tokens, batch_size=max(r.batch_size for r in results))
        return JSONResponse(body)

    async def _rows(self, request: CompletionRequest) -> list[GenerationRow]:
        """Tokenise every prompt, or render and tokenise the conversation (off the event loop), and
        check it against the context."""
        if request.chat:
            prompt_ids = [await self.tokenizers.encode_chat(request.messages)]
        else:
            prompt_ids = await self.tokenizers.encode(request.prompts)
        rows = []
        for index, ids in enumerate(prompt_ids):
            max_tokens = check_prompt_length(len(ids), request, self.served, index)
            rows.append(GenerationRow(
                prompt_ids=ids,
                max_tokens=max_tokens,
                stop=request.stop,
                mixture=request.mixture,
                routing_top_p=request.routing_top_p,
                max_loras=request.max_loras,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
            ))
        return rows

    async def _stream(self, request: CompletionRequest, rows: list[GenerationRow]):
        """Server-sent events: text as it is generated, then each choice's finish_reason and routing.

        A chat stream first sends each choice's role. Every stream ends with ``data: [DONE]``, a failed
        row's or a lost replica's error event before it.
        """
        results: dict[int, object] = {}
        sent_text = False
        if request.chat:
            roles = [stream_choice(request, i, "", first=True) for i in range(len(rows))]
            yield stream_chunk(request, roles)
        for attempt in range(ATTEMPTS):
            events = self.model.options(stream=True).stream.remote(rows)
            try:
                async for kind, index, payload in events:
                    if kind == "text":
                        sent_text = True
                        yield stream_chunk(request, [stream_choice(request, index, payload)])
                        continue
                    results[index] = payload
                    if isinstance(payload, RowResult):
                        final = stream_choice(request, index, "", payload.finish_reason, payload.routing)
                        yield stream_chunk(request, [final], dlp_batch_size=payload.batch_size)
                    else:
                        yield f"data: {json.dumps(row_error(payload).body())}\n\n"
                break
            except REPLICA_LOST as error:
                self.retries += 1
                if sent_text or results or attempt == ATTEMPTS - 1:  # the client has part of an answer
                    yield f"data: {json.dumps(replica_error(error, attempt + 1).body())}\n\n"
                    yield STREAM_DONE
                    return
            except (asyncio.CancelledError, GeneratorExit):  # the client left: stop its rows
                events.cancel()
                raise
        done = [r for r in results.values() if isinstance(r, RowResult)]
        if request.include_usage:
            totals = usage(sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done))
            yield stream_chunk(request, [], usage=totals)
        yield STREAM_DONE


def build_app(
    *,
    model: str | Path,
    adapters: dict[str, str | Path],
    router: str | Path | None = None,
    replicas: int = 1,
    device: str = "cpu",
    max_batch_size: int = 8,
    batch_wait_ms: float = 10,
    reroute: str = DEFAULT_REROUTE,
    top_p: float = DEFAULT_TOP_P,
    max_loras: int | None = None,
    dtype: str = "float32",
    model_name: str | None = None,
    cpus_per_replica: int = 1,
    max_ongoing_requests: int | None = None,
    api_key: str | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    batching: str = DEFAULT_BATCHING,
) -> serve.Application:
    """The Ray Serve application (``serve.run`` it, or compose it); checks every argument first.

    model / adapters / router: directories (on every node of a cluster). replicas: model replicas.
    device "cuda" gives each model replica one GPU; on "cpu" each reserves cpus_per_replica CPUs
    and uses as many torch threads (the front reserves none). top_p / max_loras: the router's
    defaults (requests override them with routing_top_p, max_loras). batching: "continuous" or
    "static" (see DLPLoRAModel). model_name: what clients send
    as `model` (default: the model directory's name). api_key: when given, /v1/ routes require
    `Authorization: Bearer <api_key>` (401 otherwise). max_request_bytes: a larger body gets 413.
    Raises ValueError on a bad argument or file.
    """
    for name, value in (("replicas", replicas), ("max_batch_size", max_batch_size),
                        ("cpus_per_replica", cpus_per_replica), ("max_request_bytes", max_request_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float)) \
            or not math.isfinite(batch_wait_ms) or batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be a number >= 0, got {batch_wait_ms!r}")
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if reroute not in REROUTE_MODES:
        raise ValueError(f"reroute must be one of {REROUTE_MODES}, got {reroute!r}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()
                                or not api_key.isascii() or api_key != api_key.strip()):
        raise ValueError("api_key must be a non-empty ASCII string without surrounding spaces")
    if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    adapters = {name: str(Path(path).resolve()) for name, path in adapters.items()}
    check_artifacts(model, adapters, router)
    gpu = device.startswith("cuda")
    config = ServeConfig(
        model=str(Path(model).resolve()),
        adapters=adapters,
        router=str(Path(router).resolve()) if router is not None else None,
        device=device,
        dtype=dtype,
        reroute=reroute,
        top_p=top_p,
        max_loras=max_loras,
        model_name=model_name,
        threads=None if gpu else cpus_per_replica,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
    )
    model_replicas = DLPLoRAModel.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests
        or max(MIN_ONGOING_REQUESTS, BATCHES_IN_FLIGHT * max_batch_size),
        ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": cpus_per_replica},
        user_config={"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms, "batching": batching},
    ).bind(config)
    front = DLPLoRAServer.options(
        max_ongoing_requests=FRONT_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0}
    )
    return front.bind(config, model_replicas)
