"""Checks an export against the torch Balcony model, exit by exit: logits on a prompt, then greedy tokens
decoded by onnxruntime with its KV cache against `generate_greedy`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..generate import generate_greedy, prompt_ids
from ..model import BalconyModel
from ..runtime.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    ExitGraph,
    KVShape,
    Manifest,
)

PROMPT = (
    "The harbour was quiet in the early morning. Fishing boats rocked against the pier while gulls circled "
    "overhead, and the smell of salt and diesel drifted over the stones. Write a short story about the sea."
)
GREEDY_TOKENS = 32
FP32_TOLERANCE = 1e-3  # max abs logit difference allowed in fp32


@dataclass
class ExitCheck:
    """One exit's agreement with torch: logits over the prompt and greedy tokens (counts in tokens)."""

    exit: int
    max_abs_diff: float
    top1_agreement: float  # fraction of prompt positions whose argmax matches torch's
    greedy_matched: int  # leading greedy tokens identical to torch's
    greedy_tokens: int
    finite: bool

    def failure(self, exact: bool) -> str | None:
        """Why this check fails (NaN/inf always; in fp32 also a logit difference or a greedy token), else None."""
        if not self.finite:
            return f"exit {self.exit} gives NaN or infinite logits"
        if exact and self.max_abs_diff > FP32_TOLERANCE:
            return f"exit {self.exit} differs from torch by {self.max_abs_diff:.2e} in logits (tolerance {FP32_TOLERANCE:g})"
        if exact and self.greedy_matched < self.greedy_tokens:
            return f"exit {self.exit} greedy tokens leave torch's after {self.greedy_matched} of {self.greedy_tokens}"
        return None


class GraphDecoder:
    """One exit graph in onnxruntime (CPU) with a growing KV cache: prefill and decode through the same graph."""

    def __init__(self, path: Path, entry: ExitGraph, kv: KVShape):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.num_layers = entry.num_layers
        empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=kv.dtype)
        self.cache = [(empty, empty)] * self.num_layers

    def step(self, ids: list[int]) -> np.ndarray:
        """Run `ids` after the cached tokens; returns their logits [len(ids), vocab] as float32."""
        past = self.cache[0][0].shape[2]
        feeds = {
            INPUT_IDS: np.array([ids], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, past + len(ids)), dtype=np.int64),
            POSITION_IDS: np.arange(past, past + len(ids), dtype=np.int64)[None],
        }
        for i, (key, value) in enumerate(self.cache):
            feeds[PAST_KEY.format(i=i)] = key
            feeds[PAST_VALUE.format(i=i)] = value
        names = [LOGITS] + [name.format(i=i) for i in range(self.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
        logits, *present = self.session.run(names, feeds)
        self.cache = list(zip(present[0::2], present[1::2]))
        return logits[0].astype(np.float32)

    def greedy(self, logits: np.ndarray, max_new_tokens: int) -> list[int]:
        """Greedy tokens after the cached ones, starting from the last step's logits."""
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            tokens.append(int(logits[-1].argmax()))
            logits = self.step(tokens[-1:])
        return tokens


def verification_prompt(tokenizer) -> list[int]:
    """The prompt every check runs on, in the model's chat template when it has one (tokens)."""
    return prompt_ids(tokenizer, PROMPT, chat=True)


@torch.no_grad()
def check_exit(folder: Path, manifest: Manifest, entry: ExitGraph, model: BalconyModel, prompt: list[int]) -> ExitCheck:
    """Compare one exit graph with the torch model (float32) on the prompt and on greedy decoding."""
    expected = model.exit_model(entry.exit)(input_ids=torch.tensor([prompt])).logits[0].float().numpy()
    decoder = GraphDecoder(folder / entry.graph, entry, manifest.kv)
    got = decoder.step(prompt)
    finite = bool(np.isfinite(got).all())
    onnx_tokens = decoder.greedy(got, GREEDY_TOKENS)
    torch_tokens = generate_greedy(model, entry.exit, prompt, GREEDY_TOKENS)
    matched = next((i for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens)) if a != b), GREEDY_TOKENS)
    return ExitCheck(
        exit=entry.exit,
        max_abs_diff=float(np.abs(got - expected).max()) if finite else float("nan"),
        top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()),
        greedy_matched=matched,
        greedy_tokens=GREEDY_TOKENS,
        finite=finite,
    )


def verify_export(folder: Path, manifest: Manifest, model: BalconyModel, tokenizer) -> dict:
    """Check every exit graph of an export folder; returns the report's `verification` section."""
    prompt = verification_prompt(tokenizer)
    checks = [check_exit(folder, manifest, entry, model, prompt) for entry in manifest.exits]
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
