"""A neighbour for the bench: one process that keeps one core busy (a plain busy loop) while a decoder is measured
beside it, as a device runs other work beside the model. It stops itself after a time limit, so it never outlives
the bench. Quiet and busy runs are timed in turn, so that the machine's drift between minutes falls on both."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

SETTLE_S = 0.3  # the busy loop is running before the measurement starts
BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_core(limit_s: float = 900.0):
    """While entered, one process spins on the CPU (for at most limit_s)."""
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=limit_s)])
    try:
        time.sleep(SETTLE_S)
        yield
    finally:
        neighbour.kill()
        neighbour.wait()


def quiet_and_beside(decode_tok_s: Callable[[], float], rounds: int) -> dict:
    """`decode_tok_s()` (one timed greedy run's tok/s) quiet and beside a busy core in turn for `rounds` rounds, the
    order swapped every round: the median tok/s of each, and the median of the rounds' ratios (beside / quiet)."""
    quiet: list[float] = []
    beside: list[float] = []
    for round_ in range(rounds):
        for busy in (False, True) if round_ % 2 == 0 else (True, False):
            if busy:
                with busy_core():
                    beside.append(decode_tok_s())
            else:
                quiet.append(decode_tok_s())
    return {
        "quiet_tok_s": round(statistics.median(quiet), 2),
        "neighbour_tok_s": round(statistics.median(beside), 2),
        "neighbour_ratio": round(statistics.median(b / q for b, q in zip(beside, quiet)), 3),
        "rounds": rounds,
    }
