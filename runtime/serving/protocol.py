"""The OpenAI wire format of `balcony-edge serve`: requests checked into plain settings (or an ApiError that becomes
OpenAI's error JSON with its HTTP status), and the response objects and stream chunks built from generated tokens.

Every parameter a request may carry is either honoured or refused with a 400 naming it: nothing is silently dropped.
Beside OpenAI's own, llama-server's and vLLM's sampling names are honoured (top_k, min_p, repeat_penalty or
repetition_penalty, ignore_eos), and `budget` is ours."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar, overload

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_finite_number, is_whole_number
from balcony_edge.runtime.core.generation import MAX_TOP_LOGPROBS, GeneratedToken
from balcony_edge.runtime.core.sampling import MAX_ADDITIVE_PENALTY, MAX_REPETITION_PENALTY, SamplingConfig
from balcony_edge.runtime.device.controller import Budget, parse_exit

MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_CHOICES = 8  # n
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI allows
EXIT_TAG = ":exit-"  # model "smollm2-balcony:exit-16" pins exit 16 (ollama's name:tag form)
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "response_format",
    "budget",
    "cache_prompt",
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
MESSAGE_FIELDS = {"role", "content"}  # all the chat templates read (`name` included in none)
RESPONSE_FORMAT_FIELDS = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
NEUTRAL = {  # fields this server does not implement, accepted only at their neutral value
    "logit_bias": ({}, "leave it out"),
    "echo": (False, "leave it out or send false"),
    "tools": ([], "this server has no tool calling"),
    "tool_choice": ("none", "this server has no tool calling"),
    "parallel_tool_calls": (False, "this server has no tool calling"),
    "functions": ([], "this server has no function calling"),
    "function_call": ("none", "this server has no function calling"),
    "suffix": ("", "leave it out"),
    "store": (False, "this server stores nothing"),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_body(raw: bytes) -> object:
    """A request body read as strict JSON: NaN, Infinity, numbers past a double's range and strings that are not
    valid Unicode are refused (Python's parser takes them all; JSON has none)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read", code="invalid_json") from None
    except ValueError as err:  # UnicodeDecodeError is one
        raise ApiError(400, f"the request body is not valid JSON ({str(err)[:120]})", code="invalid_json") from None
    _refuse_lone_surrogates(body)
    return body


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is past a double's range")
    return value


def _refuse_lone_surrogates(body: object) -> None:
    """A 400 for a string (or key) holding half a surrogate pair, as a \\ud800 escape can: no tokenizer can read it.
    Walked without recursion: a body nested as deep as the parser allows must not overflow the stack here."""
    pending = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ApiError(
                    400,
                    f"the request body holds a lone surrogate U+{ord(value[err.start]):04X} at character {err.start} "
                    "of a string; send valid Unicode text (a \\ud800-\\udbff escape needs its \\udc00-\\udfff pair)",
                    code="invalid_unicode",
                ) from None


@dataclass(frozen=True)
class JsonOutput:
    """A JSON response_format: the answer is JSON matching `schema` (None: any JSON object)."""

    schema: dict | None = None


@dataclass
class GenerationRequest:
    """What one request asks for, checked: the prompt (messages or text), limits, sampling overrides, stop strings,
    budget, choices, log-probabilities and the output format."""

    model: str
    messages: list[dict] | None = None  # chat completions
    prompt: str | None = None  # completions
    max_tokens: int | None = None  # None: up to the context length
    sampling: dict = field(default_factory=dict)  # SamplingConfig fields the request sets; the rest are the export's
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: each token's log p and the k most likely
    json_output: JsonOutput | None = None  # None: free text
    budget: Budget | None = None  # None: the server's
    cache_prompt: bool = True  # start from a kept prompt prefix and keep this one (llama-server's name)

    def sampling_config(self, defaults: dict, choice: int = 0) -> SamplingConfig:
        """The sampling of choice `choice`: the export's defaults under this request's settings; a given seed is
        offset by the choice, so that n choices differ and repeat."""
        seed = self.sampling.get("seed")
        settings = {k: v for k, v in self.sampling.items() if k != "seed"}
        return SamplingConfig.of(defaults, **settings, seed=None if seed is None else seed + choice)


def served_budget(model: str, served: set[str], exits: list[int]) -> Budget | None:
    """The exit a model name pins (name:exit-16; None for a served name itself), or a 404 naming what is served."""
    if model in served:
        return None
    name, tag, depth = model.rpartition(EXIT_TAG)
    exit = parse_exit(depth)
    if tag and name in served and exit in exits:
        return Budget("exit", exit=exit)
    names = sorted(served)
    raise ApiError(
        404,
        f"the model {model[:80]!r} does not exist; this server serves {', '.join(map(repr, names))}, "
        f"each also as NAME{EXIT_TAG}N for exit N of {', '.join(map(str, exits))} (GET /v1/models)",
        "model",
        "model_not_found",
    )


def parse_request(body: object, chat: bool, served: set[str], exits: list[int]) -> GenerationRequest:
    """Check a /v1/chat/completions (chat) or /v1/completions body against the served model names and exits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = typed(body, "model", str, required=True)
    request = GenerationRequest(model=model)
    pinned = served_budget(model, served, exits)
    if chat:
        request.messages = _messages(body)
    else:
        request.prompt = _prompt(body)
    request.max_tokens = _max_tokens(body)
    request.sampling = _sampling(body)
    request.stop = _stop(body)
    request.ignore_eos = bool(typed(body, "ignore_eos", bool) or False)
    request.n = _whole(body, "n", 1, 1, MAX_CHOICES)
    request.stream = bool(typed(body, "stream", bool) or False)
    options = typed(body, "stream_options", dict)
    if options is not None:
        if not request.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        refuse_unknown(options, {"include_usage"}, "stream_options.")
        request.include_usage = bool(
            typed(options, "include_usage", bool, param="stream_options.include_usage") or False
        )
    request.logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    request.json_output = _json_output(body)
    if request.stop and request.json_output is not None:
        raise ApiError(
            400,
            "stop cannot be combined with a JSON response_format: a stop string would cut the JSON short; drop stop",
            "stop",
            "invalid_value",
        )
    request.cache_prompt = typed(body, "cache_prompt", bool) is not False
    budget = typed(body, "budget", (str, int))
    if budget is not None:
        try:
            request.budget = Budget.parse(str(budget))
        except BalconyError as err:
            raise ApiError(400, str(err), "budget", "invalid_budget") from None
    if pinned is not None:
        if request.budget is not None and request.budget != pinned:
            raise ApiError(400, f"the model {model!r} pins exit {pinned.exit}; leave budget out", "budget")
        request.budget = pinned
    return request


def refuse_unknown(body: dict, known: set[str], prefix: str = "") -> None:
    for name, value in body.items():
        if name in known:
            continue
        neutral = NEUTRAL.get(name) if not prefix else None
        if neutral is not None:
            if value is None or value == neutral[0]:
                continue
            raise ApiError(400, f"{name} is not supported by this server; {neutral[1]}", name, "unsupported_parameter")
        raise ApiError(
            400,
            f"{prefix}{name[:60]} is not a parameter this server knows; leave it out (docs/serving.md lists them)",
            prefix + name[:60],
            "unknown_parameter",
        )


_T = TypeVar("_T")


@overload
def typed(body: dict, name: str, kind: type[_T], required: Literal[True], param: str | None = None) -> _T: ...
@overload
def typed(body: dict, name: str, kind: type[_T], required: bool = False, param: str | None = None) -> _T | None: ...
@overload
def typed(body: dict, name: str, kind: tuple[type, ...], required: bool = False, param: str | None = None) -> Any: ...
def typed(
    body: dict, name: str, kind: type | tuple[type, ...], required: bool = False, param: str | None = None
) -> object:
    """body[name] if it is of `kind` (a type or a tuple of types; a bool only where bool is one), None when absent or
    null, else an ApiError (400): a missing one too when `required`."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is required", param or name, "missing_required_parameter")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(
            {
                str: "a string",
                int: "an integer",
                float: "a number",
                bool: "a boolean",
                dict: "an object",
                list: "an array",
            }[k]
            for k in kinds
        )
        raise ApiError(
            400, f"{param or name} must be {names}, not {type(value).__name__}", param or name, "invalid_type"
        )
    return value


def _messages(body: dict) -> list[dict]:
    messages = typed(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with a role and a content", param, "invalid_type")
        _refuse_message_extras(message, param)
        role = typed(message, "role", str, required=True, param=f"{param}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(
                        400,
                        f"{param}.content: only text parts are supported",
                        f"{param}.content",
                        "unsupported_content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(
                400, f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type"
            )
        checked.append({"role": role, "content": content})
    return checked


def _refuse_message_extras(message: dict, param: str) -> None:
    """A 400 for a message field beside role and content that says something (`name`, ...): no chat template reads
    one, and dropping it would change the conversation unseen."""
    for name, value in message.items():
        if name not in MESSAGE_FIELDS and value is not None:
            raise ApiError(
                400,
                f"{param}.{name[:40]} is not supported: the chat template reads only role and content; leave it out",
                f"{param}.{name[:40]}",
                "unsupported_parameter",
            )


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt", "invalid_type")
    return prompt


def _whole(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not (is_whole_number(value) and low <= value <= high):
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}, not {value!r}", name, "invalid_value")
    return int(value)


def _max_tokens(body: dict) -> int | None:
    """max_completion_tokens (OpenAI's current name) or else max_tokens; None when neither is given."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not (is_whole_number(value) and value >= 1):
                raise ApiError(
                    400, f"{name} must be a whole number of at least 1, not {value!r}", name, "invalid_value"
                )
            return int(value)
    return None


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not is_finite_number(value)
        or value > high
        or value < low
        or (low_open and value == low)
    ):
        bracket = "(" if low_open else "["
        raise ApiError(
            400, f"{name} must be a number in {bracket}{low:g}, {high:g}], not {value!r}", name, "invalid_value"
        )
    return float(value)


def _sampling(body: dict) -> dict:
    """The sampling settings the request gives (SamplingConfig names); the export's recommended ones fill the rest."""
    penalties = {
        name: _number(body, name, 0.0, MAX_REPETITION_PENALTY, True)
        for name in ("repeat_penalty", "repetition_penalty")
    }
    given = {name: value for name, value in penalties.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, "repeat_penalty and repetition_penalty differ; give one of them", "repetition_penalty")
    settings = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, low_open=True),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repetition_penalty": next(iter(given.values()), None),
        "presence_penalty": _number(body, "presence_penalty", -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY),
        "frequency_penalty": _number(body, "frequency_penalty", -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY),
    }
    if body.get("top_k") is not None:
        settings["top_k"] = _whole(body, "top_k", 0, 0, 1 << 20)
    if body.get("seed") is not None:
        settings["seed"] = _whole(body, "seed", 0, 0, (1 << 63) - MAX_CHOICES)
    settings = {name: value for name, value in settings.items() if value is not None}
    try:
        SamplingConfig.of({}, **{k: v for k, v in settings.items() if k != "seed"})
    except BalconyError as err:  # min_p of 1 and the like: the config's own rule
        raise ApiError(400, str(err), "sampling", "invalid_value") from None
    return settings


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (
        isinstance(stops, list) and all(isinstance(s, str) and s for s in stops) and len(stops) <= MAX_STOP_STRINGS
    ):
        raise ApiError(
            400,
            f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
            "stop",
            "invalid_value",
        )
    return tuple(stops)


def _chat_logprobs(body: dict) -> int | None:
    """Chat: logprobs (a boolean) and top_logprobs (0 to 20, only with logprobs)."""
    wanted = typed(body, "logprobs", bool)
    top = _whole(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if body.get("top_logprobs") is not None else None
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def _completion_logprobs(body: dict) -> int | None:
    """Completions: logprobs is the number of most likely tokens to list (0 to 5)."""
    if body.get("logprobs") is None:
        return None
    return _whole(body, "logprobs", 0, 0, MAX_COMPLETION_LOGPROBS)


def _json_output(body: dict) -> JsonOutput | None:
    """response_format: None for text; json_object (any object, or llama-server's `schema` in it) or json_schema
    ({"json_schema": {"schema", "name", "strict", ...}}: the schema; its other keys are names, not rules)."""
    value = typed(body, "response_format", dict)
    if value is None:
        return None
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in RESPONSE_FORMAT_FIELDS:
        raise ApiError(
            400,
            f"response_format type {str(kind)[:40]!r} is not one of {', '.join(RESPONSE_FORMAT_FIELDS)}",
            "response_format",
            "invalid_value",
        )
    _refuse_format_extras(value, kind)
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonOutput(typed(value, "schema", dict, param="response_format.schema"))
    spec = value.get("json_schema")
    if not (isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict)):
        raise ApiError(400, "response_format.json_schema must be an object with a schema object", "response_format")
    return JsonOutput(spec.get("schema"))


def _refuse_format_extras(value: dict, kind: str) -> None:
    """A 400 for a response_format field its type does not take (text's json_schema would be ignored)."""
    allowed = RESPONSE_FORMAT_FIELDS[kind]
    for name in value:
        if name not in allowed:
            takes = " and ".join(sorted(allowed - {"type"})) or "no other field"
            raise ApiError(
                400,
                f"response_format type {kind} takes no {name[:40]} (it takes {takes}); leave it out or change the type",
                f"response_format.{name[:40]}",
                "invalid_value",
            )


# --- responses


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def balcony_field(token: GeneratedToken) -> dict:
    """The per-choice extension: which exit made the token, what it cost, why."""
    return {
        "exit": token.exit,
        "latency_ms": round(token.latency_ms, 3),
        "reason": token.reason,
        "catch_up": token.catch_up_tokens,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


TokenText = Callable[[int], str]  # one token id's text


def _chat_logprob_entry(token_id: int, logprob: float, text: TokenText) -> dict:
    piece = text(token_id)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def chat_logprobs(tokens: list[GeneratedToken], text: TokenText) -> dict:
    """OpenAI's chat logprobs object: one entry per token with its top alternatives."""
    content = []
    for t in tokens:
        entry = _chat_logprob_entry(t.id, t.logprob if t.logprob is not None else 0.0, text)
        entry["top_logprobs"] = [_chat_logprob_entry(i, lp, text) for i, lp in t.top_logprobs]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[GeneratedToken], text: TokenText, offset: int = 0) -> dict:
    """OpenAI's (legacy) completions logprobs object: tokens, their log p, the top alternatives, text offsets."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [text(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text(i): lp for i, lp in t.top_logprobs} for t in tokens],
        "text_offset": offsets,
    }


@dataclass
class Responder:
    """Builds one request's response objects and chunks (whole or streamed, n choices)."""

    chat: bool
    ident: str
    model: str
    text: TokenText
    logprobs: int | None = None

    def _head(self, kind: str) -> dict:
        return {"id": self.ident, "object": kind, "created": int(time.time()), "model": self.model}

    def completion(self, choices: list[list[GeneratedToken]], prompt_tokens: int, cached_tokens: int = 0) -> dict:
        """The whole answer (stream: false), one entry per choice."""
        built = []
        for index, tokens in enumerate(choices):
            exits: dict[str, int] = {}
            for t in tokens:
                exits[str(t.exit)] = exits.get(str(t.exit), 0) + 1
            extension = {
                "exit": tokens[-1].exit if tokens else None,
                "latency_ms": round(sum(t.latency_ms for t in tokens) / len(tokens), 3) if tokens else None,
                "reason": tokens[-1].reason if tokens else None,
                "tokens_per_exit": exits,
            }
            choice: dict = {"index": index, "finish_reason": tokens[-1].finish if tokens else "length"}
            text = "".join(t.text for t in tokens)
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = chat_logprobs(tokens, self.text) if self.logprobs is not None else None
            else:
                choice["text"] = text
                choice["logprobs"] = completion_logprobs(tokens, self.text) if self.logprobs is not None else None
            choice["balcony"] = extension
            built.append(choice)
        completion_tokens = sum(map(len, choices))
        kind = "chat.completion" if self.chat else "text_completion"
        return self._head(kind) | {"choices": built, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, token: GeneratedToken | None, index: int = 0, first: bool = False) -> dict:
        """One stream chunk of choice `index`: the role first (chat), then a token's text with its exit; the last
        carries finish_reason."""
        choice: dict = {"index": index, "finish_reason": token.finish if token else None}
        if self.chat:
            if first:
                choice["delta"] = {"role": "assistant", "content": ""}
            else:
                choice["delta"] = {"content": token.text} if token and token.text else {}
            choice["logprobs"] = (
                chat_logprobs([token], self.text) if self.logprobs is not None and token is not None else None
            )
        else:
            choice["text"] = token.text if token else ""
            choice["logprobs"] = (
                completion_logprobs([token], self.text) if self.logprobs is not None and token is not None else None
            )
        if token is not None:
            choice["balcony"] = balcony_field(token)
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(kind) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
