"""One answer being generated, a token at a time: the exit chosen before each token, the token chosen from that exit's
logits (penalties, sampling, a JSON constraint, stop strings), and what each token reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from balcony_edge.runtime.core.constraints import JsonConstraint
from balcony_edge.runtime.core.sampling import Sampler
from balcony_edge.runtime.core.sequence import Sequence
from balcony_edge.runtime.core.text import TextStream
from balcony_edge.runtime.device.controller import Chooser, Decision
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.sources import Signals


@dataclass
class GeneratedToken:
    """One generated token: its text piece, the exit that computed it and what it cost."""

    id: int
    text: str
    exit: int
    latency_ms: float  # from choosing the exit to having the token, catch-up included (ms)
    catch_up_tokens: int  # positions recomputed first because earlier tokens ran at shallower exits
    reason: str  # why the controller chose this exit
    signals: dict = field(default_factory=dict)
    why: str = ""  # the reason in a few words ("plugged in and cool", "battery 15%")
    below_floor: bool = False  # a hard limit (battery critical, thermal trip) took it below the quality floor
    logprob: float | None = None  # with generate(logprobs=...): log p of this token at its exit (nats, before sampling)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the most likely ids and their log p
    # on the last token: "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    finish: str | None = None


class Generation:
    """One answer: `plan()` asks the controller for the next token's exit, the caller computes that exit's logits
    (`sequence.logits(exit)` alone, or in a batch with other answers), `emit(logits)` chooses the token and returns
    it, fed to the sequence unless it ends the answer; `done` once it has."""

    def __init__(
        self,
        sequence: Sequence,
        max_new_tokens: int,
        controller: Chooser,
        hub: SignalHub,
        sampler: Sampler,
        text: TextStream,
        eos: set[int],
        logprobs: int | None = None,
        constraint: JsonConstraint | None = None,
    ):
        self.sequence, self.max_new_tokens, self.controller, self.hub = sequence, max_new_tokens, controller, hub
        self.sampler, self.text, self.eos, self.logprobs, self.constraint = sampler, text, eos, logprobs, constraint
        self.index = 0
        self.answer_start = len(sequence.tokens)  # the prompt's tokens before it: penalties count the answer's
        self.done = False
        self._last_latency: float | None = None
        self._planned: tuple[Signals, Decision, float] | None = None  # (reading, decision, start time) of the token

    def plan(self) -> int:
        """Read the signals and ask the controller; the exit whose logits the next token needs."""
        reading = self.hub.read(token_index=self.index)
        decision = self.controller.choose(reading, self._last_latency, self.index)
        self._planned = (reading, decision, time.perf_counter())
        return decision.exit

    def emit(self, logits: np.ndarray) -> GeneratedToken:
        """Choose the token from the planned exit's logits and account for it."""
        if self._planned is None:
            raise RuntimeError("Generation.emit() before plan(): plan each token first")
        reading, decision, started = self._planned
        sequence, constraint, text = self.sequence, self.constraint, self.text
        scores = logits if constraint is None else constraint.mask(logits)
        token = self.sampler(scores, sequence.tokens, answer_start=self.answer_start)
        if constraint is not None:
            constraint.advance(token)
        latency = (time.perf_counter() - started) * 1000
        chosen, top = log_probabilities(logits, token, self.logprobs) if self.logprobs is not None else (None, [])
        self._last_latency = latency if self.index else None  # the first token carries the prompt's prefill
        ended = token in self.eos or (constraint is not None and constraint.done)  # complete JSON ends, ignore_eos too
        if token not in self.eos:
            text.push(token)
        stopped = ended or text.stop_at is not None or self.index == self.max_new_tokens - 1
        if stopped:
            text.finish()
        finish = ("stop" if ended or text.stop_at is not None else "length") if stopped else None
        generated = GeneratedToken(
            id=token,
            text=text.take(final=stopped),
            exit=decision.exit,
            latency_ms=latency,
            catch_up_tokens=sequence.last_catch_up,
            reason=decision.reason,
            signals=reading.to_dict(),
            why=decision.short,
            below_floor=decision.below_floor,
            logprob=chosen,
            top_logprobs=top,
            finish=finish,
        )
        self.index += 1
        self.done = stopped
        if not stopped:
            sequence.append(token)
        return generated


MAX_TOP_LOGPROBS = 20  # as OpenAI allows


def log_probabilities(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p of `token` and the `top` most likely (id, log p) under softmax(logits) (nats)."""
    shifted = logits.astype(np.float64) - logits.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-log_probs, top)[:top] if top else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-log_probs[best])]
    return float(log_probs[token]), [(int(i), float(log_probs[i])) for i in best]
