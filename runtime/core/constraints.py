"""Structured output: an answer that is always valid JSON (matching a JSON schema when one is given), by constrained
decoding with llguidance.

Before each token the matcher says which tokens keep the answer a prefix of the grammar; the others get -inf logits,
so greedy and sampled choices alike stay inside it, and once the JSON is complete only an end token remains. Chosen
for this (beside xgrammar and outlines-core) because it is torch-free, reads the tokenizers library's own
tokenizer.json, needs no per-schema index and computes a mask in about 11 us a token on SmolLM2's 49,152-token
vocabulary (docs/serving.md, "Structured output"). An optional dependency: the `serve` extra installs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from balcony_edge.common.errors import BalconyError

if TYPE_CHECKING:
    from llguidance import LLMatcher

# Compact JSON: a small model left free to add whitespace can write blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(BalconyError):
    """A schema llguidance cannot compile, or llguidance missing."""


class JsonGrammar:
    """A tokenizer's view for llguidance (built once per export: about a quarter of a second), and matchers for it."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        llguidance = _llguidance()
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)
        self.vocab_size = vocab_size

    def constraint(self, schema: dict | None = None) -> JsonConstraint:
        """A fresh constraint for one answer: any JSON object (schema None) or one that matches `schema`."""
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, defaults=JSON_OPTIONS)
        except ValueError as err:
            raise ConstraintError(
                f"the JSON schema cannot be read ({str(err)[:200]}); give a JSON schema object"
            ) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(
                f"the JSON schema cannot be compiled ({matcher.get_error()[:200]}); simplify it or leave it out"
            )
        constraint = JsonConstraint(matcher, self.vocab_size)
        constraint.allowed()  # a schema no value matches is refused now, not after an empty answer
        return constraint


class JsonConstraint:
    """One answer's grammar state: `mask` before a token is chosen, `advance` after."""

    def __init__(self, matcher: LLMatcher, vocab_size: int):
        self.matcher = matcher
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._bits = np.arange(32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Which token ids the grammar allows next (one bool per id of the vocabulary); a ConstraintError at a dead
        end, where llguidance leaves only the end of the answer although the JSON is incomplete."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self.matcher.is_stopped() and not self.matcher.is_accepting():  # found while computing the mask
            raise ConstraintError(
                "the JSON schema matches no complete value here: only the end of the answer fits, which would leave "
                "the JSON unfinished (as with a $ref that refers only to itself); give a schema that some value matches"
            )
        return ((self._bitmask[:, None] >> self._bits) & 1).astype(bool).reshape(-1)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids now at -inf (a new array)."""
        return np.where(self.allowed()[: logits.shape[-1]], logits, -np.inf)

    @property
    def done(self) -> bool:
        """Whether the JSON is complete (only an end token could follow)."""
        return self.matcher.is_stopped()

    def advance(self, token: int) -> None:
        """Take the chosen token (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} does not fit the JSON grammar ({self.matcher.get_error()[:200]})")


def _llguidance() -> ModuleType:
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(
            "JSON output needs the llguidance package: pip install llguidance (the serve extra has it)"
        ) from None
    return llguidance
