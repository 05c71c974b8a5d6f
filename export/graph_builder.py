"""ONNX graphs of decoder pieces built node by node from the model's weights, with onnxruntime's fused contrib ops.

Nothing is traced: each piece is a handful of nodes per layer (SimplifiedLayerNormalization and its Skip form,
one MatMul for Q, K and V together, GroupQueryAttention with rotary embedding and a KV cache that past and
present may share, one MatMul for gate and up), so a whole export takes seconds. Weights are initializers named
after BalconyModel parameters (fused or transposed copies get a suffix), so that every piece can point into one
weights file and each weight is stored once.

A piece is one of: a backbone segment (layers a..b-1; the first also looks up the embedding, the last ends with
the final norm), a balcony (its layer and exit norm), or the head. Exit k is the chain of segments up to depth
k, balcony k and the head; the full model is every segment and the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from balcony_edge.common.errors import ExportError
from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # onnxruntime 1.20 reads up to 10
TRANSPOSED = ".T"  # suffix of a weight stored transposed (the layout MatMul reads)

ROTARY_COS = "base.rotary.cos_cache"
ROTARY_SIN = "base.rotary.sin_cache"


# The submodules the builder reads of a Llama-family decoder layer (transformers' modules and BalconyModel's balconies
# alike): torch types any submodule as `Tensor | Module`, so these say what each one is.
class NormModule(Protocol):
    """An RMSNorm: its scale."""

    @property
    def weight(self) -> torch.Tensor: ...


class AttentionModule(Protocol):
    """Self-attention: Q, K, V and output projections (Qwen3: and an RMSNorm per head of Q and K)."""

    @property
    def q_proj(self) -> torch.nn.Linear: ...
    @property
    def k_proj(self) -> torch.nn.Linear: ...
    @property
    def v_proj(self) -> torch.nn.Linear: ...
    @property
    def o_proj(self) -> torch.nn.Linear: ...
    @property
    def q_norm(self) -> NormModule: ...  # only where Architecture.qk_norm
    @property
    def k_norm(self) -> NormModule: ...  # only where Architecture.qk_norm
    @property
    def scaling(self) -> float: ...


class MlpModule(Protocol):
    """The gated (SwiGLU) MLP."""

    @property
    def gate_proj(self) -> torch.nn.Linear: ...
    @property
    def up_proj(self) -> torch.nn.Linear: ...
    @property
    def down_proj(self) -> torch.nn.Linear: ...


class DecoderLayerModule(Protocol):
    """One decoder layer: norm, attention, norm, MLP."""

    @property
    def input_layernorm(self) -> NormModule: ...
    @property
    def self_attn(self) -> AttentionModule: ...
    @property
    def post_attention_layernorm(self) -> NormModule: ...
    @property
    def mlp(self) -> MlpModule: ...


@dataclass(frozen=True)
class Architecture:
    """What the builder reads from a Hugging Face config of a Llama-family model."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    vocab_size: int
    sliding_window: int | None
    qk_norm: bool  # Qwen3: RMSNorm on each head of Q and K before the rotary embedding

    @classmethod
    def of(cls, config) -> Architecture:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ExportError(
                f"hidden_act {act!r} is not supported by the graph builder (SiLU only); use a Llama-family base"
            )
        window = getattr(config, "sliding_window", None)
        if not getattr(config, "use_sliding_window", window is not None):
            window = None
        return cls(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            eps=float(config.rms_norm_eps),
            vocab_size=config.vocab_size,
            sliding_window=window,
            qk_norm=config.model_type == "qwen3",
        )


@dataclass(frozen=True)
class KVScales:
    """One attention's int8 cache scales (`export/kv_calibration.py`), each [1, kv_heads, 1, head_dim] float32:
    GroupQueryAttention's PER_CHANNEL form."""

    key: np.ndarray
    value: np.ndarray


class GraphBuilder:
    """Collects nodes, graph inputs/outputs and initializers (each weight once, by name) of one ONNX graph."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"/{stem}_{self._count}"

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [self.fresh(op) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, names, name=self.fresh(op + "_node"), domain=domain or None, **attrs)
        )
        return names

    def one(self, op: str, inputs: list[str], output: str | None = None, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, [output] if output else 1, domain, **attrs)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer, stored once however often it is used."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = self.fresh("const")
        self.initializers[name] = numpy_helper.from_array(np.asarray(values, dtype=dtype), name)
        return name

    def add_input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="balcony-edge")


def add_sequence_lengths(b: GraphBuilder) -> None:
    """The attention_mask input and the nodes that make GroupQueryAttention's seqlens_k (each row's tokens - 1) and
    total_sequence_length from it: once in a standard graph (a whole exit, a floor), where a piece takes both as
    inputs from the engine."""
    b.add_input(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])
    total = b.one("ReduceSum", [ATTENTION_MASK, b.const([1])], keepdims=0)
    b.one("Cast", [b.one("Sub", [total, b.const([1])])], SEQLENS_K, to=TensorProto.INT32)
    length = b.one("Gather", [b.one("Shape", [ATTENTION_MASK]), b.const(1)], axis=0)
    b.one("Cast", [length], TOTAL_SEQUENCE_LENGTH, to=TensorProto.INT32)


def _array(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().astype(dtype)


class DecoderEmitter:
    """Emits the nodes of decoder layers, norms, embedding and head into a GraphBuilder."""

    def __init__(
        self,
        builder: GraphBuilder,
        arch: Architecture,
        names: dict[int, str],
        rotary: tuple[np.ndarray, np.ndarray],
        kv_scales: dict[str, KVScales] | None = None,
    ):
        self.b, self.arch = builder, arch
        self.names = names  # id(parameter) -> BalconyModel name
        self.rotary = rotary
        self.kv_scales = kv_scales  # attention name -> its int8 cache scales; None: a float cache

    def param(
        self, parameter: torch.Tensor, suffix: str = "", transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> str:
        """The initializer of a model parameter (optionally transformed, e.g. transposed, under name + suffix)."""
        name = self.names[id(parameter)] + suffix
        if name not in self.b.initializers:
            array = _array(parameter, self.b.dtype)
            self.b.weight(name, transform(array) if transform else array)
        return name

    def fused(self, name: str, parameters: list[torch.Tensor]) -> str:
        """Several Linear weights side by side along the output axis, transposed: x @ fused = concat of x @ W_i.T."""
        if name not in self.b.initializers:
            self.b.weight(name, np.concatenate([_array(p, self.b.dtype) for p in parameters], axis=0).T)
        return name

    def norm(self, pending: str | None, residual: str, weight: str, output: str | None = None) -> tuple[str, str]:
        """RMSNorm of residual (+ pending, added first when given): (normed, new residual)."""
        eps = self.arch.eps
        if pending is None:
            return self.b.one(
                "SimplifiedLayerNormalization", [residual, weight], output, axis=-1, epsilon=eps, stash_type=1
            ), residual
        normed, total = self.b.fresh("normed") if output is None else output, self.b.fresh("residual")
        self.b.node(
            "SkipSimplifiedLayerNormalization",
            [pending, residual, weight],
            [normed, "", "", total],
            MS_DOMAIN,
            epsilon=eps,
        )
        return normed, total

    def layer(self, layer: DecoderLayerModule, residual: str, pending: str | None, slot: str) -> tuple[str, str]:
        """One decoder layer: returns (residual before its MLP output is added, MLP output)."""
        x, residual = self.norm(pending, residual, self.param(layer.input_layernorm.weight))
        attention = self.attention(layer.self_attn, x, slot)
        x, residual = self.norm(attention, residual, self.param(layer.post_attention_layernorm.weight))
        return residual, self.mlp(layer.mlp, x)

    def linear_bias(self, x: str, modules: list[torch.nn.Linear], name: str) -> str:
        if all(m.bias is None for m in modules):
            return x
        if any(m.bias is None for m in modules):
            raise ExportError(f"{name}: some projections have a bias and some not; not supported by the graph builder")
        bias = np.concatenate([_array(m.bias, self.b.dtype) for m in modules])
        return self.b.one("Add", [x, self.b.weight(name, bias)])

    def attention(self, attn: AttentionModule, x: str, slot: str) -> str:
        a, b = self.arch, self.b
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        base = self.names[id(attn.q_proj.weight)].rsplit(".q_proj.weight", 1)[0]
        qkv = b.one("MatMul", [x, self.fused(f"{base}.qkv_proj.weight{TRANSPOSED}", [p.weight for p in projections])])
        qkv = self.linear_bias(qkv, projections, f"{base}.qkv_proj.bias")
        if a.qk_norm:
            sizes = b.const([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim])
            q, k, v = b.node("Split", [qkv, sizes], 3, axis=-1)
            q, k = (self.head_norm(t, n.weight) for t, n in ((q, attn.q_norm), (k, attn.k_norm)))
            query = [q, k, v]
        else:
            query = [qkv, "", ""]  # packed Q, K, V
        cos, sin = self.rotary_caches()
        past = [PAST_KEY.format(slot=slot), PAST_VALUE.format(slot=slot)]
        inputs = [*query, *past, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, cos, sin]
        quantized_cache = {}
        if self.kv_scales is not None:  # int8 codes in the cache, one scale per KV head and channel
            scales = self.kv_scales[base]
            inputs += [
                "",
                "",
                "",
                b.weight(f"{base}.k_cache_scale", scales.key),
                b.weight(f"{base}.v_cache_scale", scales.value),
            ]
            quantized_cache = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        out = b.node(
            "GroupQueryAttention",
            inputs,
            [b.fresh("attention"), PRESENT_KEY.format(slot=slot), PRESENT_VALUE.format(slot=slot)],
            MS_DOMAIN,
            num_heads=a.num_heads,
            kv_num_heads=a.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(attn.scaling),
            local_window_size=a.sliding_window or -1,
            **quantized_cache,
        )[0]
        output = b.one("MatMul", [out, self.param(attn.o_proj.weight, TRANSPOSED, np.transpose)])
        if attn.o_proj.bias is not None:
            output = b.one("Add", [output, self.param(attn.o_proj.bias)])
        return output

    def head_norm(self, x: str, weight: torch.Tensor) -> str:
        """RMSNorm over each head of [batch, seq, heads x head_dim]."""
        b = self.b
        heads = b.one("Reshape", [x, b.const([0, 0, -1, self.arch.head_dim])])
        normed = b.one(
            "SimplifiedLayerNormalization", [heads, self.param(weight)], axis=-1, epsilon=self.arch.eps, stash_type=1
        )
        return b.one("Reshape", [normed, b.const([0, 0, -1])])

    def rotary_caches(self) -> tuple[str, str]:
        cos, sin = self.rotary
        return self.b.weight(ROTARY_COS, cos.astype(self.b.dtype)), self.b.weight(ROTARY_SIN, sin.astype(self.b.dtype))

    def mlp(self, mlp: MlpModule, x: str) -> str:
        b = self.b
        base = self.names[id(mlp.gate_proj.weight)].rsplit(".gate_proj.weight", 1)[0]
        gate_up = b.one(
            "MatMul",
            [x, self.fused(f"{base}.gate_up_proj.weight{TRANSPOSED}", [mlp.gate_proj.weight, mlp.up_proj.weight])],
        )
        gate_up = self.linear_bias(gate_up, [mlp.gate_proj, mlp.up_proj], f"{base}.gate_up_proj.bias")
        gate, up = b.node("Split", [gate_up], 2, axis=-1)
        activated = b.one("Mul", [b.one("Mul", [gate, b.one("Sigmoid", [gate])]), up])
        output = b.one("MatMul", [activated, self.param(mlp.down_proj.weight, TRANSPOSED, np.transpose)])
        if mlp.down_proj.bias is not None:
            output = b.one("Add", [output, self.param(mlp.down_proj.bias)])
        return output

    def head(self, hidden: str, lm_head: torch.nn.Linear, embedding: torch.Tensor, tie_as_gemm: bool) -> str:
        """Logits [batch, seq, vocab] of normed hidden states; a tied head reads the embedding itself through Gemm."""
        b = self.b
        if tie_as_gemm and lm_head.weight is embedding:
            flat = b.one("Reshape", [hidden, b.const([-1, self.arch.hidden_size])])
            logits = b.one("Gemm", [flat, self.param(embedding)], transB=1)
            leading = b.one("Shape", [hidden], start=0, end=-1)
            shape = b.one("Concat", [leading, b.const([self.arch.vocab_size])], axis=0)
            return b.one("Reshape", [logits, shape], LOGITS)
        logits = b.one("MatMul", [hidden, self.param(lm_head.weight, TRANSPOSED, np.transpose)])
        if lm_head.bias is not None:
            logits = b.one("Add", [logits, self.param(lm_head.bias)])
        return b.one("Identity", [logits], LOGITS)
