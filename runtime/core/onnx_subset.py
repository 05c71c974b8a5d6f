"""The few onnx.proto messages through which a model reaches its tensors and its inputs and outputs, as a protobuf
descriptor of our own: the runtime reads and edits graphs without the onnx package. Parsing keeps every other field
as protobuf's unknown fields, so a model parsed and serialised again is the same model."""

from __future__ import annotations

import functools
from collections.abc import Iterator

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

# The part of onnx.proto (same field numbers) through which a ModelProto reaches a TensorProto; parsing keeps
# these fields and skips every other one. Message -> field -> (number, message name or scalar type, repeated).
ONNX_SUBSET = {
    "ModelProto": {
        "graph": (7, "GraphProto", False),
        "training_info": (20, "TrainingInfoProto", True),
        "functions": (25, "FunctionProto", True),
    },
    "TrainingInfoProto": {"initialization": (1, "GraphProto", False), "algorithm": (2, "GraphProto", False)},
    "FunctionProto": {"node": (7, "NodeProto", True), "attribute_proto": (11, "AttributeProto", True)},
    "GraphProto": {
        "node": (1, "NodeProto", True),
        "initializer": (5, "TensorProto", True),
        "input": (11, "ValueInfoProto", True),
        "output": (12, "ValueInfoProto", True),
        "sparse_initializer": (15, "SparseTensorProto", True),
    },
    "ValueInfoProto": {"name": (1, "bytes", False), "type": (2, "TypeProto", False)},
    "TypeProto": {"tensor_type": (1, "TypeProtoTensor", False)},
    "TypeProtoTensor": {"elem_type": (1, "int32", False), "shape": (2, "TensorShapeProto", False)},
    "TensorShapeProto": {"dim": (1, "Dimension", True)},
    "Dimension": {"dim_value": (1, "int64", False), "dim_param": (2, "bytes", False)},
    "NodeProto": {"attribute": (5, "AttributeProto", True)},
    "AttributeProto": {
        "t": (5, "TensorProto", False),
        "g": (6, "GraphProto", False),
        "tensors": (10, "TensorProto", True),
        "graphs": (11, "GraphProto", True),
        "sparse_tensor": (22, "SparseTensorProto", False),
        "sparse_tensors": (23, "SparseTensorProto", True),
    },
    "SparseTensorProto": {"values": (1, "TensorProto", False), "indices": (2, "TensorProto", False)},
    # bytes, not string: a name that is not UTF-8 must not stop the check
    "TensorProto": {
        "name": (8, "bytes", False),
        "external_data": (13, "StringStringEntryProto", True),
        "data_location": (14, "int32", False),
    },
    "StringStringEntryProto": {"key": (1, "bytes", False), "value": (2, "bytes", False)},
}
_SCALAR_TYPES = {
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
}
# onnx TensorProto.DataType of the cache's numpy names; hidden states and logits are of the activation dtype
ELEM_TYPES = {"float32": 1, "int8": 3, "int32": 6, "float16": 10, "int64": 7}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def tensors(proto: message.Message) -> Iterator[message.Message]:
    """Every TensorProto inside a parsed message of ONNX_SUBSET: initializers, attributes, subgraphs, functions."""
    if proto.DESCRIPTOR.name == "TensorProto":
        yield proto
        return
    declared = ONNX_SUBSET[proto.DESCRIPTOR.name]
    for field, value in proto.ListFields():
        kind, repeated = declared[field.name][1:]  # from the table: protobuf's own flag changed name across versions
        if kind in _SCALAR_TYPES or kind == "ValueInfoProto":  # a graph's inputs and outputs hold no tensor data
            continue
        for child in value if repeated else [value]:
            yield from tensors(child)


@functools.cache
def model_class() -> type[message.Message]:
    """The ModelProto class of ONNX_SUBSET, in a descriptor pool of its own (onnx may have filled the default one)."""
    package = "balcony_edge_onnx_subset"
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    for message_name, message_fields in ONNX_SUBSET.items():
        declared = file.message_type.add(name=message_name)
        for field_name, (number, kind, repeated) in message_fields.items():
            label = (
                descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if repeated
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            )
            field = declared.field.add(name=field_name, number=number, label=label)
            if kind in _SCALAR_TYPES:
                field.type = _SCALAR_TYPES[kind]
            else:
                field.type, field.type_name = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, f".{package}.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.ModelProto"))
