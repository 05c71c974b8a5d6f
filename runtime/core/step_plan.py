"""One exit's chain bound once for one-token decode steps: each piece's input, output and lengths are buffers of
ours that onnxruntime reads and writes in place, and each piece reads the buffer its predecessor wrote, so a step
only writes the token and the length and runs the pieces (binding per run cost 50-100 us a piece, about a tenth of
a step at int4)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from balcony_edge.runtime.core.manifest import SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from balcony_edge.runtime.core.piece_runner import PieceRunner


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
        self.outputs: list[np.ndarray] = []
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
            self.outputs.append(output)
            self._bindings.append(binding)
            previous = output

    def step(self, token: int, count: int) -> list[np.ndarray]:
        """Run the newest position (`token`, the count-th) through every piece; each piece's output [1, 1, width],
        overwritten by the next step."""
        self._token[0, 0] = token
        self._seqlens[0] = count - 1
        self._total[()] = count
        for runner, binding in zip(self.runners, self._bindings):
            runner.session.run_with_iobinding(binding)
        return self.outputs
