"""The OpenAI wire format of `balcony-edge serve`: requests checked into plain settings (or an ApiError that becomes
OpenAI's error JSON with its HTTP status), and the response objects and stream chunks built from generated tokens."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_finite_number, is_whole_number
from balcony_edge.runtime.core.engine import GeneratedToken
from balcony_edge.runtime.core.sampling import SamplingConfig
from balcony_edge.runtime.device.controller import Budget

MAX_STOP_STRINGS = 4  # as OpenAI allows
UNSUPPORTED_WHEN_SET = {  # fields a client may send at their neutral value; anything else is refused, not ignored
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "n": 1,
}
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
)


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


@dataclass
class GenerationRequest:
    """What one request asks for, checked: the prompt (messages or text), limits, sampling, stop strings, budget."""

    model: str
    messages: list[dict] | None = None  # chat completions
    prompt: str | None = None  # completions
    max_tokens: int | None = None  # None: up to the context length
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    budget: Budget | None = None  # None: the server's


def parse_request(body: object, chat: bool, served_model: str) -> GenerationRequest:
    """Check a /v1/chat/completions (chat) or /v1/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _typed(body, "model", str, required=True)
    if model != served_model:
        raise ApiError(
            404,
            f"the model {model[:80]!r} does not exist; this server serves {served_model!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")
    for name, neutral in UNSUPPORTED_WHEN_SET.items():
        if name in body and body[name] is not None and body[name] != neutral:
            raise ApiError(
                400,
                f"{name}={body[name]!r} is not supported by this server; leave it out or use {neutral!r}",
                name,
                "unsupported_parameter",
            )
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(
            400,
            "response_format other than {'type': 'text'} is not supported",
            "response_format",
            "unsupported_parameter",
        )
    request = GenerationRequest(model=model)
    if chat:
        request.messages = _messages(body)
    else:
        request.prompt = _prompt(body)
    request.max_tokens = _max_tokens(body)
    request.sampling = _sampling(body)
    request.stop = _stop(body)
    request.stream = bool(_typed(body, "stream", bool) or False)
    options = _typed(body, "stream_options", dict)
    if options is not None:
        if not request.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        request.include_usage = bool(
            _typed(options, "include_usage", bool, param="stream_options.include_usage") or False
        )
    budget = _typed(body, "budget", (str, int))
    if budget is not None:
        try:
            request.budget = Budget.parse(str(budget))
        except BalconyError as err:
            raise ApiError(400, str(err), "budget", "invalid_budget") from None
    return request


def _typed(body: dict, name: str, kind, required: bool = False, param: str | None = None):
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
    messages = _typed(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with a role and a content", param, "invalid_type")
        role = _typed(message, "role", str, required=True, param=f"{param}.role")
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


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt", "invalid_type")
    return prompt


def _max_tokens(body: dict) -> int | None:
    """max_completion_tokens (OpenAI's current name) or else max_tokens; None when neither is given."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not (is_whole_number(value) and not isinstance(value, bool) and value >= 1):
                raise ApiError(
                    400, f"{name} must be a whole number of at least 1, not {value!r}", name, "invalid_value"
                )
            return int(value)
    return None


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
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


def _sampling(body: dict) -> SamplingConfig:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and not (is_whole_number(seed) and not isinstance(seed, bool) and seed >= 0):
        raise ApiError(400, f"seed must be a whole number, 0 or more, not {seed!r}", "seed", "invalid_value")
    return SamplingConfig(temperature=temperature, top_p=top_p, seed=None if seed is None else int(seed))


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(chat: bool, ident: str, model: str, tokens: list[GeneratedToken], prompt_tokens: int) -> dict:
    """The whole answer (stream: false)."""
    text = "".join(t.text for t in tokens)
    exits: dict[str, int] = {}
    for t in tokens:
        exits[str(t.exit)] = exits.get(str(t.exit), 0) + 1
    extension = {
        "exit": tokens[-1].exit if tokens else None,
        "latency_ms": round(sum(t.latency_ms for t in tokens) / len(tokens), 3) if tokens else None,
        "reason": tokens[-1].reason if tokens else None,
        "tokens_per_exit": exits,
    }
    finish = tokens[-1].finish if tokens else "length"
    choice = {"index": 0, "finish_reason": finish, "balcony": extension}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(tokens)),
    }


def chunk(chat: bool, ident: str, model: str, token: GeneratedToken | None, first: bool = False) -> dict:
    """One stream chunk: the role first (chat), then a token's text with its exit; the last carries finish_reason."""
    choice: dict = {"index": 0, "finish_reason": token.finish if token else None}
    if chat:
        choice["delta"] = (
            {"role": "assistant", "content": ""} if first else ({"content": token.text} if token and token.text else {})
        )
    else:
        choice.update(text=token.text if token else "", logprobs=None)
    if token is not None:
        choice["balcony"] = balcony_field(token)
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(chat: bool, ident: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
