"""What the server tests share: the tiny engine behind an app, SSE parsing, and the app live on uvicorn."""

import json
import threading
import time

import uvicorn

from balcony_edge.runtime.device.controller import Budget, Controller, DeviceController
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.sources import FixedSource
from balcony_edge.runtime.serving.app import ServerConfig, create_app

MODEL = "tiny-balcony"
HELLO = [{"role": "user", "content": "Tell me about the harbour."}]


def make_app(engine, budget="auto", signals=None, **settings):
    config = ServerConfig(model_name=MODEL, **settings)
    controller = DeviceController(Controller(engine.controller_profiles(Budget.parse(budget)), Budget.parse(budget)))
    hub = SignalHub([FixedSource.from_text(signals)] if signals else [])
    return create_app(engine, config, controller, hub)


def sse_events(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


class LiveServer:
    """The app on uvicorn on a free port of 127.0.0.1, in a thread, stopped by the test."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
