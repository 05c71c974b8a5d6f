"""The runtime engine: exact exit switching, generation equal to torch, context limits, shared weights."""

import dataclasses
import json

import numpy as np
import pytest

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine, SamplingConfig
from balcony_edge.runtime.core.constraints import ConstraintError
from balcony_edge.runtime.core.sequence import Boundary, ContextFullError
from balcony_edge.runtime.device.telemetry import TelemetryWriter, read_telemetry


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


def _static_logits(engine, tokens):
    """Every exit's logits after every prefix, each exit run alone: exit -> [len(tokens), vocab]."""
    table = {}
    for exit in engine.exits:
        sequence = engine.sequence(tokens[:1])
        rows = [sequence.logits(exit)]
        for token in tokens[1:]:
            sequence.append(token)
            rows.append(sequence.logits(exit))
        table[exit] = np.stack(rows)
    return table


def test_switching_exit_gives_static_exit_logits(engine):
    rng = np.random.default_rng(0)
    vocab = engine.manifest.vocab_size
    for trial in range(4):
        tokens = rng.integers(0, vocab, size=40).tolist()
        static = _static_logits(engine, tokens)
        sequence = engine.sequence(tokens[:5])
        schedule = rng.choice(engine.exits, size=len(tokens) - 4)
        if trial == 0:
            schedule[:] = engine.exits[0]
            schedule[-1] = engine.exits[-1]  # one deepening after a long shallow backlog
        for position, exit in zip(range(4, len(tokens)), schedule):
            logits = sequence.logits(int(exit))
            np.testing.assert_allclose(logits, static[int(exit)][position], rtol=0, atol=1e-4)
            if position + 1 < len(tokens):
                sequence.append(tokens[position + 1])


def test_a_long_deep_stretch_then_shallow_catches_up_exactly(engine):
    """Hidden states held for a lagging balcony across buffer growth (more rows than the first buffer holds)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, engine.manifest.vocab_size, size=160).tolist()
    static = _static_logits(engine, tokens)
    shallow, deep = engine.exits[0], engine.exits[-1]
    schedule = [deep] * 100 + [shallow] * 10 + [deep, shallow] * 24 + [deep]
    sequence = engine.sequence(tokens[:1])
    for position, exit in enumerate(schedule):
        np.testing.assert_allclose(sequence.logits(exit), static[exit][position], rtol=0, atol=1e-4)
        sequence.append(tokens[position + 1])


def test_steps_on_the_bound_plan_equal_one_run_over_the_whole_prefix(engine):
    """One-token steps run on each exit's step plan (buffers bound once); across the cache's growth past its first
    capacity (256) and across switches, each step's logits equal those of one run of the chain over the prefix."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, engine.manifest.vocab_size, size=300).tolist()
    whole = {exit: engine.sequence(tokens).logits(exit, every_position=True) for exit in engine.exits}
    sequence = engine.sequence(tokens[:1])
    schedule = [engine.exits[(position // 50) % len(engine.exits)] for position in range(len(tokens))]
    earlier = None
    for position, exit in enumerate(schedule):
        logits = sequence.logits(exit)
        np.testing.assert_allclose(logits, whole[exit][position], rtol=0, atol=1e-4)
        if earlier is not None:  # a step leaves the logits it returned before as they were
            np.testing.assert_array_equal(earlier[0], earlier[1])
        earlier = (logits, logits.copy())
        if position + 1 < len(tokens):
            sequence.append(tokens[position + 1])
    assert {exit for exit, _ in sequence._plans} == set(engine.exits)  # every exit stepped on a plan
    assert sequence.cache.capacity > 256


def test_a_boundary_keeps_exactly_the_rows_put_and_not_dropped():
    rng = np.random.default_rng(2)
    boundary, expected = Boundary(), {}
    end = 0
    for _ in range(300):
        if rng.random() < 0.2 and expected:
            position = int(rng.integers(min(expected), end + 1))
            boundary.drop_before(position)
            expected = {p: row for p, row in expected.items() if p >= position}
            continue
        start = int(rng.integers(max(min(expected, default=0), end - 3), end + 1))
        rows = rng.standard_normal((1, int(rng.integers(1, 40)), 4)).astype(np.float32)
        boundary.put(start, rows)
        expected = {p: row for p, row in expected.items() if p < start} | {
            start + i: rows[0, i] for i in range(rows.shape[1])
        }
        end = start + rows.shape[1]
        held = sorted(expected)
        np.testing.assert_array_equal(boundary.take(held[0], end)[0], np.stack([expected[p] for p in held]))


def test_deepening_recomputes_exactly_the_backlog(engine):
    shallow, deep = engine.exits[0], engine.exits[-1]
    sequence = engine.sequence([3, 4, 5])
    sequence.logits(deep)
    assert sequence.last_catch_up == 0  # the prompt is a prefill, not a catch-up
    sequence.append(6)
    sequence.logits(shallow)
    assert sequence.last_catch_up == 3  # the shallow exit's balcony had not seen the prompt
    for token in range(7, 7 + 6):
        sequence.append(token)
        sequence.logits(shallow)
        assert sequence.last_catch_up == 0
    sequence.append(20)
    sequence.logits(deep)
    assert sequence.last_catch_up == 7
    sequence.append(21)
    sequence.logits(deep)
    assert sequence.last_catch_up == 0


@pytest.mark.parametrize("position", ["exit", "full"])
def test_constant_budget_greedy_text_equals_torch(engine, tiny_model, position):
    from balcony_edge.generate import generate_greedy

    exit = engine.exits[0] if position == "exit" else engine.exits[-1]
    prompt = engine.prompt_ids("Write a short story about the sea.")
    tokens = [t.id for t in engine.generate(prompt, max_new_tokens=24, budget=str(exit))]
    expected = generate_greedy(tiny_model, exit, prompt, 24, set(engine.manifest.generation.eos_token_ids))
    assert tokens == expected
    assert all(t.exit == exit for t in engine.generate(prompt, max_new_tokens=4, budget=str(exit)))


def test_generated_tokens_report_exit_latency_and_text(engine):
    tokens = list(engine.generate("The harbour", max_new_tokens=6, budget="auto"))
    assert 1 <= len(tokens) <= 6
    assert all(t.exit in engine.exits and t.latency_ms > 0 and t.reason for t in tokens)
    assert "".join(t.text for t in tokens) == engine.codec.decode(
        [t.id for t in tokens if t.id not in engine.manifest.generation.eos_token_ids]
    )


def test_stop_strings_end_the_answer_without_the_stop_text(engine):
    tokens = list(engine.generate("The harbour", max_new_tokens=30, budget="full"))
    text = "".join(t.text for t in tokens)
    stop = text[3:6]
    assert stop
    stopped = list(engine.generate("The harbour", max_new_tokens=30, budget="full", stop=(stop,)))
    assert "".join(t.text for t in stopped) == text[: text.index(stop)]


def test_context_length_is_a_clear_error_or_an_opt_in_window(engine):
    limit = engine.manifest.generation.context_length
    sequence = engine.sequence([t % 300 for t in range(limit)])
    with pytest.raises(ContextFullError, match="context length of 512 tokens"):
        sequence.append(1)
    windowed = engine.sequence([t % 300 for t in range(10, 10 + limit)], sliding_window=True)
    windowed.append(7)
    assert len(windowed.tokens) == limit // 2 + 1 and windowed.tokens[-1] == 7
    reference = engine.sequence(windowed.tokens)
    np.testing.assert_allclose(windowed.logits(engine.exits[0]), reference.logits(engine.exits[0]), atol=1e-5)


def test_all_sessions_share_one_copy_of_the_weights(tiny_export):
    """Without packed weights (test_packed_weights.py has those), each weight is lent from the one memory map."""
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, packed_weights=False)
    pieces = engine.manifest.pieces
    lent = engine.weights.nbytes()
    assert lent == sum(engine.manifest.weights[name].length for name in {n for p in pieces for n in p.weights})
    assert len({id(runner.session) for runner in engine.runners.values()}) == len(pieces)
    assert engine.provider == "CPUExecutionProvider"


def test_no_weight_is_in_two_sessions(engine):
    """Each session prepacks what it is lent: a weight lent to two sessions would be packed twice. Only the rotary
    tables (read by GroupQueryAttention, never packed) and a tied embedding (looked up by Gather in the first
    segment, multiplied by the head) are lent to more than one."""
    owners: dict[str, list[str]] = {}
    for runner in engine.runners.values():
        for name in runner.piece.weights:
            owners.setdefault(name, []).append(runner.piece.name)
    shared = {name: where for name, where in owners.items() if len(where) > 1}
    assert set(shared) <= {"base.rotary.cos_cache", "base.rotary.sin_cache", "base.model.embed_tokens.weight"}
    assert shared["base.model.embed_tokens.weight"] == ["layers_0_0", "head"]


def test_the_cache_is_written_in_place(engine):
    sequence = engine.sequence(list(range(5, 15)))
    sequence.logits(engine.exits[-1])
    buffers = {slot: tuple(id(a) for a in pair) for slot, pair in sequence.cache.store._host.items()}
    before = sequence.cache.keys("layer.0", 10)
    for token in (3, 4, 5):
        sequence.append(token)
        sequence.logits(engine.exits[-1])
    assert {slot: tuple(id(a) for a in pair) for slot, pair in sequence.cache.store._host.items()} == buffers
    after = sequence.cache.keys("layer.0", 13)
    np.testing.assert_array_equal(after[:, :, :10], before)
    assert np.abs(after[:, :, 10:]).sum() > 0 and sequence.cache.filled["layer.0"] == 13


def test_a_corrupted_export_is_refused(tiny_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / engine_graph(copy), "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(Exception, match="sha256 differs"):
        Engine.load(copy, providers=["cpu"])


def engine_graph(folder):
    from balcony_edge.runtime.core.manifest import Manifest

    return Manifest.load(folder).exits[0].graph


@pytest.mark.parametrize("fixture", ["tiny_export", "tiny_export_kv8"])
def test_the_gpu_check_script_runs_on_the_cpu_and_skips_absent_gpus(request, fixture):
    """With a float cache and with an int8 one (its switching limit is its activations')."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tiny_export = request.getfixturevalue(fixture)
    script = Path(__file__).parents[2] / "scripts" / "gpu" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_export), "--tokens", "6"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    cpu = report["providers"]["cpu"]
    assert (
        cpu["provider"] == "CPUExecutionProvider"
        and cpu["switching_max_abs_diff"] <= 1e-4
        and cpu["switching_limit"] == 1e-3
    )
    assert set(cpu["exits"]) == {"1", "2", "4"} and all(len(row["tokens"]) == 6 for row in cpu["exits"].values())
    for name in ("tensorrt", "cuda"):
        assert "skipped" in report["providers"][name] or report["providers"][name]["provider"].lower().startswith(
            name[:4]
        )


def test_text_stream_decodes_each_token_once_and_holds_back_split_characters_and_stop_prefixes(engine):
    from balcony_edge.runtime.core.text import TextStream

    codec = engine.codec
    ids = codec.encode("naïve 🚢 harbour END tail")
    stream = TextStream(codec, stop=("END",))
    shown = ""
    for token in ids:
        stream.push(token)
        shown += stream.take(final=False)
        assert "\ufffd" not in shown and "END" not in shown
        if stream.stop_at is not None:
            break
    shown += stream.take(final=True)
    assert shown == "naïve 🚢 harbour "
    cut = TextStream(codec)
    for token in codec.encode("🚢")[:-1]:  # generation ended inside a character
        cut.push(token)
    assert cut.take(final=False) == ""
    cut.finish()
    assert cut.take(final=True) == "\ufffd" * len(cut.text) and cut.text


def test_the_last_token_says_why_generation_ended(engine):
    tokens = list(engine.generate("The harbour", max_new_tokens=3, budget="full"))
    assert [t.finish for t in tokens[:-1]] == [None] * (len(tokens) - 1)
    assert tokens[-1].finish == ("stop" if tokens[-1].id in engine.manifest.generation.eos_token_ids else "length")


def test_a_telemetry_writer_follows_a_generation_one_line_per_token(engine, tmp_path):
    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as writer:
        tokens = list(
            writer.follow(engine.generate("Hello there", max_new_tokens=6, budget=str(engine.exits[1]), chat=False))
        )
    records = read_telemetry(path)
    assert [r["token_index"] for r in records] == list(range(len(tokens)))
    assert [(r["token_id"], r["token_text"], r["exit"], r["catch_up_tokens"], r["reason"]) for r in records] == [
        (t.id, t.text, t.exit, t.catch_up_tokens, t.reason) for t in tokens
    ]
    assert [r["latency_ms"] for r in records] == [round(t.latency_ms, 3) for t in tokens]
    assert all(r["signals"] == t.signals for r, t in zip(records, tokens))


def test_a_provider_that_falls_back_is_quiet_and_says_why_in_a_line(engine, capsys):
    from balcony_edge.runtime.core.engine import _fallback_reason, _quietly

    tensorrt = (
        "EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::python::"
        "RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::ProviderOptions&) Please install "
        "TensorRT libraries as mentioned in the GPU requirements page.\n when using [('TensorrtExecutionProvider', {})]"
    )
    cuda = (
        "EP Error [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Buffer containing "
        "the initializer must be owned by the user. when using [...]"
    )

    def falling_back():
        print(
            "*************** EP Error ***************\n"
            + tensorrt
            + "\nFalling back to ['CPUExecutionProvider'] and retrying."
        )
        return "session"

    session, printed = _quietly(falling_back)
    assert session == "session" and capsys.readouterr().out == ""
    assert _fallback_reason(printed) == "Please install TensorRT libraries as mentioned in the GPU requirements page."
    assert (
        _fallback_reason(cuda) == "2 : INVALID_ARGUMENT : Buffer containing the initializer must be owned by the user."
    )
    assert _fallback_reason("nothing printed") is None
    saved, engine.fallbacks = (
        engine.fallbacks,
        {"TensorrtExecutionProvider": _fallback_reason(printed), "CUDAExecutionProvider": "no usable GPU"},
    )
    try:
        assert engine.describe().endswith("; unavailable: Tensorrt: no TensorRT libraries; CUDA: no usable GPU")
        assert "TensorrtExecutionProvider: Please install TensorRT libraries" in engine.describe(verbose=True)
    finally:
        engine.fallbacks = saved


def test_an_answer_longer_than_the_context_ends_at_the_context_with_finish_length(engine):
    limit = engine.manifest.generation.context_length
    prompt = engine.prompt_ids("The harbour", chat=False)
    tokens = list(engine.generate(prompt, max_new_tokens=10**18, budget="full", ignore_eos=True))
    assert len(prompt) + len(tokens) == limit and tokens[-1].finish == "length"
    with pytest.raises(ContextFullError, match="the prompt fills the context of 512 tokens"):
        next(engine.generate([5] * limit, max_new_tokens=1))


def test_empty_stop_strings_and_bad_logprobs_are_refused(engine):
    with pytest.raises(BalconyError, match="stop strings must be non-empty text"):
        next(engine.generate("The harbour", stop=("",)))
    with pytest.raises(BalconyError, match="logprobs 21 must be a whole number from 0 to 20"):
        next(engine.generate("The harbour", logprobs=21))


def test_without_sampling_settings_the_exports_recommended_ones_are_used(tiny_export):
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    assert engine.default_sampling == SamplingConfig()  # the tiny base recommends nothing: greedy
    recommended = {"temperature": 1.5, "top_k": 5.0}
    engine.manifest.generation = dataclasses.replace(engine.manifest.generation, sampling=recommended)
    assert engine.default_sampling == SamplingConfig(temperature=1.5, top_k=5)
    prompt = engine.prompt_ids("The harbour")
    chosen = [t.id for t in engine.generate(prompt, 12, "full")]
    sampled = [t.id for t in engine.generate(prompt, 12, "full", SamplingConfig(temperature=1.5, top_k=5))]
    greedy = [t.id for t in engine.generate(prompt, 12, "full", SamplingConfig())]
    assert chosen != greedy or sampled != greedy  # the recommended sampling, not greedy, chose the default's tokens
    seeded = [t.id for t in engine.generate(prompt, 12, "full", SamplingConfig(temperature=1.5, top_k=5, seed=3))]
    assert seeded == [t.id for t in engine.generate(prompt, 12, "full", SamplingConfig.of(recommended, seed=3))]


def test_each_token_carries_its_log_probability_at_its_exit(engine):
    prompt = engine.prompt_ids("The harbour")
    tokens = list(engine.generate(prompt, 3, str(engine.exits[0]), SamplingConfig(), logprobs=2))
    logits = engine.sequence(prompt).logits(engine.exits[0]).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert tokens[0].logprob == pytest.approx(log_probs[tokens[0].id])
    assert [i for i, _ in tokens[0].top_logprobs] == list(np.argsort(-log_probs)[:2])
    assert all(t.logprob is None for t in engine.generate(prompt, 2, "full"))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.5, seed=3)], ids=["greedy", "hot"])
def test_a_json_constraint_makes_every_answer_valid_json_matching_the_schema(engine, sampling):
    pytest.importorskip("llguidance")
    for exit in engine.exits:
        constraint = engine.json_constraint(SCHEMA)
        tokens = list(engine.generate("Describe the harbour.", 120, str(exit), sampling, constraint=constraint))
        answer = json.loads("".join(t.text for t in tokens))
        assert tokens[-1].finish == "stop" and set(answer) == {"name", "count", "ok"}
        assert isinstance(answer["name"], str) and type(answer["count"]) is int and type(answer["ok"]) is bool
    # Any object: a random model may write one longer than the answer's limit; complete ones parse.
    free = list(engine.generate("Describe the harbour.", 200, "full", sampling, constraint=engine.json_constraint()))
    text = "".join(t.text for t in free)
    assert text.startswith("{") and (
        isinstance(json.loads(text), dict) if free[-1].finish == "stop" else len(free) == 200
    )


def test_a_schema_llguidance_cannot_compile_is_a_one_line_error(engine):
    pytest.importorskip("llguidance")
    with pytest.raises(ConstraintError, match="the JSON schema cannot be compiled"):
        engine.json_constraint({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})


def test_a_complete_json_answer_ends_even_with_ignore_eos(engine):
    pytest.importorskip("llguidance")
    constraint = engine.json_constraint(SCHEMA)
    tokens = list(
        engine.generate("Describe the harbour.", 300, "full", SamplingConfig(), ignore_eos=True, constraint=constraint)
    )
    assert tokens[-1].finish == "stop" and json.loads("".join(t.text for t in tokens))


def test_room_made_for_an_answer_spares_its_steps_any_cache_growth(engine):
    rng = np.random.default_rng(3)
    vocab = engine.manifest.vocab_size
    prompt = rng.integers(0, vocab, size=256).tolist()  # fills the first capacity exactly: the next token would grow it
    roomy, plain = engine.sequence(prompt), engine.sequence(prompt)
    roomy.make_room(40)
    version, capacity = roomy.cache.version, roomy.cache.capacity
    assert capacity >= 296
    token = int(np.argmax(roomy.logits(engine.exits[0])))
    assert int(np.argmax(plain.logits(engine.exits[0]))) == token
    for step in range(40):
        exit = engine.exits[step % len(engine.exits)]
        roomy.append(token)
        plain.append(token)
        logits = roomy.logits(exit)
        np.testing.assert_array_equal(logits, plain.logits(exit))  # the same numbers in a larger buffer
        token = int(np.argmax(logits))
    assert roomy.cache.version == version and roomy.cache.capacity == capacity
    assert plain.cache.capacity > 256  # the plain sequence grew on the way


@pytest.mark.parametrize("bad", [2.5, -1, "8"])
def test_make_room_refuses_what_is_not_a_number_of_tokens(engine, bad):
    with pytest.raises(BalconyError, match="whole number of tokens"):
        engine.sequence([1, 2]).make_room(bad)


def test_start_makes_room_for_the_answer_up_to_answer_room(engine, monkeypatch):
    from balcony_edge.runtime.core import sequence as sequence_module

    monkeypatch.setattr(sequence_module, "ANSWER_ROOM", 64)  # the tiny model's context is short
    limit, room = engine.manifest.generation.context_length, sequence_module.ANSWER_ROOM
    prompt = list(range(10, 30))
    assert 2 * (len(prompt) + room) <= limit  # so that room for the whole answer would show
    short = engine.start(prompt, max_new_tokens=50, budget="full", chat=False)
    assert short.sequence.cache.capacity >= 70
    long = engine.start(prompt, max_new_tokens=limit - len(prompt), budget="full", chat=False)
    assert len(prompt) + room <= long.sequence.cache.capacity < limit  # room for the start, not for all of it


@pytest.mark.parametrize("packed", [True, False])
def test_a_sequence_outlives_its_engine(tiny_export, packed):
    """Nothing the sessions borrow goes with the engine (in a child: a use after free would crash the process)."""
    import subprocess
    import sys

    script = (
        "import gc, numpy as np\n"
        "from balcony_edge.runtime import Engine\n"
        f"engine = Engine.load({str(tiny_export)!r}, providers=['cpu'], threads=1, packed_weights={packed})\n"
        "expected = engine.sequence(list(range(3, 40))).logits(1)\n"
        "sequence = engine.sequence(list(range(3, 40)))\n"
        "del engine\n"
        "gc.collect()\n"
        "print(bool(np.array_equal(sequence.logits(1), expected)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stderr[-500:]
