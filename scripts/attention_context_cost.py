"""What one decode step's attention costs as the conversation grows: onnxruntime's GroupQueryAttention alone, with
SmolLM2's shapes (9 query heads, 3 KV heads, head size 64), past and present sharing one float32 buffer of 2,048
positions (as the engine binds them), after 64 and after 2,000 tokens. Each layer reads the whole KV cache once
per token: 3 MB at 2,000 tokens, 31 layers: 95 MB a step, more than the int4 weights (86 MB).

python scripts/attention_context_cost.py
"""

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, TensorProto

H, KV, D, CAP = 9, 3, 64, 2048
node = helper.make_node(
    "GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"], ["o", "ok", "ov"], domain="com.microsoft", num_heads=H, kv_num_heads=KV
)
f = TensorProto.FLOAT
g = helper.make_graph(
    [node],
    "g",
    [
        helper.make_tensor_value_info("q", f, [1, 1, H * D]),
        helper.make_tensor_value_info("k", f, [1, 1, KV * D]),
        helper.make_tensor_value_info("v", f, [1, 1, KV * D]),
        helper.make_tensor_value_info("pk", f, [1, KV, "cap", D]),
        helper.make_tensor_value_info("pv", f, [1, KV, "cap", D]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ],
    [
        helper.make_tensor_value_info("o", f, [1, 1, H * D]),
        helper.make_tensor_value_info("ok", f, [1, KV, "cap", D]),
        helper.make_tensor_value_info("ov", f, [1, KV, "cap", D]),
    ],
)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
m.ir_version = 10
so = ort.SessionOptions()
so.intra_op_num_threads = 2
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
pk = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV, CAP, D)).astype(np.float32))
pv = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV, CAP, D)).astype(np.float32))
q, k, v = (rng.standard_normal((1, 1, n * D)).astype(np.float32) for n in (H, KV, KV))
for past in (63, 1999):
    b = s.io_binding()
    for name, arr in (("q", q), ("k", k), ("v", v)):
        b.bind_cpu_input(name, arr)
    b.bind_ortvalue_input("pk", pk)
    b.bind_ortvalue_input("pv", pv)
    b.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    b.bind_cpu_input("total", np.array(past + 1, np.int32))
    b.bind_ortvalue_output("ok", pk)
    b.bind_ortvalue_output("ov", pv)
    b.bind_output("o")
    s.run_with_iobinding(b)
    ts = []
    for _ in range(200):
        t = time.perf_counter()
        s.run_with_iobinding(b)
        ts.append(time.perf_counter() - t)
    print(past + 1, f"{statistics.median(ts) * 1e6:.0f} us")
