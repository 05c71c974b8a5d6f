"""`balcony-edge serve`: the engine behind an OpenAI-compatible HTTP API (Starlette on uvicorn), one device-wide
controller for every request, `parallel` generations at a time, a bounded queue, then 503."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_whole_number
from balcony_edge.runtime.core.constraints import ConstraintError, JsonConstraint
from balcony_edge.runtime.core.engine import Engine, GeneratedToken
from balcony_edge.runtime.core.prefix_cache import PrefixCache
from balcony_edge.runtime.core.text import PromptError
from balcony_edge.runtime.device.controller import Budget, DeviceController
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.serving.metrics import ServerMetrics
from balcony_edge.runtime.serving.protocol import (
    EXIT_TAG,
    ApiError,
    GenerationRequest,
    JsonOutput,
    Responder,
    new_id,
    parse_body,
    parse_request,
    refuse_unknown,
    typed,
)
from balcony_edge.runtime.serving.scheduler import DONE, Busy, Job, Scheduler

log = logging.getLogger("balcony_edge")
OPEN_PATHS = ("/health",)  # answered without the API key
CLIENT_LEFT = 499  # nginx's status for a request whose client closed the connection before the answer ended


@dataclass(frozen=True)
class ServerConfig:
    """How the server answers: its model name and aliases, concurrency, queue, key, CORS origins and body limit."""

    model_name: str
    parallel: int = 1
    queue_limit: int = 16
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 2
    aliases: tuple[str, ...] = ()  # more names clients may send as `model` (an app configured for another model)
    prompt_cache: int = 4  # finished sequences kept for prompt reuse (0: none)

    def __post_init__(self) -> None:
        if self.prompt_cache < 0:
            raise BalconyError(f"--prompt-cache {self.prompt_cache} must be 0 (off) or more kept sequences")
        if self.parallel < 1 or self.queue_limit < 0:
            raise BalconyError(
                f"--parallel {self.parallel} / --queue {self.queue_limit}: give at least 1 running and 0 or more queued"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise BalconyError("the API key is empty; give a non-empty key or leave it out")
        _check_served_names(self.model_name, self.aliases)

    @property
    def served(self) -> set[str]:
        return {self.model_name, *self.aliases}


def _check_served_names(model_name: str, aliases: tuple[str, ...]) -> None:
    """Each name the server answers to is non-empty, free of the exit tag (NAME:exit-N must mean one thing) and given
    once."""
    named = [("--model-name (default: the export folder's name)", model_name), *(("--alias", a) for a in aliases)]
    for option, name in named:
        if not name.strip() or EXIT_TAG in name:
            raise BalconyError(f"{option} {name!r} must be a non-empty name without {EXIT_TAG!r}; give another")
    for index, alias in enumerate(aliases):
        if alias in (model_name, *aliases[:index]):
            raise BalconyError(f"--alias {alias!r} repeats a name the server already answers to; give each name once")


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class ApiKeyMiddleware:
    """Bearer-token check (constant-time) on every path but /health; CORS preflights pass to the CORS layer."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(
                    ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int) -> object:
    """The request body as strict JSON (`parse_body`), refused over the size limit before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    return parse_body(bytes(body))


async def cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
    """Wait for the client to go away (the body is read: the next message is the disconnect), then cancel `jobs`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            return


async def merged(jobs: list[Job]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, item) from several jobs' queues as they come, until each has given DONE or an error."""
    pending = {asyncio.ensure_future(job.queue.get()): i for i, job in enumerate(jobs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                item = future.result()
                yield index, item
                if item is not DONE and not isinstance(item, Exception):
                    pending[asyncio.ensure_future(jobs[index].queue.get())] = index
    finally:
        for future in pending:
            future.cancel()


class Handlers:
    """The server's endpoints over one engine, its scheduler and the device controller (each method one route)."""

    def __init__(self, engine: Engine, config: ServerConfig, controller: DeviceController, hub: SignalHub):
        self.engine, self.config, self.controller, self.hub = engine, config, controller, hub
        self.metrics = ServerMetrics()
        batch = engine.batch_decoder(config.parallel) if config.parallel > 1 and engine.device == "cpu" else None
        self.scheduler = Scheduler(
            config.parallel, config.queue_limit, self.metrics.observe, batch, self.metrics.batched.observe
        )
        self.context_length = engine.manifest.generation.context_length
        self.created = int(time.time())
        self.defaults = engine.manifest.generation.sampling
        self.prefixes = PrefixCache(engine.sequence, config.prompt_cache)

    def prompt_ids(self, request: GenerationRequest, chat: bool) -> list[int]:
        """The prompt's token ids, refused when it leaves no room to answer."""
        prompt, name = (request.messages, "messages") if chat else (request.prompt, "prompt")
        if prompt is None:  # parse_request sets the one that `chat` names
            raise ApiError(400, f"{name} is required", name, "missing_required_parameter")
        try:
            ids = self.engine.prompt_ids(prompt, chat=chat)
        except PromptError as err:
            raise ApiError(400, str(err), "messages" if chat else "prompt", "invalid_prompt") from None
        if len(ids) >= self.context_length:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; this model's context is {self.context_length} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        return ids

    def start(self, request: GenerationRequest, ids: list[int]) -> tuple[list[Job], int]:
        """The request's n generations queued on the scheduler (503 when the slots and the queue cannot take them),
        each from the longest kept prompt prefix; and the prompt tokens the first one did not compute again."""
        room = self.context_length - len(ids)
        max_tokens = min(request.max_tokens or room, room)
        try:
            choosers = [self.controller.for_request(request.budget or Budget("auto")) for _ in range(request.n)]
        except BalconyError as err:
            raise ApiError(400, str(err), "budget", "invalid_budget") from None
        loop = asyncio.get_running_loop()
        constraints = [self.constraint(request.json_output) for _ in choosers]
        jobs, cached = [], 0
        for index, chooser in enumerate(choosers):
            sequence, reused = self.prefixes.take(ids) if request.cache_prompt else (self.engine.sequence(), 0)
            cached = cached if index else reused
            if reused:
                self.metrics.prefix_hits.inc()
                self.metrics.prefix_tokens.inc(reused)
            generation = self.engine.start(
                ids[reused:],
                max_new_tokens=max_tokens,
                sampling=request.sampling_config(self.defaults, index),
                signals=self.hub,
                stop=request.stop,
                controller=chooser,
                logprobs=request.logprobs,
                ignore_eos=request.ignore_eos,
                constraint=constraints[index],
                sequence=sequence,
            )
            jobs.append(Job(generation, loop, keep=request.cache_prompt))
        try:
            self.scheduler.submit_all(jobs)
        except Busy:
            raise ApiError(
                503,
                "the server is busy (all slots and the queue are full); retry shortly",
                code="server_busy",
                kind="server_error",
            ) from None
        return jobs, cached

    def constraint(self, json_output: JsonOutput | None) -> JsonConstraint | None:
        """The JSON constraint a JSON response_format asks for (its schema, or any object); None for text."""
        if json_output is None:
            return None
        try:
            return self.engine.json_constraint(json_output.schema)
        except ConstraintError as err:
            raise ApiError(400, str(err), "response_format", "invalid_value") from None

    def count(self, endpoint: str, status: int) -> None:
        """One request in balcony_requests_total, by how it ended (CLIENT_LEFT: the client went first)."""
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def generation(self, request: Request, chat: bool) -> Response:
        """POST /v1/chat/completions (chat) and /v1/completions, each request counted once by how it ended."""
        count = functools.partial(self.count, request.url.path)
        try:
            response = await self.answer(request, chat, count)
        except Exception:  # `unexpected` answers it with a 500
            count(500)
            raise
        if not isinstance(response, EventStream):  # a stream counts itself when it ends
            count(response.status_code)
        return response

    async def answer(self, request: Request, chat: bool, count: Callable[[int], None]) -> Response:
        """A whole answer, a stream of chunks (counted by `count` when it ends) or an error."""
        try:
            body = await read_json(request, self.config.max_body_bytes)
            parsed = parse_request(body, chat, self.config.served, self.engine.exits)
            ids = self.prompt_ids(parsed, chat)
            jobs, cached = self.start(parsed, ids)
        except ApiError as err:
            headers = {"Retry-After": str(self.config.retry_after_s)} if err.status == 503 else None
            return error_response(err, headers)
        except ClientDisconnect:
            return Response(status_code=CLIENT_LEFT)
        responder = Responder(chat, new_id(chat), parsed.model, self.engine.codec.token_text, parsed.logprobs)
        if parsed.stream:
            outcome = Outcome()
            events = self.stream(jobs, responder, len(ids), parsed.include_usage, cached, outcome)
            return EventStream(events, functools.partial(_ended, jobs, outcome, count))
        return await self.whole(request, jobs, responder, len(ids), cached)

    def kept(self, job: Job) -> None:
        """A finished job's sequence back to the prompt cache (the scheduler is done with it once DONE came)."""
        if job.keep:
            self.prefixes.put(job.sequence)

    async def whole(
        self, request: Request, jobs: list[Job], responder: Responder, prompt_tokens: int, cached: int
    ) -> Response:
        """Collect the jobs' tokens into one response; a client that leaves cancels them at their next token."""
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, jobs))
        choices: list[list[GeneratedToken]] = [[] for _ in jobs]
        try:
            async for index, item in merged(jobs):
                if isinstance(item, Exception):
                    for job in jobs:
                        job.cancel()
                    return error_response(generation_failed(item))
                if item is DONE:
                    self.kept(jobs[index])
                else:  # a job's queue holds its tokens, then an error or DONE
                    choices[index].append(cast(GeneratedToken, item))
        finally:
            watcher.cancel()
        if any(job.cancelled.is_set() for job in jobs):
            return Response(status_code=CLIENT_LEFT)
        return JSONResponse(responder.completion(choices, prompt_tokens, cached))

    async def stream(
        self, jobs: list[Job], responder: Responder, prompt_tokens: int, usage: bool, cached: int, outcome: Outcome
    ) -> AsyncIterator[str]:
        """The jobs' tokens as server-sent events, then [DONE]; `outcome` gets 200, or a failed generation's status
        (its error is the last event), once [DONE] is sent, and 500 if this raises."""
        made, status = 0, 200
        try:
            if responder.chat:
                for index in range(len(jobs)):
                    yield sse(responder.chunk(None, index, first=True))
            async for index, item in merged(jobs):
                if isinstance(item, Exception):
                    failure = generation_failed(item)
                    status = failure.status
                    yield sse(failure.to_json())
                    break
                if item is DONE:
                    self.kept(jobs[index])
                else:
                    made += 1
                    yield sse(responder.chunk(cast(GeneratedToken, item), index))  # a token (see whole())
            if usage:
                yield sse(responder.usage_chunk(prompt_tokens, made, cached))
            yield "data: [DONE]\n\n"
            outcome.status = status
        except Exception:
            outcome.status = 500
            raise

    async def models(self, request: Request) -> Response:
        """GET /v1/models: each served name, and each exit of it as NAME:exit-N."""
        engine = self.engine
        data = []
        for name in [self.config.model_name, *self.config.aliases]:
            data.append(self._model(name, {"exits": engine.exits, "provider": engine.provider}))
            data += [self._model(f"{name}{EXIT_TAG}{exit}", {"exit": exit}) for exit in engine.exits]
        return JSONResponse({"object": "list", "data": data})

    def _model(self, name: str, balcony: dict) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "balcony-edge", "balcony": balcony}

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize (llama-server's shape): {"content", "add_special", "with_pieces"} -> {"tokens"}."""
        try:
            body = await read_json(request, self.config.max_body_bytes)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            refuse_unknown(body, {"content", "add_special", "with_pieces"})
            content = typed(body, "content", str, required=True)
            special = bool(typed(body, "add_special", bool) or False)
            pieces = bool(typed(body, "with_pieces", bool) or False)
        except ApiError as err:
            return error_response(err)
        ids = self.engine.codec.encode(content, add_special_tokens=special)
        if pieces:
            return JSONResponse({"tokens": [{"id": i, "piece": self.engine.codec.token_text(i)} for i in ids]})
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize (llama-server's shape): {"tokens"} -> {"content"}."""
        try:
            body = await read_json(request, self.config.max_body_bytes)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            refuse_unknown(body, {"tokens"})
            ids = typed(body, "tokens", list, required=True)
            vocab = self.engine.manifest.vocab_size
            if not all(is_whole_number(i) and 0 <= i < vocab for i in ids):
                raise ApiError(400, f"tokens must be token ids from 0 to {vocab - 1}", "tokens", "invalid_value")
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"content": self.engine.codec.decode(ids)})

    async def health(self, request: Request) -> Response:
        """GET /health (no key needed)."""
        running, queued = self.scheduler.depth
        return JSONResponse({"status": "ok", "model": self.config.model_name, "running": running, "queued": queued})

    async def metrics_page(self, request: Request) -> Response:
        """GET /metrics in Prometheus' text format."""
        running, queued = self.scheduler.depth
        metrics = self.metrics.render(running, queued, self.prefixes.nbytes)
        return Response(metrics, media_type=self.metrics.content_type)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", functools.partial(self.generation, chat=True), methods=["POST"]),
            Route("/v1/completions", functools.partial(self.generation, chat=False), methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
        ]


async def unexpected(request: Request, err: Exception) -> Response:
    log.error("request %s failed: %s", request.url.path, err, exc_info=err)
    return error_response(
        ApiError(500, "internal error; the server logged it and keeps serving", code="internal_error")
    )


async def not_found(request: Request, err: Exception) -> Response:
    return error_response(
        ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models", code="not_found")
    )


async def wrong_method(request: Request, err: Exception) -> Response:
    return error_response(
        ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    )


@dataclass
class Outcome:
    """How a streamed request ended, as the status it is counted under: CLIENT_LEFT until the stream says."""

    status: int = CLIENT_LEFT


class EventStream(StreamingResponse):
    """Server-sent events that call `ended` once the response is over, however it ends: sent in full, failed, or
    dropped by a client that left (before the first event, too, when the events never start)."""

    def __init__(self, events: AsyncIterator[str], ended: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ended()


def _ended(jobs: list[Job], outcome: Outcome, count: Callable[[int], None]) -> None:
    """A stream is over: no more tokens for it, and the request counted by its outcome."""
    for job in jobs:
        job.cancel()
    count(outcome.status)


def middleware_for(config: ServerConfig) -> list[Middleware]:
    """CORS for the configured origins, then the API key check."""
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    if config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, key=config.api_key))
    return middleware


def create_app(engine: Engine, config: ServerConfig, controller: DeviceController, hub: SignalHub) -> Starlette:
    """The ASGI app; the scheduler thread starts with it and stops with it (lifespan)."""
    handlers = Handlers(engine, config, controller, hub)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        handlers.scheduler.stop()

    errors = {Exception: unexpected, 404: not_found, 405: wrong_method}
    app = Starlette(
        routes=handlers.routes(), middleware=middleware_for(config), lifespan=lifespan, exception_handlers=errors
    )
    app.state.scheduler = handlers.scheduler
    return app


def generation_failed(err: Exception) -> ApiError:
    """A generation that raised: the user's mistake (400) or ours (500, logged)."""
    if isinstance(err, BalconyError):
        return ApiError(400, str(err), code="invalid_request")
    log.error("generation failed: %s", err, exc_info=err)
    return ApiError(500, "the generation failed; the server logged it and keeps serving", code="internal_error")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
