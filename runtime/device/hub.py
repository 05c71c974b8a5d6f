"""The signal hub: every source read before each token and merged, without a sensor ever stopping generation.

A live source (one that touches hardware) is read on its own daemon thread, so a read that hangs costs the token
loop one timeout and the source is dropped; a source that raises or gives something else is dropped; a field no
working sensor can give (NaN, 500 degC, a battery at -20 %) is left out. Each is warned of once.
"""

from __future__ import annotations

import contextlib
import numbers
import queue
import reprlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

from balcony_edge.common.console import log_warning
from balcony_edge.common.errors import SignalError
from balcony_edge.runtime.device.sources import (
    JtopSource,
    NvmlSource,
    PsutilSource,
    Signals,
    SignalSource,
    SysfsSource,
    why_impossible,
)

# A healthy read takes well under 50 ms (sysfs, psutil, NVML, jtop's cached sample) and a token 20-200 ms on the edge:
# 0.5 s leaves ten times the slowest healthy read under load, yet stalls generation for a few tokens' time once at most.
READ_TIMEOUT_S = 0.5
# A source's first read may connect to a service (jtop) or start NVML without persistence mode: seconds, before
# generation.
PROBE_TIMEOUT_S = 5.0


class SignalHub:
    """Reads and merges every source; one that raises, hangs or gives no Signals, or a field no sensor can give (NaN,
    500 degC), is warned of once and skipped."""

    def __init__(
        self,
        sources: Sequence[SignalSource],
        min_interval_s: float = 0.2,
        on_warning: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_timeout_s: float = READ_TIMEOUT_S,
    ):
        if min_interval_s < 0:
            raise SignalError(f"min_interval_s {min_interval_s} is negative; give 0 (read every time) or more seconds")
        if not read_timeout_s > 0:
            raise SignalError(
                f"read_timeout_s {read_timeout_s} is not positive; give the seconds a read may take, e.g. 0.5"
            )
        self.sources: list[SignalSource] = list(sources)
        self.min_interval_s = min_interval_s  # live sources are read at most this often (s); others every call
        # the longest a live source's read or close may take (s) before it is dropped
        self.read_timeout_s = read_timeout_s
        self.warnings: list[str] = []
        self._on_warning = on_warning or log_warning
        self._clock = clock
        self._cache: dict[int, tuple[float, Signals]] = {}
        self._reported: set[tuple[int, str]] = set()  # (source, field) pairs already warned about
        # Live sources touch hardware and may hang: each is read on its own thread, bounded by read_timeout_s.
        self._threads = {id(source): _SourceThread(source.name) for source in self.sources if source.live}
        self._stop_threads = weakref.finalize(self, _stop_all, list(self._threads.values()))

    def read(self, token_index: int | None = None) -> Signals:
        """Merged reading of all working sources, in order (earlier sources win, temperatures take the max)."""
        now = self._clock()
        # Every due source is asked at once, so that a token waits read_timeout_s at most however many sources hang.
        asked = {
            id(source): self._ask(source, source.read, token_index) for source in self.sources if self._due(source, now)
        }
        deadline = time.monotonic() + self.read_timeout_s
        merged = Signals()
        for source in list(self.sources):
            if id(source) in asked:
                fresh = self._reading_from(source, asked[id(source)], deadline)
                if fresh is None:
                    continue
                self._cache[id(source)] = (now, self._possible_part(source, fresh))
            merged = merged.merge(self._cache[id(source)][1])
        return merged

    def _due(self, source: SignalSource, now: float) -> bool:
        cached = self._cache.get(id(source))
        return cached is None or not source.live or now - cached[0] >= self.min_interval_s

    def _ask(self, source: SignalSource, function: Callable, *args: object) -> Future:
        """Start function(*args) on a live source's own thread; for any other source, make the call right here."""
        thread = self._threads.get(id(source))
        return thread.submit(function, *args) if thread is not None else _settle(Future(), function, args)

    def _reading_from(self, source: SignalSource, asked: Future, deadline: float) -> Signals | None:
        """The source's reading, or None when it raised, hung past the deadline or gave no Signals (it is then
        dropped)."""
        try:
            reading = _answer(asked, deadline)
        except _NoAnswer:
            self._drop(source, f"did not answer within {self.read_timeout_s:g} s")
            return None
        except Exception as error:  # noqa: BLE001 - any failure of a sensor must not stop generation
            self._drop(source, "failed", error)
            return None
        if not isinstance(reading, Signals):
            self._drop(source, f"gave a {type(reading).__name__} instead of Signals")
            return None
        return reading

    def _possible_part(self, source: SignalSource, reading: Signals) -> Signals:
        """The reading without the fields no working sensor can give."""
        # field -> value of that field's type (_possible keeps on_battery a bool and makes every other field a float)
        headline: dict[str, Any] = {
            f.name: self._possible(source, f.name, getattr(reading, f.name))
            for f in fields(Signals)
            if f.name != "extra"
        }
        extra = reading.extra if isinstance(reading.extra, Mapping) else {"extra": reading.extra}
        kept = {str(key): self._possible(source, str(key), value) for key, value in extra.items()}
        return Signals(**headline, extra={key: value for key, value in kept.items() if value is not None})

    def _possible(self, source: SignalSource, key: str, value: object) -> float | bool | None:
        """value as a float (on_battery: the bool), or None when absent or impossible (reported once per source and
        key)."""
        if value is None:
            return None
        why = why_impossible(key, value)
        if why is None:
            # why_impossible let through only a bool for on_battery and only a finite real number for any other key
            return cast(bool, value) if key == "on_battery" else float(cast(numbers.Real, value))
        if (id(source), key) not in self._reported:
            self._reported.add((id(source), key))
            self._warn(
                f"signal source {source.name} gave {key}={reprlib.repr(value)}, "
                f"{why}; that field of it is ignored from now on (check the sensor)"
            )
        return None

    def _drop(self, source: SignalSource, what: str, error: Exception | None = None) -> None:
        self.sources.remove(source)
        self._cache.pop(id(source), None)
        detail = f": {type(error).__name__}: {error}" if error is not None else ""
        self._warn(f"signal source {source.name} {what} and is skipped from now on{detail}")
        thread = self._threads.pop(id(source), None)
        if thread is None:
            _close(source)
        else:  # nobody waits: behind a hung read, the close runs only if the read ever returns
            thread.submit(_close, source)
            thread.stop()

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self._on_warning(message)

    def close(self) -> None:
        """Close every source that holds a connection (jtop, NVML) within read_timeout_s; the hub reads nothing
        after."""
        closing = [(source, self._ask(source, source.close)) for source in self.sources if hasattr(source, "close")]
        deadline = time.monotonic() + self.read_timeout_s
        for source, asked in closing:
            try:
                _answer(asked, deadline)
            except _NoAnswer:
                self._warn(
                    f"signal source {source.name} did not close within "
                    f"{self.read_timeout_s:g} s; it is left to finish in the background"
                )
            except Exception as error:  # noqa: BLE001 - a source that fails to close must not hide the answer
                self._warn(
                    f"signal source {source.name} failed while closing and is dropped: {type(error).__name__}: {error}"
                )
        self.sources.clear()
        self._stop_threads()

    def __enter__(self) -> SignalHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoAnswer(Exception):
    """A live source's call did not return within the hub's read_timeout_s."""


class _SourceThread:
    """One daemon thread that makes a live source's calls in order, so that the caller can give up on a call that
    hangs."""

    def __init__(self, name: str):
        # Not a ThreadPoolExecutor: Python joins its threads at exit, so a read hung forever would keep the program from
        # exiting.
        self._calls: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=f"signal source {name}", daemon=True).start()

    def submit(self, function: Callable, *args: object) -> Future:
        """Queue function(*args); the future is done once it has returned or raised."""
        future: Future = Future()
        self._calls.put((future, function, args))
        return future

    def stop(self) -> None:
        """End the thread once the calls queued so far have been made."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            _settle(*call)


def _settle(future: Future, function: Callable, args: tuple) -> Future:
    """Make the call and settle the future with what it returned or raised."""
    try:
        future.set_result(function(*args))
    except Exception as error:  # noqa: BLE001 - handed to whoever waits on the future, who decides
        future.set_exception(error)
    return future


def _answer(future: Future, deadline: float) -> object:
    """What the call returned (or raise what it raised); _NoAnswer when it has not returned by deadline (monotonic
    s)."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:  # the builtin TimeoutError only from Python 3.11
        if not future.done():
            raise _NoAnswer from None
        return future.result()  # it answered at the deadline, or itself raised TimeoutError


def _stop_all(threads: list[_SourceThread]) -> None:
    for thread in threads:
        thread.stop()


def _close(source: object) -> None:
    """Close a source that is no longer used, quietly: a dropped source has been reported once, an unused one needs no
    report."""
    close = getattr(source, "close", None)
    if close is None:
        return
    with contextlib.suppress(Exception):
        close()


def default_sources(root: str | Path = "/", timeout_s: float = PROBE_TIMEOUT_S) -> list[SignalSource]:
    """The sources that give a reading on this machine within timeout_s (s): sysfs, psutil, then jtop and NVML when
    installed."""
    candidates: list[SignalSource] = [SysfsSource(root), PsutilSource()]
    if JtopSource.available():
        candidates.append(JtopSource())
    if NvmlSource.available():
        candidates.append(NvmlSource())
    threads = [_SourceThread(source.name) for source in candidates]
    probes = [thread.submit(_reads_something, source) for thread, source in zip(threads, candidates)]  # all at once
    deadline = time.monotonic() + timeout_s
    working: list[SignalSource] = []
    for source, thread, probe in zip(candidates, threads, probes):
        try:
            works = _answer(probe, deadline) is True
        except Exception:  # noqa: BLE001 - a source that cannot read here, or hangs, is simply not used
            works = False
        if works:
            working.append(source)
        else:
            thread.submit(_close, source)  # after the probe, if a hung one ever returns
        thread.stop()
    return working


def _reads_something(source: SignalSource) -> bool:
    return not source.read().is_empty()
