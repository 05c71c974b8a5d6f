"""What running an exit as a chain of pieces costs against one session on that exit's standard graph, on the CPU.

In one process on onnxruntime's process-wide pool (so that both decoders wake the same threads), rounds alternate two
decoders of the same export at each exit asked for: the engine's `Sequence` (the chain: segments, balcony, head, on
its step plan) and one onnxruntime session on the exit's standard graph (`exit_k.onnx` / `full.onnx`, IO binding, past
and present sharing one buffer per layer). Each decodes `--tokens` greedy tokens after a 64-token prompt (the bench's
timed greedy loop; their median steps are compared); the order turns every round and the median of the rounds' ratios
is printed, since this machine's speed drifts between rounds. Both must give the same tokens. When onnxruntime_genai
is importable, each round also runs onnxruntime-genai's own loop on the exit's genai folder (the same graph, its own
session and threads), to tell the chain's cost from the cost of driving one graph from Python. Then, per piece of the
chain, its onnxruntime call, and the step's time outside those calls. Sessions loaded later in a process ran 0-6%
faster in such A/Bs (docs/benchmarks.md), so the ratios carry that order's bias.

python scripts/chain_overhead.py <cache>/exports/smollm2-balcony-int4 --exits 8 30 --rounds 6
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from balcony_edge.bench.decode import EngineDecoder, RunTiming, greedy_run
from balcony_edge.bench.peers import genai_generator, genai_model
from balcony_edge.export.genai import genai_folder
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS
from balcony_edge.runtime.core.piece_runner import NUMPY_TYPES

PROMPT = list(range(100, 164))


class GraphDecoder:
    """One session on the exit's standard graph (the bench's decoder interface: prefill, then step by step); its cache
    buffers, sized for the prompt and `tokens` more, are bound as both past and present."""

    def __init__(self, session: ort.InferenceSession, engine: Engine, tokens: int):
        self.session, self.tokens, self.vocab, self.kv = session, tokens, engine.manifest.vocab_size, engine.manifest.kv
        self.pasts = [i for i in session.get_inputs() if i.name not in (INPUT_IDS, ATTENTION_MASK)]

    def prefill(self, prompt: list[int]) -> np.ndarray:
        shape = (1, self.kv.num_kv_heads, len(prompt) + self.tokens, self.kv.head_dim)
        self.buffers = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=NUMPY_TYPES[i.type])) for i in self.pasts
        ]
        self.binding, self.total = self.session.io_binding(), 0
        for past, buffer in zip(self.pasts, self.buffers):
            self.binding.bind_ortvalue_input(past.name, buffer)
            self.binding.bind_ortvalue_output(past.name.replace("past_key_values", "present"), buffer)
        return self._run(prompt)

    def step(self, token: int) -> np.ndarray:
        return self._run([token])

    def _run(self, ids: list[int]) -> np.ndarray:
        self.total += len(ids)
        self.binding.bind_cpu_input(INPUT_IDS, np.asarray([ids], dtype=np.int64))
        self.binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, self.total), dtype=np.int64))
        logits = np.empty((1, len(ids), self.vocab), dtype=np.float32)
        self.binding.bind_output(LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return logits[0, -1]


def genai_run(model, prompt: list[int], tokens: int) -> RunTiming:
    """onnxruntime-genai's greedy loop: the prompt appended, then `tokens` + 1 tokens, each `generate_next_token` timed
    (the first one only picks from the prompt's logits and is left out of the steps)."""
    generator = genai_generator(model, prompt, tokens + 1)
    started = time.perf_counter()
    generator.append_tokens(prompt)
    prefilled = time.perf_counter()
    steps = []
    for _ in range(tokens + 1):
        begin = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - begin)
    made = [int(token) for token in generator.get_sequence(0)[len(prompt) :]]
    return RunTiming(len(prompt), prefilled - started, prefilled - started + steps[0], steps[1:], made)


def piece_overheads(engine: Engine, exit: int, tokens: int) -> dict[str, object]:
    """Median microseconds of each piece's onnxruntime call in a decode step at `exit`, and of the step's time outside
    them (Python, the step plan's writes, choosing the token)."""
    chain = next(entry.chain for entry in engine.manifest.exits if entry.exit == exit)
    calls: dict[str, list[float]] = {name: [] for name in chain}
    originals = {}
    for name in chain:
        session = engine.runners[name].session
        originals[name] = session.run_with_iobinding

        def timed_call(binding, _call=session.run_with_iobinding, _times=calls[name]):
            started = time.perf_counter()
            _call(binding)
            _times.append(time.perf_counter() - started)

        session.run_with_iobinding = timed_call
    try:
        run = greedy_run(EngineDecoder(engine, exit), PROMPT, tokens)
    finally:
        for name, call in originals.items():
            engine.runners[name].session.run_with_iobinding = call
    inside = [sum(times) for times in zip(*(calls[name][-tokens:] for name in chain))]
    return {
        "onnxruntime_us": {name: round(statistics.median(calls[name][-tokens:]) * 1e6, 1) for name in chain},
        "outside_us": round(statistics.median(s - i for s, i in zip(run.step_s, inside)) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--exits", type=int, nargs="+", default=None, help="default: every exit of the export")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    engine = Engine.load(args.export, threads=args.threads, thread_pool="process")
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    names = ["chain", "graph"] + (["genai"] if genai else [])
    for exit in args.exits or engine.exits:
        entry = next((e for e in engine.manifest.exits if e.exit == exit), None)
        if entry is None:
            raise SystemExit(f"exit {exit} is not in {args.export}; exits: {', '.join(map(str, engine.exits))}")
        session = ort.InferenceSession(str(args.export / entry.graph), options, providers=["CPUExecutionProvider"])
        model = genai_model(args.export / genai_folder(entry), args.threads)[0] if genai else None
        ratios: dict[str, list[float]] = {"chain_over_graph": [], "graph_over_genai": []}
        for turn in range(args.rounds):
            order = names if turn % 2 == 0 else names[::-1]
            decoders = {"chain": EngineDecoder(engine, exit), "graph": GraphDecoder(session, engine, args.tokens)}
            runs = {
                name: genai_run(model, PROMPT, args.tokens)
                if name == "genai"
                else greedy_run(decoders[name], PROMPT, args.tokens)
                for name in order
            }
            ms = {name: statistics.median(runs[name].step_s) * 1000 for name in names}
            ratios["chain_over_graph"].append(ms["chain"] / ms["graph"])
            if genai:
                ratios["graph_over_genai"].append(ms["graph"] / ms["genai"])
            same = all(runs[name].tokens == runs["chain"].tokens for name in names)
            row = {
                "exit": exit,
                "round": turn,
                **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
                "same_tokens": same,
            }
            print(json.dumps(row), flush=True)
        overheads = piece_overheads(engine, exit, args.tokens)
        medians = {f"{key}_median": round(statistics.median(values), 3) for key, values in ratios.items() if values}
        print(json.dumps({"exit": exit, **medians, "pieces": overheads}), flush=True)


if __name__ == "__main__":
    main()
