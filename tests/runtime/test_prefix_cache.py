"""Prompt reuse: a kept sequence cut back to a shared prefix gives the logits of a fresh one at every exit, and the
cache keeps the most recent ones within its slots and bytes."""

import numpy as np
import pytest

from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.prefix_cache import MIN_REUSED_TOKENS, PrefixCache, common_prefix


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


PROMPT = [(7 * i + 3) % 300 + 5 for i in range(40)]


@pytest.mark.parametrize("schedule", [[1, 1, 1], [4, 2, 1], [1, 4, 2]], ids=str)
def test_a_reused_prefix_gives_the_logits_of_a_fresh_sequence_at_every_exit(engine, schedule):
    kept = engine.sequence(PROMPT[:30])
    for step, exit in enumerate(schedule):  # the kept sequence ran at mixed depths, so its slots differ
        kept.logits(exit)
        kept.append(300 + step)
    kept.truncate(25)
    kept.extend(PROMPT[25:])
    for exit in engine.exits:
        fresh = engine.sequence(PROMPT)
        np.testing.assert_allclose(kept.logits(exit), fresh.logits(exit), atol=1e-5)


def test_the_cache_hands_out_the_longest_prefix_and_counts_it(engine):
    cache = PrefixCache(engine.sequence, slots=2)
    first, reused = cache.take(PROMPT)
    assert reused == 0 and len(cache) == 0
    first.extend(PROMPT)
    first.logits(engine.exits[-1])
    cache.put(first)
    other = engine.sequence(PROMPT[: MIN_REUSED_TOKENS - 1])
    cache.put(other)
    again, reused = cache.take(PROMPT + [9, 9])
    assert again is first and reused == len(PROMPT) and again.tokens == PROMPT and len(cache) == 1
    cache.put(again)
    resent, reused = cache.take(PROMPT)  # the same prompt again: all but its last token, fed anew for its logits
    assert resent is first and reused == len(PROMPT) - 1
    cache.put(resent)
    assert (cache.stats.hits, cache.stats.reused_tokens) == (2, 2 * len(PROMPT) - 1)
    short, reused = cache.take(PROMPT[:5] + [1] * 30)  # 5 shared tokens: not worth it
    assert reused == 0 and short is not other


def test_the_least_recently_kept_go_first_within_slots_and_bytes(engine):
    cache = PrefixCache(engine.sequence, slots=2)
    sequences = [engine.sequence([i + 5] * 20) for i in range(3)]
    for sequence in sequences:
        sequence.logits(engine.exits[0])
        cache.put(sequence)
    assert len(cache) == 2 and cache.take([5] * 20)[1] == 0  # the first was dropped
    small = PrefixCache(engine.sequence, slots=4, max_bytes=sequences[1].cache.nbytes)
    small.put(sequences[1])
    small.put(sequences[2])
    assert len(small) == 1 and small.nbytes <= sequences[1].cache.nbytes
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
