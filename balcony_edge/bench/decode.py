"""Greedy decoding timed phase by phase (prefill, first token, each decode step), through the engine or a bare
onnxruntime loop; medians over repeats after a warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from balcony_edge.bench.peers import one_run
from balcony_edge.runtime.core.manifest import ATTENTION_MASK, INPUT_IDS
from balcony_edge.runtime.core.piece_runner import NUMPY_TYPES

if TYPE_CHECKING:
    from balcony_edge.runtime.core.engine import Engine
    from balcony_edge.runtime.core.sequence import Sequence


@dataclass
class RunTiming:
    """One greedy run: prompt prefill, first token, then one time per decode step (s), and the tokens made."""

    prompt_tokens: int
    prefill_s: float  # the prompt through the model, up to its last logits
    first_token_s: float  # prefill plus choosing the first token
    step_s: list[float]  # each decode step: feed the previous token, get the next
    tokens: list[int]

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / sum(self.step_s)


@dataclass
class DecodeStats:
    """Medians over repeated runs: decode and prefill speed (tokens/s), time to first token (ms), step (ms)."""

    decode_tok_s: float
    prefill_tok_s: float
    ttft_ms: float
    step_ms: float  # median decode step over every step of every run
    tokens: list[int]  # tokens of the first measured run (all runs are greedy, so all equal)

    def to_json(self) -> dict:
        return {
            "decode_tok_s": round(self.decode_tok_s, 2),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "ttft_ms": round(self.ttft_ms, 2),
            "step_ms": round(self.step_ms, 3),
        }


def summarize(runs: list[RunTiming]) -> DecodeStats:
    """Medians of several runs of the same decoder."""
    return DecodeStats(
        decode_tok_s=statistics.median(run.decode_tok_s for run in runs),
        prefill_tok_s=statistics.median(run.prompt_tokens / run.prefill_s for run in runs),
        ttft_ms=statistics.median(run.first_token_s for run in runs) * 1000,
        step_ms=statistics.median(s for run in runs for s in run.step_s) * 1000,
        tokens=runs[0].tokens,
    )


class EngineDecoder:
    """The runtime's own decode path at one fixed exit, as `Engine.generate` drives it: the prompt with room made for
    `new_tokens` (`Sequence.make_room`), then `Sequence.append` + `Sequence.logits(exit)`."""

    def __init__(self, engine: Engine, exit: int, new_tokens: int = 0):
        self.engine, self.exit, self.new_tokens = engine, exit, new_tokens
        self.sequence: Sequence | None = None

    def prefill(self, prompt: list[int]) -> np.ndarray:
        self.sequence = self.engine.sequence(prompt)
        self.sequence.make_room(self.new_tokens)
        return self.sequence.logits(self.exit)

    def step(self, token: int) -> np.ndarray:
        if self.sequence is None:
            raise RuntimeError("EngineDecoder.step() before prefill()")
        self.sequence.append(token)
        return self.sequence.logits(self.exit)


class BareDecoder:
    """A plain onnxruntime loop over one causal-LM graph: past = the previous run's present, nothing else around it.

    The session is onnxruntime's default (a thread pool of its own, spinning; it reads its own external data and
    prepacks weights), with the given threads.
    """

    def __init__(self, graph: Path, threads: int | None, kv_heads: int, head_dim: int, providers=None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(graph), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name not in (INPUT_IDS, ATTENTION_MASK)]
        self.output_names = [o.name for o in self.session.get_outputs()]  # logits, then the presents in past order
        self.layers = len(self.past_names) // 2
        # The cache type is the graph's own: a floor keeps a float cache where the export's may be int8.
        self.empty = np.zeros((1, kv_heads, 0, head_dim), dtype=NUMPY_TYPES[inputs[self.past_names[0]]])
        self.past: list[np.ndarray] = []
        self.length = 0

    def _run(self, token_ids: list[int]) -> np.ndarray:
        count = len(token_ids)
        feed = {
            INPUT_IDS: np.asarray([token_ids], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, self.length + count), dtype=np.int64),
        }
        feed.update(zip(self.past_names, self.past))
        outputs = self.session.run(self.output_names, feed)
        self.past, self.length = outputs[1:], self.length + count
        return outputs[0][0, -1]  # logits come first

    def prefill(self, prompt: list[int]) -> np.ndarray:
        self.past, self.length = [self.empty] * (2 * self.layers), 0
        return self._run(list(prompt))

    def step(self, token: int) -> np.ndarray:
        return self._run([token])


def greedy_run(decoder, prompt: list[int], new_tokens: int) -> RunTiming:
    """Prefill the prompt, then `new_tokens` greedy decode steps, each timed (s)."""
    started = time.perf_counter()
    logits = decoder.prefill(prompt)
    prefilled = time.perf_counter()
    token = int(np.argmax(logits))
    first = time.perf_counter()
    tokens, steps = [token], []
    for _ in range(new_tokens):
        begin = time.perf_counter()
        token = int(np.argmax(decoder.step(token)))
        steps.append(time.perf_counter() - begin)
        tokens.append(token)
    return RunTiming(len(prompt), prefilled - started, first - started, steps, tokens)


def measure(decoder, prompt: list[int], new_tokens: int, repeats: int, warmup_tokens: int = 8) -> DecodeStats:
    """Medians of `repeats` greedy runs after one short warm-up run."""
    greedy_run(decoder, prompt, min(warmup_tokens, new_tokens))
    return summarize([greedy_run(decoder, prompt, new_tokens) for _ in range(repeats)])


CONTEXTS = (64, 2000)  # tokens of context before the timed decode steps


def context_step_ratio(engine, exit: int, contexts=CONTEXTS, repeats: int = 3, steps: int = 16) -> dict[str, float]:
    """Median decode step at `exit` after each context length, over the step after the first (1.0: a step costs the
    same however long the conversation); contexts the model cannot hold are left out."""
    medians = {}
    vocab, limit = engine.manifest.vocab_size, engine.manifest.generation.context_length
    for context in (c for c in contexts if c + steps <= limit):
        prompt = [(11 + 7 * i) % (vocab - 10) + 10 for i in range(context)]
        times = []
        for _ in range(repeats):
            sequence = engine.sequence(prompt)
            token = int(np.argmax(sequence.logits(exit)))
            for _ in range(steps):
                sequence.append(token)
                started = time.perf_counter()
                token = int(np.argmax(sequence.logits(exit)))
                times.append(time.perf_counter() - started)
        medians[context] = statistics.median(times)
    first = medians[contexts[0]]
    return {str(context): round(value / first, 3) for context, value in medians.items()}


def alternate(decoder, peer_timed, prompt: list[int], new_tokens: int, rounds: int) -> dict:
    """The engine's decoder and a peer (`peer_timed(count)` -> seconds for the prompt and `count` greedy tokens) timed
    in turn for `rounds` rounds, the order swapped every round, so that the machine's drift falls on both: the peer's
    median decode tok/s and first token (ms), the engine's median, and the median of the rounds' ratios."""
    greedy_run(decoder, prompt, 8)
    peer_timed(8)
    engine, peer, firsts, ratios = [], [], [], []

    def run_engine() -> None:
        engine.append(greedy_run(decoder, prompt, new_tokens).decode_tok_s)

    def run_peer() -> None:
        first, tok_s = one_run(peer_timed, new_tokens)
        firsts.append(first)
        peer.append(tok_s)

    for round_ in range(rounds):
        for run in (run_engine, run_peer) if round_ % 2 == 0 else (run_peer, run_engine):
            run()
        ratios.append(engine[-1] / peer[-1])
    return {
        "decode_tok_s": round(statistics.median(peer), 2),
        "ttft_ms": round(statistics.median(firsts) * 1000, 2),
        "engine_tok_s": round(statistics.median(engine), 2),
        "engine_vs_peer": round(statistics.median(ratios), 3),
        "rounds": rounds,
    }
