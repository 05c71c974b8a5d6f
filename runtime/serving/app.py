"""`balcony-edge serve`: the engine behind an OpenAI-compatible HTTP API (Starlette on uvicorn), one device-wide
controller for every request, `parallel` generations at a time, a bounded queue, then 503."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime.core.engine import Engine, GeneratedToken
from balcony_edge.runtime.core.text import PromptError
from balcony_edge.runtime.device.controller import Budget, DeviceController
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.serving.metrics import ServerMetrics
from balcony_edge.runtime.serving.protocol import (
    ApiError,
    GenerationRequest,
    chunk,
    completion,
    new_id,
    parse_request,
    usage_chunk,
)
from balcony_edge.runtime.serving.scheduler import DONE, Busy, Job, Scheduler

log = logging.getLogger("balcony_edge")
OPEN_PATHS = ("/health",)  # answered without the API key
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerConfig:
    """How the server answers: its model name, concurrency, queue, key, CORS origins and body limit."""

    model_name: str
    parallel: int = 1
    queue_limit: int = 16
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.queue_limit < 0:
            raise BalconyError(
                f"--parallel {self.parallel} / --queue {self.queue_limit}: give at least 1 running and 0 or more queued"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise BalconyError("the API key is empty; give a non-empty key or leave it out")


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class ApiKeyMiddleware:
    """Bearer-token check (constant-time) on every path but /health; CORS preflights pass to the CORS layer."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
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


class Handlers:
    """The server's endpoints over one engine, its scheduler and the device controller (each method one route)."""

    def __init__(self, engine: Engine, config: ServerConfig, controller: DeviceController, hub: SignalHub):
        self.engine, self.config, self.controller, self.hub = engine, config, controller, hub
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(config.parallel, config.queue_limit, on_token=self.metrics.observe)
        self.context_length = engine.manifest.generation.context_length
        self.created = int(time.time())

    async def read_json(self, request: Request) -> object:
        """The request body as JSON, refused over the size limit before it is all read."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({str(err)[:120]})", code="invalid_json") from None

    def prompt_ids(self, request: GenerationRequest, chat: bool) -> list[int]:
        """The prompt's token ids, refused when it leaves no room to answer."""
        try:
            ids = self.engine.prompt_ids(request.messages if chat else request.prompt, chat=chat)
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

    def start(self, parsed: GenerationRequest, ids: list[int]) -> Job:
        """The request's generation queued on the scheduler (503 when every slot and the queue are taken)."""
        room = self.context_length - len(ids)
        max_tokens = min(parsed.max_tokens or room, room)
        try:
            chooser = self.controller.for_request(parsed.budget or Budget("auto"))
        except BalconyError as err:
            raise ApiError(400, str(err), "budget", "invalid_budget") from None
        tokens = self.engine.generate(
            ids,
            max_new_tokens=max_tokens,
            sampling=parsed.sampling,
            signals=self.hub,
            stop=parsed.stop,
            controller=chooser,
        )
        job = Job(tokens, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except Busy:
            raise ApiError(
                503,
                "the server is busy (all slots and the queue are full); retry shortly",
                code="server_busy",
                kind="server_error",
            ) from None
        return job

    async def generation(self, request: Request, chat: bool) -> Response:
        """POST /v1/chat/completions (chat) and /v1/completions: a whole answer or a stream of chunks."""
        endpoint = request.url.path
        try:
            parsed = parse_request(await self.read_json(request), chat, self.config.model_name)
            ids = self.prompt_ids(parsed, chat)
            job = self.start(parsed, ids)
        except ApiError as err:
            self.metrics.requests.labels(endpoint=endpoint, status=str(err.status)).inc()
            headers = {"Retry-After": str(self.config.retry_after_s)} if err.status == 503 else None
            return error_response(err, headers)
        except ClientDisconnect:
            return Response(status_code=499)
        self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
        ident = new_id(chat)
        if parsed.stream:
            events = self.stream(job, chat, ident, len(ids), parsed.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.whole(request, job, chat, ident, len(ids))

    async def whole(self, request: Request, job: Job, chat: bool, ident: str, prompt_tokens: int) -> Response:
        """Collect a job's tokens into one response; a client that leaves cancels the job."""
        tokens: list[GeneratedToken] = []
        while True:
            try:
                item = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
                continue
            if item is DONE:
                return JSONResponse(completion(chat, ident, self.config.model_name, tokens, prompt_tokens))
            if isinstance(item, Exception):
                return error_response(generation_failed(item))
            tokens.append(item)

    async def stream(
        self, job: Job, chat: bool, ident: str, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """A job's tokens as server-sent events, then [DONE]; the job is cancelled however the stream ends."""
        name, made = self.config.model_name, 0
        try:
            if chat:
                yield sse(chunk(chat, ident, name, None, first=True))
            while True:
                item = await job.queue.get()
                if item is DONE:
                    break
                if isinstance(item, Exception):
                    yield sse(generation_failed(item).to_json())
                    break
                made += 1
                yield sse(chunk(chat, ident, name, item))
            if include_usage:
                yield sse(usage_chunk(chat, ident, name, prompt_tokens, made))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response is cancelled) or the stream ended: no more tokens either way
            job.cancel()

    async def models(self, request: Request) -> Response:
        """GET /v1/models."""
        model = {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "balcony-edge",
            "balcony": {"exits": self.engine.exits, "provider": self.engine.provider},
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        """GET /health (no key needed)."""
        running, queued = self.scheduler.depth
        return JSONResponse({"status": "ok", "model": self.config.model_name, "running": running, "queued": queued})

    async def metrics_page(self, request: Request) -> Response:
        """GET /metrics in Prometheus' text format."""
        running, queued = self.scheduler.depth
        return Response(self.metrics.render(running, queued), media_type=self.metrics.content_type)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", functools.partial(self.generation, chat=True), methods=["POST"]),
            Route("/v1/completions", functools.partial(self.generation, chat=False), methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
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


def middleware_for(config: ServerConfig) -> list[Middleware]:
    """CORS for the configured origins, then the API key check."""
    middleware = []
    if config.cors_origins:
        cors = dict(
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
        middleware.append(Middleware(CORSMiddleware, **cors))
    if config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, key=config.api_key))
    return middleware


def create_app(engine: Engine, config: ServerConfig, controller: DeviceController, hub: SignalHub) -> Starlette:
    """The ASGI app; the scheduler thread starts with it and stops with it (lifespan)."""
    handlers = Handlers(engine, config, controller, hub)

    @asynccontextmanager
    async def lifespan(app):
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
