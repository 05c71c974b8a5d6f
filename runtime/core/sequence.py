"""One conversation's tokens and KV cache, computed at any exit, exactly.

Exit k is a chain of pieces (segments up to depth k, balcony k, head). Before a piece runs, every position its
cache slots lack (because earlier tokens ran at shallower exits) is computed in the same call, from the hidden
states at the piece's input depth, which the shallower chain already produced and this sequence kept. So
deepening from exit a to b runs only the pieces between a and b over the backlog, and each token's logits equal
those of exit k run alone on the same prefix. The head runs on the last position only. A step that adds only
the newest position to every piece of the chain runs on the exit's step plan (its buffers bound once): the exit's
step graph where the engine has one (packed weights, CPU) and other processes leave the CPU quiet, else its chain.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import onnxruntime as ort

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_whole_number
from balcony_edge.runtime.core.contention import CpuContention
from balcony_edge.runtime.core.kv_cache import KVCache
from balcony_edge.runtime.core.manifest import Manifest, Piece
from balcony_edge.runtime.core.piece_runner import PieceRunner, steps_on_plans
from balcony_edge.runtime.core.step_plan import StepGraphPlan, StepPlan
from balcony_edge.runtime.core.text import PromptError

# Room made with a prompt for this many tokens of its answer: growing the cache copies all of it, several decode steps'
# time after a few hundred tokens (docs/benchmarks.md, "Room for the answer"), which the answer's first steps should
# not wait for; longer answers grow by doubling.
ANSWER_ROOM = 256  # tokens


class ContextFullError(BalconyError):
    """The sequence reached the model's context length."""


class Boundary:
    """Hidden states at one depth for the positions [start, end) that a deeper piece may still need, in a buffer
    that grows by doubling: a step writes its row in place, however many rows a lagging piece keeps held."""

    def __init__(self) -> None:
        self.start = self.end = 0
        self._base = 0  # the buffer row of position `start`
        self._buffer = np.empty((1, 0, 0), dtype=np.float32)

    def take(self, start: int, end: int) -> np.ndarray:
        return self._buffer[:, self._base + start - self.start : self._base + end - self.start]

    def put(self, start: int, rows: np.ndarray) -> None:
        """Store rows for positions start.. (replacing those from start on), keeping earlier rows still held."""
        if start <= self.start or start > self.end:
            self.start = self.end = start
            self._base = 0
        self.end = start  # rows from `start` on are replaced
        held = self.end - self.start
        needed = held + rows.shape[1]
        if (
            self._base + needed > self._buffer.shape[1]
            or self._buffer.shape[2] != rows.shape[2]
            or self._buffer.dtype != rows.dtype
        ):
            buffer = np.empty((1, max(2 * needed, 64), rows.shape[2]), dtype=rows.dtype)
            if held:
                buffer[:, :held] = self._buffer[:, self._base : self._base + held]
            self._buffer, self._base = buffer, 0
        self._buffer[:, self._base + held : self._base + needed] = rows
        self.end = start + rows.shape[1]

    def drop_before(self, position: int) -> None:
        """Forget rows before `position` (every consumer has them)."""
        if position > self.start:
            cut = min(position, self.end) - self.start
            self.start, self._base = self.start + cut, self._base + cut


class Sequence:
    """The tokens of one conversation and their KV cache; `logits(exit)` gives the next-token logits at any exit."""

    def __init__(
        self,
        manifest: Manifest,
        runners: dict[str, PieceRunner],
        device: str = "cpu",
        token_ids: Iterable[int] = (),
        sliding_window: bool = False,
        step_graphs: dict[int, ort.InferenceSession] | None = None,
        contention: CpuContention | None = None,
    ):
        """step_graphs: exit -> a session of its step graph (packed_weights.py), for one-token steps on the CPU while
        `contention` (shared by the engine's sequences) finds the CPU quiet."""
        self.manifest, self.runners, self.device = manifest, runners, device
        self.chains = {entry.exit: [runners[name] for name in entry.chain] for entry in manifest.exits}
        self._plannable = steps_on_plans(runners.values(), device)
        self.step_graphs = step_graphs or {}
        self.contention = contention
        # The pieces that read the hidden states at each depth: what a boundary must keep rows for.
        self._consumers: dict[int, list[PieceRunner]] = {}
        for runner in runners.values():
            if runner.first_input != "input_ids" and runner.piece.kind != "head":
                self._consumers.setdefault(runner.piece.first_layer, []).append(runner)
        self.tokens: list[int] = []
        self.sliding_window = sliding_window
        self._in_use = threading.Lock()  # held while a call runs: a second thread is refused, not let in
        self.last_catch_up = 0  # positions recomputed by the last logits() because the exit's slots lacked them
        self._reset_state()
        self.extend(token_ids)

    def _reset_state(self) -> None:
        self.cache = KVCache(self.manifest, self.device)
        self._bindings: dict[str, tuple[tuple[int, int, int], ort.IOBinding]] = {}  # name: (cache version, binding)
        # (exit, on its step graph): (cache version, plan)
        self._plans: dict[tuple[int, bool], tuple[tuple[int, int, int], StepPlan | StepGraphPlan]] = {}
        self._boundaries: dict[int, Boundary] = {}
        self._last_logits: dict[int, tuple[int, np.ndarray]] = {}
        self._computed = 0  # positions computed by any exit so far

    @property
    def context_length(self) -> int:
        return self.manifest.generation.context_length

    def append(self, token_id: int) -> None:
        """Feed one token (computed lazily, at the exit of the next `logits` call)."""
        self.extend([token_id])

    def extend(self, token_ids: Iterable[int]) -> None:
        """Feed tokens, all or none (see _extend)."""
        with self._exclusive():
            self._extend(token_ids)

    def _extend(self, token_ids: Iterable[int]) -> None:
        """Feed tokens, all or none: ids outside the vocabulary, or more than the context holds, change nothing.

        With the sliding window, tokens that do not fit make room instead: the newest half of the context is kept,
        then the new tokens (positions restart at 0, so the cache is rebuilt on the next call)."""
        if isinstance(token_ids, (str, bytes)):
            raise PromptError(
                "token ids must be a list of ints, not text; turn text into ids with engine.prompt_ids(text)"
            )
        token_ids = list(token_ids)
        vocab, limit = self.manifest.vocab_size, self.context_length
        for token_id in token_ids:
            if not is_whole_number(token_id):
                raise PromptError(
                    f"token id {token_id!r} is not an int; feed whole-number ids of this model's tokenizer"
                )
            if not 0 <= token_id < vocab:
                raise PromptError(
                    f"token id {token_id} is outside the vocabulary (0 to "
                    f"{vocab - 1}); feed ids of this model's tokenizer"
                )
        if len(self.tokens) + len(token_ids) <= limit:
            self.tokens.extend(int(t) for t in token_ids)
            return
        if not self.sliding_window:
            if len(self.tokens) == limit:
                raise ContextFullError(
                    f"the conversation reached the context length of {limit} "
                    "tokens; start a new one (/reset) or enable the sliding window"
                )
            raise ContextFullError(
                f"{len(token_ids)} new tokens do not fit in the context "
                f"of {limit} tokens ({len(self.tokens)} already used); "
                "shorten the prompt or start a new conversation (/reset)"
            )
        kept = self.tokens[-(limit // 2) :] + [int(t) for t in token_ids]
        self.tokens = kept if len(kept) <= limit else kept[-(limit // 2) :]
        self._reset_state()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The sequence for one call of one thread; a call from another thread meanwhile is a one-line error."""
        if not self._in_use.acquire(blocking=False):
            raise BalconyError(
                "this Sequence is in use by another thread: a Sequence is not thread-safe; give each thread its own "
                "(engine.sequence())"
            )
        try:
            yield
        finally:
            self._in_use.release()

    def make_room(self, new_tokens: int) -> None:
        """Grow the cache now for the tokens fed so far and the next min(new_tokens, ANSWER_ROOM) (within the context
        length), so that decoding them never stops to grow it."""
        if not (is_whole_number(new_tokens) and new_tokens >= 0):
            raise BalconyError(f"new_tokens {new_tokens!r} must be a whole number of tokens, at least 0")
        with self._exclusive():
            self.cache.reserve(min(len(self.tokens) + min(new_tokens, ANSWER_ROOM), self.context_length))

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens and what the cache holds of them (a prefix another request shares); the
        positions after them are computed again when asked for, so logits stay exact."""
        with self._exclusive():
            self.tokens = self.tokens[:length]
            for slot, filled in self.cache.filled.items():
                self.cache.filled[slot] = min(filled, length)
            for boundary in self._boundaries.values():
                boundary.end = min(boundary.end, length)
                if boundary.start > boundary.end:
                    boundary.start = boundary.end = boundary._base = 0
            self._computed = min(self._computed, length)
            self._last_logits.clear()
            self.last_catch_up = 0

    def logits(self, exit: int, every_position: bool = False) -> np.ndarray:
        """Next-token logits [vocab] after all tokens fed so far, as exit `exit` alone would give them (see _logits)."""
        with self._exclusive():
            return self._logits(exit, every_position)

    def _logits(self, exit: int, every_position: bool = False) -> np.ndarray:
        """Next-token logits [vocab] after all tokens fed so far, as exit `exit` alone would give them.

        every_position: the logits [positions, vocab] of every position this call computed (all of a fresh
        sequence's tokens: what evaluation and verification compare), instead of the last one only."""
        count = len(self.tokens)
        if count == 0:
            raise BalconyError("the sequence is empty; feed at least one token (a prompt) before asking for logits")
        if not is_whole_number(exit):
            raise BalconyError(
                f"exit {exit!r} is a {type(exit).__name__}; give the exit as an int such as {min(self.chains)}"
            )
        if exit not in self.chains:
            raise BalconyError(f"exit {exit} is not in this export; exits: {', '.join(map(str, sorted(self.chains)))}")
        last = self._last_logits.get(exit)
        if last is not None and last[0] == count and not every_position:
            self.last_catch_up = 0
            return last[1]
        self.cache.reserve(count)
        if not every_position and self._plannable and self.ready_for_batch(exit):
            return self._step(exit, count)
        *body, head = self.chains[exit]
        earliest = count - 1
        for runner in body:  # every chain has at least one piece before its head (the manifest checks it)
            start, hidden = self._run_piece(runner, count)
            earliest = min(earliest, start)
        rows = hidden if every_position else hidden[:, -1:]
        logits = self._run(head, rows, rows.shape[1])[0]
        self.after_logits(exit, earliest, logits[-1])
        return logits if every_position else logits[-1]

    def after_logits(self, exit: int, earliest: int, last: np.ndarray) -> None:
        """Record a computed step: its last logits at `exit`, and how many known positions it ran again."""
        count = len(self.tokens)
        # Positions some exit had computed before are a catch-up; never-computed ones (a prompt) are a prefill.
        self.last_catch_up = max(0, min(self._computed, count - 1) - earliest)
        self._computed = max(self._computed, count)
        self._last_logits[exit] = (count, last)

    def ready_for_batch(self, exit: int) -> bool:
        """Whether the last token is all that `exit` lacks: new to every piece of its chain (no catch-up and no
        prompt to run), and its logits not known yet; such steps of several sequences run as one batch."""
        count, last = len(self.tokens), self._last_logits.get(exit)
        if count == 0 or exit not in self.chains or (last is not None and last[0] == count):
            return False
        return all(self.cache.filled_of(r.piece.cache_slots) == count - 1 for r in self.chains[exit][:-1])

    def _step(self, exit: int, count: int) -> np.ndarray:
        """The newest token through the exit's step plan (every piece of its chain lacks that position alone)."""
        whole = exit in self.step_graphs and not (self.contention is not None and self.contention.contended())
        version, plan = self._plans.get((exit, whole), (None, None))
        if plan is None or version != self.cache.version:
            if whole:
                plan = StepGraphPlan(self.step_graphs[exit], self.chains[exit], self.cache.values)
            else:
                plan = StepPlan(self.chains[exit], self.cache.values)
            self._plans[exit, whole] = (self.cache.version, plan)
        plan.step(self.tokens[-1], count)
        for runner, output in zip(plan.runners[:-1], plan.piece_outputs):
            self.after_piece(runner.piece, count - 1, output)
        logits = plan.logits[0, -1].copy()  # the plan's buffer is the next step's
        self.after_logits(exit, count - 1, logits)
        return logits

    def _run_piece(self, runner: PieceRunner, count: int) -> tuple[int, np.ndarray]:
        """Bring one piece up to `count` positions (at least the last one computed); (first position run, its
        output)."""
        piece = runner.piece
        start = min(self.cache.filled_of(piece.cache_slots), count - 1)
        if piece.first_layer == 0 and piece.kind == "segment":
            first = np.asarray([self.tokens[start:count]], dtype=np.int64)
        else:
            first = self._boundaries[piece.first_layer].take(start, count)
        output = self._run(runner, first, count)
        self.after_piece(piece, start, output)
        return start, output

    def after_piece(self, piece: Piece, start: int, output: np.ndarray | None) -> None:
        """Record that a piece ran positions start.. (up to the last token): its slots filled, and its output kept
        at its depth while a lagging piece still needs it (a segment's; None only where nothing reads it)."""
        count = len(self.tokens)
        self.cache.mark(piece.cache_slots, count)
        if piece.kind == "segment" and piece.end_layer in self._consumers and output is not None:
            boundary = self._boundaries.setdefault(piece.end_layer, Boundary())
            boundary.put(start, output)
            needed = min(self.cache.filled_of(c.piece.cache_slots) for c in self._consumers[piece.end_layer])
            boundary.drop_before(min(needed, count - 1))

    def _run(self, runner: PieceRunner, first: np.ndarray, count: int) -> np.ndarray:
        name = runner.piece.name
        version, binding = self._bindings.get(name, (None, None))
        if version != self.cache.version:
            binding = runner.binding(self.cache.values)
            self._bindings[name] = (self.cache.version, binding)
        return runner.run(binding, first, np.array([count]))
