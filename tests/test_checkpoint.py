"""Checkpoint folders: round trip, base-model hash check, incomplete folders, atomic writes."""

import json

import pytest
import torch

from balcony_edge.base_model import load_base_model
from balcony_edge.checkpoint import (
    CONFIG_FILE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    build_model,
    load_checkpoint,
    save_checkpoint,
    write_folder_atomically,
)
from balcony_edge.errors import CheckpointError
from balcony_edge.model import BalconyConfig

from conftest import make_base_folder


def _trained_model(tiny_base):
    model = build_model(tiny_base, BalconyConfig((1, 3), "random", "exit_input"), seed=7)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_checkpoint_round_trip_restores_every_exit(tiny_base, tiny_base_dir, tmp_path):
    model = _trained_model(tiny_base)
    save_checkpoint(model, str(tiny_base_dir), tmp_path / "ckpt", {"steps": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["schema_version"] == SCHEMA_VERSION and config["exits"] == [1, 3]
    assert config["base_model"]["sha256"] == tiny_base.identity.sha256 and config["training"] == {"steps": 3}
    assert (config["balcony_init"], config["norm_init"]) == ("random", "exit_input")
    loaded, info, _ = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 100, (1, 9))
    for k in (1, 3):
        torch.testing.assert_close(loaded.all_logits(ids)[k], model.all_logits(ids)[k], rtol=0, atol=0)


def test_fp16_checkpoint_holds_only_balcony_weights(tiny_base, tiny_base_dir, tmp_path):
    from safetensors.torch import load_file

    save_checkpoint(_trained_model(tiny_base), str(tiny_base_dir), tmp_path / "ckpt", {}, dtype=torch.float16)
    tensors = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(name.startswith(("balconies.1.", "balconies.3.", "norms.1.", "norms.3.")) for name in tensors)


def test_loading_onto_another_base_model_is_refused(tiny_base, tiny_base_dir, tmp_path):
    save_checkpoint(_trained_model(tiny_base), str(tiny_base_dir), tmp_path / "ckpt", {})
    other = load_base_model(str(make_base_folder(tmp_path / "other", seed=1)))
    with pytest.raises(CheckpointError, match="pass the original base with --base"):
        load_checkpoint(tmp_path / "ckpt", other)


def test_incomplete_or_missing_checkpoints_are_refused(tiny_base, tiny_base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(_trained_model(tiny_base), str(tiny_base_dir), tmp_path / "ckpt", {})
    (tmp_path / "ckpt" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="balconies.safetensors is missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_an_interrupted_write_leaves_the_old_folder_untouched(tmp_path):
    target = tmp_path / "ckpt"
    write_folder_atomically(target, lambda staging: (staging / "a.txt").write_text("old"))

    def fail_half_way(staging):
        (staging / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder_atomically(target, fail_half_way)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
