"""Batched decoding: sequences in one KV store's rows, each at its own exit, give the logits and tokens they give
alone, whatever the other rows do (shallower exits, catch-ups run alone between batched steps, empty rows)."""

import numpy as np
import pytest

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine

PROMPTS = [[5, 9, 14, 3, 27], [8, 11, 2, 40, 41, 42, 43], [17, 3], [60, 61, 62, 63]]


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


def alone(engine, prompt, schedule):
    """Greedy tokens and logits of one sequence on its own, exit by exit."""
    sequence, tokens, rows = engine.sequence(prompt), [], []
    for exit in schedule:
        logits = sequence.logits(exit)
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        sequence.append(tokens[-1])
    return tokens, rows


@pytest.mark.parametrize(
    "schedules",
    [
        [[1] * 6, [2] * 6, [4] * 6],  # each row at its own fixed exit
        [[1, 1, 4, 4, 4, 2, 2], [4, 4, 4, 2, 2, 2, 1], [2, 2, 1, 1, 4, 4, 4]],  # changing: catch-ups run alone
    ],
    ids=["fixed", "switching"],
)
def test_each_row_gets_what_it_gets_alone(engine, schedules):
    batch = engine.batch_decoder(4)  # one row stays empty
    sequences = [engine.sequence(prompt) for prompt in PROMPTS[:3]]
    for sequence in sequences:
        batch.admit(sequence)
    made = [[] for _ in sequences]
    batched_steps = 0
    for step in range(len(schedules[0])):
        ready = [(s, sch[step]) for s, sch in zip(sequences, schedules) if s.ready_for_batch(sch[step])]
        logits = dict(zip((id(s) for s, _ in ready), batch.step(ready))) if len(ready) > 1 else {}
        batched_steps += len(ready) > 1
        for index, (sequence, schedule) in enumerate(zip(sequences, schedules)):
            row = logits.get(id(sequence))
            row = row if row is not None else sequence.logits(schedule[step])
            made[index].append((int(np.argmax(row)), row))
            sequence.append(made[index][-1][0])
    assert batched_steps >= 2
    for index, (prompt, schedule) in enumerate(zip(PROMPTS, schedules)):
        tokens, rows = alone(engine, prompt, schedule)
        assert [t for t, _ in made[index]] == tokens
        np.testing.assert_allclose(np.array([r for _, r in made[index]]), np.array(rows), atol=1e-4)


def test_a_released_sequence_keeps_its_cache_and_a_full_batch_is_refused(engine):
    batch = engine.batch_decoder(2)
    first, second, third = (engine.sequence(p) for p in PROMPTS[:3])
    batch.admit(first)
    batch.admit(second)
    with pytest.raises(BalconyError, match="all 2 rows of the batch are taken"):
        batch.admit(third)
    expected = first.logits(2)
    batch.release(first)
    np.testing.assert_allclose(first.logits(2), expected)
    first.append(7)
    np.testing.assert_allclose(first.logits(4), engine.sequence(PROMPTS[0] + [7]).logits(4), atol=1e-5)
    with pytest.raises(BalconyError, match="one new position"):
        batch.step([(third, 1)])
