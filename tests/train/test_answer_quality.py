"""The held-out answer measure: loops, facts, and the full model's judgement of every depth's answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from balcony_edge.answer_quality import (
    AnswerSettings,
    AnswerWriter,
    ExportWriter,
    answer_nll,
    answer_quality,
    in_loop,
    names_fact,
)
from balcony_edge.generate import generate_greedy, prompt_ids
from balcony_edge.held_out_prompts import FACTS, HELD_OUT_PROMPTS


def test_a_block_written_three_times_back_to_back_over_sixteen_tokens_is_a_loop():
    assert in_loop([5, 6, 7] + [8] * 16)
    assert not in_loop([5, 6, 7] + [8] * 15)  # too short a run: a number, an echo
    assert in_loop([1, 2, 3] + [9, 4] * 8)
    assert not in_loop([1, 2, 3] + [9, 4] * 7)
    assert in_loop([1, 2] + [20, 21, 22, 23, 24, 25, 26, 27, 28, 29] * 3)  # a long block three times is enough
    assert not in_loop([20, 21, 22, 23, 24, 25, 26, 27, 28, 29] * 2 + [1])  # twice is not a loop
    assert not in_loop(list(range(40)))
    words = {1: "Ireland", 2: ",", 3: "-", 4: "\n", 5: "0", 6: "1", 7: "3", 8: "."}
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    assert in_loop([1, 2] * 8, decode)
    assert not in_loop([3] * 20 + [4] * 20, decode)  # a rule of dashes and blank lines hold no word
    assert not in_loop([6, 2, 5, 5, 5, 2, 5, 5, 5, 2, 5, 5, 5, 8], decode)  # 1,000,000,000. (one token a digit)
    assert not in_loop([7, 7, 7, 8], decode)  # 333.


def test_a_fact_is_named_as_a_whole_word_in_any_case():
    assert names_fact("The capital of France is Paris.", "Paris")
    assert names_fact("paris, of course", "Paris")
    assert not names_fact("Parisian food is good", "Paris")
    assert names_fact("It is 144.", "144") and not names_fact("It is 1440.", "144")


def test_held_out_prompts_are_at_least_a_hundred_distinct_ones_with_the_facts_first():
    assert len(HELD_OUT_PROMPTS) >= 100 and len(set(HELD_OUT_PROMPTS)) == len(HELD_OUT_PROMPTS)
    assert HELD_OUT_PROMPTS[: len(FACTS)] == tuple(p for p, _ in FACTS)


def test_batched_greedy_answers_equal_one_at_a_time_generation(tiny_model, tiny_base):
    writer = AnswerWriter(tiny_model, tiny_base.tokenizer)
    prompts = [prompt_ids(tiny_base.tokenizer, p, chat=True) for p in HELD_OUT_PROMPTS[:3]]
    for depth in (1, 4):
        batched = writer.write(depth, prompts, 6)
        alone = [generate_greedy(tiny_model, depth, p, 6, set(writer.stop)) for p in prompts]
        assert batched == alone


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.8, "top_p": 0.9}], ids=["greedy", "sampled"])
def test_an_exports_answers_written_in_a_batch_equal_those_written_one_at_a_time(tiny_export, tiny_base, sampling):
    from balcony_edge.runtime import Engine, SamplingConfig

    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    prompts = [prompt_ids(tiny_base.tokenizer, p, chat=True) for p in HELD_OUT_PROMPTS[:7]]
    for depth in (1, 4):  # 7 prompts in 3 rows: later prompts take the rows that earlier answers freed
        batched = ExportWriter(engine, rows=3).write(depth, prompts, 12, sampling, seed=5)
        for i, (prompt, answer) in enumerate(zip(prompts, batched)):
            config = SamplingConfig(**(sampling or {}), seed=5 * 1_000_003 + i)
            alone = [t.id for t in engine.generate(prompt, 12, budget=str(depth), sampling=config)]
            assert answer == alone
        assert ExportWriter(engine, rows=1).write(depth, prompts, 12, sampling, seed=5) == batched


def test_answer_nll_is_the_sum_of_the_answer_tokens_log_probabilities(tiny_model, tiny_base):
    prompt, answer = [3, 4, 5], [6, 7]
    sums = answer_nll(tiny_model, [prompt, [9]], [answer, [10, 11, 12]], [1, 4])
    with torch.no_grad():
        logits = tiny_model.all_logits(torch.tensor([prompt + answer]))
    for depth in (1, 4):
        log_probs = F.log_softmax(logits[depth][0].float(), -1)
        assert sums[depth][0] == pytest.approx(-(log_probs[2, 6] + log_probs[3, 7]).item(), rel=1e-5)
        assert len(sums[depth]) == 2


def test_answer_quality_scores_every_depth_and_the_full_model_judges_itself(tiny_model, tiny_base):
    result = answer_quality(
        tiny_model,
        tiny_base.tokenizer,
        AnswerSettings(max_new_tokens=5, sampling={"temperature": 0.7, "top_p": 0.9}, seeds=1, batch_size=50),
        show_progress=False,
    )
    depths = result.by_depth()
    assert sorted(depths) == [1, 2, 4] and result.prompts == len(HELD_OUT_PROMPTS) == len(result.answers)
    full = depths[4]
    assert full.judge_nll == pytest.approx(full.reverse_nll) and full.relative_compute == 1.0
    for d in depths.values():
        assert (
            math.isfinite(d.judge_nll) and 0 <= d.loop_share <= 1 and 0 < d.mean_length <= 5 and 0 <= d.facts_right <= 1
        )
        assert d.sampled_judge_nll is not None and math.isfinite(d.sampled_judge_nll)
    again = answer_quality(
        tiny_model,
        tiny_base.tokenizer,
        AnswerSettings(max_new_tokens=5, sampling={"temperature": 0.7, "top_p": 0.9}, seeds=1, batch_size=50),
        show_progress=False,
    )
    assert again.to_json() == result.to_json()
