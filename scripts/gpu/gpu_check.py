"""The GPU path end to end, for a machine with an NVIDIA GPU and onnxruntime-gpu (also runs on the CPU provider).

    python scripts/gpu/gpu_check.py EXPORT_FOLDER [--providers tensorrt cuda cpu] [--tokens 32]

For each provider: load the export on it alone (one TensorRT engine per piece; KV caches on the device, bound
as past and present), greedy tokens at every exit against the CPU provider's, one exit schedule that switches
every few tokens against the static exits' logits, and decode tokens/s per exit. Prints one JSON object; exits
non-zero if a provider that is present fails a check. Made to finish in a few minutes on an H100 with the
shipped fp16 export (`balcony-edge export --dtype fp16`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort

from balcony_edge.export.inspect import usable_providers
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.manifest import KV_DTYPES
from balcony_edge.runtime.core.sessions import PROVIDER_ALIASES

PROMPT = "Write a short story about a lighthouse keeper and a storm."
# Largest logit difference a switching schedule may show against static exits: float32 on the CPU is exact (to
# summation order), a GPU's kernels differ more; float16 rounds where the pieces run over other shapes (a few float16
# steps at logits of ~30).
SWITCHING_LIMIT = {
    ("float32", "cpu"): 1e-3,
    ("float32", "gpu"): 0.05,
    ("float16", "cpu"): 0.25,
    ("float16", "gpu"): 0.25,
}
# int4 and int8 weights (MatMulNBits, accuracy level 4) on the CPU: onnxruntime quantises each activation row to int8
# before the product, so the attention kernel's last-bit difference between a run over several tokens and a one-token
# step can flip a rounding and grow through the layers (docs/runtime.md, "How switching stays exact": 0.98 on the int4
# export of run 11, where an exit's own one-token steps differ from one run over the prefix by up to 1.2).
QUANTISED_ACTIVATIONS_CPU_LIMIT = 2.0
SCHEDULE = (8, 8, 30, 16, 24, 8, 30, 30, 16, 8)  # exits in turn, a few tokens each (missing exits are skipped)


def greedy(engine: Engine, exit: int, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy tokens at one exit and the decode tokens/s after the first."""
    sequence = engine.sequence(prompt)
    made, started = [], None
    for index in range(tokens):
        made.append(int(np.argmax(sequence.logits(exit))))
        sequence.append(made[-1])
        if index == 0:
            started = time.perf_counter()
    return made, (tokens - 1) / (time.perf_counter() - started)


def switching_error(engine: Engine, prompt: list[int], steps: int = 3) -> float:
    """Largest logit difference between a switching schedule and each exit run alone on the same tokens."""
    exits = [k for k in SCHEDULE if k in engine.exits] or engine.exits
    switching, worst = engine.sequence(prompt), 0.0
    for exit in exits:
        for _ in range(steps):
            logits = switching.logits(exit)
            alone = engine.sequence(switching.tokens).logits(exit)
            worst = max(worst, float(np.abs(logits.astype(np.float32) - alone.astype(np.float32)).max()))
            switching.append(int(np.argmax(logits)))
    return worst


def check(folder: str, provider: str, reference: dict[int, list[int]] | None, tokens: int) -> dict:
    started = time.perf_counter()
    engine = Engine.load(folder, providers=[provider])
    result = {
        "provider": engine.provider,
        "described": engine.describe(),
        "load_s": round(time.perf_counter() - started, 1),
    }
    prompt = engine.prompt_ids(PROMPT)
    greedy(engine, engine.exits[0], prompt, 8)  # untimed: a GPU provider tunes its kernels on the first calls
    result["exits"] = {}
    for exit in engine.exits:
        made, rate = greedy(engine, exit, prompt, tokens)
        row = {"decode_tok_s": round(rate, 1), "tokens": made}
        if reference is not None:
            same = next((i for i, (a, b) in enumerate(zip(made, reference[exit])) if a != b), tokens)
            row["same_as_cpu"] = same
        result["exits"][exit] = row
    result["switching_max_abs_diff"] = switching_error(engine, prompt)
    quantised_activations = (engine.manifest.quantization or {}).get("accuracy_level") == 4 and provider == "cpu"
    result["switching_limit"] = (
        QUANTISED_ACTIVATIONS_CPU_LIMIT
        if quantised_activations
        else SWITCHING_LIMIT[(KV_DTYPES[engine.manifest.dtype], "cpu" if provider == "cpu" else "gpu")]
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--providers", nargs="+", default=["tensorrt", "cuda", "cpu"])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    available = set(usable_providers())  # built in and able to start here (onnxruntime-gpu lists CUDA without a GPU)
    report = {"onnxruntime": ort.__version__, "usable": sorted(available), "providers": {}}
    reference = check(args.export, "cpu", None, args.tokens)
    report["providers"]["cpu"] = reference
    cpu_tokens = {exit: row["tokens"] for exit, row in reference["exits"].items()}
    failed = reference["switching_max_abs_diff"] > reference["switching_limit"]
    for name in (p for p in args.providers if p != "cpu"):
        if PROVIDER_ALIASES[name] not in available:
            report["providers"][name] = {
                "skipped": f"{PROVIDER_ALIASES[name]} cannot start here (not built in, or no GPU)"
            }
            continue
        try:
            result = check(args.export, name, cpu_tokens, args.tokens)
        except Exception as err:  # a provider that cannot start here is reported, with its reason
            report["providers"][name] = {"failed": f"{type(err).__name__}: {err}"}
            failed = True
            continue
        report["providers"][name] = result
        failed |= (
            result["provider"] != PROVIDER_ALIASES[name] or result["switching_max_abs_diff"] > result["switching_limit"]
        )
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
