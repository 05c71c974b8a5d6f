"""Sampling: greedy, temperature, top-k, top-p, repetition penalty and seeds."""

import numpy as np
import pytest

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime.core.sampling import Sampler, SamplingConfig

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], dtype=np.float32)


def test_greedy_takes_the_largest_logit():
    assert Sampler()(LOGITS) == 1


def test_top_k_of_one_is_greedy_at_any_temperature():
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=1, seed=3))
    assert {sampler(LOGITS) for _ in range(50)} == {1}


def test_top_p_keeps_only_the_smallest_set_reaching_the_mass():
    probs = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    assert probs[1] > 0.5
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=0.5, seed=0))
    assert {sampler(LOGITS) for _ in range(50)} == {1}
    wider = Sampler(SamplingConfig(temperature=1.0, top_p=0.9, seed=0))
    assert {wider(LOGITS) for _ in range(300)} == {0, 1, 2}


def test_sampling_follows_the_softmax_and_a_seed_repeats_it():
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    counts = np.bincount([sampler(LOGITS) for _ in range(4000)], minlength=5) / 4000
    expected = np.exp(LOGITS) / np.exp(LOGITS).sum()
    np.testing.assert_allclose(counts, expected, atol=0.03)
    first, second = Sampler(SamplingConfig(temperature=1.0, seed=9)), Sampler(SamplingConfig(temperature=1.0, seed=9))
    assert [first(LOGITS) for _ in range(20)] == [second(LOGITS) for _ in range(20)]


def test_repetition_penalty_discourages_seen_tokens():
    assert Sampler(SamplingConfig(repetition_penalty=2.0))(LOGITS, previous=[1]) == 2
    assert Sampler(SamplingConfig(repetition_penalty=1.0))(LOGITS, previous=[1]) == 1


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0)]
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(BalconyError):
        SamplingConfig(**bad)
