"""The KV cache of one sequence: per cache slot, keys and values of the positions computed so far.

Backbone layer i has slot i, shared by every exit that runs it; each balcony has a slot of its own.
Tokens computed at a shallow exit leave the deeper slots short; `missing_from` says where an exit
must start recomputing so that all its slots cover the whole prefix.
"""

from __future__ import annotations

import numpy as np

from .manifest import Manifest


class KVCache:
    """Keys and values [1, kv_heads, filled, head_dim] per slot, with each slot's filled length (tokens)."""

    def __init__(self, manifest: Manifest):
        kv = manifest.kv
        self.names = list(manifest.cache_slots)
        self._empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=np.dtype(kv.dtype))
        self.keys: list = [self._empty] * len(self.names)
        self.values: list = [self._empty] * len(self.names)
        self.filled = [0] * len(self.names)

    def missing_from(self, slots: list[int]) -> int:
        """The first position (token index) that some slot among `slots` lacks."""
        return min(self.filled[s] for s in slots)

    def past(self, slot: int, length: int) -> tuple:
        """Keys and values of the first `length` positions of a slot."""
        if length == self.filled[slot]:
            return self.keys[slot], self.values[slot]
        if length == 0:
            return self._empty, self._empty
        return _prefix(self.keys[slot], length), _prefix(self.values[slot], length)

    def store(self, slot: int, keys, values, length: int) -> None:
        """Keep a graph's present keys/values (covering positions 0..length-1) as the slot's cache."""
        self.keys[slot], self.values[slot], self.filled[slot] = keys, values, length


def _prefix(tensor, length: int) -> np.ndarray:
    """The first `length` positions of a [1, heads, tokens, head_dim] tensor (numpy, or an OrtValue on a device)."""
    array = tensor if isinstance(tensor, np.ndarray) else tensor.numpy()  # device: only on the rare catch-up path
    return np.ascontiguousarray(array[:, :, :length])
