"""One standard graph per exit, composed from the (already quantised) piece graphs of its chain.

The pieces' internal values and nodes get the piece's name as a prefix, so that they cannot collide; the weights
keep their names (all graphs point into the one weights file); the hidden states that pass from piece to piece
become internal values, and so do the sequence lengths the pieces take, made once from the graph's attention_mask;
the cache slots get the layer numbers of an ordinary decoder of exit + 1 layers
(`past_key_values.{i}.key` ... `present.{i}.value`, the balcony as layer `exit`), which onnxruntime-genai and
optimum expect: the chain's slots numbered in chain order, which the runtime's step graphs rely on
(runtime/core/step_plan.py). Composing instead of building again keeps the exit graphs equal to the chains by
construction, and quantises each weight once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from balcony_edge.export.graph_builder import IR_VERSION, MS_DOMAIN, OPSET, GraphBuilder, add_sequence_lengths
from balcony_edge.export.weights import is_weight
from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Piece,
)

_LENGTHS = {SEQLENS_K, TOTAL_SEQUENCE_LENGTH}  # the pieces' inputs that the composed graph makes once from its mask
_KEPT = {INPUT_IDS, ATTENTION_MASK, LOGITS} | _LENGTHS


def compose_exit(name: str, chain: list[tuple[Piece, onnx.ModelProto]]) -> onnx.ModelProto:
    """The chain's graphs as one graph with standard I/O names."""
    layer_of: dict[str, int] = {}  # cache slot -> layer number in the composed graph
    for piece, _ in chain:
        for slot in piece.cache_slots:
            layer_of[slot] = len(layer_of)
    renames = {}
    for slot, i in layer_of.items():
        for pattern in (PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE):
            renames[pattern.format(slot=slot)] = pattern.format(slot=i)
    links = {v.name for _, proto in chain for v in proto.graph.output} & {
        v.name for _, proto in chain for v in proto.graph.input
    }
    lengths = GraphBuilder(name, np.dtype(np.float32))  # its values' names start with "/", the pieces' with their own
    add_sequence_lengths(lengths)
    nodes, initializers, outputs = list(lengths.nodes), dict(lengths.initializers), {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    for piece, proto in chain:

        def rename(value: str, prefix: str = piece.name) -> str:
            if not value or value in _KEPT or value in links or is_weight(value):
                return value
            return renames.get(value, f"{prefix}{value}" if value.startswith("/") else f"{prefix}/{value}")

        graph = proto.graph
        for tensor in graph.initializer:
            new = rename(tensor.name)
            if new not in initializers:
                initializers[new] = _renamed(tensor, new)
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = rename(node.name)
            copy.input[:] = [rename(v) for v in node.input]
            copy.output[:] = [rename(v) for v in node.output]
            nodes.append(copy)
        for value in graph.input:
            new = rename(value.name)
            if new in _LENGTHS:
                new, value = ATTENTION_MASK, lengths.inputs[0]
            if new not in links and new not in inputs:
                inputs[new] = _renamed_info(value, new)
        for value in graph.output:
            new = rename(value.name)
            if new not in links:
                outputs[new] = _renamed_info(value, new)
    ordered_outputs = [outputs.pop(LOGITS)] + list(outputs.values())
    composed = helper.make_graph(nodes, name, list(inputs.values()), ordered_outputs, list(initializers.values()))
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(composed, opset_imports=opsets, ir_version=IR_VERSION, producer_name="balcony-edge")


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _renamed_info(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy
