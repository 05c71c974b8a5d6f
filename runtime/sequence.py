"""One conversation's tokens and KV cache, computed at any exit, exactly.

Before exit k runs, every position that one of its cache slots lacks (because earlier tokens ran at
other exits) is recomputed in the same call, like a short prefill; so each token's logits equal those
of exit k run alone on the same prefix.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import BalconyError
from .kv_cache import KVCache
from .manifest import LOGITS, PRESENT_KEY, PRESENT_VALUE, ExitGraph, Manifest, graph_input_names
from .text import PromptError


class ContextFullError(BalconyError):
    """The sequence reached the model's context length."""


class ExitRunner:
    """Feeds one exit's graph from a KV cache and stores its present keys/values back (CPU arrays or device OrtValues)."""

    def __init__(self, session: ort.InferenceSession, entry: ExitGraph, device: str):
        self.session, self.entry, self.device = session, entry, device
        self.input_names = graph_input_names(entry.num_layers)
        self.output_names = [LOGITS] + [n.format(i=i) for i in range(entry.num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]

    def run(self, token_ids: list[int], start: int, cache: KVCache) -> np.ndarray:
        """Compute positions start..start+len(token_ids)-1; returns the last position's logits [vocab]."""
        count = len(token_ids)
        fixed = [
            np.asarray([token_ids], dtype=np.int64),
            np.ones((1, start + count), dtype=np.int64),
            np.arange(start, start + count, dtype=np.int64)[None, :],
        ]
        past = [t for slot in self.entry.cache_slots for t in cache.past(slot, start)]
        if self.device == "cpu":
            outputs = self.session.run(self.output_names, dict(zip(self.input_names, fixed + past)))
            logits = outputs[0][0, -1]
        else:
            outputs = self._run_bound(fixed + past)
            logits = outputs[0].numpy()[0, -1]
        for i, slot in enumerate(self.entry.cache_slots):
            cache.store(slot, outputs[1 + 2 * i], outputs[2 + 2 * i], start + count)
        return logits

    def _run_bound(self, inputs: list) -> list:
        """IO binding on the device: caches stay there; only token ids go up and one logits row comes down."""
        binding = self.session.io_binding()
        for name, value in zip(self.input_names, inputs):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


class Sequence:
    """The tokens of one conversation and their KV cache; `logits(exit)` gives the next-token logits at any exit."""

    def __init__(self, manifest: Manifest, runners: dict[int, ExitRunner], token_ids: list[int] = (), sliding_window: bool = False):
        self.manifest, self.runners = manifest, runners
        self.cache = KVCache(manifest)
        self.tokens: list[int] = []
        self.sliding_window = sliding_window
        self.last_catch_up = 0  # positions recomputed by the last logits() because the exit's slots lacked them
        self._computed = 0  # positions computed by any exit so far
        self._last_logits: dict[int, tuple[int, np.ndarray]] = {}
        self.extend(token_ids)

    @property
    def context_length(self) -> int:
        return self.manifest.generation.context_length

    def append(self, token_id: int) -> None:
        """Feed one token (computed lazily, at the exit of the next `logits` call)."""
        self.extend([token_id])

    def extend(self, token_ids) -> None:
        """Feed tokens, all or none: ids outside the vocabulary, or more than the context holds, change nothing.

        With the sliding window, tokens that do not fit make room instead: the newest half of the context is kept,
        then the new tokens (positions restart at 0, so the cache is rebuilt on the next call)."""
        token_ids = list(token_ids)
        vocab, limit = self.manifest.vocab_size, self.context_length
        for token_id in token_ids:
            if not 0 <= token_id < vocab:
                raise PromptError(f"token id {token_id} is outside the vocabulary (0 to {vocab - 1}); feed ids of this model's tokenizer")
        if len(self.tokens) + len(token_ids) <= limit:
            self.tokens.extend(int(t) for t in token_ids)
            return
        if not self.sliding_window:
            if len(self.tokens) == limit:
                raise ContextFullError(
                    f"the conversation reached the context length of {limit} tokens; "
                    "start a new one (/reset) or enable the sliding window"
                )
            raise ContextFullError(
                f"{len(token_ids)} new tokens do not fit in the context of {limit} tokens ({len(self.tokens)} already used); "
                "shorten the prompt or start a new conversation (/reset)"
            )
        kept = self.tokens[-(limit // 2):] + [int(t) for t in token_ids]
        self.tokens = kept if len(kept) <= limit else kept[-(limit // 2):]
        self.cache = KVCache(self.manifest)
        self._last_logits.clear()
        self._computed = 0

    def logits(self, exit: int) -> np.ndarray:
        """Next-token logits [vocab] after all tokens fed so far, as exit `exit` alone would give them."""
        count = len(self.tokens)
        if count == 0:
            raise BalconyError("the sequence is empty; feed at least one token (a prompt) before asking for logits")
        if exit not in self.runners:
            raise BalconyError(f"exit {exit} is not in this export; exits: {', '.join(map(str, sorted(self.runners)))}")
        last = self._last_logits.get(exit)
        if last is not None and last[0] == count:
            self.last_catch_up = 0
            return last[1]
        runner = self.runners[exit]
        start = min(self.cache.missing_from(runner.entry.cache_slots), count - 1)
        logits = runner.run(self.tokens[start:], start, self.cache)
        # Positions some exit had computed before are a catch-up; never-computed ones (a prompt) are a prefill.
        self.last_catch_up = max(0, min(self._computed, count - 1) - start)
        self._computed = max(self._computed, count)
        self._last_logits[exit] = (count, logits)
        return logits
