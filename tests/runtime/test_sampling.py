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


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    sampler = Sampler(SamplingConfig(temperature=1.0, min_p=0.3, seed=0))
    assert {sampler(LOGITS) for _ in range(200)} == {1, 2}  # p(2) / p(1) = e^-1 = 0.37; p(0) / p(1) = 0.14
    strict = Sampler(SamplingConfig(temperature=1.0, min_p=0.5, seed=0))
    assert {strict(LOGITS) for _ in range(200)} == {1}


def test_presence_and_frequency_penalties_subtract_once_and_per_occurrence():
    sampler = Sampler(SamplingConfig(presence_penalty=1.5))
    assert sampler(LOGITS, previous=[1]) == 2  # 3 - 1.5 < 2
    assert Sampler(SamplingConfig(presence_penalty=0.5))(LOGITS, previous=[1, 1, 1]) == 1  # once, however often
    assert Sampler(SamplingConfig(frequency_penalty=0.5))(LOGITS, previous=[1, 1, 1]) == 2  # 3 - 3 x 0.5 < 2
    scores = Sampler(SamplingConfig(presence_penalty=0.25, frequency_penalty=0.5)).scores(LOGITS, [1, 1, 4])
    np.testing.assert_allclose(scores - LOGITS, [0, -1.25, 0, 0, -0.75])


def test_recommended_settings_fill_what_the_caller_leaves_unset():
    recommended = {"temperature": 0.2, "top_p": 0.9}
    assert SamplingConfig.of(recommended) == SamplingConfig(temperature=0.2, top_p=0.9)
    assert SamplingConfig.of(recommended, temperature=0.0, top_k=None) == SamplingConfig(temperature=0.0, top_p=0.9)
    with pytest.raises(BalconyError, match="sampling setting 'typical_p' is unknown"):
        SamplingConfig.of({"typical_p": 0.5})


def test_presence_and_frequency_count_the_answer_only_and_repetition_the_prompt_too():
    sampler = Sampler(SamplingConfig(presence_penalty=1.0, frequency_penalty=1.0, repetition_penalty=2.0))
    scores = sampler.scores(LOGITS, previous=[1, 1, 2], answer_start=2)  # the prompt [1, 1], the answer [2]
    np.testing.assert_allclose(scores, [1.0, 1.5, 1.0 - 2.0, 0.5, -1.0])
