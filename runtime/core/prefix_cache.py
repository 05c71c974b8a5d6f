"""Prompt reuse: the sequences of recent requests kept with their KV caches, so that a request whose prompt starts as
one of them did (a growing conversation, a resend, a shared system message) computes only what is new.

A request takes the kept sequence with the longest common token prefix, cut back to that prefix; the positions after
it are computed as for a fresh prompt, at whatever exits (a deeper exit catches up what shallower ones left, as
always), so the logits are those of a fresh sequence. Least recently used sequences go first when there are more
than `slots` or their caches hold more than `max_bytes`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from balcony_edge.runtime.core.sequence import Sequence

MIN_REUSED_TOKENS = 16  # a shorter shared prefix (a chat template's first tokens) is not worth a kept cache


@dataclass
class PrefixStats:
    """What reuse did so far: requests that started from a kept prefix, and the tokens they did not compute."""

    hits: int = 0
    reused_tokens: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class PrefixCache:
    """Up to `slots` finished sequences (their caches at most `max_bytes` in all), newest last."""

    def __init__(self, new_sequence: Callable[[], Sequence], slots: int = 4, max_bytes: int = 1 << 30):
        self.new_sequence, self.slots, self.max_bytes = new_sequence, slots, max_bytes
        self.stats = PrefixStats()
        self._kept: list[Sequence] = []
        self._lock = threading.Lock()

    def take(self, tokens: list[int]) -> tuple[Sequence, int]:
        """A sequence for a prompt of `tokens` (not fed yet) and how many of them it already holds: the kept one with
        the longest common prefix (at least MIN_REUSED_TOKENS, at most all but the last token), cut back to it, or a
        new one."""
        with self._lock:
            best, length = None, 0
            for sequence in self._kept:
                shared = common_prefix(sequence.tokens, tokens)
                if shared > length:
                    best, length = sequence, shared
            length = min(length, len(tokens) - 1)  # the last prompt token is fed again: its logits start the answer
            if best is None or length < min(MIN_REUSED_TOKENS, len(tokens) - 1) or length < 1:
                return self.new_sequence(), 0
            self._kept.remove(best)
            self.stats.hits += 1
            self.stats.reused_tokens += length
        best.truncate(length)
        return best, length

    def put(self, sequence: Sequence) -> None:
        """Keep a finished request's sequence for the next ones (the least recently used go first)."""
        if self.slots < 1 or not sequence.tokens:
            return
        with self._lock:
            self._kept.append(sequence)
            while len(self._kept) > self.slots or (len(self._kept) > 1 and self.nbytes > self.max_bytes):
                self._kept.pop(0)
            if self.nbytes > self.max_bytes:  # one sequence alone larger than the budget: none kept
                self._kept.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the kept sequences' caches."""
        return sum(sequence.cache.nbytes for sequence in self._kept)

    def __len__(self) -> int:
        return len(self._kept)
