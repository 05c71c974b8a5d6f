"""One exit as one ONNX graph: a wrapper with the KV cache as explicit tensors, the dynamo export, and the
passes that leave every weight as an initializer named after its BalconyModel parameter (so that all graphs
can point into one data file)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..model import BalconyModel
from ..runtime.manifest import graph_input_names, graph_output_names

OPSET = 18
TRANSPOSED = ".T"  # suffix of a weight stored transposed (W.T, the layout MatMul reads)
_WRAPPED = "decoder"  # attribute name of the decoder in the wrapper: the prefix of exported parameter names
# Example sizes for tracing: every dynamic dimension >= 2 and distinct, so that none is specialised.
_BATCH, _SEQUENCE, _PAST = 2, 3, 4


class DecoderWithCache(nn.Module):
    """A causal LM with its cache as tensors: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, decoder: PreTrainedModel):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, position_ids, *past):
        config = self.decoder.config
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(config.num_hidden_layers)]
        output = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=DynamicCache(ddp_cache_data=pairs, config=config),
            use_cache=True,
        )
        present = [tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (output.logits, *present)


def _example_inputs(config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    kv_shape = (_BATCH, config.num_key_value_heads, _PAST, config.head_dim)
    input_ids = torch.ones(_BATCH, _SEQUENCE, dtype=torch.int64)
    attention_mask = torch.ones(_BATCH, _PAST + _SEQUENCE, dtype=torch.int64)
    position_ids = torch.arange(_PAST, _PAST + _SEQUENCE).expand(_BATCH, -1)
    past = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * config.num_hidden_layers)]
    return (input_ids, attention_mask, position_ids, *past)


def _dynamic_shapes(num_layers: int) -> tuple:
    batch = torch.export.Dim("batch_size")
    sequence = torch.export.Dim("sequence_length")
    past = torch.export.Dim("past_sequence_length")
    # Its own dimension: dynamo refuses past + sequence here.
    total = torch.export.Dim("total_sequence_length")
    cache = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence}, cache)  # *past is one argument


def canonical_weight_names(model: BalconyModel, decoder: PreTrainedModel) -> dict[str, str]:
    """Exported parameter name (`decoder.model.layers.8.…`) -> BalconyModel name (`balconies.8.…`)."""
    canonical = {id(p): name for name, p in model.named_parameters()}  # a tied head maps to the embedding
    return {
        f"{_WRAPPED}.{name}": canonical[id(p)] for name, p in decoder.named_parameters(remove_duplicate=False)
    }


def export_decoder(decoder: PreTrainedModel, dtype: torch.dtype) -> ir.Model:
    """torch.onnx.export (dynamo, opset 18) of a causal LM with explicit cache I/O and dynamic batch/lengths."""
    layers = decoder.config.num_hidden_layers
    wrapper = DecoderWithCache(decoder).eval()
    # The exporter reports progress on stdout and warns about optional packages; neither concerns the user.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            _example_inputs(decoder.config, dtype),
            input_names=graph_input_names(layers),
            output_names=graph_output_names(layers),
            dynamic_shapes=_dynamic_shapes(layers),
            opset_version=OPSET,
            dynamo=True,
            optimize=False,  # the optimizer would fold weight transposes into anonymous constants
            verbose=False,
        )
    return program.model


@contextlib.contextmanager
def _quiet_loggers():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def name_weights(model: ir.Model, names: dict[str, str]) -> None:
    """Rename the exported parameter initializers to their BalconyModel names."""
    for name, value in list(model.graph.initializers.items()):
        if name in names:
            value.name = names[name]


def tied_head_as_gemm(model: ir.Model) -> None:
    """Compute a tied LM head as Gemm(h, E, transB=1) on the embedding itself, instead of MatMul(h, Transpose(E)).

    Left as a Transpose, the head would be a second copy of the embedding: on disk once folded, or in every
    session's memory when onnxruntime folds it at load time.
    """
    graph = model.graph
    for transpose in [n for n in graph if n.op_type == "Transpose" and n.inputs[0].is_initializer()]:
        embedding = transpose.inputs[0]
        if not any(use.node.op_type == "Gather" for use in embedding.uses()):
            continue
        for use in list(transpose.outputs[0].uses()):
            matmul = use.node
            if matmul.op_type == "MatMul" and use.idx == 1:
                _replace_with_gemm(graph, matmul, embedding)
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)


def _replace_with_gemm(graph: ir.Graph, matmul: ir.Node, weight: ir.Value) -> None:
    hidden = matmul.inputs[0]
    vocab_size = weight.const_value.shape[0]
    leading = ir.node("Shape", [hidden], {"start": 0, "end": -1})
    flat_shape = ir.node("Constant", [], {"value": ir.tensor(np.array([-1, weight.const_value.shape[1]], dtype=np.int64))})
    flat = ir.node("Reshape", [hidden, flat_shape.outputs[0]])
    gemm = ir.node("Gemm", [flat.outputs[0], weight], {"transB": 1})
    vocab = ir.node("Constant", [], {"value": ir.tensor(np.array([vocab_size], dtype=np.int64))})
    shape = ir.node("Concat", [leading.outputs[0], vocab.outputs[0]], {"axis": 0})
    logits = ir.node("Reshape", [gemm.outputs[0], shape.outputs[0]])
    new_nodes = [leading, flat_shape, flat, gemm, vocab, shape, logits]
    ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], new_nodes, matmul.outputs, logits.outputs)


def fold_weight_transposes(model: ir.Model, weight_names: set[str]) -> None:
    """Replace Transpose(W) of a 2-D weight by an initializer `W.T` holding W transposed (MatMul's layout)."""
    graph = model.graph
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or weight.name not in weight_names or len(weight.const_value.shape) != 2:
            continue
        if list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        name = weight.name + TRANSPOSED
        if name not in graph.initializers:
            array = np.ascontiguousarray(weight.const_value.numpy().T)
            graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(array, name=name)))
        node.outputs[0].replace_all_uses_with(graph.initializers[name], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not weight.uses():
            graph.initializers.pop(weight.name)


def strip_debug_metadata(model: ir.Model) -> None:
    """Drop the exporter's per-node and per-value provenance (about 2 KB a node: most of a graph file's size)."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def export_exit_graph(model: BalconyModel, exit: int, dtype: torch.dtype, tie_head: bool = True) -> ir.Model:
    """Exit `exit` (num_layers: the full model) as an ONNX graph whose weights are named initializers.

    Weights are named as in `model.named_parameters()`; a weight MatMul reads transposed gets the suffix `.T`.
    tie_head=False gives a tied LM head its own (transposed) initializer, as quantizers need.
    """
    decoder = model.exit_model(exit)
    names = canonical_weight_names(model, decoder)
    graph = export_decoder(decoder, dtype)
    name_weights(graph, names)
    if tie_head:
        tied_head_as_gemm(graph)
    fold_weight_transposes(graph, set(names.values()))
    onnxscript.optimizer.optimize(graph)
    strip_debug_metadata(graph)
    return graph
