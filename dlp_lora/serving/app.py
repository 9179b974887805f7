"""The Ray Serve application: an OpenAI-compatible front and model replicas that batch its requests.

    from ray import serve
    from dlp_lora.serving import build_app
    serve.run(build_app(model="llama/", adapters={"math": "a/math", "code": "a/code"}, router="router/"))

Two deployments:

* ``DLPLoRAServer`` (the HTTP ingress, no model): parses and validates every request (OpenAI's
  shapes, protocol.py), tokenises the prompts and checks them against the context, then hands the
  rows to a model replica. Routes: POST /v1/completions (server-sent events with "stream": true),
  GET /v1/models, GET /health.
* ``DLPLoRAModel`` (``replicas`` of them): each loads the model, the adapters (LoRABank) and the
  router once and patches the model. Requests that arrive together (``@serve.batch``: up to
  max_batch_size rows, waiting at most batch_wait_ms for the batch to fill), and all those that
  arrived while the model was busy (BatchRunner), become one CompletionEngine.run: one left-padded
  generate() per set of compatible decoding settings, in a worker thread so the replica keeps
  accepting requests meanwhile. A request's prompts go to one replica together.

If a model replica dies under a request (a crash, a lost node, ``ray.kill``), the front sends the
request again to another replica, so the client sees the answer, only later; a stream that had
already sent text ends with an error event instead. Only when every try fails does the client get
a 503 naming the cause. Ray Serve starts a replacement replica meanwhile.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. Request) at runtime.

import asyncio
import json
import math
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, StreamingResponse

from ..options import DEFAULT_REROUTE, DEFAULT_TOP_P, REROUTE_MODES
from .engine import BatchRunner, GenerationRow, RowResult
from .loading import ServeConfig, check_artifacts, load_engine, load_front
from .protocol import (
    STREAM_DONE,
    APIError,
    CompletionRequest,
    check_prompt_length,
    choice,
    completion_response,
    models_list,
    parse_completion_request,
    stream_chunk,
    usage,
)

__all__ = ["APP_NAME", "DLPLoRAModel", "DLPLoRAServer", "build_app"]

APP_NAME = "dlp-lora"
# Ray Serve's default (5) let a replica hold only 2-3 requests, so batches never filled.
MIN_ONGOING_REQUESTS = 64
# @serve.batch batches that may wait at once for the BatchRunner (their rows merge there).
BATCHES_IN_FLIGHT = 8
FRONT_ONGOING_REQUESTS = 1024
ATTEMPTS = 3  # tries of a request whose model replica died under it
# A replica that died, or cannot be reached: the request may run again elsewhere.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

api = FastAPI(title="dlp-lora", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
class DLPLoRAModel:
    """One model replica. user_config: {"max_batch_size": int, "batch_wait_ms": float}."""

    def __init__(self, config: ServeConfig):
        self.engine = load_engine(config)
        self.runner = BatchRunner(self.engine, max_batch_size=8)

    def reconfigure(self, user_config: dict) -> None:
        self.runner.max_batch_size = int(user_config["max_batch_size"])
        self._generate.set_max_batch_size(self.runner.max_batch_size)
        self._generate.set_batch_wait_timeout_s(float(user_config["batch_wait_ms"]) / 1000.0)

    async def complete(self, rows: list[GenerationRow]) -> list:
        """The RowResult (or the exception) of every row, each row batched with whatever else arrives."""
        return list(await asyncio.gather(*(self._generate(row) for row in rows)))

    async def stream(self, rows: list[GenerationRow]):
        """Yields ("text", row index, piece) as text is generated and ("done", row index, result) per row."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            # Called from the generating thread; the queue belongs to this event loop, which runs the
            # callbacks in order, so a row's last text comes before its "done".
            row.on_text = lambda text, i=index: loop.call_soon_threadsafe(
                events.put_nowait, ("text", i, text)
            )
        for index, row in enumerate(rows):
            task = asyncio.ensure_future(self._generate(row))
            task.add_done_callback(lambda t, i=index: events.put_nowait(("done", i, _task_result(t))))
        finished = 0
        while finished < len(rows):
            event = await events.get()
            finished += event[0] == "done"
            yield event

    def health(self) -> dict:
        return {
            "replica": ray.get_runtime_context().get_actor_name(),
            "generate_calls": self.engine.calls,
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
        self.tokenizer, self.served = load_front(config)
        self.model = model
        self.created = int(time.time())
        self.retries = 0  # requests sent again because their model replica died

    @api.get("/health")
    async def health(self):
        try:
            replica = await self.model.health.remote()
        except REPLICA_LOST as error:
            return JSONResponse(_replica_error(error).body(), status_code=503)
        return {"status": "ok", "model_replica": replica, "front_retries": self.retries}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return models_list(self.served, self.created)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            parsed = parse_completion_request(await request.body(), self.served)
            rows = [self._row(parsed, i) for i in range(len(parsed.prompts))]
        except APIError as error:
            return JSONResponse(error.body(), status_code=error.status)
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, rows), media_type="text/event-stream")
        last = None
        for _ in range(ATTEMPTS):
            try:
                results = await self.model.complete.remote(rows)
                break
            except REPLICA_LOST as error:
                last = error
                self.retries += 1
        else:
            error = _replica_error(last)
            return JSONResponse(error.body(), status_code=error.status)
        for result in results:
            if not isinstance(result, RowResult):
                error = _row_error(result)
                return JSONResponse(error.body(), status_code=error.status)
        choices = [choice(i, r.text, r.finish_reason, r.routing) for i, r in enumerate(results)]
        tokens = usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
        body = completion_response(parsed, choices, tokens, batch_size=max(r.batch_size for r in results))
        return JSONResponse(body)

    def _row(self, request: CompletionRequest, index: int) -> GenerationRow:
        prompt_ids = list(self.tokenizer(request.prompts[index])["input_ids"])
        check_prompt_length(len(prompt_ids), request, self.served, index)
        return GenerationRow(
            prompt_ids=prompt_ids,
            max_tokens=request.max_tokens,
            stop=request.stop,
            mixture=request.mixture,
            routing_top_p=request.routing_top_p,
            max_loras=request.max_loras,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )

    async def _stream(self, request: CompletionRequest, rows: list[GenerationRow]):
        """Server-sent events: text as it is generated, then each choice's finish_reason and routing."""
        results: dict[int, object] = {}
        sent_text = False
        for attempt in range(ATTEMPTS):
            try:
                async for kind, index, payload in self.model.options(stream=True).stream.remote(rows):
                    if kind == "text":
                        sent_text = True
                        yield stream_chunk(request, [choice(index, payload, None, None)])
                        continue
                    results[index] = payload
                    if isinstance(payload, RowResult):
                        final = choice(index, "", payload.finish_reason, payload.routing)
                        yield stream_chunk(request, [final], dlp_batch_size=payload.batch_size)
                    else:
                        yield f"data: {json.dumps(_row_error(payload).body())}\n\n"
                break
            except REPLICA_LOST as error:
                self.retries += 1
                if sent_text or results or attempt == ATTEMPTS - 1:  # the client has part of an answer
                    yield f"data: {json.dumps(_replica_error(error).body())}\n\n"
                    yield STREAM_DONE
                    return
        done = [r for r in results.values() if isinstance(r, RowResult)]
        if request.include_usage:
            totals = usage(sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done))
            yield stream_chunk(request, [], usage=totals)
        yield STREAM_DONE


def _task_result(task: asyncio.Task):
    if task.cancelled():
        return RuntimeError("the generation was cancelled")
    return task.exception() or task.result()


def _row_error(error) -> APIError:
    """The HTTP error of a row that failed inside generate(): 400 for bad input, else 500 naming it."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(f"invalid request: {error}")
    return APIError(f"generation failed: {type(error).__name__}: {error}", status=500, type="server_error")


def _replica_error(error: BaseException) -> APIError:
    cause = " ".join(str(error).split())[:300]
    return APIError(
        f"the model replica serving this request died or is unreachable ({type(error).__name__}: {cause}), "
        f"{ATTEMPTS} times in a row; retry once Ray Serve has replaced it",
        status=503,
        type="server_error",
        code="replica_unavailable",
    )


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
) -> serve.Application:
    """The Ray Serve application (``serve.run`` it, or compose it); checks every argument first.

    model / adapters / router: directories (on every node of a cluster). replicas: model replicas.
    device "cuda" gives each model replica one GPU; on "cpu" each reserves cpus_per_replica CPUs
    and uses as many torch threads (the front reserves none). top_p / max_loras: the router's
    defaults (requests override them with routing_top_p, max_loras). model_name: what clients send
    as `model` (default: the model directory's name). Raises ValueError on a bad argument or file.
    """
    for name, value in (("replicas", replicas), ("max_batch_size", max_batch_size),
                        ("cpus_per_replica", cpus_per_replica)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float)) \
            or not math.isfinite(batch_wait_ms) or batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be a number >= 0, got {batch_wait_ms!r}")
    if reroute not in REROUTE_MODES:
        raise ValueError(f"reroute must be one of {REROUTE_MODES}, got {reroute!r}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
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
    )
    model_replicas = DLPLoRAModel.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests
        or max(MIN_ONGOING_REQUESTS, BATCHES_IN_FLIGHT * max_batch_size),
        ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": cpus_per_replica},
        user_config={"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms},
    ).bind(config)
    front = DLPLoRAServer.options(
        max_ongoing_requests=FRONT_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0}
    )
    return front.bind(config, model_replicas)
