"""One exit bound once for one-token decode steps: as its chain of pieces (`StepPlan`) or, where the packed weights
give one, as its step graph (`StepGraphPlan`, the whole chain as one session). Inputs, outputs and lengths are buffers
of ours that onnxruntime reads and writes in place, so a step only writes the token and the length and runs (binding
per run cost 50-100 us a piece, about a tenth of a step at int4)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    EXIT_HIDDEN,
    INPUT_IDS,
    LOGITS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)
from balcony_edge.runtime.core.piece_runner import NUMPY_TYPES, PieceRunner, bind_cache_slot


class StepPlan:
    """Bindings of one exit's pieces over one cache version's buffers, for steps that run only the newest position
    through every piece (no backlog to catch up). The pieces take sequence lengths (manifest schema 4 and later);
    every chain starts with the segment that reads token ids (the manifest checks it)."""

    def __init__(self, chain: list[PieceRunner], values: dict[str, tuple[ort.OrtValue, ort.OrtValue]]):
        self.runners = chain
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._seqlens = np.zeros(1, dtype=np.int32)  # positions before the new one (GroupQueryAttention's seqlens_k)
        self._total = np.zeros((), dtype=np.int32)
        lengths = (ort.OrtValue.ortvalue_from_numpy(self._seqlens), ort.OrtValue.ortvalue_from_numpy(self._total))
        outputs: list[np.ndarray] = []
        self._bindings: list[ort.IOBinding] = []
        previous = self._token
        for runner in chain:
            binding = runner.binding(values)
            binding.bind_ortvalue_input(runner.first_input, ort.OrtValue.ortvalue_from_numpy(previous))
            if runner.takes_lengths:
                binding.bind_ortvalue_input(SEQLENS_K, lengths[0])
                binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, lengths[1])
            output = np.zeros((1, 1, runner.output_width), dtype=runner.output_dtype)
            binding.bind_ortvalue_output(runner.output, ort.OrtValue.ortvalue_from_numpy(output))
            outputs.append(output)
            self._bindings.append(binding)
            previous = output
        *self.piece_outputs, self.logits = outputs

    def step(self, token: int, count: int) -> None:
        """Run the newest position (`token`, the count-th) through every piece: `piece_outputs` (each piece's output
        [1, 1, width], the head's aside) and `logits` [1, 1, vocab], overwritten by the next step."""
        self._token[0, 0] = token
        self._seqlens[0] = count - 1
        self._total[()] = count
        for runner, binding in zip(self.runners, self._bindings):
            runner.session.run_with_iobinding(binding)


class StepGraphPlan:
    """An exit's step graph bound over one cache version's buffers: the exit graph, whose cache slots are its chain's
    in chain order (export/compose.py numbers them so), with the hidden states at the chain's boundaries as outputs
    (packed_weights.py). Same results as the chain's `StepPlan`, in one run."""

    def __init__(
        self,
        session: ort.InferenceSession,
        chain: list[PieceRunner],
        values: dict[str, tuple[ort.OrtValue, ort.OrtValue]],
    ):
        self.runners, self.session = chain, session
        self._binding = binding = session.io_binding()
        slots = [slot for runner in chain[:-1] for slot in runner.piece.cache_slots]
        for layer, slot in enumerate(slots):
            bind_cache_slot(binding, str(layer), values[slot])
        self._token = np.zeros((1, 1), dtype=np.int64)
        binding.bind_ortvalue_input(INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(self._token))
        self._mask = np.ones((1, values[slots[0]][0].shape()[2]), dtype=np.int64)  # as long as the cache holds
        self.logits = self._bound_output(LOGITS)
        # Each segment's hidden states, which a balcony or a deeper segment reads (balconies and the full model's last
        # segment give the head's input instead, which nothing keeps).
        self.piece_outputs = [
            None if runner.output == EXIT_HIDDEN else self._bound_output(runner.output) for runner in chain[:-1]
        ]

    def _bound_output(self, name: str) -> np.ndarray:
        """A [1, 1, width] buffer of ours bound to output `name`."""
        declared = {output.name: output for output in self.session.get_outputs()}[name]
        buffer = np.zeros((1, 1, declared.shape[-1]), dtype=NUMPY_TYPES[declared.type])
        self._binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        return buffer

    def step(self, token: int, count: int) -> None:
        """Run the newest position (`token`, the count-th): `piece_outputs` (the hidden states a boundary keeps, None
        for a piece whose output nothing keeps) and `logits`, overwritten by the next step."""
        self._token[0, 0] = token
        self._binding.bind_cpu_input(ATTENTION_MASK, self._mask[:, :count])
        self.session.run_with_iobinding(self._binding)
