"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p, and repetition, presence and frequency
penalties, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_finite_number, is_whole_number

# Beyond these the arithmetic overflows (1e308) and the choice is the same as at the bound anyway.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_ADDITIVE_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range is -2 to 2


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen; temperature 0 is greedy (the penalties still apply before the choice).

    Applied in this order: repetition penalty (divides the positive logit of a token seen in the prompt or the answer,
    multiplies a negative one), presence and frequency penalties (subtract from the logit of a token the answer holds,
    once and once per occurrence, as OpenAI and vLLM do), temperature, top-k, top-p (the smallest set reaching the
    mass), min-p (drops tokens below min_p x the top probability)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0  # 0: no limit
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise BalconyError(f"{name.replace('_', '-')} {value!r} is not a finite number; give one such as 0.7")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and not (is_whole_number(value) and value >= 0):
                raise BalconyError(f"{name.replace('_', '-')} {value!r} must be a whole number, 0 or more")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise BalconyError(
                f"temperature {self.temperature} is outside 0 to {MAX_TEMPERATURE:g}; use 0 for greedy or e.g. 0.7"
            )
        if not 0 < self.top_p <= 1:
            raise BalconyError(f"top-p {self.top_p} is outside (0, 1]; use 1 for no limit")
        if not 0 <= self.min_p < 1:
            raise BalconyError(f"min-p {self.min_p} is outside [0, 1); use 0 for no limit or e.g. 0.05")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise BalconyError(
                f"repetition penalty {self.repetition_penalty} is outside (0, {MAX_REPETITION_PENALTY:g}]; "
                "1 means none, 1.1 is usual"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if abs(getattr(self, name)) > MAX_ADDITIVE_PENALTY:
                raise BalconyError(
                    f"{name.replace('_', ' ')} {getattr(self, name)} is outside -{MAX_ADDITIVE_PENALTY:g} to "
                    f"{MAX_ADDITIVE_PENALTY:g}; 0 means none"
                )

    @classmethod
    def of(cls, settings: dict, **overrides: Any) -> SamplingConfig:
        """A config from recommended settings (a manifest's `generation.sampling`), with the caller's overrides on top
        (None: not set)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise BalconyError(f"sampling setting {unknown[0]!r} is unknown; known: {', '.join(sorted(names))}")
        # counts read back from JSON as floats (a manifest's dict[str, float]) are counts again
        whole = {
            k: int(v) for k, v in settings.items() if k in ("top_k", "seed") and isinstance(v, float) and v.is_integer()
        }
        return replace(cls(**(settings | whole)), **{k: v for k, v in overrides.items() if v is not None})


class Sampler:
    """Chooses token ids from logits [vocab]; one per sequence, so its random stream is reproducible."""

    def __init__(self, config: SamplingConfig = SamplingConfig()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def scores(self, logits: np.ndarray, previous: Sequence[int] = (), answer_start: int = 0) -> np.ndarray:
        """The logits after the penalties (float64): what the temperature then divides. `previous` holds the prompt,
        then from `answer_start` on the answer so far."""
        c = self.config
        scores = logits.astype(np.float64, copy=True)
        if len(previous) and c.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(previous))
            scores[seen] = np.where(
                scores[seen] > 0, scores[seen] / c.repetition_penalty, scores[seen] * c.repetition_penalty
            )
        answer = previous[answer_start:]
        if len(answer) and (c.presence_penalty or c.frequency_penalty):
            seen, counts = np.unique(np.asarray(answer), return_counts=True)
            scores[seen] -= c.presence_penalty + c.frequency_penalty * counts
        return scores

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = (), answer_start: int = 0) -> int:
        c = self.config
        scores = self.scores(logits, previous, answer_start)
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
        if c.min_p > 0:
            probs = np.where(probs >= c.min_p * probs.max(), probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
