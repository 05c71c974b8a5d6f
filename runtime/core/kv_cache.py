"""The KV cache of one sequence: per cache slot, one key and one value buffer that the graphs write in place.

Backbone layer i has slot `layer.i`, shared by every exit that runs it; each balcony has a slot of its own. The
buffers are [1, kv_heads, capacity, head_dim]; GroupQueryAttention reads the first positions of a buffer as its
past and writes the new positions into the same buffer (past and present are one buffer), so a step copies
nothing however long the conversation. The capacity grows by doubling (copying once), up to the context length.
Each slot also counts its filled positions: tokens computed at a shallow exit leave the deeper slots short.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from balcony_edge.runtime.core.manifest import Manifest

INITIAL_CAPACITY = 256  # tokens


class KVCache:
    """Key and value buffers per slot (host numpy arrays lent to onnxruntime, or device OrtValues) and fill counts."""

    def __init__(self, manifest: Manifest, device: str = "cpu"):
        kv = manifest.kv
        self.device = device
        self.dtype = np.dtype(kv.dtype)
        self.shape = (1, kv.num_kv_heads, 0, kv.head_dim)
        self.limit = manifest.generation.context_length
        self.filled = {slot: 0 for slot in manifest.cache_slots}
        self.capacity = 0
        self.version = 0  # changes whenever the buffers are replaced (bindings must then be made again)
        self._host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.values: dict[str, tuple[ort.OrtValue, ort.OrtValue]] = {}

    def reserve(self, length: int) -> None:
        """Make every buffer hold at least `length` positions (doubling, at most the context length), keeping
        contents."""
        if length <= self.capacity:
            return
        capacity = max(INITIAL_CAPACITY, self.capacity * 2)
        while capacity < length:
            capacity *= 2
        capacity = max(length, min(capacity, self.limit))
        shape = (*self.shape[:2], capacity, self.shape[3])
        for slot in self.filled:
            old = self._read(slot) if self.capacity else None
            pair = (np.zeros(shape, dtype=self.dtype), np.zeros(shape, dtype=self.dtype))
            if old is not None:
                for new, previous in zip(pair, old):
                    new[:, :, : self.capacity] = previous
            if self.device == "cpu":
                self._host[slot] = pair  # onnxruntime reads and writes these arrays' memory
                self.values[slot] = tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in pair)
            else:
                self.values[slot] = tuple(ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in pair)
        self.capacity = capacity
        self.version += 1

    def _read(self, slot: str) -> tuple[np.ndarray, np.ndarray]:
        if self.device == "cpu":
            return self._host[slot]
        return tuple(value.numpy() for value in self.values[slot])

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers of every slot."""
        per_slot = 2 * self.shape[1] * self.capacity * self.shape[3] * self.dtype.itemsize
        return per_slot * len(self.filled)

    def filled_of(self, slots: list[str]) -> int:
        """The first position that some slot among `slots` lacks."""
        return min(self.filled[s] for s in slots)

    def mark(self, slots: list[str], length: int) -> None:
        """Record that `slots` now hold positions 0..length-1."""
        for slot in slots:
            self.filled[slot] = length

    def keys(self, slot: str, length: int) -> np.ndarray:
        """A copy of a slot's first `length` keys [1, kv_heads, length, head_dim] (for tests and inspection)."""
        return np.array(self._read(slot)[0][:, :, :length])
