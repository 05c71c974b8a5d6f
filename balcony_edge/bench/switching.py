"""What deepening costs: after n tokens at a shallow exit, the first deep `logits` recomputes those n positions in
the deep exit's missing layers; its time is expressed in decode steps of the deep exit."""

from __future__ import annotations

import statistics
import time

import numpy as np

BACKLOGS = (1, 4, 16, 64)


def switch_cost_steps(deepening_s: list[float], deep_step_s: float) -> float:
    """Median time of the first deep step after a backlog, in median deep decode steps (1.0: free)."""
    return statistics.median(deepening_s) / deep_step_s


def deepening_time(engine, prompt: list[int], shallow: int, deep: int, backlog: int) -> float:
    """Seconds of the first `logits(deep)` after `backlog` greedy tokens at `shallow` (both exits saw the prompt; room
    made for the answer, as `Engine.generate` makes it)."""
    sequence = engine.sequence(prompt)
    sequence.make_room(backlog + 1)
    sequence.logits(deep)
    token = int(np.argmax(sequence.logits(shallow)))
    for _ in range(backlog):
        sequence.append(token)
        token = int(np.argmax(sequence.logits(shallow)))
    sequence.append(token)
    started = time.perf_counter()
    sequence.logits(deep)
    elapsed = time.perf_counter() - started
    if sequence.last_catch_up != backlog:
        raise AssertionError(f"deepening after {backlog} shallow tokens caught up {sequence.last_catch_up} positions")
    return elapsed


def switch_costs(
    engine, prompt: list[int], shallow: int, deep: int, deep_step_s: float, repeats: int, backlogs=BACKLOGS
) -> dict[str, float]:
    """Backlog (tokens, as a JSON key) -> cost of deepening from `shallow` to `deep` in deep decode steps."""
    deepening_time(engine, prompt, shallow, deep, backlogs[0])  # warm-up
    return {
        str(n): switch_cost_steps(
            [deepening_time(engine, prompt, shallow, deep, n) for _ in range(repeats)], deep_step_s
        )
        for n in backlogs
    }
