"""`balcony-edge chat` driven through a pseudo-terminal, one-shot prompts with telemetry, and `plot`."""

import json
import os
import subprocess
import sys

import pexpect
import pytest

# The chat in a process of its own, as a user runs it: on the default process-wide thread pool.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "BALCONY_EDGE_THREAD_POOL"},
    "HF_HUB_OFFLINE": "1",
    "COLUMNS": "200",
    "TERM": "dumb",
}


def spawn_chat(export, options: str) -> pexpect.spawn:
    """`balcony-edge chat EXPORT OPTIONS` in a pseudo-terminal (options: space-separated, no spaces inside one)."""
    return pexpect.spawn(
        sys.executable,
        ["-m", "balcony_edge", "chat", str(export), *options.split()],
        env=ENV,
        encoding="utf-8",
        timeout=120,
    )


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The chat keeps its line history in the cache folder: a test's own, not the user's."""
    monkeypatch.setitem(ENV, "BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_interactive_chat_streams_answers_and_obeys_commands(tiny_export, own_cache):
    chat = spawn_chat(
        tiny_export,
        "--budget 1 --plain --temperature 0 --max-new-tokens 8 --signals temperature_degc=55,battery_percent=80",
    )
    chat.expect("> ")
    chat.sendline("Write a short story about the sea.")
    chat.expect(r"\[1\]")  # the first token's exit marker
    chat.expect(r"tok/s \| exit 1: fixed budget \| 55 degC \| battery 80% \| budget 1")
    chat.expect("> ")
    chat.sendline("/exit 4")
    chat.expect("budget: 4")
    chat.sendline("And then?")
    chat.expect(r"\[4\]")
    chat.expect("exit 4")
    chat.expect("> ")
    chat.sendline("/stats")
    chat.expect(r"exit   1: +\d+ tokens")
    chat.expect(r"exit   4: +\d+ tokens")
    chat.expect("CPUExecutionProvider")
    chat.sendline("/budget nonsense")
    chat.expect("not understood")
    chat.sendline("/reset")
    chat.expect("conversation cleared")
    chat.sendline("/system Answer briefly.")
    chat.expect("system message set")
    chat.sendline('"""')
    chat.sendline("A message")
    chat.sendline("on two lines")
    chat.sendline('"""')
    chat.expect(r"tok/s \| exit 4")
    chat.expect("> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert "on two lines" in (own_cache / "chat_history").read_text()  # readline's history, kept for next time


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_export):
    # Greedy: the tiny model never picks its end token then (sampled, an answer sometimes ended before the interrupt).
    chat = spawn_chat(
        tiny_export,
        "--budget full --plain --temperature 0 --max-new-tokens 100000 --signals temperature_degc=50 --sliding-window",
    )
    chat.expect("> ")
    chat.sendline("Tell me everything.")
    chat.expect(r"\[4\]")
    chat.sendintr()
    chat.expect(r"\(stopped\)")
    chat.expect("> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)


def test_one_shot_prompt_with_replayed_trace_writes_telemetry_and_a_plot(tiny_export, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"token": t, "temperature_degc": 60 + 2 * t, "battery_percent": 90}) for t in range(20))
    )
    telemetry = tmp_path / "run.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "balcony_edge",
            "chat",
            str(tiny_export),
            "--prompt",
            "The harbour",
            "--budget",
            "auto",
            "--signals",
            str(trace),
            "--signals-clock",
            "token",
            "--telemetry",
            str(telemetry),
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout  # stdout holds the answer alone
    records = [json.loads(line) for line in telemetry.read_text().splitlines()]
    assert 1 <= len(records) <= 12
    assert records[0]["signals"]["temperature_degc"] == 60
    assert all(
        {"t_s", "token_id", "exit", "latency_ms", "catch_up_tokens", "reason", "signals"} <= r.keys() for r in records
    )
    plotted = subprocess.run(
        [sys.executable, "-m", "balcony_edge", "plot", str(telemetry), "-o", str(tmp_path / "run.png")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "run.png").stat().st_size > 10_000


@pytest.mark.parametrize("budget, words", [("fast", "not understood"), ("3", "exit 3")])
def test_bad_budgets_are_one_line_errors(tiny_export, budget, words):
    result = subprocess.run(
        [sys.executable, "-m", "balcony_edge", "chat", str(tiny_export), "--prompt", "x", "--budget", budget],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_first_screen_is_short_and_quiet(tiny_export):
    """No onnxruntime provider errors, library warnings or tracebacks before the first prompt: two short lines."""
    chat = spawn_chat(tiny_export, "--signals temperature_degc=40")
    chat.expect("> ")
    first_screen = chat.before.strip().splitlines()
    chat.sendline("/help")
    chat.expect(r"/system\s+TEXT")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    assert len(first_screen) <= 3, first_screen
    assert not [
        line
        for line in first_screen
        if any(w in line for w in ("provider_bridge", "Warning", "Traceback", "onnxruntime_src"))
    ]
    assert first_screen[0].startswith("balcony-edge chat on CPUExecutionProvider")


def test_the_chat_says_once_that_a_hard_limit_went_below_the_quality_floor(tiny_export):
    import io

    from rich.console import Console

    from balcony_edge.runtime import Engine, SignalHub
    from balcony_edge.runtime.chat import ChatSession
    from balcony_edge.runtime.core.generation import GeneratedToken

    status = io.StringIO()
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    session = ChatSession(engine, "1", None, SignalHub([]), status=Console(file=status, width=200))
    below = GeneratedToken(
        5, "a", 1, 3.0, 0, "battery 5% < 10% on battery", why="battery 5% (critical)", below_floor=True
    )
    for _ in range(3):
        session.tell_below_floor(below)
    assert status.getvalue().count("below the quality floor (battery 5% (critical))") == 1
