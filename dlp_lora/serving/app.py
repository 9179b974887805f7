"""The Ray Serve deployment: an OpenAI-compatible server whose concurrent requests share generate().

    from ray import serve
    from dlp_lora.serving import build_app
    serve.run(build_app(model="llama/", adapters={"math": "a/math", "code": "a/code"}, router="router/"))

Every replica loads the model, the adapters (LoRABank) and the router once and patches the model.
Requests that arrive together (``@serve.batch``: up to max_batch_size, waiting at most
batch_wait_ms for the batch to fill) become one CompletionEngine.run, i.e. one left-padded
generate() per set of compatible decoding settings, run in a worker thread so the replica keeps
accepting requests meanwhile. A request with a list of prompts adds one row per prompt.

Routes: POST /v1/completions (OpenAI's shapes, server-sent events with "stream": true),
GET /v1/models, GET /health (this replica's name, its generate() calls and their sizes).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (e.g. Request) at runtime.

import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

from .engine import GenerationRow, RowResult
from .loading import ServeConfig, check_artifacts, load_engine
from .protocol import (
    STREAM_DONE,
    APIError,
    CompletionRequest,
    ServedModels,
    check_prompt_length,
    choice,
    completion_response,
    models_list,
    parse_completion_request,
    stream_chunk,
    usage,
)

__all__ = ["DLPLoRAServer", "build_app"]

APP_NAME = "dlp-lora"
# Ray Serve's default (5) let a replica hold only 2-3 requests, so batches never filled.
MIN_ONGOING_REQUESTS = 64

api = FastAPI(title="dlp-lora", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class DLPLoRAServer:
    """One replica: a patched model behind the OpenAI routes. user_config: max_batch_size, batch_wait_ms."""

    def __init__(self, config: ServeConfig):
        self.engine = load_engine(config)
        bank = self.engine.model._dlp_lora_patch.bank
        self.served = ServedModels(config.served_name, tuple(bank.names), self.engine.max_context)
        self.created = int(time.time())
        self.call_sizes = Counter()  # rows per generate() call on this replica

    def reconfigure(self, user_config: dict) -> None:
        self._generate.set_max_batch_size(int(user_config["max_batch_size"]))
        self._generate.set_batch_wait_timeout_s(float(user_config["batch_wait_ms"]) / 1000.0)

    @api.get("/health")
    async def health(self) -> dict:
        import ray

        return {
            "status": "ok",
            "replica": ray.get_runtime_context().get_actor_name(),
            "generate_calls": self.engine.calls,
            "call_sizes": {str(k): v for k, v in sorted(self.call_sizes.items())},
        }

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
        results = await asyncio.gather(*(self._generate(row) for row in rows))
        for result in results:
            if not isinstance(result, RowResult):
                error = _row_error(result)
                return JSONResponse(error.body(), status_code=error.status)
        choices = [choice(i, r.text, r.finish_reason, r.routing) for i, r in enumerate(results)]
        body = completion_response(
            parsed,
            choices,
            usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)),
            batch_size=max(r.batch_size for r in results),
        )
        return JSONResponse(body)

    def _row(self, request: CompletionRequest, index: int) -> GenerationRow:
        prompt_ids = self.engine.encode(request.prompts[index])
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
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            # Called from the generating thread; the queue belongs to this event loop.
            row.on_text = lambda text, i=index: loop.call_soon_threadsafe(
                events.put_nowait, ("text", i, text)
            )
        tasks = [asyncio.ensure_future(self._generate(row)) for row in rows]
        for index, task in enumerate(tasks):
            task.add_done_callback(lambda t, i=index: events.put_nowait(("done", i, t)))
        results: dict[int, object] = {}
        while len(results) < len(rows):
            kind, index, payload = await events.get()
            if kind == "text":
                yield stream_chunk(request, [choice(index, payload, None, None)])
                continue
            if payload.cancelled():
                result = RuntimeError("the generation was cancelled")
            else:
                result = payload.exception() or payload.result()
            results[index] = result
            if not isinstance(result, RowResult):
                yield f"data: {json.dumps(_row_error(result).body())}\n\n"
                continue
            final = choice(index, "", result.finish_reason, result.routing)
            yield stream_chunk(request, [final], dlp_batch_size=result.batch_size)
        done = [r for r in results.values() if isinstance(r, RowResult)]
        if request.include_usage:
            totals = usage(sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done))
            yield stream_chunk(request, [], usage=totals)
        yield STREAM_DONE

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate(self, rows: list[GenerationRow]) -> list[RowResult | Exception]:
        results = await asyncio.to_thread(self.engine.run, rows)
        for size in {r.batch_size for r in results if isinstance(r, RowResult)}:
            self.call_sizes[size] += 1
        return results


def _row_error(error) -> APIError:
    """The HTTP error of a row that failed inside generate(): 400 for bad input, else 500 naming it."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(f"invalid request: {error}")
    return APIError(
        f"generation failed: {type(error).__name__}: {error}", status=500, type="server_error"
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
    reroute: str = "sentence",
    top_p: float = 0.6,
    max_loras: int | None = None,
    dtype: str = "float32",
    model_name: str | None = None,
    cpus_per_replica: int = 1,
    max_ongoing_requests: int | None = None,
) -> serve.Application:
    """The Ray Serve application (``serve.run`` it, or compose it); checks every argument first.

    model / adapters / router: directories (on every node of a cluster). device "cuda" gives each
    replica one GPU; on "cpu" each replica reserves cpus_per_replica CPUs and uses as many torch
    threads. top_p / max_loras: the router's defaults (requests override them with routing_top_p,
    max_loras). Raises ValueError on a bad argument or a missing file.
    """
    for name, value, low in (("replicas", replicas, 1), ("max_batch_size", max_batch_size, 1),
                             ("cpus_per_replica", cpus_per_replica, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float)) \
            or not math.isfinite(batch_wait_ms) or batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be a number >= 0, got {batch_wait_ms!r}")
    if reroute not in ("sentence", "prompt"):
        raise ValueError(f"reroute must be 'sentence' or 'prompt', got {reroute!r}")
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
    ongoing = max_ongoing_requests or max(MIN_ONGOING_REQUESTS, 4 * max_batch_size)
    return DLPLoRAServer.options(
        num_replicas=replicas,
        max_ongoing_requests=ongoing,
        ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": cpus_per_replica},
        user_config={"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms},
    ).bind(config)
