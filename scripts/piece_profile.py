"""Where a decode step's time goes: every piece of an export run alone for one token, as the engine runs it (the
engine's session options, past and present sharing one cache buffer per slot), at two context lengths, with
onnxruntime's profiler: per piece the wall time of a run, the sum of its kernels (the rest is the executor between
nodes) and the time per operator type.

python scripts/piece_profile.py                                    # the default export
python scripts/piece_profile.py ~/.cache/balcony-edge/exports/smollm2-balcony-int4 --contexts 64 2000 --json p.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from balcony_edge.common.paths import default_export_dir
from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    Piece,
)
from balcony_edge.runtime.core.sessions import session_options

RUNS = 200


def profile_piece(folder: Path, manifest: Manifest, piece: Piece, context: int, threads: int | None) -> dict:
    """One piece run RUNS times on one new position after `context - 1` cached ones: wall, kernel sum, per operator."""
    options = session_options(threads, prepack=True)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / piece.name)
    session = ort.InferenceSession(str(folder / piece.graph), options, providers=["CPUExecutionProvider"])
    kv = manifest.kv
    capacity = max(256, 1 << (context - 1).bit_length())
    binding = session.io_binding()
    buffers = []
    for slot in piece.cache_slots:
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            buffer = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, kv.num_kv_heads, capacity, kv.head_dim), dtype=kv.dtype)
            )
            buffers.append(buffer)  # kept alive while the session writes into it
            binding.bind_ortvalue_input(past.format(slot=slot), buffer)
            binding.bind_ortvalue_output(present.format(slot=slot), buffer)
    first = session.get_inputs()[0]
    if first.name == INPUT_IDS:
        binding.bind_cpu_input(first.name, np.array([[1]], dtype=np.int64))
    else:
        width = first.shape[-1]
        dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        binding.bind_cpu_input(first.name, np.random.default_rng(0).standard_normal((1, 1, width)).astype(dtype))
    inputs = {i.name for i in session.get_inputs()}
    if SEQLENS_K in inputs:
        binding.bind_cpu_input(SEQLENS_K, np.array([context - 1], dtype=np.int32))
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(context, dtype=np.int32))
    elif ATTENTION_MASK in inputs:  # an export before manifest schema 4
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, context), dtype=np.int64))
    binding.bind_output(session.get_outputs()[0].name, "cpu")
    for _ in range(20):
        session.run_with_iobinding(binding)
    walls = []
    for _ in range(RUNS):
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        walls.append(time.perf_counter() - started)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = RUNS + 20
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    kernels = sum(by_op.values()) / runs
    return {
        "piece": piece.name,
        "context": context,
        "wall_us": round(statistics.median(walls) * 1e6, 1),
        "kernels_us": round(kernels, 1),
        "ops_us": {op: round(total / runs, 1) for op, total in by_op.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", nargs="?", type=Path, default=default_export_dir())
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2000])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = Manifest.load(args.export)
    rows = [
        profile_piece(args.export, manifest, piece, context, args.threads)
        for context in args.contexts
        for piece in manifest.pieces
    ]
    for row in rows:
        ops = ", ".join(f"{op} {us:.0f}" for op, us in list(row["ops_us"].items())[:6])
        print(
            f"{row['piece']:>14} ctx {row['context']:>5}: run "
            f"{row['wall_us']:7.0f} us, kernels {row['kernels_us']:7.0f} us ({ops})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
