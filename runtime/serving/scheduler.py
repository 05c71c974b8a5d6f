"""Several generations over one engine: one worker thread advances the running ones a token each in turn (so each
step asks the device controller afresh), up to `parallel` at a time, with a bounded queue behind them."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Generator

from balcony_edge.runtime.core.engine import GeneratedToken
from balcony_edge.runtime.core.sequence import Sequence

DONE = object()  # put on a job's queue after its last token


class Busy(Exception):
    """The running jobs and the queue are full; retry later."""


class Job:
    """One generation: an iterator of tokens run by the scheduler, read by an asyncio task through `queue`."""

    def __init__(
        self,
        tokens: Generator[GeneratedToken, None, None],
        loop: asyncio.AbstractEventLoop,
        sequence: Sequence | None = None,
    ):
        """sequence: the one `tokens` extends, kept for prompt reuse once the job is over."""
        self.tokens, self.loop, self.sequence = tokens, loop, sequence
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop before the next token (a client that went away)."""
        self.cancelled.set()

    def deliver(self, item: object) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """Round-robin over the running jobs, one token each; `parallel` running, `queue_limit` waiting, then Busy."""

    def __init__(self, parallel: int = 1, queue_limit: int = 16, on_token=None):
        self.parallel, self.queue_limit = parallel, queue_limit
        self.on_token = on_token or (lambda token: None)
        self._running: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="balcony-scheduler", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> tuple[int, int]:
        """(running, waiting) jobs now."""
        with self._wake:
            return len(self._running), len(self._waiting)

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue jobs together (a request's n choices): all of them, or none and Busy."""
        with self._wake:
            if len(self._running) + len(self._waiting) + len(jobs) > self.parallel + self.queue_limit:
                raise Busy
            self._waiting.extend(jobs)
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._running and not self._waiting:
                    self._wake.wait()
                if self._stopped:
                    return
                while self._waiting and len(self._running) < self.parallel:
                    self._running.append(self._waiting.popleft())
                running = list(self._running)
            for job in running:
                if not self._advance(job):
                    with self._wake:
                        self._running.remove(job)

    def _advance(self, job: Job) -> bool:
        """One token of one job; False when the job is over (finished, failed or cancelled)."""
        if job.cancelled.is_set():
            job.tokens.close()
            job.deliver(DONE)  # whoever still reads the job (a request handler) ends too
            return False
        try:
            token = next(job.tokens)
        except StopIteration:
            job.deliver(DONE)
            return False
        except Exception as err:  # noqa: BLE001 - handed to the request, which answers with an error; the server goes on
            job.deliver(err)
            return False
        self.on_token(token)
        job.deliver(token)
        return True
