"""`balcony-edge serve`: OpenAI's wire format over the engine, errors in OpenAI's shape, one device controller,
a bounded queue, cancellation on disconnect, the API key, and a start with torch absent."""

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import BLOCKER
from serving_helpers import HELLO, MODEL, LiveServer, make_app, sse_events
from starlette.testclient import TestClient

from balcony_edge.runtime import Engine


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(make_app(engine)) as client:
        yield client


def test_chat_completion_counts_usage_exactly_and_equals_the_engine(client, engine):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0, "budget": "full"}
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    prompt = engine.prompt_ids(HELLO)
    direct = list(engine.generate(prompt, max_new_tokens=6, budget="full"))
    choice = result["choices"][0]
    assert result["object"] == "chat.completion" and result["model"] == MODEL and result["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": "".join(t.text for t in direct)}
    assert choice["finish_reason"] == direct[-1].finish
    assert result["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(direct),
        "total_tokens": len(prompt) + len(direct),
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert choice["balcony"]["exit"] == engine.exits[-1] and sum(choice["balcony"]["tokens_per_exit"].values()) == len(
        direct
    )


def test_streamed_chat_is_the_same_answer_in_openai_chunks(client):
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    whole = client.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(answer.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c for c in chunks[1:] if c["choices"]]
    assert all(c["object"] == "chat.completion.chunk" and "exit" in c["choices"][0]["balcony"] for c in tokens)
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in tokens)
        == whole["choices"][0]["message"]["content"]
    )
    assert tokens[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_stream_and_not(client, engine):
    body = {"model": MODEL, "prompt": "The harbour was", "max_tokens": 5, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["usage"]["prompt_tokens"] == len(
        engine.codec.encode("The harbour was")
    )
    streamed = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == whole["choices"][0]["text"]


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()
    exits = client.app.state.scheduler and [m["balcony"].get("exit") for m in models["data"][1:]]
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert [m["id"] for m in models["data"][1:]] == [f"{MODEL}:exit-{e}" for e in exits] and len(exits) == 3
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    metrics = client.get("/metrics").text
    for name in (
        "balcony_tokens_total{exit=",
        "balcony_token_latency_seconds_bucket",
        "balcony_catch_up_positions_total",
        "balcony_queued_requests",
        'balcony_requests_total{endpoint="/v1/chat/completions",status="200"}',
    ):
        assert name in metrics, name


SELF_REFERENCE = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}  # no value matches it


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ("{not json", 400, None, "invalid_json"),
        ([1, 2], 400, None, None),
        ({"model": MODEL, "messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature", "invalid_value"),
        ({"model": MODEL, "messages": "hello"}, 400, "messages", "invalid_type"),
        ({"model": "gpt-4o", "messages": HELLO}, 404, "model", "model_not_found"),
        ({"messages": HELLO}, 400, "model", "missing_required_parameter"),
        ({"model": MODEL, "messages": []}, 400, "messages", None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "invalid_prompt"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content",
            "unsupported_content",
        ),
        ({"model": MODEL, "messages": HELLO, "budget": "turbo"}, 400, "budget", "invalid_budget"),
        ({"model": MODEL, "messages": HELLO, "budget": "3"}, 400, "budget", "invalid_budget"),
        ({"model": MODEL, "messages": HELLO, "n": 9}, 400, "n", "invalid_value"),
        ({"model": MODEL, "messages": HELLO, "frequency_penalty": 3}, 400, "frequency_penalty", "invalid_value"),
        ({"model": MODEL, "messages": HELLO, "frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"5": 3}}, 400, "logit_bias", "unsupported_parameter"),
        ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
        ({"model": MODEL, "messages": HELLO, "min_p": 1}, 400, "sampling", "invalid_value"),
        (
            {"model": MODEL, "messages": HELLO, "repeat_penalty": 1.2, "repetition_penalty": 1.3},
            400,
            "repetition_penalty",
            None,
        ),
        ({"model": MODEL + ":exit-5", "messages": HELLO}, 404, "model", "model_not_found"),
        ({"model": MODEL + ":exit-²", "messages": HELLO}, 404, "model", "model_not_found"),
        ({"model": MODEL + ":exit-01", "messages": HELLO}, 404, "model", "model_not_found"),
        ({"model": MODEL, "messages": HELLO, "budget": "²"}, 400, "budget", "invalid_budget"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "b"}]}, 400, "messages[0].name", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}, 400, None, "invalid_unicode"),
        ('{"messages": [], "temperature": NaN}', 400, None, "invalid_json"),
        ('{"messages": [], "temperature": 1e999}', 400, None, "invalid_json"),
        (
            {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}, "stop": ["}"]},
            400,
            "stop",
            "invalid_value",
        ),
        (
            {"model": MODEL, "messages": HELLO, "response_format": {"type": "text", "json_schema": {"schema": {}}}},
            400,
            "response_format.json_schema",
            "invalid_value",
        ),
        (
            {
                "model": MODEL,
                "messages": HELLO,
                "response_format": {"type": "json_schema", "json_schema": {"schema": SELF_REFERENCE}},
            },
            400,
            "response_format",
            "invalid_value",
        ),
        ({"model": MODEL + ":exit-1", "messages": HELLO, "budget": "2"}, 400, "budget", None),
        ("[" * 50_000 + "]" * 50_000, 400, None, "invalid_json"),
        ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
        ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    answer = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and "Traceback" not in answer.text
    assert error["param"] == param and (code is None or error["code"] == code)
    assert (
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1}).status_code
        == 200
    )


def test_a_body_over_the_limit_is_413_and_unknown_routes_are_json_404(engine):
    with TestClient(make_app(engine, max_body_bytes=1000)) as client:
        answer = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}
        )
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"
        assert client.get("/v1/chat/completions").status_code == 405


def test_the_api_key_is_required_everywhere_but_health(engine):
    with TestClient(make_app(engine, api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            answer = client.get("/v1/models", headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metrics").status_code == 401


def test_cors_is_off_unless_asked(engine):
    preflight = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST"}
    with TestClient(make_app(engine)) as client:
        assert "access-control-allow-origin" not in client.options("/v1/models", headers=preflight).headers
    with TestClient(make_app(engine, cors_origins=("http://app.local",))) as client:
        assert (
            client.options("/v1/models", headers=preflight).headers["access-control-allow-origin"] == "http://app.local"
        )


def test_the_device_controller_decides_and_a_request_budget_caps_it(engine):
    shallow, deep = engine.exits[0], engine.exits[-1]
    with TestClient(make_app(engine, budget="full")) as client:

        def exits(budget):
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True, "budget": budget}
            return {
                c["choices"][0]["balcony"]["exit"]
                for c in sse_events(client.post("/v1/chat/completions", json=body).text)[1:]
            }

        assert exits("auto") == {deep}
        assert exits(str(shallow)) == {shallow}
    # Hot device: the shared controller steps down for every request, whatever the request asked.
    with TestClient(make_app(engine, budget="auto", signals="temperature_degc=99")) as client:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "budget": "full"}
        assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["balcony"]["exit"] == shallow


def test_queue_full_is_503_with_retry_after_and_a_disconnect_cancels(engine):
    app = make_app(engine, parallel=1, queue_limit=0)
    long = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "stream": True, "temperature": 1.0, "seed": 1}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running now
            busy = http.post("/v1/chat/completions", json={**long, "stream": False, "max_tokens": 2})
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0
            assert busy.json()["error"]["code"] == "server_busy"
        # The client closed the stream: its generation stops at the next token and the slot frees.
        scheduler = app.state.scheduler
        deadline = time.monotonic() + 10
        while scheduler.depth != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.depth == (0, 0)
        answer = http.post("/v1/chat/completions", json={**long, "stream": False, "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_the_official_openai_client_streams_from_several_threads(engine):
    openai = pytest.importorskip("openai")
    with LiveServer(make_app(engine, parallel=2, api_key="k")) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="k")
        assert [m.id for m in client.models.list()][0] == MODEL
        results = {}

        def ask(index):
            stream = client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            results[index] = (
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                chunks[-1].usage.completion_tokens,
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert (
            len(results) == 3 and len({text for text, _ in results.values()}) == 1
        )  # greedy: the same answer each time
        whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content == results[0][0] and whole.usage.completion_tokens == results[0][1]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_serve_starts_and_answers_with_torch_blocked(tiny_export):
    script = (
        BLOCKER
        + f"""
from pathlib import Path
from starlette.testclient import TestClient
from balcony_edge.runtime.serving.launch import ServeOptions, build_app
from balcony_edge.runtime.device.hub import SignalHub
app, engine, config = build_app(ServeOptions(export=Path({str(tiny_export)!r}), threads=1), SignalHub([]),
default_export=None)
with TestClient(app) as client:
    answer = client.post('/v1/chat/completions', json={{'model': config.model_name, 'messages': [{{'role': 'user',
    'content': 'Hi'}}], 'max_tokens': 3}})
    assert answer.status_code == 200, answer.text
print('ok', config.model_name, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))
"""
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok tiny-fp32 []"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_command_binds_localhost_requires_its_key_and_stops_on_interrupt(tiny_export, tmp_path):
    import signal

    key_file = tmp_path / "key.txt"
    key_file.write_text("from-a-file\n")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "balcony_edge",
        "serve",
        str(tiny_export),
        "--port",
        str(port),
        "--api-key-file",
        str(key_file),
        "--threads",
        "1",
        "--signals",
        "temperature_degc=40",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": "Bearer from-a-file"}
        body = {"model": "tiny-fp32", "messages": HELLO, "max_tokens": 3}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30).status_code == 401
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        taken = subprocess.run([*command[:5], "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1 and "cannot listen on 127.0.0.1" in taken.stdout + taken.stderr
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert (
        process.returncode == 130 and f"at http://127.0.0.1:{port}/v1" in output and "Traceback" not in output
    )  # Ctrl-C


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "turbo"], "budget 'turbo' is not understood"),
        (["--api-key", "a", "--api-key-file", "k"], "give one"),
        (["--api-key-file", "/nonexistent/key"], "No such file"),
        (["--api-key", "  "], "the API key is empty"),
        (["--model-name", "m:exit-2"], "must be a non-empty name without ':exit-'"),
        (["--alias", "a", "--alias", "a"], "repeats a name the server already answers to"),
    ],
)
def test_bad_serve_options_are_one_line_errors(tiny_export, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "balcony_edge", "serve", str(tiny_export), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and message in output and len(output.strip().splitlines()) == 1, output
