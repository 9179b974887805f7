"""OpenAI's /v1/completions and /v1/chat/completions shapes: request validation, responses, stream
chunks, error bodies.

Field names and meanings follow OpenAI's Completions and Chat Completions APIs (as vLLM's OpenAI
server does), so the official ``openai`` client works unchanged. A chat request is a completion
request whose one prompt is its ``messages`` in the tokenizer's chat template (the front renders
it): both share every field check below. Our own request fields ride along (the client sends them
through ``extra_body``):

    mixture        {adapter: weight}: this prompt uses exactly that mixture (the router is bypassed)
    routing_top_p  the router's top-p threshold for this request (named apart from sampling's top_p)
    max_loras      the most adapters the router may mix for this request

and each choice carries ``dlp_routing``, the adapters of every sentence span (see engine.py).

Every check here runs before a request joins a batch; a failure is an :class:`APIError`, which
the server turns into ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
Hostile input is refused here too, as a 400: nesting deeper than MAX_JSON_DEPTH, integers beyond
Python's int-to-string limit, lone surrogates in any string, a seed outside int64. Plain Python (no
web framework), so it is tested without a server.
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
    "MAX_PROMPTS_PER_REQUEST",
    "MAX_REQUEST_BYTES",
    "APIError",
    "CompletionRequest",
    "ServedModels",
    "completion_response",
    "models_list",
    "check_prompt_length",
    "replica_error",
    "row_error",
    "choice",
    "parse_chat_request",
    "parse_completion_request",
    "stream_choice",
    "template_error",
    "stream_chunk",
    "STREAM_DONE",
]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
STREAM_DONE = "data: [DONE]\n\n"
# Limits of one request. A body over MAX_REQUEST_BYTES is answered 413 before it is read; a prompt
# list longer than MAX_PROMPTS_PER_REQUEST is refused (its rows would hold the model for everyone).
MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS_PER_REQUEST = 64
MAX_JSON_DEPTH = 16  # the deepest valid request is 6 levels (a chat text part); refuse far deeper at once
# A temperature below this samples from a distribution that overflows (1 / 1e-300 = inf): it is
# greedy decoding, as vLLM treats it.
GREEDY_TEMPERATURE = 1e-5
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64
CHAT_ROLES = ("system", "user", "assistant")

# OpenAI fields we accept only at their neutral value, or null (anything else would be silently ignored).
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}
_COMPLETION_NEUTRAL = {**_NEUTRAL, "best_of": 1, "echo": False, "logprobs": None, "suffix": None}
_CHAT_NEUTRAL = {**_NEUTRAL, "logprobs": False, "top_logprobs": None}
_IGNORED = {"user"}  # accepted and ignored, as their values change no output
# The fields both endpoints share (checked by _decoding_and_routing), then each one's own.
_SHARED = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
           "mixture", "routing_top_p", "max_loras", *_IGNORED}
_COMPLETION_FIELDS = {*_SHARED, "prompt", *_COMPLETION_NEUTRAL}
_CHAT_FIELDS = {*_SHARED, "messages", "max_completion_tokens", *_CHAT_NEUTRAL}
_MESSAGE_FIELDS = {"role", "content", "name"}


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


def row_error(error: BaseException) -> APIError:
    """The HTTP error of a row that failed inside generate(): 400 for bad input, else 500 naming it."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(f"invalid request: {_short(str(error))}")
    return APIError(f"generation failed: {type(error).__name__}: {_short(str(error))}", status=500,
                    type="server_error")


def template_error(error: BaseException) -> APIError:
    """400: the chat template refused the conversation (it may raise, e.g. on roles out of order)."""
    return APIError(f"messages: the model's chat template refused this conversation "
                    f"({type(error).__name__}: {_short(str(error))})", param="messages")


def replica_error(error: BaseException, attempts: int) -> APIError:
    """503: the model replica of a request died or could not be reached, ``attempts`` times in a row."""
    return APIError(
        f"the model replica serving this request died or is unreachable ({type(error).__name__}: "
        f"{_short(str(error))}), {attempts} time(s) in a row; retry once Ray Serve has replaced it",
        status=503,
        type="server_error",
        code="replica_unavailable",
    )


@dataclass(frozen=True)
class ServedModels:
    """What the server answers to: the base model's name and its adapters' names.

    ``model`` = the base name routes every prompt (or uses ``mixture``); ``model`` = an adapter's
    name means that adapter alone, weight 1 (as vLLM serves a LoRA by its name).
    """

    base: str
    adapters: tuple[str, ...]
    max_context: int  # prompt tokens + max_tokens may not exceed it
    chat_template: bool = False  # the tokenizer has one: /v1/chat/completions is served

    def names(self) -> list[str]:
        return [self.base, *self.adapters]


@dataclass
class CompletionRequest:
    """A validated /v1/completions or /v1/chat/completions request.

    prompts: one or more non-empty strings (completions), or [] for a chat request, whose
    ``messages`` ([{"role", "content": str}], text parts joined) the front renders with the chat
    template into its one prompt. max_tokens None (a chat request that gave none): the rest of the
    context, as vLLM does. mixture: a Mixture {adapter: weight} for every prompt, under the rule of
    dlp_lora/mixture.py (negative weights allowed, zeros dropped), or None (the router picks per
    prompt). temperature 0 means greedy decoding; sampling uses temperature and top_p (no top-k).
    """

    model: str
    prompts: list[str]
    messages: list[dict] | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
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

    @property
    def chat(self) -> bool:
        return self.messages is not None


def parse_completion_request(body: bytes | str | Mapping, served: ServedModels) -> CompletionRequest:
    """Validate a /v1/completions body (raw JSON or an already parsed object); raises APIError naming
    the field. Token counts (the prompt against the context) are checked later, once it is tokenised."""
    body = _request_object(body, _COMPLETION_FIELDS, _COMPLETION_NEUTRAL)
    request = CompletionRequest(model=_model(body, served), prompts=_prompts(body.get("prompt")))
    request.max_tokens = _max_tokens(body, "max_tokens", DEFAULT_MAX_TOKENS, served)
    _decoding_and_routing(body, served, request)
    return request


def parse_chat_request(body: bytes | str | Mapping, served: ServedModels) -> CompletionRequest:
    """Validate a /v1/chat/completions body, as parse_completion_request does; the prompt is rendered
    and its length checked later, on the front. max_completion_tokens, or the older max_tokens."""
    body = _request_object(body, _CHAT_FIELDS, _CHAT_NEUTRAL)
    model = _model(body, served)
    if not served.chat_template:
        raise APIError("messages: this model's tokenizer has no chat template, so it has no chat "
                       "completions; send a prompt to /v1/completions", param="messages")
    request = CompletionRequest(model=model, prompts=[], messages=_messages(body.get("messages")),
                                id=f"chatcmpl-{uuid.uuid4().hex}")
    newer = _max_tokens(body, "max_completion_tokens", None, served)
    older = _max_tokens(body, "max_tokens", None, served)
    if newer is not None and older is not None and newer != older:
        raise APIError(f"max_completion_tokens={newer} and max_tokens={older} differ; give one "
                       "(max_tokens is OpenAI's older name)", param="max_tokens")
    request.max_tokens = older if newer is None else newer
    _decoding_and_routing(body, served, request)
    return request


def _request_object(body, known: set[str], neutral: Mapping) -> Mapping:
    """The parsed body: a JSON object of known fields, hostile input refused, neutral-only fields checked."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except RecursionError:
            raise APIError(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer beyond the int-to-str limit
            raise APIError(f"the request body is not valid JSON ({_short(str(e))})",
                           code="invalid_json") from None
        _check_json(body)
    if not isinstance(body, Mapping):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(f"unrecognized request argument(s): {_short(', '.join(unknown))}",
                       param=_short(unknown[0], 60))
    for name, value_ok in neutral.items():
        value = body.get(name)
        if value is not None and value != value_ok and not (name == "logit_bias" and value == {}):
            raise APIError(f"{name}={_show(value)} is not supported by this server (only {value_ok!r})",
                           param=name)
    return body


def _model(body: Mapping, served: ServedModels) -> str:
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
    return model


def _max_tokens(body: Mapping, name: str, default, served: ServedModels) -> int | None:
    value = _integer(body, name, default, low=1)
    if value is not None and value >= served.max_context:
        raise APIError(
            f"{name}={value} leaves no room for a prompt in this model's context of "
            f"{served.max_context} tokens",
            param=name,
            code="context_length_exceeded",
        )
    return value


def _decoding_and_routing(body: Mapping, served: ServedModels, request: CompletionRequest) -> None:
    """The fields both endpoints share, but max_tokens: sampling, stop, streaming, our routing fields."""
    request.temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    if request.temperature < GREEDY_TEMPERATURE:
        request.temperature = 0.0
    request.top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    request.seed = _integer(body, "seed", None, low=INT64[0], high=INT64[1])
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
    model, mixture = request.model, body.get("mixture")
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


def check_prompt_length(prompt_tokens: int, request: CompletionRequest, served: ServedModels,
                        index: int) -> int:
    """The row's max_tokens (a chat request without one: the rest of the context); raise APIError
    unless prompt_tokens + max_tokens fits the model's context."""
    single = len(request.prompts) <= 1
    param = "messages" if request.chat else "prompt" if single else f"prompt[{index}]"
    what = "the conversation in the chat template" if request.chat else "the prompt" if single \
        else f"the prompt [{index}]"
    max_tokens = served.max_context - prompt_tokens if request.max_tokens is None else request.max_tokens
    if prompt_tokens + max(max_tokens, 1) > served.max_context:
        asked = ("which leaves no room for a reply" if request.max_tokens is None else
                 f"and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all)")
        raise APIError(
            f"this model's maximum context length is {served.max_context} tokens; {what} has "
            f"{prompt_tokens} tokens {asked}",
            param=param,
            code="context_length_exceeded",
        )
    if prompt_tokens == 0:
        raise APIError(f"{param} has no tokens under this model's tokenizer", param=param)
    return max_tokens


# --- responses ---------------------------------------------------------------------------------------


def choice(request: CompletionRequest, index: int, text: str, finish_reason: str | None,
           routing: list[dict] | None) -> dict:
    """One element of a full answer's ``choices``: ``text``, or a chat request's assistant ``message``.

    routing: the dlp_routing spans (None: not yet known, e.g. a stream)."""
    if request.chat:
        out = {"index": index, "message": {"role": "assistant", "content": text}}
    else:
        out = {"index": index, "text": text}
    out |= {"logprobs": None, "finish_reason": finish_reason}
    if routing is not None:
        out["dlp_routing"] = routing
    return out


def stream_choice(request: CompletionRequest, index: int, text: str, finish_reason: str | None = None,
                  routing: list[dict] | None = None, *, first: bool = False) -> dict:
    """One element of a stream chunk's ``choices``. A chat stream carries a ``delta``: the role in the
    choice's first chunk (``first``), then pieces of content, then {} with the finish_reason."""
    if not request.chat:
        return choice(request, index, text, finish_reason, routing)
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
    out = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
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
        "object": "chat.completion" if request.chat else "text_completion",
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
        "object": "chat.completion.chunk" if request.chat else "text_completion",
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
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS_PER_REQUEST} per request",
                       param="prompt")
    for i, text in enumerate(prompts):
        param = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
        if isinstance(text, int) or (isinstance(text, list) and text and isinstance(text[0], int)):
            raise APIError("prompts given as token ids are not supported; send text", param=param)
        if not isinstance(text, str):
            raise APIError(f"{param} must be a string, got {type(text).__name__}", param=param)
        if not text.strip():
            raise APIError(f"{param} is empty", param=param)
    return list(prompts)


def _messages(messages) -> list[dict]:
    """The conversation as [{"role", "content": str}] (a list of text parts joined by newlines, as vLLM
    does; a message's ``name`` kept); every other kind of part (images, audio) is refused."""
    if messages is None:
        raise APIError("you must provide messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise APIError(f"{where} must be an object {{\"role\", \"content\"}}, got "
                           f"{type(message).__name__}", param=where)
        unknown = sorted(set(message) - _MESSAGE_FIELDS)
        if unknown:
            raise APIError(f"{where} has unsupported field(s) {_short(', '.join(unknown))} (only role, "
                           "content and name; no tool calls)", param=where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(f"{where}.role must be one of {list(CHAT_ROLES)}, got {_show(role)}",
                           param=f"{where}.role")
        entry = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise APIError(f"{where}.name must be a string, got {_show(name)}", param=f"{where}.name")
            entry["name"] = name
        out.append(entry)
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of text parts, got {_show(content)}",
                       param=where)
    texts = []
    for j, part in enumerate(content):
        is_text = isinstance(part, Mapping) and part.get("type") == "text"
        if not is_text or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise APIError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": str}}; this "
                           f"server reads text only, got {_show(kind)}", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _number(body: Mapping, name: str, default, *, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not _is_finite_number(value):
        raise APIError(f"{name} must be a number, got {_show(value)}", param=name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(f"{name} must be in {interval}, got {_show(value)}", param=name)
    return float(value)


def _integer(body: Mapping, name: str, default, *, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"{name} must be an integer, got {_show(value)}", param=name)
    if low is not None and value < low:
        raise APIError(f"{name} must be >= {low}, got {_show(value)}", param=name)
    if high is not None and value > high:
        raise APIError(f"{name} must be <= {high}, got {_show(value)}", param=name)
    return value


def _is_finite_number(value) -> bool:
    """A real JSON number that is finite as a float (a huge integer overflows float: not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value, limit: int = 60) -> str:
    """repr(value) cut to ``limit`` characters (error messages echo what they refuse, not megabytes)."""
    return _short(repr(value), limit)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_json(body) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings (keys included) that are not valid Unicode.

    A lone surrogate (JSON's "\\ud800") decodes to a Python str that cannot be encoded as UTF-8: the
    tokenizer, and the error body echoing it, would fail later. Iterative: depth costs no recursion.
    """
    stack = [(body, 1, "the request body")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           code="invalid_json")
        if isinstance(value, str) and not _is_unicode(value):
            raise APIError(f"{where} holds a lone surrogate, which is not valid Unicode", code="invalid_json")
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not _is_unicode(key):
                    raise APIError(f"a field name in {where} holds a lone surrogate, which is not valid "
                                   "Unicode", code="invalid_json")
                stack.append((item, depth + 1, _short(key, 60)))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, where) for item in value)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _boolean(body: Mapping, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"{name} must be true or false, got {_show(value)}", param=name)
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
