"""The benchmark's own logic on the tiny model: JSON shape, switch-cost arithmetic, bare loop and floors exact.

No timing thresholds: speed is measured by `balcony-edge bench`, and its figures are in docs/benchmarks.md.
"""

import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from balcony_edge.bench import BenchConfig, run_bench
from balcony_edge.bench.benchmark import genai_exits, llama_cpp_exits
from balcony_edge.bench.decode import BareDecoder, EngineDecoder, alternate, greedy_run, summarize
from balcony_edge.bench.floors import floor_graphs
from balcony_edge.bench.neighbour import quiet_and_beside
from balcony_edge.bench.quality import perplexities_from_eval
from balcony_edge.bench.report import target_lines
from balcony_edge.bench.switching import deepening_time, switch_cost_steps
from balcony_edge.cli import app
from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.manifest import Manifest


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


def _bare(folder, graph):
    kv = Manifest.load(folder).kv
    return BareDecoder(graph, 1, kv.num_kv_heads, kv.head_dim)


def test_switch_cost_is_median_deepening_time_in_deep_steps():
    assert switch_cost_steps([0.30, 0.10, 0.20], deep_step_s=0.1) == pytest.approx(2.0)
    assert switch_cost_steps([0.05], deep_step_s=0.05) == pytest.approx(1.0)


def test_summary_takes_medians_over_runs():
    from balcony_edge.bench.decode import RunTiming

    runs = [
        RunTiming(10, 0.5, 0.6, [0.1, 0.1], [1]),
        RunTiming(10, 1.0, 1.1, [0.2, 0.2], [1]),
        RunTiming(10, 2.0, 2.1, [0.4, 0.4], [1]),
    ]
    stats = summarize(runs)
    assert stats.decode_tok_s == pytest.approx(5.0)  # the median run: 2 steps in 0.4 s
    assert stats.prefill_tok_s == pytest.approx(10.0)  # 10 tokens in 1.0 s
    assert stats.ttft_ms == pytest.approx(1100.0)
    assert stats.step_ms == pytest.approx(200.0)


def test_bare_loop_on_the_full_graph_makes_the_engine_tokens(engine, tiny_export):
    full = engine.manifest.exits[-1]
    prompt = list(range(5, 25))
    bare = greedy_run(_bare(tiny_export, tiny_export / full.graph), prompt, 12)
    through_engine = greedy_run(EngineDecoder(engine, full.exit), prompt, 12)
    assert bare.tokens == through_engine.tokens
    assert len(bare.step_s) == 12 and bare.prompt_tokens == 20


def test_floor_graph_equals_the_truncated_torch_model(tiny_export, tiny_base, tiny_base_dir):
    manifest = Manifest.load(tiny_export)
    graphs = floor_graphs(manifest, [2], base=tiny_base, say=lambda text: None)
    prompt = [3, 9, 4, 17, 8, 30]
    decoder = _bare(tiny_export, graphs[2])
    got = [decoder.prefill(prompt)] + [decoder.step(t) for t in (11, 12)]
    with torch.no_grad():
        ids = torch.tensor([prompt + [11, 12]])
        cut = AutoModelForCausalLM.from_pretrained(
            tiny_base_dir, num_hidden_layers=2
        ).eval()  # the first 2 layers' weights
        expected = cut(ids).logits[0].numpy()
    for row, position in zip(got, (5, 6, 7)):
        np.testing.assert_allclose(row, expected[position], atol=1e-4)
    again = floor_graphs(manifest, [2], base=None, say=lambda text: pytest.fail("a cached floor was exported again"))
    assert again == graphs


def test_deepening_recomputes_exactly_the_backlog(engine):
    shallow, deep = engine.exits[0], engine.exits[-1]
    for backlog in (1, 5):
        assert deepening_time(engine, list(range(4, 12)), shallow, deep, backlog) > 0


def test_perplexities_come_from_eval_json():
    eval_json = {"full": {"ppl": 30.0}, "exits": [{"exit": 8, "ppl": 150.0}, {"exit": 16, "ppl": 90.0}]}
    assert perplexities_from_eval(eval_json, 30) == {8: 150.0, 16: 90.0, 30: 30.0}
    with pytest.raises(BalconyError, match="eval --json"):
        perplexities_from_eval({"exits": [{"exit": 8}]}, 30)


def test_bench_result_has_every_figure(tiny_export, tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(
        json.dumps({"full": {"ppl": 40.0}, "exits": [{"exit": 1, "ppl": 90.0}, {"exit": 2, "ppl": 60.0}]})
    )
    config = BenchConfig(
        export=tiny_export,
        new_tokens=24,  # enough that a peer's decode time stands clear of its prefill's noise
        prompt_tokens=16,
        repeats=1,
        threads=1,
        eval_file=eval_file,
        say=lambda t: None,
    )
    result = run_bench(config)
    assert [row["exit"] for row in result["exits"]] == [1, 2, 4]
    for row in result["exits"]:
        for key in ("decode_tok_s", "floor_tok_s", "prefill_tok_s", "bandwidth_gb_s", "ttft_ms", "vs_floor"):
            assert row[key] > 0, key
        assert row["bandwidth_gb_s"] == pytest.approx(
            row["weight_bytes_per_token"] * row["decode_tok_s"] / 1e9, abs=0.01
        )
    assert [row["ppl"] for row in result["exits"]] == [90.0, 60.0, 40.0]
    assert set(result["switch_cost_steps"]) == {"1", "4", "16", "64"}
    assert result["engine_vs_bare"] > 0 and result["engine_vs_torch"] > 0
    assert result["bare_tokens_match"] is True
    assert result["memory"]["all_exits"]["exits"] == [1, 2, 4] and result["memory"]["full_only"]["exits"] == [4]
    assert result["memory_ratio_all_vs_full"] > 0
    assert "skipped" in result["peers"]["llama_cpp"]  # only the default model has a GGUF
    assert result["machine"]["provider"] == "CPUExecutionProvider" and result["prompt_tokens"] == 16
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    assert len(target_lines(result)) == 9 + genai  # a line for genai when it ran
    assert (
        result["neighbour_ratio"] > 0 and result["neighbour_tok_s"] > 0 and result["llama_cpp_neighbour_ratio"] is None
    )
    assert result["context_step_ratio"]["64"] == 1.0 and result["llama_cpp_precision"] is None
    assert all(row["vs_llama_cpp_full"] is None for row in result["exits"])
    if not genai:
        assert result["engine_vs_genai"] is None and any(
            note.startswith("onnxruntime_genai skipped") for note in result["notes"]
        )
    else:
        assert result["engine_vs_genai"] > 0 and all(row["genai_tok_s"] > 0 for row in result["exits"])
    json.dumps(result)  # serialisable as is


def test_an_int8_cache_export_is_benched_against_float_cache_floors(tiny_export_kv8):
    config = BenchConfig(
        export=tiny_export_kv8,
        new_tokens=3,
        prompt_tokens=8,
        repeats=1,
        threads=1,
        peers=False,
        memory=False,
        say=lambda t: None,
    )
    result = run_bench(config)
    assert result["kv_cache"] == "int8" and result["bare_tokens_match"] is True
    assert all(row["floor_tok_s"] > 0 for row in result["exits"])  # floors are plain models: a float cache


def test_onnxruntime_genai_runs_each_exit_graph_when_importable(tiny_export):
    pytest.importorskip(
        "onnxruntime_genai", reason="onnxruntime-genai is installed in an environment of its own (docs/export.md)"
    )
    config = BenchConfig(export=tiny_export, new_tokens=24, prompt_tokens=16, repeats=1, threads=1, say=lambda t: None)
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    run = genai_exits(config, Manifest.load(tiny_export), engine, list(range(5, 21)))
    assert set(run["exits"]) == {"1", "2", "4"}
    assert all(
        r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["folder"].endswith(f"exit_{k}" if k != "4" else "full")
        for k, r in run["exits"].items()
    )
    assert all(r["engine_vs_peer"] > 0 and r["rounds"] == 1 for r in run["exits"].values())  # timed in turn
    cuda = dataclasses.replace(config, provider="cuda")
    assert "skipped" in genai_exits(cuda, Manifest.load(tiny_export), engine, [5, 6])


def test_bench_command_prints_json_and_writes_the_plot(tiny_export, tmp_path):
    plot = tmp_path / "bench.png"
    options = (
        "--json --new-tokens 3 --prompt-tokens 8 --repeats 1 --threads 1 --no-floor --no-peers --no-memory "
        "--no-huge-pages"
    ).split()
    done = CliRunner().invoke(app, ["bench", str(tiny_export), "--plot", str(plot), *options])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)  # one JSON object on stdout; progress goes to stderr
    assert (
        result["exits"][0]["floor_tok_s"] is None and result["exits"][-1]["floor_tok_s"] > 0
    )  # bare loop on the full graph
    assert result["engine_vs_torch"] is None and result["memory_ratio_all_vs_full"] is None
    assert result["huge_pages_mb"] == 0
    assert any("floors skipped" in note for note in result["notes"])
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("huge, packed", [(True, True), (False, False)])
def test_the_memory_probe_gets_the_engines_settings(tiny_export, monkeypatch, huge, packed):
    from balcony_edge.bench import memory
    from balcony_edge.runtime.core.sessions import SessionSettings

    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='{"rss_bytes": 1}\n', stderr="")

    monkeypatch.setattr(memory.subprocess, "run", run)
    settings = SessionSettings(
        ("CPUExecutionProvider",), threads=1, prepack=False, huge_pages=huge, packed_weights=packed
    )
    assert memory.measure_in_subprocess(tiny_export, "full", settings) == {"rss_bytes": 1}
    assert "--no-prepack" in commands[0]
    assert ("--huge-pages" if huge else "--no-huge-pages") in commands[0]
    assert ("--packed-weights" if packed else "--no-packed-weights") in commands[0]


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's pagemap")
def test_resident_bytes_count_a_file_page_mapped_twice_once(tmp_path):
    import mmap

    from balcony_edge.bench.memory import resident_bytes

    size, slack = 16 << 20, 2 << 20
    path = tmp_path / "weights"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    resident_bytes()  # its own first allocations out of the way
    figures = [(resident_bytes(), psutil.Process().memory_info().rss)]
    with open(path, "rb") as handle:
        maps = []
        for _ in range(2):
            maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
            assert int(np.frombuffer(maps[-1], dtype=np.uint8)[::4096].sum()) > 0  # every page read
            figures.append((resident_bytes(), psutil.Process().memory_info().rss))
        for m in maps:
            m.close()
    (resident_0, rss_0), (resident_1, rss_1), (resident_2, rss_2) = figures
    assert resident_1 - resident_0 >= size - slack and rss_1 - rss_0 >= size - slack  # the first mapping counts
    assert rss_2 - rss_1 >= size - slack  # RSS counts the second mapping's pages again
    assert abs(resident_2 - resident_1) <= slack  # once here


def test_bench_without_torch_skips_floors_with_a_note_and_runs_peers_in_children_on_the_process_pool(tiny_export):
    import subprocess
    import sys

    from conftest import BLOCKER

    script = (
        BLOCKER
        + f"""
import json
from pathlib import Path
from balcony_edge.bench import BenchConfig, run_bench
from balcony_edge.bench.decode import EngineDecoder, alternate
from balcony_edge.bench.benchmark import genai_exits, llama_cpp_exits
config = BenchConfig(
    export=Path({str(tiny_export)!r}), new_tokens=3, prompt_tokens=8, repeats=1, threads=1, memory=False,
    thread_pool="process", say=lambda t: None
)
print(json.dumps(run_bench(config)))
"""
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["floor_tok_s"] is None for row in result["exits"]] == [True, True, False]  # the bare loop still runs
    assert result["thread_pool"] == "process" and result["bare_tokens_match"] is True  # bare loop first, then the pool
    assert any("floors skipped" in note and "torch" in note for note in result["notes"])
    assert result["peers"]["torch"]["decode_tok_s"] > 0  # a peer runs in a child process of its own, torch there


def test_the_summary_compares_each_exit_with_llama_cpp_on_its_own_gguf():
    rows = [
        {"exit": 8, "full": False, "vs_floor": 1.0, "vs_llama_cpp_full": 2.0, "vs_llama_cpp_same_exit": 0.75},
        {"exit": 30, "full": True, "vs_floor": 1.0, "vs_llama_cpp_full": 0.6, "vs_llama_cpp_same_exit": 0.6},
    ]
    lines = target_lines({"exits": rows, "engine_vs_llama_cpp": 0.6, "llama_cpp_precision": "q4_0"})
    assert "engine / llama.cpp on the same exit's GGUF: 8 0.75, full 0.60 (no target)" in lines
    assert "slowest exit / llama.cpp full: 2.00 (target >= 1.0) met" in lines  # exits short of full depth
    assert "engine / llama.cpp q4_0 (full): 0.60 (target >= 0.85) MISSED" in lines
    rows[0]["vs_genai"], rows[1]["vs_genai"] = 1.1, 0.95
    assert "slowest exit / onnxruntime-genai on its graph: 0.95 (target >= 0.95) met" in target_lines({"exits": rows})


def test_a_peer_that_crashes_hangs_or_fails_is_a_note_and_the_bench_goes_on(monkeypatch):
    from balcony_edge.bench import isolated

    crashed = isolated.run_isolated("torch", 60, base_spec="/nowhere", prompt=[1], new_tokens=1, repeats=1, threads=1)
    assert "skipped" in crashed and "failed" in crashed["skipped"]
    monkeypatch.setattr(isolated, "CHILD", [sys.executable, "-c", "import os; os.abort()"])
    assert "crashed (SIGABRT)" in isolated.run_isolated("torch", 60)["skipped"]
    monkeypatch.setattr(isolated, "CHILD", [sys.executable, "-c", "import time; time.sleep(30)"])
    assert "did not finish within 1 s" in isolated.run_isolated("torch", 1)["skipped"]
    with pytest.raises(isolated.PeerFailed, match="did not answer within 1 s"):
        isolated.PeerWorker("llama_cpp", 1, gguf_path="x", prompt=[1], threads=1)
    monkeypatch.setattr(isolated, "CHILD", [sys.executable, "-c", "import os; os.abort()"])
    with pytest.raises(isolated.PeerFailed, match=r"crashed \(SIGABRT\)"):
        isolated.PeerWorker("llama_cpp", 10, gguf_path="x", prompt=[1], threads=1)


def test_the_engine_and_a_peer_alternate_round_by_round(engine):
    calls = []

    def peer_timed(count):
        calls.append(("peer", count))
        return 0.01 * count

    class Recording(EngineDecoder):
        def prefill(self, prompt):
            calls.append("engine")
            return super().prefill(prompt)

    figures = alternate(Recording(engine, engine.exits[0]), peer_timed, [5, 6, 7], 4, 3)
    assert figures["decode_tok_s"] == pytest.approx(100.0) and figures["rounds"] == 3 and figures["engine_vs_peer"] > 0
    order = [c if c == "engine" else "peer" for c in calls if c == "engine" or c[1] == 1]
    # a warm-up, then rounds in turn, the order swapped every round
    assert order == ["engine", "engine", "peer", "peer", "engine", "engine", "peer"]


def test_a_peer_is_timed_in_turn_with_the_engine_at_every_exit_asked(engine, monkeypatch):
    """llama.cpp's full model against each exit: one worker, each exit's rounds under in_turn, the last on top."""
    from balcony_edge.bench import benchmark

    class FakeWorker:  # a peer making 100 tokens/s, without a child process
        info = {"file": "full.gguf"}

        def __init__(self, name, timeout_s, **where):
            self.name = name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def timed(self, count):
            return 0.01 * count

    monkeypatch.setattr(benchmark, "PeerWorker", FakeWorker)
    config = BenchConfig(export=engine.folder, new_tokens=4, repeats=2, threads=1, say=lambda t: None)
    result = benchmark.side_by_side(config, engine, engine.exits, [5, 6, 7], "llama_cpp", gguf_path="x")
    assert set(result["in_turn"]) == {str(exit) for exit in engine.exits} and result["file"] == "full.gguf"
    assert all(r["decode_tok_s"] == pytest.approx(100.0) and r["rounds"] == 2 for r in result["in_turn"].values())
    assert result["engine_vs_peer"] == result["in_turn"][str(engine.exits[-1])]["engine_vs_peer"]
    single = benchmark.side_by_side(config, engine, [engine.exits[0]], [5, 6, 7], "llama_cpp", gguf_path="x")
    assert "in_turn" not in single and single["engine_vs_peer"] > 0


def test_the_export_ab_script_compares_two_exports_exit_by_exit(tiny_export, tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "export_ab.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_export), str(tiny_export), "--rounds", "2", "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["exit"] for row in rows] == [e.exit for e in Manifest.load(tiny_export).exits]
    assert all(row["same_tokens"] and row["a_tok_s"] > 0 and row["b_over_a"] > 0 for row in rows)


def test_llama_cpp_exit_files_are_skipped_for_a_checkpoint_of_deeper_balconies(tiny_export, tiny_base, tmp_path):
    from balcony_edge.checkpoint import build_model, save_checkpoint
    from balcony_edge.model import BalconyConfig

    exits = [entry.exit for entry in Manifest.load(tiny_export).exits if not entry.is_full]
    model = build_model(tiny_base, BalconyConfig(tuple(exits), deeper=((exits[0], 2),)))
    save_checkpoint(model, tiny_base.identity.name, tmp_path / "deep", training={})
    config = BenchConfig(export=tiny_export, checkpoint=tmp_path / "deep", say=lambda t: None)
    result = llama_cpp_exits(config, Manifest.load(tiny_export), "f16", None, [])
    assert result == {"skipped": f"exit {exits[0]} of {tmp_path / 'deep'} has a balcony of 2 layers"}


def test_quiet_and_busy_runs_alternate_and_the_ratio_is_the_median_of_the_rounds():
    """Each call sees the busy loop running exactly when it is a busy run; the order turns every round."""
    seen, speeds = [], iter([100.0, 50.0, 30.0, 90.0, 80.0, 60.0])  # round 0 quiet, busy; round 1 busy, quiet; ...

    def busy() -> bool:
        return any("monotonic" in " ".join(child.cmdline()) for child in psutil.Process().children())

    def decode_tok_s() -> float:
        seen.append(busy())
        return next(speeds)

    result = quiet_and_beside(decode_tok_s, rounds=3)
    assert seen == [False, True, True, False, False, True]
    assert not busy()  # the busy loop is gone
    assert result["quiet_tok_s"] == 90.0 and result["neighbour_tok_s"] == 50.0
    assert result["neighbour_ratio"] == pytest.approx(statistics.median([0.5, 30 / 90, 60 / 80]), abs=1e-3)
