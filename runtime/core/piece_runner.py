"""Driving one piece's graph: its inputs bound, its KV cache slots bound as both past and present (written in place),
its output returned, for any positions (prefills, catch-ups, batches; one-token steps of one sequence run on a
`StepPlan` instead). Only `Sequence` and `BatchDecoder` decide what to run."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnxruntime as ort

from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Piece,
)


class PieceRunner:
    """One piece's session; `run` computes positions start..start+n-1 of a sequence from its first input."""

    def __init__(self, session: ort.InferenceSession, piece: Piece, lender: object = None):
        """lender: what the session's initializers are borrowed from (`SharedWeights`), kept as long as the runner: a
        sequence may outlive its engine, and onnxruntime does not hold what add_initializer lends it."""
        self.session, self.piece, self.lender = session, piece, lender
        inputs = [i.name for i in session.get_inputs()]
        self.first_input = inputs[0]  # input_ids, hidden_{depth} or exit_hidden
        output = session.get_outputs()[0]
        self.output = output.name  # hidden_{depth}, exit_hidden or logits
        self.output_width, self.output_dtype = output.shape[-1], np.dtype(NUMPY_TYPES[output.type])
        self.takes_lengths = SEQLENS_K in inputs  # schema 4 and later
        self.takes_mask = ATTENTION_MASK in inputs  # the pieces of exports before schema 4
        self.dtype = np.dtype(np.int64 if self.first_input == INPUT_IDS else NUMPY_TYPES[session.get_inputs()[0].type])

    def binding(self, values: dict[str, tuple[ort.OrtValue, ort.OrtValue]]) -> ort.IOBinding:
        """A binding with this piece's cache slots bound (`values`: slot -> key and value buffers, a sequence's row or a
        batch's rows), past and present to the same buffers (remade when they grow)."""
        binding = self.session.io_binding()
        for slot in self.piece.cache_slots:
            bind_cache_slot(binding, slot, values[slot])
        return binding

    def run(self, binding: ort.IOBinding, first: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Run on `first` ([rows, n] ids or [rows, n, hidden] states) as the last n positions of each row, whose
        lengths (positions written after this run, [rows]) a piece with attention needs: as GroupQueryAttention's
        seqlens_k and total_sequence_length, or as a mask of ones then zeros (older exports). The output on the
        host, written by onnxruntime straight into a new array (reading it back through the binding wraps every
        output, the cache's too: a tenth of a millisecond a piece)."""
        first = np.ascontiguousarray(first, dtype=self.dtype)
        binding.bind_cpu_input(self.first_input, first)
        if lengths is not None and self.takes_lengths:
            binding.bind_cpu_input(SEQLENS_K, (lengths - 1).astype(np.int32))
            binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(lengths.max(), dtype=np.int32))
        elif lengths is not None and self.takes_mask:
            mask = np.arange(lengths.max())[None, :] < lengths[:, None]
            binding.bind_cpu_input(ATTENTION_MASK, mask.astype(np.int64))
        output = np.empty((first.shape[0], first.shape[1], self.output_width), dtype=self.output_dtype)
        binding.bind_output(self.output, "cpu", 0, self.output_dtype.type, list(output.shape), output.ctypes.data)
        self.session.run_with_iobinding(binding)
        return output


def bind_cache_slot(binding: ort.IOBinding, name: str, buffers: tuple[ort.OrtValue, ort.OrtValue]) -> None:
    """Bind one cache slot's key and value buffers as both past and present (written in place); `name` fills the slot
    in the I/O names: a manifest slot for a piece, a layer number for an exit graph."""
    key, value = buffers
    binding.bind_ortvalue_input(PAST_KEY.format(slot=name), key)
    binding.bind_ortvalue_input(PAST_VALUE.format(slot=name), value)
    binding.bind_ortvalue_output(PRESENT_KEY.format(slot=name), key)
    binding.bind_ortvalue_output(PRESENT_VALUE.format(slot=name), value)


def steps_on_plans(runners: Iterable[PieceRunner], device: str) -> bool:
    """Whether one-token steps run on bound plans: on the CPU provider only (a GPU provider copies a bound host input
    when it is bound), and only with pieces that take sequence lengths (not an older export's mask)."""
    return device == "cpu" and not any(runner.takes_mask for runner in runners)


# onnxruntime's names of the tensor types a piece or an exit graph passes: activations, and an int8 KV cache.
NUMPY_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
