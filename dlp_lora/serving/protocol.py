"""OpenAI's /v1/completions shapes: request validation, response and stream chunks, error bodies.

Field names and meanings follow OpenAI's Completions API (as vLLM's OpenAI server does), so the
official ``openai`` client works unchanged. Our own request fields ride along (the client sends them
through ``extra_body``):

    mixture        {adapter: weight}: this prompt uses exactly that mixture (the router is bypassed)
    routing_top_p  the router's top-p threshold for this request (named apart from sampling's top_p)
    max_loras      the most adapters the router may mix for this request

and each choice carries ``dlp_routing``, the adapters of every sentence span (see engine.py).

Every check here runs before a request joins a batch; a failure is an :class:`APIError`, which
the server turns into ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
Plain Python (no web framework), so it is tested without a server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..mixture import Mixture, MixtureError

__all__ = [
    "APIError",
    "CompletionRequest",
    "ServedModels",
    "completion_response",
    "models_list",
    "check_prompt_length",
    "choice",
    "parse_completion_request",
    "stream_chunk",
    "STREAM_DONE",
]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
STREAM_DONE = "data: [DONE]\n\n"

# OpenAI fields we accept only at their neutral value (anything else would be silently ignored).
_NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
}
_IGNORED = {"user"}  # accepted and ignored, as their values change no output
_KNOWN = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "mixture",
    "routing_top_p",
    "max_loras",
    *_NEUTRAL,
    *_IGNORED,
}


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModels:
    """What the server answers to: the base model's name and its adapters' names.

    ``model`` = the base name routes every prompt (or uses ``mixture``); ``model`` = an adapter's
    name means that adapter alone, weight 1 (as vLLM serves a LoRA by its name).
    """

    base: str
    adapters: tuple[str, ...]
    max_context: int  # prompt tokens + max_tokens may not exceed it

    def names(self) -> list[str]:
        return [self.base, *self.adapters]


@dataclass
class CompletionRequest:
    """A validated /v1/completions request. prompts: one or more non-empty strings.

    mixture: a Mixture {adapter: weight} for every prompt, under the rule of dlp_lora/mixture.py
    (negative weights allowed, zeros dropped), or None (the router picks per prompt).
    temperature 0 means greedy decoding; sampling uses temperature and top_p (no top-k).
    """

    model: str
    prompts: list[str]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    mixture: Mixture | None = None
    routing_top_p: float | None = None
    max_loras: int | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_completion_request(body: bytes | str | Mapping, served: ServedModels) -> CompletionRequest:
    """Validate a request body (raw JSON or an already parsed object); raises APIError naming the field.

    Token counts (the prompt against the context) are checked later, once the prompt is tokenised.
    """
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, Mapping):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise APIError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    for name, neutral in _NEUTRAL.items():
        value = body.get(name, neutral)
        if value != neutral and not (name == "logit_bias" and value == {}):
            raise APIError(f"{name}={value!r} is not supported by this server (only {neutral!r})", param=name)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("you must provide a model (see GET /v1/models)", param="model")
    if model not in served.names():
        raise APIError(
            f"the model {model!r} does not exist; this server serves {served.names()}",
            status=404,
            param="model",
            code="model_not_found",
        )
    request = CompletionRequest(model=model, prompts=_prompts(body.get("prompt")))
    request.max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, low=1)
    if request.max_tokens >= served.max_context:
        raise APIError(
            f"max_tokens={request.max_tokens} leaves no room for a prompt in this model's context of "
            f"{served.max_context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    request.temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    request.top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    request.seed = _integer(body, "seed", None)
    request.stop = _stop(body.get("stop"))
    request.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
            raise APIError("stream_options must be {\"include_usage\": bool}", param="stream_options")
        if not request.stream:
            raise APIError("stream_options is only allowed with stream=true", param="stream_options")
        request.include_usage = _boolean(options, "include_usage")

    request.routing_top_p = _number(body, "routing_top_p", None, low=0.0, high=1.0, low_open=True)
    request.max_loras = _integer(body, "max_loras", None, low=1)
    if request.max_loras is not None and request.max_loras > len(served.adapters):
        raise APIError(
            f"max_loras={request.max_loras} exceeds the {len(served.adapters)} adapters served",
            param="max_loras",
        )
    mixture = body.get("mixture")
    if model != served.base:
        if mixture is not None:
            raise APIError(
                f"model {model!r} is one adapter; give `mixture` with the base model {served.base!r}",
                param="mixture",
            )
        mixture = {model: 1.0}
    if mixture is not None:
        request.mixture = _mixture(mixture, served.adapters)
        for name in ("routing_top_p", "max_loras"):
            if body.get(name) is not None:
                raise APIError(f"{name} applies to the router, which a fixed mixture bypasses", param=name)
    return request


def check_prompt_length(prompt_tokens: int, request: CompletionRequest, served: ServedModels, index: int):
    """Raise APIError unless prompt_tokens + max_tokens fits the model's context."""
    param = "prompt" if len(request.prompts) == 1 else f"prompt[{index}]"
    if prompt_tokens + request.max_tokens > served.max_context:
        raise APIError(
            f"this model's maximum context length is {served.max_context} tokens; the prompt"
            f"{'' if len(request.prompts) == 1 else f' [{index}]'} has {prompt_tokens} tokens and "
            f"max_tokens is {request.max_tokens} ({prompt_tokens + request.max_tokens} in all)",
            param=param,
            code="context_length_exceeded",
        )
    if prompt_tokens == 0:
        raise APIError(f"{param} has no tokens under this model's tokenizer", param=param)


# --- responses ---------------------------------------------------------------------------------------


def choice(index: int, text: str, finish_reason: str | None, routing: list[dict] | None) -> dict:
    """One element of ``choices``; routing: the dlp_routing spans (None: not yet known, e.g. a stream)."""
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if routing is not None:
        out["dlp_routing"] = routing
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    request: CompletionRequest, choices: Sequence[dict], usage_: dict, batch_size: int
) -> dict:
    """The body of a non-streamed answer. batch_size: the most rows any of its generate() calls held."""
    return {
        "id": request.id,
        "object": "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": list(choices),
        "usage": usage_,
        "dlp_batch_size": batch_size,
    }


def stream_chunk(request: CompletionRequest, choices: Sequence[dict], **extra) -> str:
    """One server-sent event of a streamed answer (same object as the full answer, partial text)."""
    body = {
        "id": request.id,
        "object": "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": list(choices),
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def models_list(served: ServedModels, created: int) -> dict:
    """GET /v1/models: the base model, then every adapter (``parent`` = the base), OpenAI's list shape."""
    def entry(name: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "dlp-lora",
                "parent": parent, "max_model_len": served.max_context}

    rows = [entry(served.base, None), *(entry(name, served.base) for name in served.adapters)]
    return {"object": "list", "data": rows}


# --- field checks ------------------------------------------------------------------------------------


def _prompts(prompt) -> list[str]:
    if prompt is None:
        raise APIError("you must provide a prompt", param="prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise APIError("prompt must be a non-empty string or a non-empty list of strings", param="prompt")
    for i, text in enumerate(prompts):
        param = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
        if isinstance(text, int) or (isinstance(text, list) and text and isinstance(text[0], int)):
            raise APIError("prompts given as token ids are not supported; send text", param=param)
        if not isinstance(text, str):
            raise APIError(f"{param} must be a string, got {type(text).__name__}", param=param)
        if not text.strip():
            raise APIError(f"{param} is empty", param=param)
    return list(prompts)


def _number(body: Mapping, name: str, default, *, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(f"{name} must be a number, got {value!r}", param=name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(f"{name} must be in {interval}, got {value!r}", param=name)
    return float(value)


def _integer(body: Mapping, name: str, default, *, low: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise APIError(f"{name} must be >= {low}, got {value}", param=name)
    return value


def _boolean(body: Mapping, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(f"stop holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}", param="stop")
    return tuple(stops)


def _mixture(mixture, adapters: Sequence[str]) -> Mixture:
    """The request's mixture under the one rule of dlp_lora/mixture.py; a 400 naming `mixture` otherwise."""
    try:
        return Mixture(mixture, adapters)
    except MixtureError as e:
        raise APIError(str(e), param="mixture") from None
