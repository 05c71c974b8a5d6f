"""Several generations over one engine: one worker thread advances every running one by a token per step (so each
token asks the device controller afresh), up to `parallel` at a time, with a bounded queue behind them.

On the CPU provider the running generations live in the rows of one BatchDecoder: the tokens of a step that need one
position each are computed as one batch, each at its own exit; prompts and catch-ups run alone on their rows."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from balcony_edge.runtime.core.batch import BatchDecoder
from balcony_edge.runtime.core.generation import GeneratedToken, Generation
from balcony_edge.runtime.core.sequence import Sequence

DONE = object()  # put on a job's queue after its last token


class Busy(Exception):
    """The running jobs and the queue are full; retry later."""


class Job:
    """One generation run by the scheduler, read by an asyncio task through `queue`."""

    def __init__(self, generation: Generation, loop: asyncio.AbstractEventLoop, keep: bool = True):
        """keep: hand its sequence on for prompt reuse when it is over (`sequence` stays set)."""
        self.generation, self.loop, self.keep = generation, loop, keep
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    @property
    def sequence(self) -> Sequence:
        return self.generation.sequence

    def cancel(self) -> None:
        """Stop before the next token (a client that went away)."""
        self.cancelled.set()

    def deliver(self, item: object) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """Steps over the running jobs, a token each; `parallel` running, `queue_limit` waiting, then Busy."""

    def __init__(
        self,
        parallel: int = 1,
        queue_limit: int = 16,
        on_token: Callable[[GeneratedToken], None] | None = None,
        batch: BatchDecoder | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        """on_token: told of every token; on_batch: of every batched step, with its number of sequences."""
        self.parallel, self.queue_limit, self.batch = parallel, queue_limit, batch
        self.on_token = on_token or (lambda token: None)
        self.on_batch = on_batch or (lambda rows: None)
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
                    job = self._waiting.popleft()
                    if self.batch is not None:
                        self.batch.admit(job.sequence)
                    self._running.append(job)
                running = list(self._running)
            for job in self._step(running):
                with self._wake:
                    self._running.remove(job)

    def _step(self, running: list[Job]) -> list[Job]:
        """One token of every running job, batched where it can be; returns the jobs that are over."""
        over, planned = [], []
        for job in running:
            if job.cancelled.is_set():
                over.append(self._finish(job))
                continue
            try:
                planned.append((job, job.generation.plan()))
            except Exception as err:  # noqa: BLE001 - handed to the request; the server goes on
                over.append(self._finish(job, err))
        batch = self.batch
        chosen = batch.batchable([(job.sequence, exit) for job, exit in planned]) if batch is not None else []
        batched = [planned[i] for i in chosen]
        logits: dict[Job, np.ndarray | Exception] = {}
        for job, exit in planned:
            if (job, exit) not in batched:
                logits[job] = self._alone(job, exit)
        if batched and batch is not None:  # batched holds jobs only with a batch decoder
            try:
                rows = batch.step([(job.sequence, exit) for job, exit in batched])
                logits.update({job: row for (job, _), row in zip(batched, rows)})
                self.on_batch(len(batched))
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error
                logits.update({job: err for job, _ in batched})
        for job, _ in planned:
            result = logits[job]
            if isinstance(result, Exception):
                over.append(self._finish(job, result))
                continue
            try:
                token = job.generation.emit(result)
            except Exception as err:  # noqa: BLE001 - a grammar at a dead end, say: handed to the request
                over.append(self._finish(job, err))
                continue
            self.on_token(token)
            job.deliver(token)
            if job.generation.done:
                over.append(self._finish(job))
        return over

    @staticmethod
    def _alone(job: Job, exit: int) -> np.ndarray | Exception:
        try:
            return job.sequence.logits(exit)
        except Exception as err:  # noqa: BLE001 - handed to the request
            return err

    def _finish(self, job: Job, error: Exception | None = None) -> Job:
        """Take a job out of the batch's rows and tell its reader it is over (DONE, after the error if one)."""
        if self.batch is not None and job.sequence in self.batch.occupants.values():
            self.batch.release(job.sequence)
        if error is not None:
            job.deliver(error)
        job.deliver(DONE)
        return job
