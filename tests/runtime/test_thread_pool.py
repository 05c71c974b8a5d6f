"""The engine on onnxruntime's process-wide thread pool (`--thread-pool process`): the same logits as with a pool per
session (the default), and clear errors for what onnxruntime refuses once that pool exists. Each process-pool check
runs in a fresh process: the pool cannot be undone in the test process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balcony_edge.runtime import Engine

PROMPT = [5, 9, 14, 3, 27, 8, 11]
EXIT_SCHEDULE = [1, 4, 2, 2, 4, 1]  # shallow and deep in turn: catch-up runs on the pool too


def logits_per_step(engine: Engine) -> list[list[float]]:
    """The logits of each token of a fixed schedule of exits, one engine, one sequence."""
    sequence = engine.sequence(PROMPT)
    rows = []
    for step, exit in enumerate(EXIT_SCHEDULE):
        rows.append(sequence.logits(exit).tolist())
        sequence.append(20 + step)
    return rows


def run_in_fresh_process(tiny_export) -> dict:
    script = f"""
import json
from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine
from test_thread_pool import logits_per_step
engine = Engine.load({str(tiny_export)!r}, threads=1, thread_pool="process")
out = {{"logits": logits_per_step(engine), "describe": engine.describe()}}
for name, make in {{
    "own_pool": lambda: Engine.load({str(tiny_export)!r}, threads=1),
    "other_size": lambda: Engine.load({str(tiny_export)!r}, threads=2, thread_pool="process"),
}}.items():
    try:
        make()
        out[name] = "loaded"
    except BalconyError as err:
        out[name] = str(err)
out["second_on_pool"] = len(logits_per_step(Engine.load({str(tiny_export)!r}, threads=1, thread_pool="process")))
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_process_pool_gives_the_per_session_logits_and_refuses_clearly(tiny_export):
    pooled = run_in_fresh_process(tiny_export)
    own = logits_per_step(Engine.load(tiny_export, threads=1))
    np.testing.assert_allclose(np.array(pooled["logits"]), np.array(own), atol=1e-5)
    assert "load with thread_pool='process'" in pooled["own_pool"]
    assert "thread pool has 1 threads" in pooled["other_size"] and "load with threads=1" in pooled["other_size"]
    assert pooled["second_on_pool"] == len(EXIT_SCHEDULE)  # more engines share the one pool


def test_an_onnxruntime_without_the_process_pool_or_with_one_made_by_the_host_is_a_clear_error(
    tiny_export, monkeypatch
):
    import onnxruntime as ort

    from balcony_edge.common.errors import BalconyError

    monkeypatch.delattr(ort, "set_global_thread_pool_sizes")  # as in onnxruntime before 1.23
    with pytest.raises(BalconyError, match="has no process-wide thread pool.*--thread-pool session"):
        Engine.load(tiny_export, threads=1, thread_pool="process")
    monkeypatch.undo()
    script = f"""
import onnxruntime as ort
from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine
ort.set_global_thread_pool_sizes(1, 1)  # the host application's own pool
try:
    Engine.load({str(tiny_export)!r}, threads=1, thread_pool="process")
except BalconyError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "process-wide thread pool cannot be made here" in done.stdout, done.stdout + done.stderr
