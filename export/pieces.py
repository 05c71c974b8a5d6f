"""The pieces of an export and their graphs: backbone segments between consecutive exit depths, one balcony per
exit, one head; and, composed from the same pieces, one standard graph per exit for other clients.

For exits 8, 16, 24 of 30 layers the segments are layers 0-7 (with the embedding), 8-15, 16-23 and 24-29 (with
the final norm). A piece's KV cache slots are named after the manifest's cache slots, so that an engine can lend
every piece the one buffer per slot that all of them share.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import onnx
import torch
from numpy.typing import DTypeLike
from onnx import TensorProto
from transformers import PreTrainedModel

from balcony_edge.common.errors import ExportError
from balcony_edge.export.graph_builder import (
    Architecture,
    DecoderEmitter,
    DecoderLayerModule,
    GraphBuilder,
    KVScales,
    NormModule,
    add_sequence_lengths,
)
from balcony_edge.model import BalconyModel
from balcony_edge.runtime.core.manifest import (
    EXIT_HIDDEN,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Piece,
    hidden_name,
)

SEGMENT, BALCONY, HEAD = "segment", "balcony", "head"


def layer_slot(i: int) -> str:
    return f"layer.{i}"


def balcony_slot(k: int) -> str:
    return f"balcony.{k}"


def piece_layout(exits: tuple[int, ...], num_layers: int) -> list[Piece]:
    """Segments between consecutive depths, then one balcony per exit, then the head (graph files named after them)."""
    bounds = [0, *exits, num_layers]
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        name = f"layers_{start}_{end - 1}"
        pieces.append(
            Piece(
                name=name,
                kind=SEGMENT,
                graph=f"{name}.onnx",
                first_layer=start,
                end_layer=end,
                cache_slots=[layer_slot(i) for i in range(start, end)],
                weights=[],
            )
        )
    for k in exits:
        pieces.append(
            Piece(
                name=f"balcony_{k}",
                kind=BALCONY,
                graph=f"balcony_{k}.onnx",
                first_layer=k,
                end_layer=k,
                cache_slots=[balcony_slot(k)],
                weights=[],
            )
        )
    pieces.append(
        Piece(
            name=HEAD,
            kind=HEAD,
            graph="head.onnx",
            first_layer=num_layers,
            end_layer=num_layers,
            cache_slots=[],
            weights=[],
        )
    )
    return pieces


def exit_chain(pieces: list[Piece], exit: int, num_layers: int) -> list[str]:
    """Piece names that compute exit `exit` (num_layers: the full model), in order."""
    segments = [p.name for p in pieces if p.kind == SEGMENT and p.end_layer <= exit]
    balcony = [] if exit == num_layers else [f"balcony_{exit}"]
    return segments + balcony + [HEAD]


def rotary_tables(base: PreTrainedModel, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every position up to the context length, [positions, head_dim / 2], from the model's own rotary
    embedding (so any rope scaling it applies is the one exported)."""
    positions = torch.arange(base.config.max_position_embeddings)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = base.model.rotary_emb(probe, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy().astype(dtype), sin[0, :, :half].numpy().astype(dtype)


class PieceGraphs:
    """Builds the graphs of one export from a BalconyModel (float32 or float16 parameters), or of a plain base model."""

    def __init__(
        self,
        model: BalconyModel | PreTrainedModel,
        dtype: DTypeLike,
        tie_head_as_gemm: bool = True,
        kv_scales: dict[str, KVScales] | None = None,
    ):
        """kv_scales: an int8 KV cache with these scales (by attention name; see kv_calibration), else a float one."""
        self.base: PreTrainedModel
        self.balconies: torch.nn.ModuleDict | dict[str, torch.nn.Module]
        self.norms: torch.nn.ModuleDict | dict[str, torch.nn.Module]
        if isinstance(model, BalconyModel):
            self.base, self.balconies, self.norms = model.base, model.balconies, model.norms
            named = model.named_parameters()
        else:  # a plain causal LM: its weights are named as a BalconyModel would name them
            self.base, self.balconies, self.norms = model, {}, {}
            named = (("base." + name, p) for name, p in model.named_parameters())
        self.dtype = np.dtype(dtype)
        self.num_layers = self.base.config.num_hidden_layers
        self.arch = Architecture.of(self.base.config)
        self.names = {id(p): name for name, p in named}  # a tied head maps to the embedding
        self.rotary = rotary_tables(self.base, self.dtype)
        self.tie_head_as_gemm = tie_head_as_gemm
        self.kv_scales = kv_scales

    @property
    def elem(self) -> int:
        return onnx.helper.np_dtype_to_tensor_dtype(self.dtype)

    def _builder(self, name: str, kv_scales: dict[str, KVScales] | None = None) -> tuple[GraphBuilder, DecoderEmitter]:
        builder = GraphBuilder(name, self.dtype)
        return builder, DecoderEmitter(builder, self.arch, self.names, self.rotary, kv_scales)

    def _cache_io(self, builder: GraphBuilder, slot: str, quantized: bool = False) -> None:
        shape = ["batch_size", self.arch.num_kv_heads, "cache_length", self.arch.head_dim]
        elem = TensorProto.INT8 if quantized else self.elem
        builder.add_input(PAST_KEY.format(slot=slot), elem, shape)
        builder.add_input(PAST_VALUE.format(slot=slot), elem, shape)
        builder.add_output(PRESENT_KEY.format(slot=slot), elem, shape)
        builder.add_output(PRESENT_VALUE.format(slot=slot), elem, shape)

    def _hidden_io(self, builder: GraphBuilder, name: str, output: bool) -> None:
        shape = ["batch_size", "sequence_length", self.arch.hidden_size]
        (builder.add_output if output else builder.add_input)(name, self.elem, shape)

    def _segment_nodes(
        self, emitter: DecoderEmitter, start: int, end: int, residual: str | None, slots: dict[int, str]
    ) -> tuple[str, str | None]:
        """Layers start..end-1 (the embedding first when start is 0); returns (residual, pending MLP output)."""
        b, pending = emitter.b, None
        if start == 0:
            residual = b.one("Gather", [emitter.param(self.base.model.embed_tokens.weight), INPUT_IDS], axis=0)
        if residual is None:  # only layer 0 starts from token ids
            raise ExportError(f"layers {start}-{end - 1}: no hidden states of layer {start} to start from")
        for i in range(start, end):
            residual, pending = emitter.layer(self.base.model.layers[i], residual, pending, slots[i])
        return residual, pending

    def _close(self, emitter: DecoderEmitter, residual: str, pending: str | None, output: str) -> None:
        emitter.b.one("Add", [pending, residual], output) if pending else emitter.b.one("Identity", [residual], output)

    def _balcony_nodes(self, emitter: DecoderEmitter, k: int, residual: str, slot: str, output: str) -> None:
        # a balcony is a decoder layer of the base model's class, its exit norm the base model's RMSNorm
        residual, pending = emitter.layer(cast(DecoderLayerModule, self.balconies[str(k)]), residual, None, slot)
        emitter.norm(pending, residual, emitter.param(cast(NormModule, self.norms[str(k)]).weight), output)

    def _final_norm(self, emitter: DecoderEmitter, residual: str, pending: str | None, output: str) -> None:
        emitter.norm(pending, residual, emitter.param(self.base.model.norm.weight), output)

    def _head_nodes(self, emitter: DecoderEmitter, hidden: str) -> None:
        emitter.head(hidden, self.base.lm_head, self.base.model.embed_tokens.weight, self.tie_head_as_gemm)

    def _begin(self, builder: GraphBuilder, first_layer: int, standard: bool = False) -> str | None:
        """The graph's first inputs: token ids (from layer 0) or hidden states; then each row's sequence length (a
        piece), or the attention mask they are made from (a standard graph)."""
        residual = None
        if first_layer == 0:
            builder.add_input(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        else:
            residual = hidden_name(first_layer)
            self._hidden_io(builder, residual, output=False)
        if standard:
            add_sequence_lengths(builder)
        else:
            builder.add_input(SEQLENS_K, TensorProto.INT32, ["batch_size"])
            builder.add_input(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])
        return residual

    def piece(self, piece: Piece) -> onnx.ModelProto:
        """The graph of one piece."""
        builder, emitter = self._builder(piece.name, self.kv_scales)
        if piece.kind == HEAD:
            self._hidden_io(builder, EXIT_HIDDEN, output=False)
            self._head_nodes(emitter, EXIT_HIDDEN)
            builder.add_output(LOGITS, self.elem, ["batch_size", "sequence_length", self.arch.vocab_size])
            return builder.model()
        residual = self._begin(builder, piece.first_layer)
        for slot in piece.cache_slots:
            self._cache_io(builder, slot, quantized=self.kv_scales is not None)
        if piece.kind == BALCONY:
            if residual is None:  # _begin gives hidden states for every first layer but 0
                raise ExportError(f"piece {piece.name}: a balcony at depth 0 has no hidden states to read")
            self._balcony_nodes(emitter, piece.first_layer, residual, piece.cache_slots[0], EXIT_HIDDEN)
            self._hidden_io(builder, EXIT_HIDDEN, output=True)
        else:
            slots = {piece.first_layer + j: slot for j, slot in enumerate(piece.cache_slots)}
            residual, pending = self._segment_nodes(emitter, piece.first_layer, piece.end_layer, residual, slots)
            if piece.end_layer == self.num_layers:
                self._final_norm(emitter, residual, pending, EXIT_HIDDEN)
                self._hidden_io(builder, EXIT_HIDDEN, output=True)
            else:
                self._close(emitter, residual, pending, hidden_name(piece.end_layer))
                self._hidden_io(builder, hidden_name(piece.end_layer), output=True)
        builder.outputs = builder.outputs[-1:] + builder.outputs[:-1]  # the hidden states first, then the caches
        return builder.model()

    def truncated(self, layers: int) -> onnx.ModelProto:
        """The base model cut to its first `layers` layers, with its final norm and head, as one ordinary decoder graph
        (input_ids, attention_mask, past_key_values.{i}.* -> logits, present.{i}.*): an exit's speed floor."""
        builder, emitter = self._builder(f"layers_{layers}")
        self._begin(builder, 0, standard=True)
        for i in range(layers):
            self._cache_io(builder, str(i))
        residual, pending = self._segment_nodes(emitter, 0, layers, None, {i: str(i) for i in range(layers)})
        self._final_norm(emitter, residual, pending, EXIT_HIDDEN)
        self._head_nodes(emitter, EXIT_HIDDEN)
        builder.add_output(LOGITS, self.elem, ["batch_size", "sequence_length", self.arch.vocab_size])
        builder.outputs = builder.outputs[-1:] + builder.outputs[:-1]
        return builder.model()
