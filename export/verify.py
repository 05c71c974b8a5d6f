"""Checks an export against the torch Balcony model, exit by exit: the runtime's chain of pieces (logits on a
prompt, then greedy tokens with its in-place KV cache against `generate_greedy`), and the exit's standard graph
(logits on the prompt, against the chain's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from balcony_edge.common.console import phase_progress
from balcony_edge.generate import generate_greedy, prompt_ids
from balcony_edge.model import BalconyModel
from balcony_edge.runtime.core.engine import Engine
from balcony_edge.runtime.core.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    KV_DTYPES,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    ExitGraph,
    KVShape,
    Manifest,
)
from balcony_edge.runtime.core.sessions import SessionSettings

PROMPT = (
    "The harbour was quiet in the early morning. Fishing boats rocked against the pier while gulls circled "
    "overhead, and the smell of salt and diesel drifted over the stones. Write a short story about the sea."
)
GREEDY_TOKENS = 32
FP32_TOLERANCE = 1e-3  # max abs logit difference allowed in fp32
GRAPH_TOLERANCE = 1e-2  # the standard graph against the chain in float32: the same weights and ops
# In float16 the two round in different places (onnxruntime fuses across what are piece boundaries in the chain):
# allow so many float16 steps at the largest logit's size.
GRAPH_FP16_STEPS = 8


def graph_tolerance(dtype: str, logits: np.ndarray) -> float:
    """How far the standard graph's logits may be from the chain's, for activations of `dtype`."""
    if dtype == "float32":
        return GRAPH_TOLERANCE
    return GRAPH_FP16_STEPS * float(np.finfo(np.float16).eps) * max(1.0, float(np.abs(logits).max()))


@dataclass
class ExitCheck:
    """One exit's agreement with torch: logits over the prompt and greedy tokens (counts in tokens)."""

    exit: int
    max_abs_diff: float  # the chain's logits against torch's
    top1_agreement: float  # fraction of prompt positions whose argmax matches torch's
    greedy_matched: int  # leading greedy tokens identical to torch's
    greedy_tokens: int
    finite: bool
    graph_max_abs_diff: float  # the standard exit graph's logits against the chain's
    graph_tolerance: float = GRAPH_TOLERANCE  # reports written before this field were checked at GRAPH_TOLERANCE

    def failure(self, exact: bool) -> str | None:
        """Why this check fails (NaN/inf always; in fp32 also a logit difference or a greedy token), else None."""
        if not self.finite:
            return f"exit {self.exit} gives NaN or infinite logits"
        if exact and self.max_abs_diff > FP32_TOLERANCE:
            return (
                f"exit {self.exit} differs from torch by {self.max_abs_diff:.2e} "
                f"in logits (tolerance {FP32_TOLERANCE:g})"
            )
        if not self.graph_max_abs_diff <= self.graph_tolerance:
            return (
                f"the standard graph of exit {self.exit} differs from "
                f"its chain by {self.graph_max_abs_diff:.2e} in logits "
                f"(tolerance {self.graph_tolerance:.2e})"
            )
        if exact and self.greedy_matched < self.greedy_tokens:
            return f"exit {self.exit} greedy tokens leave torch's after {self.greedy_matched} of {self.greedy_tokens}"
        return None


class GraphDecoder:
    """One standard exit graph in onnxruntime (CPU), run on a prompt with an empty KV cache."""

    def __init__(self, path: Path, entry: ExitGraph, kv: KVShape):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers = entry.num_layers
        self.empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=kv.dtype)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] as float32."""
        feeds = {INPUT_IDS: np.array([ids], dtype=np.int64), ATTENTION_MASK: np.ones((1, len(ids)), dtype=np.int64)}
        for i in range(self.num_layers):
            feeds[PAST_KEY.format(slot=i)] = feeds[PAST_VALUE.format(slot=i)] = self.empty
        return self.session.run([LOGITS], feeds)[0][0].astype(np.float32)


def verification_prompt(tokenizer) -> list[int]:
    """The prompt every check runs on, in the model's chat template when it has one (tokens)."""
    return prompt_ids(tokenizer, PROMPT, chat=True)


@torch.no_grad()
def check_exit(
    folder: Path, manifest: Manifest, entry: ExitGraph, engine: Engine, model: BalconyModel, prompt: list[int]
) -> ExitCheck:
    """Compare one exit's chain with the torch model (float32) on the prompt and on greedy decoding, and its standard
    graph with the chain on the prompt."""
    expected = model.exit_model(entry.exit)(input_ids=torch.tensor([prompt])).logits[0].float().numpy()
    sequence = engine.sequence(prompt)
    got = sequence.logits(entry.exit, every_position=True).astype(np.float32)
    finite = bool(np.isfinite(got).all())
    chain_tokens = []
    logits = got[-1]
    for _ in range(GREEDY_TOKENS):
        chain_tokens.append(int(logits.argmax()))
        sequence.append(chain_tokens[-1])
        logits = sequence.logits(entry.exit)
    torch_tokens = generate_greedy(model, entry.exit, prompt, GREEDY_TOKENS)
    matched = next((i for i, (a, b) in enumerate(zip(torch_tokens, chain_tokens)) if a != b), GREEDY_TOKENS)
    graph = GraphDecoder(folder / entry.graph, entry, manifest.kv).prompt_logits(prompt)
    return ExitCheck(
        exit=entry.exit,
        max_abs_diff=float(np.abs(got - expected).max()) if finite else float("nan"),
        top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()),
        greedy_matched=matched,
        greedy_tokens=GREEDY_TOKENS,
        finite=finite,
        graph_max_abs_diff=float(np.abs(graph - got).max()),
        graph_tolerance=graph_tolerance(KV_DTYPES[manifest.dtype], got),
    )


def verify_export(folder: Path, manifest: Manifest, model: BalconyModel, tokenizer) -> dict:
    """Check every exit of an export folder; returns the report's `verification` section."""
    prompt = verification_prompt(tokenizer)
    engine = Engine(folder, manifest, SessionSettings(providers=("CPUExecutionProvider",)), verify=False)
    with phase_progress() as progress:
        task = progress.add_task("verify against torch", total=len(manifest.exits))
        checks = []
        for entry in manifest.exits:
            checks.append(check_exit(folder, manifest, entry, engine, model, prompt))
            progress.advance(task)
    return {
        "prompt_tokens": len(prompt),
        "greedy_tokens": GREEDY_TOKENS,
        "reference": "torch float32",
        "exits": [asdict(check) for check in checks],
    }


def verification_failures(verification: dict, exact: bool) -> list[str]:
    """Failures of a `verification` section (see ExitCheck.failure)."""
    checks = [ExitCheck(**entry) for entry in verification["exits"]]
    return [reason for reason in (check.failure(exact) for check in checks) if reason]
