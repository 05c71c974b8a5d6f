"""MatMulNBits settings on this CPU, measured on SmolLM2's largest per-layer matmul shape (gate/up: 576 -> 1536, batch
1):
accuracy level and block size (16, 32, 64) for the symmetric int4 the export writes, and whether a GGUF Q4_1 block
(w = d * q + m) can be kept exactly as MatMulNBits with float zero points (zp = -m / d) at a usable speed. With
--rows, the same shape with several rows at once (a prefill, or a deepening's catch-up) beside fp32 MatMul.

python scripts/matmulnbits_settings.py            # one JSON line per setting, then a summary
python scripts/matmulnbits_settings.py --rows 1 4 17 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

N, K = 1536, 576
RUNS = 500


def pack(q: np.ndarray) -> np.ndarray:
    """4-bit codes [N, blocks, block] -> bytes [N, blocks, block / 2], low nibble first (MatMulNBits' layout)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def session(blob, scales, zero_points, block: int, level: int, rows: int = 1, threads: int = 1) -> ort.InferenceSession:
    initializers = [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(scales.reshape(-1), "S")]
    inputs = ["A", "B", "S"]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=block, accuracy_level=level
    )
    graph = helper.make_graph(
        [node],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, N])],
        initializers,
    )
    return _session(graph, threads)


def fp32_session(weight: np.ndarray, rows: int, threads: int) -> ort.InferenceSession:
    """Y = A @ weight.T as an fp32 MatMul (what an fp32 export runs for the same shape)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, N])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")],
    )
    return _session(graph, threads)


def _session(graph, threads: int) -> ort.InferenceSession:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, feeds: dict) -> float:
    """Median microseconds per run over RUNS runs in 5 groups, after a warm-up."""
    sess.run(None, feeds)
    groups = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(RUNS // 5):
            sess.run(None, feeds)
        groups.append((time.perf_counter() - started) / (RUNS // 5) * 1e6)
    return sorted(groups)[2]


def rows_sweep(rows: list[int], threads: int) -> None:
    """Microseconds per call for `rows` rows at once: fp32 MatMul and symmetric int4 at blocks 32 and 64, levels 0 and
    4."""
    rng = np.random.default_rng(0)
    for count in rows:
        x = rng.standard_normal((count, K)).astype(np.float32)
        weight = rng.standard_normal((N, K)).astype(np.float32)
        row = {
            "rows": count,
            "threads": threads,
            "fp32_matmul_us": round(timed(fp32_session(weight, count, threads), {"A": x}), 1),
        }
        for block in (32, 64):
            q = rng.integers(0, 16, size=(N, K // block, block)).astype(np.uint8)
            d = (rng.random((N, K // block)) * 0.02 + 0.001).astype(np.float32)
            for level in (0, 4):
                row[f"int4_block{block}_level{level}_us"] = round(
                    timed(session(pack(q), d, None, block, level, count, threads), {"A": x}), 1
                )
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", help="measure these row counts (int4 against fp32) instead of the settings"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.rows:
        rows_sweep(args.rows, args.threads)
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, K)).astype(np.float32)
    results = []
    for block in (16, 32, 64):  # 576 is no multiple of 128
        blocks = K // block
        q = rng.integers(0, 16, size=(N, blocks, block)).astype(np.uint8)
        d = (rng.random((N, blocks)) * 0.02 + 0.001).astype(np.float32)
        m = (-rng.random((N, blocks)) * 0.1).astype(np.float32)
        q4_1 = (q * d[..., None] + m[..., None]).reshape(N, K)
        symmetric = ((q.astype(np.float32) - 8) * d[..., None]).reshape(N, K)
        cases = [("symmetric (zero point 8, implicit)", None, symmetric)]
        if block == 32:
            cases.append(("Q4_1 kept: float zero points -m/d", (-m / d).astype(np.float32).reshape(-1), q4_1))
        for name, zero_points, reference in cases:
            for level in (0, 1, 4):
                sess = session(pack(q), d, zero_points, block, level, threads=args.threads)
                y = sess.run(None, {"A": x})[0]
                error = float(np.abs(y - x @ reference.T).max() / np.abs(x @ reference.T).max())
                row = {
                    "weights": name,
                    "block": block,
                    "accuracy_level": level,
                    "us_per_call": round(timed(sess, {"A": x}), 1),
                    "max_rel_error": float(f"{error:.2e}"),
                }
                results.append(row)
                print(json.dumps(row))
    fastest = min((r for r in results if r["weights"].startswith("symmetric")), key=lambda r: r["us_per_call"])
    kept = min((r for r in results if r["weights"].startswith("Q4_1")), key=lambda r: r["us_per_call"])
    print(
        json.dumps(
            {
                "fastest_symmetric": fastest,
                "fastest_q4_1_kept": kept,
                "q4_1_kept_slowdown": round(kept["us_per_call"] / fastest["us_per_call"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
