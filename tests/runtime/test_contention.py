"""Contention: other processes' CPU load read from the machine's and this process's CPU times, and one-token steps
that leave the step graph for the chain while the CPU is busy, with the same logits."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from balcony_edge.runtime import Engine
from balcony_edge.runtime.core import contention, step_plan
from balcony_edge.runtime.core.contention import CpuContention


class Clock:
    """Readings the test sets: seconds, the machine's busy CPU seconds and this process's."""

    def __init__(self) -> None:
        self.now = self.machine = self.own = 0.0

    def advance(self, seconds: float, others_cores: float, own_cores: float = 1.0) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.machine += (own_cores + others_cores) * seconds


def test_others_load_past_busy_cores_is_contention_until_it_falls_below_quiet_cores():
    clock = Clock()
    probe = CpuContention(lambda: clock.machine, lambda: clock.own, lambda: clock.now)
    clock.advance(2 * contention.INTERVAL_S, others_cores=0.9)  # while the sessions load: not a neighbour's reading
    assert not probe.contended() and probe.others_cores == 0.0  # the first question only takes the baseline
    clock.advance(2 * contention.INTERVAL_S, others_cores=0.9)
    assert probe.contended() and probe.others_cores == pytest.approx(0.9)
    clock.advance(2 * contention.INTERVAL_S, others_cores=0.4)  # between the thresholds: still contended
    assert probe.contended()
    clock.advance(contention.INTERVAL_S / 2, others_cores=0.0)  # too soon to read again
    assert probe.contended() and probe.others_cores == pytest.approx(0.4)
    clock.advance(2 * contention.INTERVAL_S, others_cores=0.0)
    assert not probe.contended()
    clock.advance(2 * contention.INTERVAL_S, others_cores=contention.BUSY_CORES + 0.1)
    assert probe.contended()


BUSY_LOOP = "import time\nend = time.time() + 20\nwhile time.time() < end:\n    pass\n"


def test_a_busy_loop_beside_is_seen_as_contention():
    loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        probe = CpuContention()
        seen = []
        for _ in range(10):
            time.sleep(contention.INTERVAL_S * 1.5)
            seen.append(probe.contended())
        assert any(seen)
    finally:
        loop.kill()
        loop.wait()


class Busy:
    def __init__(self) -> None:
        self.busy = False

    def contended(self) -> bool:
        return self.busy


def test_steps_leave_the_step_graph_for_the_chain_while_contended_with_the_same_logits(tiny_export, monkeypatch):
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    reference = Engine.load(tiny_export, providers=["cpu"], threads=1, packed_weights=False)
    assert engine.step_graphs
    busy = Busy()
    engine.contention = busy
    ran = []
    for plan in (step_plan.StepPlan, step_plan.StepGraphPlan):
        monkeypatch.setattr(plan, "step", lambda self, *args, run=plan.step: ran.append(type(self)) or run(self, *args))
    tokens = np.random.default_rng(7).integers(0, engine.manifest.vocab_size, size=60).tolist()
    sequence, expected = engine.sequence(tokens[:4]), reference.sequence(tokens[:4])
    for position, token in enumerate(tokens[4:]):
        busy.busy = (position // 7) % 2 == 1
        exit = engine.exits[(position // 11) % len(engine.exits)]
        np.testing.assert_array_equal(sequence.logits(exit), expected.logits(exit))
        sequence.append(token)
        expected.append(token)
    assert step_plan.StepPlan in ran and step_plan.StepGraphPlan in ran
