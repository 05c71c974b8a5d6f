"""Batched decoding, each sequence at its own exit: one run of a piece for every sequence whose exit needs it.

The sequences of running requests live in the rows of one KVStore. A step takes the sequences whose next token needs
one position only (`Sequence.ready_for_batch`), each with the exit its controller chose, and runs every segment that
some of them need over all rows at once, then each balcony that some exit at, then the head: decode at batch 1 is
bound by reading the weights, so four rows cost little more than one. Rows a piece does not serve now (a shallower
exit, a request waiting, an empty row) go through it too, with sequence lengths that make them write only at their
first position not computed yet: a position that is computed again when it is needed, so every sequence keeps
exactly the logits it would have alone. Catch-ups and prompts run alone, on their own rows.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime.core.kv_cache import KVStore
from balcony_edge.runtime.core.manifest import Manifest, Piece
from balcony_edge.runtime.core.piece_runner import PieceRunner
from balcony_edge.runtime.core.sequence import Sequence


class BatchDecoder:
    """The rows of one KVStore, the sequences in them, and batched steps over them (CPU provider)."""

    def __init__(self, manifest: Manifest, runners: dict[str, PieceRunner], rows: int):
        self.manifest, self.runners = manifest, runners
        self.store = KVStore(manifest, "cpu", rows)
        self.occupants: dict[int, Sequence] = {}
        self._bindings: dict[tuple[str, int], tuple[int, ort.IOBinding]] = {}
        self._hidden = manifest.kv.hidden_size

    def admit(self, sequence: Sequence) -> None:
        """Give a sequence a free row (its cache copied there); it computes in that row until `release`."""
        free = [row for row in range(self.store.rows) if row not in self.occupants]
        if not free:
            raise BalconyError(f"all {self.store.rows} rows of the batch are taken; release one first")
        self.store.reserve(sequence.cache.capacity)  # keep the room made for its answer (Sequence.make_room)
        sequence.cache.move_to(self.store, free[0])
        self.occupants[free[0]] = sequence

    def release(self, sequence: Sequence) -> None:
        """Take a sequence out of its row (its cache copied to a store of its own, so that it can be kept)."""
        row = sequence.cache.row
        sequence.cache.move_to(KVStore(self.manifest, "cpu"), 0)
        del self.occupants[row]

    @staticmethod
    def batchable(items: list[tuple[Sequence, int]]) -> list[int]:
        """The indices of the (sequence, exit) pairs that a batched step takes now: those ready for one, when at least
        two are (one alone is cheaper than a step over every row)."""
        ready = [i for i, (sequence, exit) in enumerate(items) if sequence.ready_for_batch(exit)]
        return ready if len(ready) > 1 else []

    def step(self, items: list[tuple[Sequence, int]]) -> list[np.ndarray]:
        """The next-token logits of each (sequence, exit), every sequence in a row and ready for a batched step."""
        if not all(seq.cache.store is self.store and seq.ready_for_batch(exit) for seq, exit in items):
            raise BalconyError("a batched step takes sequences in the batch's rows, each with one new position")
        chains = {seq.cache.row: seq.chains[exit] for seq, exit in items}
        counts = {seq.cache.row: len(seq.tokens) for seq, _ in items}
        occupied = [len(seq.tokens) for seq in self.occupants.values()]
        self.store.reserve(max(occupied, default=1) + 1)  # a row may write one past what it holds
        rows = max(self.occupants) + 1  # the rows up to the last one taken: `admit` fills the lowest first
        ids = np.zeros((rows, 1), dtype=np.int64)
        for seq, _ in items:
            ids[seq.cache.row, 0] = seq.tokens[-1]
        by_depth: dict[int, np.ndarray] = {}  # residual after `depth` layers, every row
        exit_hidden = np.zeros((rows, 1, self._hidden), dtype=self._activation_dtype())
        for piece in self.manifest.pieces:
            if piece.kind == "head":
                continue
            serving = [row for row, chain in chains.items() if any(r.piece is piece for r in chain)]
            if not serving:
                continue
            runner = self.runners[piece.name]
            if piece.kind == "segment" and piece.first_layer == 0:
                first = ids
            else:
                first = by_depth[piece.first_layer]
            output = runner.run(self._binding(runner, rows), first, self._lengths(piece, counts, serving, rows))
            if piece.kind == "segment" and piece.end_layer < self.manifest.num_layers:
                by_depth[piece.end_layer] = output
            for row in serving:
                self.occupants[row].after_piece(piece, counts[row] - 1, output[row : row + 1])
                if piece.kind == "balcony" or piece.end_layer == self.manifest.num_layers:
                    exit_hidden[row] = output[row]
        head = self.runners[next(p.name for p in self.manifest.pieces if p.kind == "head")]
        logits = head.run(self._binding(head, rows), exit_hidden)
        results = []
        for seq, exit in items:
            row = seq.cache.row
            seq.after_logits(exit, counts[row] - 1, logits[row, 0])
            results.append(logits[row, 0])
        return results

    def _lengths(self, piece: Piece, counts: dict[int, int], serving: list[int], rows: int) -> np.ndarray:
        """Each row's length for this piece: a served row its tokens (it writes its last position); any other row one
        past what this piece holds of it (it writes there: a position computed again when needed)."""
        lengths = np.ones(rows, dtype=np.int64)
        for row, seq in self.occupants.items():
            lengths[row] = counts[row] if row in serving else seq.cache.filled_of(piece.cache_slots) + 1
        return lengths

    def _binding(self, runner: PieceRunner, rows: int) -> ort.IOBinding:
        key = (runner.piece.name, rows)
        version, binding = self._bindings.get(key, (None, None))
        if version != self.store.version:
            values = {slot: self.store.batch_values(slot, rows) for slot in runner.piece.cache_slots}
            binding = runner.binding(values)
            self._bindings[key] = (self.store.version, binding)
        return binding

    def _activation_dtype(self) -> np.dtype:
        return np.dtype("float16" if self.manifest.dtype == "fp16" else "float32")
