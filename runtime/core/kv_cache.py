"""The KV cache: per cache slot, one key and one value buffer that the graphs write in place.

Backbone layer i has slot `layer.i`, shared by every exit that runs it; each balcony has a slot of its own. A
`KVStore` holds the buffers of some rows, [rows, kv_heads, capacity, head_dim] per slot: one row for a sequence on
its own, or one row per running request for a server that decodes them as a batch. GroupQueryAttention reads the
first positions of a row as its past and writes the new positions into the same buffer (past and present are one
buffer), so a step copies nothing however long the conversation. The capacity grows by doubling (copying once), up
to the context length. A sequence's `KVCache` is its row of a store and its slots' fill counts: tokens computed at a
shallow exit leave the deeper slots short.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort

from balcony_edge.runtime.core.manifest import Manifest

INITIAL_CAPACITY = 256  # tokens
_STORE_NUMBERS = itertools.count()  # a store's number is never reused, where id() of a freed store may be


class KVStore:
    """Key and value buffers per slot for `rows` sequences (host numpy arrays lent to onnxruntime, or device
    OrtValues for one row), grown for every row at once."""

    def __init__(self, manifest: Manifest, device: str = "cpu", rows: int = 1):
        if rows > 1 and device != "cpu":
            raise ValueError("a store of several rows lives on the host (batched decoding runs on the CPU provider)")
        kv = manifest.kv
        self.device, self.rows = device, rows
        self.dtype = np.dtype(kv.dtype)
        self.heads, self.head_dim = kv.num_kv_heads, kv.head_dim
        self.limit = manifest.generation.context_length
        self.slots = list(manifest.cache_slots)
        self.capacity = 0
        self.number = next(_STORE_NUMBERS)
        self.version = 0  # changes whenever the buffers are replaced (bindings must then be made again)
        self._host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._device: dict[str, tuple[ort.OrtValue, ort.OrtValue]] = {}
        self._rows: dict[int, dict[str, tuple[ort.OrtValue, ort.OrtValue]]] = {}  # per row, this version's views

    def reserve(self, length: int) -> None:
        """Make every buffer hold at least `length` positions (doubling, at most the context length), keeping
        contents."""
        if length <= self.capacity:
            return
        capacity = max(INITIAL_CAPACITY, self.capacity * 2)
        while capacity < length:
            capacity *= 2
        capacity = max(length, min(capacity, self.limit))
        shape = (self.rows, self.heads, capacity, self.head_dim)
        for slot in self.slots:
            old = self.read(slot) if self.capacity else None
            pair = (np.zeros(shape, dtype=self.dtype), np.zeros(shape, dtype=self.dtype))
            if old is not None:
                for new, previous in zip(pair, old):
                    new[:, :, : self.capacity] = previous
            if self.device == "cpu":
                self._host[slot] = pair  # onnxruntime reads and writes these arrays' memory
            else:
                self._device[slot] = (
                    ort.OrtValue.ortvalue_from_numpy(pair[0], self.device, 0),
                    ort.OrtValue.ortvalue_from_numpy(pair[1], self.device, 0),
                )
        self.capacity = capacity
        self.version += 1
        self._rows = {}

    def read(self, slot: str) -> tuple[np.ndarray, np.ndarray]:
        """A slot's key and value buffers of every row (the host arrays themselves, or copies from the device)."""
        if self.device == "cpu":
            return self._host[slot]
        key, value = self._device[slot]
        return key.numpy(), value.numpy()

    def batch_values(self, slot: str, rows: int) -> tuple[ort.OrtValue, ort.OrtValue]:
        """A slot's buffers of the first `rows` rows, as onnxruntime values (what a batched run binds)."""
        key, value = self._host[slot]
        return ort.OrtValue.ortvalue_from_numpy(key[:rows]), ort.OrtValue.ortvalue_from_numpy(value[:rows])

    def row_values(self, row: int) -> dict[str, tuple[ort.OrtValue, ort.OrtValue]]:
        """Every slot's buffers of one row, [1, heads, capacity, head_dim] each (a contiguous part of the rows')."""
        if row not in self._rows:
            if self.device != "cpu":
                self._rows[row] = dict(self._device)
            else:
                self._rows[row] = {
                    slot: (
                        ort.OrtValue.ortvalue_from_numpy(key[row : row + 1]),
                        ort.OrtValue.ortvalue_from_numpy(value[row : row + 1]),
                    )
                    for slot, (key, value) in self._host.items()
                }
        return self._rows[row]

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row's key and value buffers, every slot."""
        return 2 * self.heads * self.capacity * self.head_dim * self.dtype.itemsize * len(self.slots)


class KVCache:
    """One sequence's row of a KVStore (a store of its own unless given one) and its slots' fill counts."""

    def __init__(self, manifest: Manifest, device: str = "cpu", store: KVStore | None = None, row: int = 0):
        self.manifest = manifest
        self.store = store or KVStore(manifest, device)
        self.row = row
        self.filled = {slot: 0 for slot in manifest.cache_slots}

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def version(self) -> tuple[int, int, int]:
        """Changes whenever the buffers behind this cache change (grown, or moved to another store or row)."""
        return self.store.number, self.store.version, self.row

    @property
    def values(self) -> dict[str, tuple[ort.OrtValue, ort.OrtValue]]:
        return self.store.row_values(self.row)

    def reserve(self, length: int) -> None:
        """Make the buffers hold at least `length` positions, keeping contents."""
        self.store.reserve(length)

    def move_to(self, store: KVStore, row: int) -> None:
        """Copy what this cache holds into `row` of another store (grown to fit) and use that from now on (host
        stores: the batched server's)."""
        if store.device != "cpu" or self.store.device != "cpu":
            raise ValueError("caches move between host stores only")
        held = max(self.filled.values(), default=0)
        if held:
            store.reserve(held)
            for slot in self.filled:
                for new, old in zip(store.read(slot), self.store.read(slot)):
                    new[row, :, :held] = old[self.row, :, :held]
        self.store, self.row = store, row

    @property
    def nbytes(self) -> int:
        """Bytes of this cache's buffers (its row)."""
        return self.store.row_nbytes

    def filled_of(self, slots: list[str]) -> int:
        """The first position that some slot among `slots` lacks."""
        return min(self.filled[s] for s in slots)

    def mark(self, slots: list[str], length: int) -> None:
        """Record that `slots` now hold positions 0..length-1."""
        for slot in slots:
            self.filled[slot] = length

    def keys(self, slot: str, length: int) -> np.ndarray:
        """A copy of a slot's first `length` keys [1, kv_heads, length, head_dim] (for tests and inspection)."""
        return np.array(self.store.read(slot)[0][self.row : self.row + 1, :, :length])
