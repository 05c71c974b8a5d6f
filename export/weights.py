"""Weights once: every graph of an export points into one data file in which each weight is stored once,
at offsets onnxruntime can memory-map."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import set_external_data

from balcony_edge.common.errors import ExportError
from balcony_edge.runtime.core.manifest import WeightEntry

WEIGHTS_FILE = "weights.bin"
# Weights are named after BalconyModel parameters (quantizers add suffixes such as `_Q4`, `_scales`);
# every other initializer is a small constant of one graph and stays inline.
WEIGHT_PREFIXES = ("base.", "balconies.", "norms.")
# onnxruntime maps external data in place when the offset is a multiple of the page size (4 KiB on
# Linux); smaller tensors are only 64-byte aligned, so that they waste little space.
PAGE_ALIGNMENT = 4096
SMALL_ALIGNMENT = 64
_TYPED_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def is_weight(name: str) -> bool:
    return name.startswith(WEIGHT_PREFIXES)


class WeightFile:
    """The one external-data file of an export, written through `handle`; `externalize` moves each weight in once."""

    def __init__(self, handle: BinaryIO, name: str = WEIGHTS_FILE):
        self.name = name  # the file name graphs refer to, relative to the export folder
        self.tensors: dict[str, WeightEntry] = {}
        self._sha256: dict[str, str] = {}
        self._size = 0
        self._handle = handle

    @property
    def size(self) -> int:
        """Bytes written so far, padding included."""
        return self._size

    def externalize(self, model: onnx.ModelProto) -> None:
        """Point every weight initializer of `model` into this file, writing those not stored yet."""
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in self.tensors:
                continue  # composed from graphs already moved into this file
            if is_weight(tensor.name):
                stored = self._store(tensor)
                set_external_data(tensor, self.name, stored.offset, stored.length)
                tensor.ClearField("raw_data")

    def _store(self, tensor: onnx.TensorProto) -> WeightEntry:
        data = _raw_bytes(tensor)
        digest = hashlib.sha256(data).hexdigest()
        if tensor.name not in self.tensors:
            offset = self._append(data)
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            self.tensors[tensor.name] = WeightEntry(offset, len(data), dtype, list(tensor.dims))
            self._sha256[tensor.name] = digest
        elif self._sha256[tensor.name] != digest:
            raise ExportError(
                f"weight {tensor.name} differs between two exit graphs; the model changed during export, export again"
            )
        return self.tensors[tensor.name]

    def _append(self, data: bytes) -> int:
        alignment = PAGE_ALIGNMENT if len(data) >= PAGE_ALIGNMENT else SMALL_ALIGNMENT
        offset = -(-self._size // alignment) * alignment
        self._handle.write(b"\0" * (offset - self._size))
        self._handle.write(data)
        self._size = offset + len(data)
        return offset


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes, moved into raw_data (external data needs that field)."""
    if not tensor.HasField("raw_data"):
        tensor.raw_data = numpy_helper.to_array(tensor).tobytes()
        for field in _TYPED_DATA_FIELDS:
            tensor.ClearField(field)
    return tensor.raw_data


def weight_bytes_per_token(model: onnx.ModelProto, weights: WeightFile) -> int:
    """Bytes of weights one decode step of `model` reads: all of each weight, one row of a lookup table."""
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in weights.tensors:
            length = weights.tensors[tensor.name].length
            only_gathered = consumers.get(tensor.name) == {"Gather"}
            total += length // tensor.dims[0] if only_gathered else length
    return total
