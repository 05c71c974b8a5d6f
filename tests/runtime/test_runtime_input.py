"""The runtime API under bad prompts and many threads: clear errors that change nothing, and no cross-talk."""

from __future__ import annotations

import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine, SamplingConfig
from balcony_edge.runtime.chat import ChatSession
from balcony_edge.runtime.core.sequence import ContextFullError
from balcony_edge.runtime.core.text import PromptError
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.sources import Signals

AWKWARD = ["\x00", "\x1b", "\x7f", "\udcff", "\ud800", "\t", "\r\n", "\u200b", "\ufeff", "<|im_end|>", " "]
PROMPTS = ["The harbour was quiet", "Write a short story about the sea", "A small model runs", "Fishing boats rocked"]


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, threads=1)


def greedy_text(engine: Engine, prompt: str, budget: str, tokens: int = 12) -> str:
    return "".join(
        t.text for t in engine.generate(prompt, tokens, budget=budget, sampling=SamplingConfig(temperature=0.0))
    )


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("", "the prompt is empty"),
        (" \n\t", "the prompt is empty"),
        ("bell\x07", "control character U+0007 at character 4"),
        ("nul\x00byte", "control character U+0000 at character 3"),
        ("bad \udcff byte", "not valid UTF-8 (byte 0xff at character 4)"),
        ("lone \ud800 surrogate", "lone surrogate U+D800"),
        (b"bytes", "the prompt is a bytes, not text"),
        ([], "the conversation is empty"),
        ([{"role": "user"}], "message 0 is not a dict with a role and a text content"),
        ([{"role": "user", "content": "esc \x1b"}], "control character U+001B"),
        ([5, 10**9], "token id 1000000000 is outside the vocabulary"),
        ([-1], "token id -1 is outside the vocabulary"),
        ([{"role": "wizard", "content": "hi"}], "message 0 has role 'wizard'; use one of system, user, assistant"),
        ([1.9, 2.9], "token id 1.9 is not a whole number"),
    ],
)
def test_bad_prompts_are_refused_before_anything_runs(engine, prompt, words):
    sequence = engine.sequence([1, 2, 3])
    with pytest.raises(PromptError, match=re.escape(words)):
        next(engine.generate(prompt, 4, budget="full", sequence=sequence))
    assert sequence.tokens == [1, 2, 3]


def test_tabs_and_newlines_are_fine_in_prompts(engine):
    assert greedy_text(engine, "line one\n\tline two\r\n", "full", 2)


def test_a_prompt_longer_than_the_context_changes_nothing_or_slides_the_window(engine):
    context = engine.manifest.generation.context_length
    sequence = engine.sequence([5, 6])
    with pytest.raises(
        ContextFullError,
        match=re.escape(f"{context} new tokens do not fit in the context of {context} tokens (2 already used)"),
    ):
        next(engine.generate([7] * context, 4, budget="full", sequence=sequence))
    assert sequence.tokens == [5, 6]
    windowed = engine.sequence([5, 6], sliding_window=True)
    windowed.extend([t % 300 for t in range(context + 1)])  # the window keeps the newest half of the context
    assert windowed.tokens == [t % 300 for t in range(context + 1)][-(context // 2) :]


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", 1e308), ("repetition_penalty", 1e308), ("temperature", -1.0)]
)
def test_sampling_values_past_their_bounds_are_refused(field, value):
    with pytest.raises(BalconyError, match="is outside"):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_max_new_tokens_must_be_a_positive_whole_number(engine, count):
    with pytest.raises(BalconyError, match="max_new_tokens"):
        next(engine.generate("Hello", count))


def test_interactive_chat_reports_a_bad_message_and_goes_on(engine):
    session, output = chat_session(engine, sliding_window=False, max_new_tokens=3)
    lines = iter(["bad \x1b escape", "Hello", "/quit"])
    session.run(read_line=lambda _: next(lines))
    text = output.getvalue()
    assert "error: the prompt holds control character U+001B" in text
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "Hello"


def test_threads_on_one_engine_give_their_single_threaded_text(engine):
    budgets = ["full", "1", "2", "full"]
    expected = {(p, b): greedy_text(engine, p, b) for p, b in zip(PROMPTS, budgets)}
    failures, runs = [], []
    deadline = time.monotonic() + 3.0

    def worker(prompt: str, budget: str) -> None:
        count = 0
        while time.monotonic() < deadline:
            text = greedy_text(engine, prompt, budget)
            if text != expected[(prompt, budget)]:
                failures.append((prompt, budget, text))
            count += 1
        runs.append(count)

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(PROMPTS, budgets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert len(runs) == len(threads) and min(runs) >= 1


class HangingSource:
    """A sensor whose driver never answers."""

    name, live = "hanging", True

    def __init__(self):
        self.release = threading.Event()

    def read(self, token_index=None):
        self.release.wait()
        return Signals()


class NonsenseSource:
    """A sensor that reports an impossible battery and die temperature beside a real power reading."""

    name, live = "nonsense", False

    def read(self, token_index=None):
        return Signals(battery_percent=-20.0, temperature_degc=500.0, power_mw=4000.0)


def test_generation_goes_on_past_a_hanging_and_a_nonsense_sensor(engine):
    warnings: list[str] = []
    hanging = HangingSource()
    hub = SignalHub([hanging, NonsenseSource()], on_warning=warnings.append, read_timeout_s=0.3)
    started = time.monotonic()
    tokens = list(engine.generate("Hello", 6, budget="auto", signals=hub, sampling=SamplingConfig(temperature=0.0)))
    hanging.release.set()
    assert len(tokens) == 6 and time.monotonic() - started < 10
    assert all(t.signals == {"power_mw": 4000.0} for t in tokens)
    assert len([w for w in warnings if "hanging" in w]) == 1
    assert len([w for w in warnings if "battery_percent" in w]) == 1
    assert len([w for w in warnings if "temperature_degc" in w]) == 1


def test_an_export_whose_rewrite_was_killed_between_the_renames_still_loads(tiny_export, tmp_path):
    import shutil

    retired = tmp_path / ".export.old-killed"
    shutil.copytree(tiny_export, retired / "export")
    engine = Engine.load(tmp_path / "export")
    assert engine.folder == retired / "export" and greedy_text(engine, "Hello", "full", 2)


def chat_session(engine, sliding_window: bool, max_new_tokens: int):
    from io import StringIO

    from rich.console import Console

    output = StringIO()
    session = ChatSession(
        engine,
        "full",
        SamplingConfig(temperature=0.0),
        SignalHub([]),
        max_new_tokens=max_new_tokens,
        console=Console(file=output, width=200),
        sliding_window=sliding_window,
    )
    return session, output


def test_a_chat_with_the_sliding_window_goes_on_past_the_context_length(engine):
    session, output = chat_session(engine, sliding_window=True, max_new_tokens=16)
    context = engine.manifest.generation.context_length
    message = " ".join(["the river runs by the small city"] * 12)
    for turn in range(10):
        assert session.answer(f"{turn} {message}"), f"turn {turn} gave no answer"
    assert len(engine.codec.chat_prompt(session.messages)) > 2 * context  # the conversation outgrew the window
    assert len(session.sequence.tokens) <= context and "error" not in output.getvalue()


def test_without_the_window_a_message_that_does_not_fit_changes_nothing(engine):
    session, output = chat_session(engine, sliding_window=False, max_new_tokens=4)
    session.answer("Hello")
    before = (list(session.messages), list(session.sequence.tokens))
    too_long = " ".join(["river"] * engine.manifest.generation.context_length)
    with pytest.raises(ContextFullError, match="do not fit in the context"):
        session.answer(too_long)
    assert (session.messages, session.sequence.tokens) == before


def test_threads_asking_for_the_auto_budget_at_once_calibrate_once(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path))
    fresh = Engine.load(tiny_export, threads=1)
    calls, real = [], fresh.calibrate
    monkeypatch.setattr(fresh, "calibrate", lambda: calls.append(1) or real())
    texts: list[str] = []
    threads = [threading.Thread(target=lambda p=p: texts.append(greedy_text(fresh, p, "auto", 4))) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1 and len(texts) == len(PROMPTS)
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1


def test_the_runtime_smoke_script_passes_on_an_export(tiny_export):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "runtime_smoke.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_export), "--provider", "cpu"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert len(checks) == 5 and all(checks.values())


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prompt=st.lists(st.characters(exclude_categories=()) | st.sampled_from(AWKWARD), max_size=30).map("".join)
    | st.lists(st.integers(-5, 500), max_size=6)
)
def test_any_prompt_generates_or_is_refused_in_one_line(engine, prompt):
    try:
        tokens = list(engine.generate(prompt, 2, budget="full", sampling=SamplingConfig(temperature=0.0)))
    except BalconyError as err:
        assert "\n" not in str(err)
    else:
        assert 1 <= len(tokens) <= 2


def test_the_jetson_example_fails_in_one_line_and_takes_trust_modified(tiny_export, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "jetson_app.py"

    def run(*args):
        return subprocess.run(
            [sys.executable, str(example), *map(str, args)], capture_output=True, text=True, timeout=120
        )

    bad_budget = run(tiny_export, "--budget", "fast")
    assert bad_budget.returncode == 1 and "Traceback" not in bad_budget.stderr
    assert len(bad_budget.stderr.strip().splitlines()) == 1 and "budget" in bad_budget.stderr
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_export, copy)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    tampered = run(copy, "--budget", "full")
    assert tampered.returncode == 1 and "--trust-modified" in tampered.stderr and "Traceback" not in tampered.stderr
    trusted = run(copy, "--budget", "full", "--trust-modified")
    assert trusted.returncode == 0, trusted.stderr
    assert "last token: exit" in trusted.stdout


TEMPLATES = {
    "break": "{% for m in messages %}{% if m['role'] == 'system' %}{% "
    "continue %}{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor "
    "%}{% if add_generation_prompt %}<assistant>{% endif %}",
    "system": "{% if messages[0]['role'] == 'system' %}[SYS]{{ messages[0]['content'] }}[/SYS]{% endif %}"
    "{% for m in messages if m['role'] != 'system' %}{% generation %}{{ "
    "m['role'] }}: {{ m['content'] }}{% endgeneration %}\n{% endfor %}"
    "{{ eos_token }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_templates_render_as_transformers_renders_them(tiny_export, tiny_base_dir, name):
    from transformers import AutoTokenizer

    from balcony_edge.runtime.core.manifest import Manifest
    from balcony_edge.runtime.core.text import chat_template_environment

    messages = [
        {"role": "system", "content": "Be brief <b>&</b> 'kind'."},
        {"role": "user", "content": 'Is 3 < 4? Say "yes" & why.'},
        {"role": "assistant", "content": "Yes: 3 < 4."},
        {"role": "user", "content": "And ü > é?"},
    ]
    manifest = Manifest.load(tiny_export)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    expected = tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATES[name], tokenize=False, add_generation_prompt=True
    )
    got = (
        chat_template_environment()
        .from_string(TEMPLATES[name])
        .render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )
    )
    assert got == expected and manifest.chat_template
    if name == "tojson":
        assert "3 < 4" in got and "\\u003c" not in got


def test_messages_go_on_after_a_backslash_or_inside_triple_quotes():
    from balcony_edge.runtime.chat import read_message

    def reader(*lines):
        feed = iter(lines)
        return lambda prompt: next(feed)

    assert read_message(reader("one line")) == "one line"
    assert read_message(reader("first \\", "second \\", "third")) == "first \nsecond \nthird"
    assert read_message(reader('"""', "  indented", "", "last", '"""')) == "indented\n\nlast"
    with pytest.raises(StopIteration):  # end of input inside a block: nothing half-read is sent
        read_message(reader('"""', "unfinished"))


def test_a_system_message_starts_the_conversation_and_slash_system_replaces_it(engine):
    session, output = chat_session(engine, sliding_window=False, max_new_tokens=4)
    assert session.messages == []
    session.command("/system You answer in one word.")
    assert session.messages == [{"role": "system", "content": "You answer in one word."}]
    session.answer("Hello")
    assert session.messages[0]["role"] == "system" and len(session.messages) == 3
    session.command("/reset")
    assert session.messages == [{"role": "system", "content": "You answer in one word."}]
    session.command("/system \x1b")
    assert "control character" in output.getvalue() and session.system == "You answer in one word."
    started = ChatSession(engine, "full", SamplingConfig(temperature=0.0), SignalHub([]), system="Be brief.")
    assert started.messages == [{"role": "system", "content": "Be brief."}]


def test_wrong_types_through_the_python_api_are_balcony_errors_naming_the_fix(engine, tiny_export):
    cases = [
        (lambda: Engine.load(12345), "must be a path (str or pathlib.Path), not int"),
        (
            lambda: Engine.load(tiny_export / "manifest.json"),
            "is a file, not an export folder; pass the folder that holds it",
        ),
        (lambda: engine.sequence("hello"), "not text; turn text into ids with engine.prompt_ids(text)"),
        (lambda: engine.sequence([1, "2"]), "token id '2' is not an int"),
        (
            lambda: list(engine.generate("hi", max_new_tokens=2, sampling={"temperature": 0})),
            "sampling must be a SamplingConfig",
        ),
        (lambda: engine.sequence([5, 6]).logits("2"), "exit '2' is a str; give the exit as an int"),
    ]
    for call, message in cases:
        with pytest.raises(BalconyError) as caught:
            call()
        assert message in str(caught.value)


def test_cuda_libraries_are_loaded_once_and_quietly_when_a_gpu_provider_is_asked(monkeypatch, capsys):
    import onnxruntime

    from balcony_edge.runtime.core import sessions

    calls = []
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    # onnxruntime-gpu's preload prints each library it cannot find; a CPU-only onnxruntime has no preload at all
    monkeypatch.setattr(
        onnxruntime,
        "preload_dlls",
        lambda **options: calls.append(options) or print("Failed to load libcublasLt.so.13"),
        raising=False,
    )
    sessions.load_cuda_libraries.cache_clear()
    try:
        assert sessions.resolve_providers(["cpu"]) == ("CPUExecutionProvider",) and calls == []
        assert sessions.resolve_providers(["cuda", "cpu"]) == ("CUDAExecutionProvider", "CPUExecutionProvider")
        sessions.resolve_providers(["tensorrt", "cuda"])
        assert calls == [{"msvc": False}] and capsys.readouterr().out == ""
    finally:
        sessions.load_cuda_libraries.cache_clear()


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "the chat template tried what its sandbox forbids"),
        ("{{ 'A' * 4000000000 }}", "the chat template tried what its sandbox forbids (a repetition of 4,000,000,000"),
        ("{% for i in range(100) %}{{ 'A' * 99999 }}{% endfor %}", "the chat template wrote more than 4,000,000"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "refused the conversation: Conversation roles"),
    ],
)
def test_a_hostile_or_runaway_chat_template_is_one_line_and_bounded(tiny_export, tmp_path, template, message):
    import shutil

    from balcony_edge.runtime.core.manifest import Manifest
    from balcony_edge.runtime.core.text import PromptError, TextCodec

    folder = shutil.copytree(tiny_export, tmp_path / "export")
    manifest = Manifest.load(folder)
    (folder / manifest.chat_template).write_text(template)
    codec = TextCodec(folder, manifest)
    with pytest.raises(PromptError) as refused:
        codec.chat_prompt([{"role": "user", "content": "Hi"}])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_chat_template_that_does_not_parse_is_one_line(tiny_export, tmp_path):
    import shutil

    from balcony_edge.runtime.core.manifest import Manifest
    from balcony_edge.runtime.core.text import TextCodec

    folder = shutil.copytree(tiny_export, tmp_path / "export")
    manifest = Manifest.load(folder)
    (folder / manifest.chat_template).write_text("{% for %}")
    with pytest.raises(BalconyError, match="does not parse .*export again"):
        TextCodec(folder, manifest)


def test_one_sequence_driven_from_several_threads_refuses_the_others_in_one_line(tiny_export):
    import threading

    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    sequence = engine.sequence([5, 6, 7])
    errors: list[Exception] = []

    def drive(offset: int) -> None:
        for step in range(40):
            try:
                sequence.logits(engine.exits[step % len(engine.exits)])
                sequence.append(10 + offset)
            except Exception as err:  # noqa: BLE001 - every kind is collected and checked below
                errors.append(err)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors and all(
        isinstance(err, BalconyError) and "a Sequence is not thread-safe" in str(err) for err in errors
    ), {type(err).__name__ for err in errors}
