"""Next-token choice from logits: greedy, temperature, top-k, top-p and repetition penalty, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_finite_number, is_whole_number

# Beyond these the arithmetic overflows (1e308) and the choice is the same as at the bound anyway.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise BalconyError(f"{name.replace('_', '-')} {value!r} is not a finite number; give one such as 0.7")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and not (is_whole_number(value) and value >= 0):
                raise BalconyError(f"{name.replace('_', '-')} {value!r} must be a whole number, 0 or more")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise BalconyError(
                f"temperature {self.temperature} is outside 0 to "
                f"{MAX_TEMPERATURE:g}; use 0 for greedy or a value such as 0.7"
            )
        if not 0 < self.top_p <= 1:
            raise BalconyError(f"top-p {self.top_p} is outside (0, 1]; use 1 for no limit")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise BalconyError(
                f"repetition penalty {self.repetition_penalty} is outside "
                f"(0, {MAX_REPETITION_PENALTY:g}]; 1 means none, 1.1 is usual"
            )


class Sampler:
    """Chooses token ids from logits [vocab]; one per sequence, so its random stream is reproducible."""

    def __init__(self, config: SamplingConfig = SamplingConfig()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        c = self.config
        scores = logits.astype(np.float64, copy=True)
        if c.repetition_penalty != 1.0 and len(previous):
            seen = np.unique(np.asarray(previous))
            scores[seen] = np.where(
                scores[seen] > 0, scores[seen] / c.repetition_penalty, scores[seen] * c.repetition_penalty
            )
        if c.temperature == 0:
            return int(np.argmax(scores))
        scores /= c.temperature
        if 0 < c.top_k < scores.size:
            cutoff = np.partition(scores, -c.top_k)[-c.top_k]
            scores[scores < cutoff] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < c.top_p  # smallest set whose mass reaches top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
