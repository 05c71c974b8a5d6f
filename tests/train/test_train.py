"""Training: the loss falls, --resume continues exactly, two gloo ranks equal one process, budgets hold."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import tiny_train_config
from safetensors.torch import load_file, save_file

from balcony_edge.checkpoint import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, load_checkpoint
from balcony_edge.common.errors import BalconyError, CheckpointError, ExitsError
from balcony_edge.train import BlockOrder, TrainConfig, Trainer, lr_factor, train


def _config(peaked_base_dir, text_dir, out, **overrides):
    return tiny_train_config(peaked_base_dir, text_dir, out, **overrides)


def test_loss_decreases_on_a_tiny_model(peaked_base_dir, text_dir, tmp_path):
    config = _config(
        peaked_base_dir, text_dir, tmp_path / "run", max_tokens=4 * 32 * 30, lr=1e-2, balcony_init="random"
    )
    summary = train(config)
    history = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["training"]
    assert summary["steps"] == 30 and history["tokens_seen"] == 30 * 4 * 32
    trainer_state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    kls = [sum(entry["kl"].values()) for entry in trainer_state["kl_history"]]
    assert sum(kls[-5:]) / 5 < 0.7 * sum(kls[:5]) / 5


def test_resume_continues_exactly_like_an_uninterrupted_run(peaked_base_dir, text_dir, tmp_path, monkeypatch):
    whole = train(_config(peaked_base_dir, text_dir, tmp_path / "whole"))
    real_step = Trainer.train_step

    def crash_at_step_six(self, step):
        if step == 5:
            raise KeyboardInterrupt  # killed after the periodic checkpoint of step 4
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        train(_config(peaked_base_dir, text_dir, tmp_path / "split"))
    assert torch.load(tmp_path / "split" / STATE_FILE, weights_only=True)["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(_config(peaked_base_dir, text_dir, tmp_path / "split"), resume=True)
    a = load_file(tmp_path / "whole" / WEIGHTS_FILE)
    b = load_file(tmp_path / "split" / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history_a = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=True)["kl_history"]
    history_b = torch.load(tmp_path / "split" / STATE_FILE, weights_only=True)["kl_history"]
    assert history_a == history_b
    assert whole["steps"] == 8


def test_resume_refuses_other_exits_or_settings(peaked_base_dir, text_dir, tmp_path):
    train(_config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=4 * 32 * 2))
    with pytest.raises(CheckpointError, match="trains exits 1,3"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "run", exits=(1, 2)), resume=True)
    with pytest.raises(CheckpointError, match="lr"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "run", lr=1e-4), resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "elsewhere"), resume=True)


def test_resume_reads_a_state_written_before_a_setting_existed_as_that_settings_default(
    peaked_base_dir, text_dir, tmp_path
):
    first = train(_config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=4 * 32 * 2))
    path = tmp_path / "run" / STATE_FILE
    state = torch.load(path, weights_only=True)
    for name in (
        "on_policy",
        "answer_tokens",
        "answer_temperature",
        "divergence",
        "on_policy_weight",
        "balcony_layers",
    ):
        del state["config"][name]  # as a run started before the on-policy trainer (and deeper balconies) wrote it
    torch.save(state, path)
    again = train(_config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=4 * 32 * 2), resume=True)
    assert again.pop("wall_seconds") >= first.pop("wall_seconds")  # the resumed call's own seconds added
    assert again == first
    with pytest.raises(CheckpointError, match="on_policy=0, not 2"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "run", max_tokens=4 * 32 * 2, on_policy=2), resume=True)


def test_init_from_starts_from_a_checkpoints_balconies_and_keeps_its_record(peaked_base_dir, text_dir, tmp_path):
    train(_config(peaked_base_dir, text_dir, tmp_path / "first", max_tokens=4 * 32 * 2))
    trainer = Trainer(_config(peaked_base_dir, text_dir, tmp_path / "second", init_from=str(tmp_path / "first")))
    first = load_file(tmp_path / "first" / WEIGHTS_FILE)
    for name, tensor in trainer.model.balcony_state_dict().items():
        assert torch.equal(tensor, first[name]), name
    summary = train(_config(peaked_base_dir, text_dir, tmp_path / "second", init_from=str(tmp_path / "first")))
    assert summary["init_from"]["training"]["tokens_seen"] == 2 * 4 * 32 and summary["seed"] == 0
    with pytest.raises(
        CheckpointError, match=r"--init-from: .* holds no balcony at exit 2; train --exits among those it holds \(1,3\)"
    ):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "third", exits=(1, 2), init_from=str(tmp_path / "first")))


def test_init_from_a_run_of_the_same_data_and_seed_warns_that_it_would_replay_its_text(
    peaked_base_dir, text_dir, tmp_path, caplog
):
    train(_config(peaked_base_dir, text_dir, tmp_path / "first", max_tokens=4 * 32 * 2))
    with caplog.at_level("WARNING", logger="balcony_edge"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "other-seed", init_from=str(tmp_path / "first"), seed=1))
    assert "--seed" not in caplog.text
    with caplog.at_level("WARNING", logger="balcony_edge"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "same-seed", init_from=str(tmp_path / "first")))
    assert "same data with the same --seed 0" in caplog.text and "give another --seed" in caplog.text


def test_max_minutes_stops_and_leaves_a_resumable_checkpoint(peaked_base_dir, text_dir, tmp_path):
    summary = train(_config(peaked_base_dir, text_dir, tmp_path / "run", max_minutes=1e-6))
    assert summary["steps"] == 0
    assert (tmp_path / "run" / STATE_FILE).is_file()
    model, info, _ = load_checkpoint(tmp_path / "run")
    assert info.config.exits == (1, 3)


def test_batch_must_split_into_micro_batches(peaked_base_dir, text_dir, tmp_path):
    with pytest.raises(BalconyError, match="multiple of --micro-batch-size"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "run", batch_size=3))


def _bare_config(**overrides) -> TrainConfig:
    return TrainConfig(exits=(1, 3), out="run", **overrides)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seq_len", 0, "--seq-len must be an integer of at least 1, not 0"),
        ("seq_len", 32.0, "--seq-len must be an integer of at least 1, not 32.0"),
        ("batch_size", -4, "--batch-size must be an integer of at least 1, not -4"),
        ("micro_batch_size", 0, "--micro-batch-size must be an integer of at least 1, not 0"),
        ("lr", 0, "--lr must be a positive finite number, not 0"),
        ("lr", -1e-3, "--lr must be a positive finite number, not -0.001"),
        ("lr", float("nan"), "--lr must be a positive finite number, not nan"),
        ("lr", float("inf"), "--lr must be a positive finite number, not inf"),
        ("lr", "3e-3", "--lr must be a positive finite number, not '3e-3'"),
        ("min_lr_ratio", 1.5, "--min-lr-ratio must be a number from 0 to 1, not 1.5"),
        ("min_lr_ratio", -0.1, "--min-lr-ratio must be a number from 0 to 1, not -0.1"),
        ("warmup_fraction", 2, "--warmup-fraction must be a number from 0 to 1, not 2"),
        ("warmup_fraction", float("nan"), "--warmup-fraction must be a number from 0 to 1, not nan"),
        ("weight_decay", -0.01, "--weight-decay must be zero or a positive finite number, not -0.01"),
        ("grad_clip", 0, "--grad-clip must be a positive finite number, not 0"),
        ("epochs", -1, "--epochs must be a positive finite number, not -1"),
        ("epochs", 0.0, "--epochs must be a positive finite number, not 0.0"),
        ("max_tokens", 0, "--max-tokens must be an integer of at least 1, not 0"),
        ("max_minutes", 0, "--max-minutes must be a positive finite number, not 0"),
        ("max_minutes", float("inf"), "--max-minutes must be a positive finite number, not inf"),
        ("save_every", 0, "--save-every must be an integer of at least 1, not 0"),
        ("seed", -1, "--seed must be an integer of at least 0, not -1"),
        ("seed", True, "--seed must be an integer of at least 0, not True"),
        ("threads", 0, "--threads must be an integer of at least 1, not 0"),
        ("kl_chunk", 0, "--kl-chunk must be an integer of at least 1, not 0"),
        ("precision", "fp8", "--precision 'fp8' is unknown; choose one of auto, bf16, fp32"),
        ("save_dtype", "int8", "--save-dtype 'int8' is unknown; choose one of fp32, fp16, bf16"),
        ("balcony_init", "zeros", "--balcony-init 'zeros' is unknown; choose one of last, random"),
        ("norm_init", "none", "--norm-init 'none' is unknown; choose one of final, exit_input"),
    ],
)
def test_every_bad_training_setting_is_refused_naming_its_option(field, value, message):
    with pytest.raises(BalconyError) as refused:
        _bare_config(**{field: value})
    assert str(refused.value) == message


def test_a_micro_batch_larger_than_the_batch_is_refused():
    with pytest.raises(BalconyError) as refused:
        _bare_config(batch_size=4, micro_batch_size=8)
    assert str(refused.value) == "--micro-batch-size 8 is larger than --batch-size 4; give at most 4"


def test_epochs_and_max_tokens_together_are_refused():
    with pytest.raises(BalconyError) as refused:
        _bare_config(epochs=2.0, max_tokens=1000)
    assert str(refused.value) == "--epochs and --max-tokens both set; give one of them"


def test_optional_settings_may_be_left_out():
    config = _bare_config()
    assert (config.epochs, config.max_tokens, config.max_minutes, config.threads) == (None, None, None, None)


def test_epochs_set_the_schedule_and_one_epoch_is_the_default(peaked_base_dir, text_dir, tmp_path):
    one = Trainer(_config(peaked_base_dir, text_dir, tmp_path / "one", max_tokens=None))
    two = Trainer(_config(peaked_base_dir, text_dir, tmp_path / "two", max_tokens=None, epochs=2.0))
    assert one.total_steps == math.ceil(len(one.blocks) / 4)
    assert two.total_steps == math.ceil(2 * len(two.blocks) / 4)


def test_block_order_is_a_permutation_per_epoch():
    order = BlockOrder(10, seed=3)
    first, second = [order[g] for g in range(10)], [order[g] for g in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert [BlockOrder(10, seed=3)[g] for g in range(20)] == first + second


def test_learning_rate_warms_up_then_decays_to_its_floor():
    factors = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_ddp_with_two_gloo_processes_gives_the_weights_of_one_process(peaked_base_dir, text_dir, tmp_path):
    common = [
        "--exits",
        "1,3",
        "--base",
        str(peaked_base_dir),
        "--data",
        str(text_dir),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-tokens",
        str(4 * 32 * 3),
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--lr",
        "3e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "balcony_edge", "train", "--out", str(tmp_path / "one"), *common], check=True, env=env
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "balcony_edge",
            "train",
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        check=True,
        env=env,
    )
    one, two = load_file(tmp_path / "one" / WEIGHTS_FILE), load_file(tmp_path / "two" / WEIGHTS_FILE)
    initial = load_checkpoint(tmp_path / "one")[0]
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "two" / CONFIG_FILE).read_text())["training"]
    assert summary["ranks"] == 2 and summary["steps"] == 3
    assert initial is not None


def test_init_from_may_train_fewer_exits_and_deepen_a_balcony(peaked_base_dir, text_dir, tmp_path):
    train(_config(peaked_base_dir, text_dir, tmp_path / "first", max_tokens=4 * 32 * 2))
    first = load_file(tmp_path / "first" / WEIGHTS_FILE)
    deep = _config(
        peaked_base_dir,
        text_dir,
        tmp_path / "deep",
        exits=(1,),
        balcony_layers="1:2",
        init_from=str(tmp_path / "first"),
    )
    trainer = Trainer(deep)
    for name, tensor in trainer.model.balcony_state_dict().items():
        if name.startswith("extra_layers."):
            assert name.startswith("extra_layers.1.0.")
        else:
            assert name.startswith(("balconies.1.", "norms.1.")) and torch.equal(tensor, first[name]), name
    train(trainer.config)
    _, info, _ = load_checkpoint(tmp_path / "deep")
    assert info.config.deeper == ((1, 2),)
    with pytest.raises(CheckpointError, match="a balcony of 2 layers at exit 1; give --balcony-layers 1:2 or more"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "back", exits=(1,), init_from=str(tmp_path / "deep")))
    with pytest.raises(CheckpointError, match="balcony_layers='1:2', not ''"):
        Trainer(_config(peaked_base_dir, text_dir, tmp_path / "deep", exits=(1,)), resume=True)
    # A damaged source (its second layer's tensors gone) is refused, not started again from the identity.
    weights = {n: t for n, t in load_file(tmp_path / "deep" / WEIGHTS_FILE).items() if not n.startswith("extra_")}
    save_file(weights, tmp_path / "deep" / WEIGHTS_FILE)
    again = _config(peaked_base_dir, text_dir, tmp_path / "again", exits=(1,), balcony_layers="1:2")
    with pytest.raises(CheckpointError, match="does not hold the balconies"):
        Trainer(replace(again, init_from=str(tmp_path / "deep")))
    for bad, match in [
        ("2:2", "not among --exits"),
        ("3:9", "give 1 to 4"),
        ("3:0", "give 1 to 4"),
        ("3", "is not EXIT:LAYERS"),
        ("3:2,3:1", "names exit 3 twice"),
    ]:
        with pytest.raises(ExitsError, match=match):
            _bare_config(balcony_layers=bad)
