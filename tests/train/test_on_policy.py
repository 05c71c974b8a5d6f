"""On-policy distillation: each exit's own answers, the full model's scores on them, and the divergences."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config
from safetensors.torch import load_file

from balcony_edge.checkpoint import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE
from balcony_edge.common.errors import BalconyError, CheckpointError
from balcony_edge.distill import DIVERGENCES, distill_backward
from balcony_edge.held_out_prompts import HELD_OUT_PROMPTS
from balcony_edge.prompts import chat_prompts
from balcony_edge.train import Trainer, train


def _config(peaked_base_dir, text_dir, out, **overrides):
    on_policy = dict(
        batch_size=2,
        micro_batch_size=2,
        lr=1e-2,
        max_tokens=2 * 32 * 12,
        on_policy=3,
        answer_tokens=12,
        balcony_init="random",
    )
    return tiny_train_config(peaked_base_dir, text_dir, out, **(on_policy | overrides))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_divergence_falls_on_the_exits_own_answers(peaked_base_dir, text_dir, tmp_path, divergence):
    summary = train(_config(peaked_base_dir, text_dir, tmp_path / "run", divergence=divergence))
    history = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["kl_history"]
    losses = [sum(entry["on_policy"].values()) for entry in history]
    assert len(losses) == 12 and all(math.isfinite(x) and x >= 0 for x in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    record = summary["on_policy"]
    assert (
        record["divergence"] == divergence and record["answer_tokens"] == sum(e["answer_tokens"] for e in history) > 0
    )
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["training"]["on_policy"] == record


def test_on_policy_resume_writes_the_same_answers_and_weights_as_one_run(
    peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    train(_config(peaked_base_dir, text_dir, tmp_path / "whole", max_tokens=2 * 32 * 8))
    real_step = Trainer.train_step

    def crash_at_step_six(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        train(_config(peaked_base_dir, text_dir, tmp_path / "split", max_tokens=2 * 32 * 8))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(_config(peaked_base_dir, text_dir, tmp_path / "split", max_tokens=2 * 32 * 8), resume=True)
    a, b = load_file(tmp_path / "whole" / WEIGHTS_FILE), load_file(tmp_path / "split" / WEIGHTS_FILE)
    assert all(torch.equal(a[name], b[name]) for name in a)
    states = [torch.load(tmp_path / run / STATE_FILE, weights_only=True) for run in ("whole", "split")]
    assert (
        states[0]["kl_history"] == states[1]["kl_history"]
        and states[0]["on_policy_tokens"] == states[1]["on_policy_tokens"]
    )


def test_on_policy_prompts_follow_from_step_and_exit_and_differ_between_them(peaked_base_dir, text_dir, tmp_path):
    trainer = Trainer(_config(peaked_base_dir, text_dir, tmp_path / "run"))
    source = trainer.on_policy
    assert source.prompts_of(4, 1) == source.prompts_of(4, 1)
    drawn = [tuple(p) for step in range(3) for exit_index in range(2) for p in source.prompts_of(step, exit_index)]
    assert len(set(drawn)) == len(drawn) == 18


def test_on_policy_settings_are_checked_and_saved_for_resume(peaked_base_dir, text_dir, tmp_path):
    with pytest.raises(BalconyError, match="--divergence 'kl' is unknown; choose one of forward, reverse, jsd"):
        _config(peaked_base_dir, text_dir, tmp_path / "run", divergence="kl")
    with pytest.raises(BalconyError, match="--answer-temperature must be a positive finite number, not 0"):
        _config(peaked_base_dir, text_dir, tmp_path / "run", answer_temperature=0)
    with pytest.raises(BalconyError, match="--on-policy must be an integer from 0 to 256, not 257"):
        _config(peaked_base_dir, text_dir, tmp_path / "run", on_policy=257)
    with pytest.raises(BalconyError, match="--answer-tokens must be an integer from 1 to 4096, not 10000000000"):
        _config(peaked_base_dir, text_dir, tmp_path / "run", answer_tokens=10**10)
    train(_config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=2 * 32 * 2))
    with pytest.raises(CheckpointError, match="divergence='forward', not 'jsd'"):
        Trainer(
            _config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=2 * 32 * 2, divergence="jsd"), resume=True
        )


def test_a_base_without_a_chat_template_trains_on_plain_prompts_and_says_so(
    peaked_base_dir, text_dir, tmp_path, caplog
):
    base = tmp_path / "plain-base"
    shutil.copytree(peaked_base_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    trainer = Trainer(_config(base, text_dir, tmp_path / "run"))
    assert "no chat template: on-policy prompts are plain text" in caplog.text
    tokenizer = trainer.base.tokenizer
    assert not tokenizer.chat_template
    system, prompt = chat_prompts(1_000_000, seed=trainer.config.seed, questions=True)[0]
    expected = tokenizer.encode(f"{system}\n\n{prompt}" if system else prompt)
    assert trainer.on_policy.prompts_of(0, 0)[0] == expected  # the first pair of the pool, as plain text
    trainer.train_step(0)  # writes plain-text answers and trains on them


def test_training_prompts_never_include_a_held_out_prompt():
    pool = {p for _, p in chat_prompts(1_000_000, questions=True)}
    assert len(pool) > 6000 and not pool & set(HELD_OUT_PROMPTS)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_each_divergence_and_its_gradient_match_the_direct_formula(divergence):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    teacher = torch.randn(7, 8)
    student = torch.randn(7, 8, requires_grad=True)
    chunked = student.detach().clone().requires_grad_()
    value = distill_backward(head, teacher, {1: chunked * 1.0}, chunk_tokens=3, divergence=divergence)[1]
    p_log, q_log = F.log_softmax(head(teacher), -1).detach(), F.log_softmax(head(student), -1)
    p, q = p_log.exp(), q_log.exp()
    m_log = torch.log((p + q) / 2)
    direct = {
        "forward": (p * (p_log - q_log)).sum(-1),
        "reverse": (q * (q_log - p_log)).sum(-1),
        "jsd": 0.5 * (p * (p_log - m_log)).sum(-1) + 0.5 * (q * (q_log - m_log)).sum(-1),
    }[divergence].mean()
    direct.backward()
    assert value == pytest.approx(direct.item(), rel=1e-5)
    torch.testing.assert_close(chunked.grad, student.grad, rtol=1e-4, atol=1e-6)
