"""Whether other processes keep the CPU busy beside the engine, from the machine's and this process's CPU times
(psutil), sampled at most every INTERVAL_S.

An exit's step graph runs a whole token in one session whose thread pool works through hundreds of nodes: fastest on
a quiet CPU, but beside a busy core its pool waits on a thread that has to share that core, and the chain of pieces,
whose pools hand over between short runs, keeps more of its speed (docs/benchmarks.md, "Thread pools"). The sequence
asks before each one-token step and runs the chain while others are busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

INTERVAL_S = 0.1  # how often the CPU times are read (in 10 ms ticks: 0.1 s of 2 cores tells 0.1 core apart)
BUSY_CORES = 0.5  # others' load, in cores, from which the CPU counts as contended ...
QUIET_CORES = 0.25  # ... and below which it counts as quiet again (between the two: as it was)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent running user code, all cores. Kernel time is left out: reading a
    freshly mapped file makes kernel threads busy for a moment, which is no neighbour taking a core."""
    times = psutil.cpu_times()
    return times.user + times.nice


def own_busy_s() -> float:
    """CPU seconds this process has spent running user code, all its threads."""
    return psutil.Process().cpu_times().user


class CpuContention:
    """`contended()`: whether other processes ran user code on at least BUSY_CORES of CPU over the last interval (with
    hysteresis down to QUIET_CORES). Thread-safe; the clock and the two readings can be given (tests)."""

    def __init__(
        self,
        machine: Callable[[], float] = machine_busy_s,
        own: Callable[[], float] = own_busy_s,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._machine, self._own, self._clock = machine, own, clock
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # taken at the first question, not while sessions load
        self._contended = False
        self.others_cores = 0.0  # the last interval's reading

    def contended(self) -> bool:
        if (self._last is None or self._clock() - self._last[0] >= INTERVAL_S) and self._lock.acquire(blocking=False):
            try:
                self._sample()
            finally:
                self._lock.release()
        return self._contended

    def _sample(self) -> None:
        """Read the CPU times again (under the lock, and only once the interval has passed: another thread may have
        just read them)."""
        now = self._clock()
        if self._last is None:
            self._last = (now, self._machine(), self._own())
            return
        at, machine_before, own_before = self._last
        if now - at < INTERVAL_S:
            return
        machine, own = self._machine(), self._own()
        self.others_cores = max(0.0, (machine - machine_before) - (own - own_before)) / (now - at)
        self._last = (now, machine, own)
        if self.others_cores >= BUSY_CORES:
            self._contended = True
        elif self.others_cores < QUIET_CORES:
            self._contended = False
