"""Starting the server: the engine loaded, one device-wide controller over the signals, the app on uvicorn."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.paths import SHIPPED_EXPORT_NAME, default_export_dir
from balcony_edge.runtime.core.engine import Engine
from balcony_edge.runtime.device.controller import Budget, ControllerConfig, DeviceController
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.serving.app import ServerConfig, create_app

if TYPE_CHECKING:
    from starlette.applications import Starlette


@dataclass(frozen=True)
class ServeOptions:
    """What `balcony-edge serve` was asked for."""

    export: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    parallel: int = 1
    queue: int = 16
    budget: str = "auto"
    model_name: str | None = None
    cors: tuple[str, ...] = ()
    providers: list[str] | None = None
    threads: int | None = None
    thread_pool: str = "session"
    trust_modified: bool = False
    aliases: tuple[str, ...] = ()
    prompt_cache: int = 4
    quality_floor: str | int = "auto"


def model_name_of(folder: Path) -> str:
    """The id clients send: smollm2-balcony for the default export, else the export folder's name."""
    return SHIPPED_EXPORT_NAME if Path(folder).resolve() == default_export_dir().resolve() else Path(folder).name


def build_app(
    options: ServeOptions,
    hub: SignalHub,
    default_export: Callable[[], Path],
    warn: Callable[[str], None] | None = None,
) -> tuple[Starlette, Engine, ServerConfig]:
    """The engine, the device controller and the app; the settings are checked before the slow engine load."""
    budget = Budget.parse(options.budget)
    config = ServerConfig(
        model_name=options.model_name or SHIPPED_EXPORT_NAME,
        parallel=options.parallel,
        queue_limit=options.queue,
        api_key=options.api_key,
        cors_origins=options.cors,
        aliases=options.aliases,
        prompt_cache=options.prompt_cache,
    )
    controller_config = ControllerConfig(quality_floor=options.quality_floor)
    folder = options.export or default_export()
    engine = Engine.load(
        folder,
        providers=options.providers,
        threads=options.threads,
        trust_modified=options.trust_modified,
        warn=warn,
        thread_pool=options.thread_pool,
    )
    controller = DeviceController(engine.controller(budget, controller_config))
    config = replace(config, model_name=options.model_name or model_name_of(folder))
    return create_app(engine, config, controller, hub), engine, config


def run_server(
    options: ServeOptions,
    hub: SignalHub,
    default_export: Callable[[], Path],
    say: Callable[[str], object] = print,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted."""
    import uvicorn

    listener = bound_socket(options.host, options.port)  # before the slow load: a taken port is said at once
    app, engine, config = build_app(options, hub, default_export, warn)
    host = f"[{options.host}]" if ":" in options.host else options.host
    say(
        f"serving {config.model_name} at "
        f"http://{host}:{options.port}/v1 "
        f"on {engine.describe()} "  # the address first: a long status line wraps after it
        f"(parallel {config.parallel}, queue {config.queue_limit}, budget {options.budget}"
        f"{', API key required' if config.api_key else ''})"
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[listener])


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or a one-line error naming the problem."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise BalconyError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or --host"
        ) from None
    return listener
