"""The shipped checkpoint and its default export, end to end: quality, exact switching, torch-equal greedy text."""

import numpy as np
import pytest

from balcony_edge.runtime import Engine, SamplingConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(default_export):
    return Engine.load(default_export, providers=["cpu"])


@pytest.fixture(scope="module")
def shipped():
    from balcony_edge.checkpoint import load_checkpoint

    return load_checkpoint()


def test_shipped_balconies_beat_the_naive_early_exit(shipped):
    from balcony_edge.data import load_corpus, pack
    from balcony_edge.evaluate import evaluate

    model, info, base = shipped
    assert info.config.exits == (8, 16, 24) and info.training["tokens_seen"] > 0
    blocks = pack(load_corpus(None).held_out, base.tokenizer, 256)[:2]
    result = evaluate(model, blocks, show_progress=False)
    ppl = [e.ppl for e in result.exits]
    assert ppl == sorted(ppl, reverse=True) and ppl[-1] > result.full_ppl
    for e in result.exits:
        assert e.ppl < e.naive_ppl and e.top1_agreement > e.naive_top1_agreement


def test_switching_exits_on_the_default_export_gives_static_exit_logits(engine):
    prompt = engine.prompt_ids("Write two sentences about a lighthouse.")
    rng = np.random.default_rng(1)
    continuation = rng.integers(100, 20000, size=10).tolist()
    schedule = [8, 24, 24, 16, 30, 8, 8, 8, 30, 16, 24]
    switched = engine.sequence(prompt)
    static = {exit: engine.sequence(prompt) for exit in engine.exits}
    for position, exit in enumerate(schedule):
        expected = static[exit].logits(exit)
        np.testing.assert_allclose(switched.logits(exit), expected, rtol=0, atol=1e-4)
        if position < len(continuation):
            switched.append(continuation[position])
            for sequence in static.values():
                sequence.append(continuation[position])


@pytest.mark.parametrize("exit", [16, 30])
def test_constant_budget_text_equals_the_torch_reference(engine, shipped, exit):
    from balcony_edge.generate import generate_greedy

    model = shipped[0]
    prompt = engine.prompt_ids("What is the capital of France?")
    greedy = SamplingConfig()  # the export's own default samples (SmolLM2's authors' temperature 0.2)
    tokens = [t.id for t in engine.generate(prompt, max_new_tokens=24, budget=str(exit), sampling=greedy)]
    assert tokens == generate_greedy(model, exit, prompt, 24, set(engine.manifest.generation.eos_token_ids))


def test_the_default_export_carries_smollm2s_recommended_sampling(engine):
    generation = engine.manifest.generation
    assert generation.sampling == {"temperature": 0.2, "top_p": 0.9} and "model card" in generation.sampling_source
    assert engine.default_sampling == SamplingConfig(temperature=0.2, top_p=0.9)
