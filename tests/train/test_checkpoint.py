"""Checkpoint folders: round trip, base-model hash check, incomplete, malformed or foreign folders, and writes that
fail, fill the disk or are killed half way without losing the last good checkpoint."""

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_base_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from balcony_edge.base_model import SUPPORTED_MODEL_TYPES, load_base_model
from balcony_edge.checkpoint import (
    CONFIG_FILE,
    SCHEMA_VERSION,
    STATE_FILE,
    WEIGHTS_FILE,
    build_model,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from balcony_edge.common.atomic import write_folder_atomically
from balcony_edge.common.errors import CheckpointError
from balcony_edge.model import BalconyConfig


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


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_holds(folder, model) -> None:
    saved = load_file(folder / WEIGHTS_FILE)
    expected = model.balcony_state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def _siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def _write_half_then(failure):
    """A Path.write_bytes that writes the first half of the data, then calls failure() (a disk filling up, a kill)."""

    def write_bytes(self, data):
        with open(self, "wb") as file:
            file.write(bytes(data)[: len(data) // 2])
        failure()

    return write_bytes


def _raise(error):
    def fail():
        raise error

    return fail


def test_a_write_that_fails_half_way_through_a_file_leaves_the_last_checkpoint_byte_identical(
    tiny_base, tiny_base_dir, tmp_path, monkeypatch
):
    old = _trained_model(tiny_base)
    save_checkpoint(old, str(tiny_base_dir), tmp_path / "ckpt", {"steps": 1})
    before = _files(tmp_path / "ckpt")
    monkeypatch.setattr(Path, "write_bytes", _write_half_then(_raise(OSError(errno.EIO, "Input/output error"))))
    with pytest.raises(CheckpointError) as refused:
        save_checkpoint(
            build_model(tiny_base, BalconyConfig((1, 3)), seed=1), str(tiny_base_dir), tmp_path / "ckpt", {"steps": 2}
        )
    monkeypatch.undo()
    assert str(refused.value) == (
        f"cannot write checkpoint {tmp_path / 'ckpt'} (Input/output "
        "error); any previous checkpoint there is untouched: "
        "check permissions and free space, then save again"
    )
    assert _files(tmp_path / "ckpt") == before
    assert _siblings(tmp_path / "ckpt") == ["ckpt"]
    _assert_holds(tmp_path / "ckpt", old)
    assert load_checkpoint(tmp_path / "ckpt", tiny_base)[1].training == {"steps": 1}


@pytest.mark.parametrize("full_at", [1, 2], ids=["weights file", "training state"])
def test_disk_full_while_checkpointing_names_the_problem_and_the_fix_and_keeps_the_last_checkpoint(
    tiny_base, tiny_base_dir, tmp_path, monkeypatch, full_at
):
    old = _trained_model(tiny_base)
    state = {"step": 4, "moments": torch.ones(3)}
    save_checkpoint(old, str(tiny_base_dir), tmp_path / "run", {"steps": 4}, state=state)
    before = _files(tmp_path / "run")
    real_write = Path.write_bytes
    writes = []

    def disk_fills_up(self, data):
        writes.append(self.name)
        if len(writes) == full_at:
            return _write_half_then(_raise(OSError(errno.ENOSPC, "No space left on device")))(self, data)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    with pytest.raises(CheckpointError) as refused:
        save_checkpoint(old, str(tiny_base_dir), tmp_path / "run", {"steps": 8}, state={**state, "step": 8})
    monkeypatch.undo()
    run = tmp_path / "run"
    assert str(refused.value) == (
        f"disk full while writing checkpoint {run}; any previous checkpoint there is untouched: free disk space, then "
        f"continue with `balcony-edge train --resume --out {run}` and the run's other options"
    )
    assert writes[-1] == [WEIGHTS_FILE, STATE_FILE][full_at - 1]
    assert _files(run) == before
    assert _siblings(run) == ["run"]


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_second_call(real):
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in
            _kill_self()
        return real(src, dst)

    return replace


def _in_a_child_killed_by_sigkill(action) -> None:
    """Run action() in a forked child process, which must die of SIGKILL (the patches it makes stay in the child)."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
        finally:
            os._exit(1)  # action did not kill the child: the parent's assertion fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("kill_point", ["half way through the weights file", "between the two renames"])
def test_a_save_killed_by_sigkill_leaves_a_loadable_last_checkpoint_and_the_next_save_cleans_up(
    tiny_base, tiny_base_dir, tmp_path, kill_point
):
    ckpt = tmp_path / "ckpt"
    old, new = _trained_model(tiny_base), build_model(tiny_base, BalconyConfig((1, 3), "random"), seed=5)
    save_checkpoint(old, str(tiny_base_dir), ckpt, {"steps": 1})
    before = _files(ckpt)

    def save_and_die():
        if kill_point == "between the two renames":
            os.replace = _kill_on_second_call(os.replace)
        else:
            Path.write_bytes = _write_half_then(_kill_self)
        save_checkpoint(new, str(tiny_base_dir), ckpt, {"steps": 2})

    _in_a_child_killed_by_sigkill(save_and_die)
    leftovers = [name for name in _siblings(ckpt) if name != "ckpt"]
    if kill_point == "between the two renames":
        assert not ckpt.exists() and any(name.startswith(".ckpt.old-") for name in leftovers)
    else:
        assert _files(ckpt) == before and any(name.startswith(".ckpt.partial-") for name in leftovers)
    loaded, info, _ = load_checkpoint(ckpt, tiny_base)
    assert info.training == {"steps": 1}
    ids = torch.randint(0, 100, (1, 7))
    torch.testing.assert_close(loaded.all_logits(ids)[3], old.all_logits(ids)[3], rtol=0, atol=0)

    save_checkpoint(new, str(tiny_base_dir), ckpt, {"steps": 2})
    assert _siblings(ckpt) == ["ckpt"]
    _assert_holds(ckpt, new)


def test_leftover_staging_folders_are_never_read_as_the_checkpoint(tiny_base, tiny_base_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    old, other = _trained_model(tiny_base), build_model(tiny_base, BalconyConfig((1, 3), "random"), seed=5)
    save_checkpoint(old, str(tiny_base_dir), ckpt, {"steps": 1})
    save_checkpoint(other, str(tiny_base_dir), tmp_path / "other", {"steps": 9})
    shutil.copytree(tmp_path / "other", tmp_path / ".ckpt.partial-dead")
    shutil.copytree(tmp_path / "other", tmp_path / ".ckpt.old-dead" / "ckpt")
    assert load_checkpoint(ckpt, tiny_base)[1].training == {"steps": 1}
    shutil.rmtree(ckpt)
    shutil.rmtree(tmp_path / ".ckpt.old-dead")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ckpt, tiny_base)


def _config_json(folder) -> dict:
    return json.loads((folder / CONFIG_FILE).read_text())


@pytest.fixture
def base_never_loaded(monkeypatch):
    """Replace the base-model loader by one that records calls: a refusal must come before the slow load."""
    calls = []
    monkeypatch.setattr("balcony_edge.checkpoint.load_base_model", lambda spec: calls.append(spec))
    return calls


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["base_model"].update(model_type="gpt2"),
            "is for a 'gpt2' base model; balcony-edge supports llama, mistral, qwen2, qwen3",
        ),
        (lambda c: c.update(exits="1,3"), "exits must be a list of integers such as [8, 16, 24], not '1,3'"),
        (lambda c: c.update(exits=[1.0, 3]), "exits must be a list of integers such as [8, 16, 24], not [1.0, 3]"),
        (lambda c: c.update(exits=[1, True]), "exits must be a list of integers such as [8, 16, 24], not [1, True]"),
        (lambda c: c.update(exits=[1, 4]), "exit 4 is out of range: this base model has 4 layers"),
        (lambda c: c.update(exits=[]), "no exits given"),
        (lambda c: c.update(balcony_init="zeros"), "balcony init 'zeros' is unknown"),
        (
            lambda c: c["base_model"].pop("sha256"),
            "base_model must record the base's name, model_type, num_layers and sha256",
        ),
        (
            lambda c: c.update(base_model="smollm2"),
            "base_model must record the base's name, model_type, num_layers and sha256",
        ),
        (lambda c: c.update(schema_version=2), "has schema version 2, this balcony-edge reads 1"),
        (lambda c: c.update(training=[1]), "training must be a JSON object, not [1]"),
        (lambda c: c.update(answers=[1]), "answers must hold prompts and per depth judge_nll"),
        (
            lambda c: c.update(answers={"prompts": 120, "depths": {"1": {"judge_nll": "low"}}}),
            "answers must hold prompts and per depth",
        ),
    ],
)
def test_a_malformed_or_foreign_checkpoint_config_is_refused_before_loading_the_base(
    tiny_checkpoint, tmp_path, base_never_loaded, change, message
):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = _config_json(folder)
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(folder)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert base_never_loaded == []


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "holds list, not a JSON object"),
        (b'{"exits": [1,', "cannot be read as JSON"),
        (b"\xff\xfe{}", "cannot be read as JSON"),
    ],
)
def test_a_config_that_is_not_a_json_object_is_refused(tiny_checkpoint, tmp_path, base_never_loaded, content, message):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (folder / CONFIG_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)
    assert base_never_loaded == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_refused_before_loading_the_base(
    tiny_checkpoint, tmp_path, base_never_loaded, damage
):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": random.Random(0).randbytes(4096), "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(folder)
    assert str(refused.value).startswith(f"{folder / WEIGHTS_FILE} cannot be read (")
    assert str(refused.value).endswith("); train again or restore the file") and "\n" not in str(refused.value)
    assert base_never_loaded == []


def test_weights_of_the_wrong_shape_are_refused(tiny_base, tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(folder / WEIGHTS_FILE)
    name = min(tensors)
    tensors[name] = torch.zeros(3)
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=f"{name} is not a tensor of shape"):
        load_checkpoint(folder, tiny_base)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        [
            "exits",
            "base_model",
            "balcony_init",
            "norm_init",
            "training",
            "schema_version",
            "num_layers",
            "model_type",
            "sha256",
        ]
    ),
    value=JSON_VALUES,
)
def test_any_value_in_any_config_field_is_read_or_refused_in_one_line(tiny_checkpoint, tmp_path, key, value):
    folder = tmp_path / "ckpt"  # rewritten by every example
    if not folder.exists():
        shutil.copytree(tiny_checkpoint, folder)
    config = _config_json(tiny_checkpoint)
    (config["base_model"] if key in ("num_layers", "model_type", "sha256") else config)[key] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    try:
        info = read_info(folder)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(folder / CONFIG_FILE) in str(err)
    else:
        assert all(type(k) is int for k in info.config.exits) and info.base["model_type"] in SUPPORTED_MODEL_TYPES
