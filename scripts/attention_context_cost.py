"""What one decode step's attention costs as the conversation grows: onnxruntime's GroupQueryAttention alone, with
SmolLM2's shapes (9 query heads, 3 KV heads, head size 64), past and present sharing one buffer of 2,048 positions
(as the engine binds them), after 64 and after 2,000 tokens, with a float32, a float16 and an int8 cache. Each layer
reads the whole KV cache once per token: 3 MB at 2,000 tokens in float32, 31 layers: 95 MB a step, more than the int4
weights (86 MB). In float16 the cache is half that; the graph then casts Q, K, V in and the output back. In int8 (what
`export --kv-cache int8` writes) it is a quarter, and the node quantises keys and values itself (per-channel scales).

Last, the same arithmetic as three standard ops (FusedMatMul, Softmax, MatMul) with the three query heads that share a
KV head as one matrix product ([3 KV heads] x [3 x 64] by [64 x n]): what the attention itself costs when each KV
head is read once per step, not once per query head.

python scripts/attention_context_cost.py
"""

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

H, KV, D, CAP = 9, 3, 64, 2048


def two_thread_session(graph) -> ort.InferenceSession:
    """A CPU session with two intra-op threads for one small graph (opset 17 + com.microsoft)."""
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session(cache: int) -> ort.InferenceSession:
    """GroupQueryAttention with float32 Q, K, V and output; with a float16 cache the node runs in float16 between casts;
    with an int8 cache it quantises keys and values itself (per-channel scales, as `export --kv-cache int8` writes)."""
    f = TensorProto.FLOAT
    nodes, q, k, v, o = [], "q", "k", "v", "o"
    if cache == TensorProto.FLOAT16:
        nodes = [helper.make_node("Cast", [n], [n + "16"], to=cache) for n in (q, k, v)]
        q, k, v, o = "q16", "k16", "v16", "o16"
    inputs, quantized, initializers = [q, k, v, "pk", "pv", "seqlens_k", "total"], {}, []
    if cache == TensorProto.INT8:
        inputs += ["", "", "", "", "", "k_scale", "v_scale"]
        quantized = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        initializers = [
            numpy_helper.from_array(np.full((1, KV, 1, D), 4 / 127, np.float32), name)
            for name in ("k_scale", "v_scale")
        ]
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            inputs,
            [o, "ok", "ov"],
            domain="com.microsoft",
            num_heads=H,
            kv_num_heads=KV,
            **quantized,
        )
    )
    if cache == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", [o], ["o"], to=f))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("q", f, [1, 1, H * D]),
            helper.make_tensor_value_info("k", f, [1, 1, KV * D]),
            helper.make_tensor_value_info("v", f, [1, 1, KV * D]),
            helper.make_tensor_value_info("pk", cache, [1, KV, "cap", D]),
            helper.make_tensor_value_info("pv", cache, [1, KV, "cap", D]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("o", f, [1, 1, H * D]),
            helper.make_tensor_value_info("ok", cache, [1, KV, "cap", D]),
            helper.make_tensor_value_info("ov", cache, [1, KV, "cap", D]),
        ],
        initializers,
    )
    return two_thread_session(graph)


def grouped_session() -> ort.InferenceSession:
    """Scores of the query heads of each KV head as one product, softmax, weighted values (no cache write, no
    rotary)."""
    f, group = TensorProto.FLOAT, H // KV
    nodes = [
        helper.make_node("FusedMatMul", ["q", "k"], ["s"], domain="com.microsoft", transB=1, alpha=D**-0.5),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    shapes = {"q": [KV, group, D], "k": [KV, "n", D], "v": [KV, "n", D]}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, f, shape) for n, shape in shapes.items()],
        [helper.make_tensor_value_info("o", f, [KV, group, D])],
    )
    return two_thread_session(graph)


def median_us(s: ort.InferenceSession, b: ort.IOBinding) -> float:
    """Median microseconds of 300 runs after one warm-up."""
    s.run_with_iobinding(b)
    ts = []
    for _ in range(300):
        t = time.perf_counter()
        s.run_with_iobinding(b)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, n * D)).astype(np.float32) for n in (H, KV, KV))
for name, elem, dtype in (
    ("float32", TensorProto.FLOAT, np.float32),
    ("float16", TensorProto.FLOAT16, np.float16),
    ("int8", TensorProto.INT8, np.int8),
):
    s = session(elem)
    pk = ort.OrtValue.ortvalue_from_numpy(
        (rng.standard_normal((1, KV, CAP, D)) * (30 if elem == TensorProto.INT8 else 1)).astype(dtype)
    )
    pv = ort.OrtValue.ortvalue_from_numpy(
        (rng.standard_normal((1, KV, CAP, D)) * (30 if elem == TensorProto.INT8 else 1)).astype(dtype)
    )
    for past in (63, 1999):
        b = s.io_binding()
        for input_name, arr in (("q", q), ("k", k), ("v", v)):
            b.bind_cpu_input(input_name, arr)
        b.bind_ortvalue_input("pk", pk)
        b.bind_ortvalue_input("pv", pv)
        b.bind_cpu_input("seqlens_k", np.array([past], np.int32))
        b.bind_cpu_input("total", np.array(past + 1, np.int32))
        b.bind_ortvalue_output("ok", pk)
        b.bind_ortvalue_output("ov", pv)
        b.bind_output("o")
        print(f"{name} cache, {past + 1} tokens: {median_us(s, b):.0f} us")


s = grouped_session()
for n in (64, 2000):
    b = s.io_binding()
    b.bind_cpu_input("q", rng.standard_normal((KV, H // KV, D)).astype(np.float32))
    b.bind_cpu_input("k", rng.standard_normal((KV, n, D)).astype(np.float32))
    b.bind_cpu_input("v", rng.standard_normal((KV, n, D)).astype(np.float32))
    b.bind_output("o")
    print(f"grouped matrix products, {n} tokens: {median_us(s, b):.0f} us")
