"""Training faults: state files that would run code or are damaged, SIGTERM/SIGINT that stop a run cleanly, a save
killed between its two renames, and real runs killed at random moments, each resumed to the exact weights of an
uninterrupted run."""

import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from balcony_edge.base_model import load_base_model
from balcony_edge.checkpoint import STATE_FILE, WEIGHTS_FILE, read_info
from balcony_edge.common.errors import BalconyError, CheckpointError, TrainingStopped
from balcony_edge.train import TrainConfig, Trainer, restore_rng_state, rng_state, train

SHORT_RUN = {
    "exits": (1, 3),
    "seq_len": 32,
    "batch_size": 4,
    "micro_batch_size": 2,
    "lr": 3e-3,
    "max_tokens": 4 * 32 * 8,
    "save_every": 4,
    "precision": "fp32",
    "threads": 1,
}
# Long enough (a few seconds) to be killed at a random moment after its first checkpoint.
LONG_STEPS = 160
LONG_RUN = {**SHORT_RUN, "max_tokens": 4 * 32 * LONG_STEPS, "save_every": 2}


def _config(settings, peaked_base_dir, text_dir, out) -> TrainConfig:
    return TrainConfig(**settings, out=str(out), base=str(peaked_base_dir), data=[str(text_dir)])


@pytest.fixture(scope="module")
def peaked_base(peaked_base_dir):
    return load_base_model(str(peaked_base_dir))


@pytest.fixture(scope="module")
def short_run(peaked_base, peaked_base_dir, text_dir, tmp_path_factory):
    """The run folder of an uninterrupted SHORT_RUN (8 steps)."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(_config(SHORT_RUN, peaked_base_dir, text_dir, out), base=peaked_base)
    return out


def _assert_same_weights(run, reference) -> None:
    a, b = load_file(run / WEIGHTS_FILE), load_file(reference / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _saved_step(run) -> int:
    return torch.load(run / STATE_FILE, weights_only=True)["step"]


# --- the training state file: no pickled code, damage refused in one line -------------------------------------


def _torch_file(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_rng_states_survive_a_weights_only_round_trip_exactly():
    def draws():
        return random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # both normal samplers now hold a cached second draw, part of the state
    np.random.standard_normal()
    saved = _torch_file(rng_state())
    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(torch.load(io.BytesIO(saved), weights_only=True))
    assert draws() == expected


class _RunsCode:
    """A pickled object that would create a folder when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _resume(run, peaked_base, peaked_base_dir, text_dir) -> Trainer:
    return Trainer(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base, resume=True)


def test_resume_refuses_a_state_file_that_would_run_code_without_running_it(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path
):
    run = shutil.copytree(short_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({**torch.load(run / STATE_FILE, weights_only=True), "step": _RunsCode(marker)}, run / STATE_FILE)
    with pytest.raises(CheckpointError) as refused:
        _resume(run, peaked_base, peaked_base_dir, text_dir)
    assert str(refused.value) == (
        f"--resume: {run / STATE_FILE} is damaged, foreign, or from "
        "a balcony-edge before 0.2 (which pickled its RNG state) "
        "(UnpicklingError); restore the file, or train again without --resume (its checkpoint still loads)"
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda data: random.Random(0).randbytes(2048), "is damaged, foreign, or from a balcony-edge before 0.2"),
        (lambda data: b"", "before 0.2 (which pickled its RNG state) (EOFError)"),
        (lambda data: data[: len(data) // 2], "before 0.2 (which pickled its RNG state) (RuntimeError)"),
        (lambda data: _torch_file([1, 2, 3]), "is not a balcony-edge training state"),
        (lambda data: _torch_file({"step": 4}), "is not a balcony-edge training state"),
    ],
    ids=["garbage", "empty", "truncated", "a list", "keys missing"],
)
def test_resume_refuses_a_damaged_state_file_in_one_line_and_touches_nothing(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path, damage, problem
):
    run = shutil.copytree(short_run, tmp_path / "run")
    (run / STATE_FILE).write_bytes(damage((run / STATE_FILE).read_bytes()))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError) as refused:
        _resume(run, peaked_base, peaked_base_dir, text_dir)
    message = str(refused.value)
    assert message.startswith(f"--resume: {run / STATE_FILE} ") and problem in message
    assert "restore the file, or train again without --resume" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Where the pickled structure (data.pkl, stored uncompressed) lies inside a torch.save zip."""
    entry = next(e for e in zipfile.ZipFile(io.BytesIO(data)).infolist() if e.filename.endswith("data.pkl"))
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)
    return start, start + entry.compress_size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_state_file_damaged_anywhere_resumes_or_is_refused_in_one_line(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path, data
):
    run = tmp_path / "run"  # rewritten by every example
    if not run.exists():
        shutil.copytree(short_run, run)
    state = bytearray((short_run / STATE_FILE).read_bytes())
    start, end = _pickle_span(bytes(state))
    if data.draw(st.booleans(), label="truncate"):
        state = state[: data.draw(st.integers(0, len(state) - 1), label="length")]
    else:
        for position in data.draw(st.lists(st.integers(start, end - 1), min_size=1, max_size=4), label="positions"):
            state[position] = data.draw(st.integers(0, 255), label="byte")
    (run / STATE_FILE).write_bytes(state)
    try:
        trainer = _resume(run, peaked_base, peaked_base_dir, text_dir)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(run) in str(err)
    else:
        assert isinstance(trainer.step, int)


# --- signals: the first one saves and stops, a second one stops at once ------------------------------------------


def _signal_during_step(monkeypatch, signals, at_step):
    """Make Trainer.train_step raise these signals in this process during step index at_step."""
    real_step = Trainer.train_step

    def step(self, index):
        if index == at_step:
            for signum in signals:
                signal.raise_signal(signum)
        return real_step(self, index)

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_finishes_the_step_saves_and_stops_with_one_line(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch, signum
):
    before = signal.getsignal(signum)
    run = tmp_path / "run"
    _signal_during_step(monkeypatch, [signum], at_step=5)
    with pytest.raises(TrainingStopped) as stopped:
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base)
    assert str(stopped.value) == (
        f"training stopped by {signal.Signals(signum).name} at step 6/8; checkpoint saved in {run}; "
        f"continue with `balcony-edge train --resume --out {run}` and the run's other options"
    )
    assert signal.getsignal(signum) is before
    assert _saved_step(run) == 6
    monkeypatch.undo()
    train(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base, resume=True)
    _assert_same_weights(run, short_run)


def test_a_signal_during_a_checkpoint_write_lets_it_finish_then_stops(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    import balcony_edge.train as train_module

    real_save, saves = train_module.save_checkpoint, []

    def save_hit_by_sigterm(*args, **kwargs):
        if not saves:
            signal.raise_signal(signal.SIGTERM)  # arrives while the first checkpoint is being written
        saves.append(1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_hit_by_sigterm)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="training stopped by SIGTERM at step 4/8"):
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base)
    assert _saved_step(run) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    train(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base, resume=True)
    _assert_same_weights(run, short_run)


def test_a_second_sigint_stops_at_once_leaving_the_last_periodic_checkpoint(
    peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _signal_during_step(monkeypatch, [signal.SIGINT, signal.SIGINT], at_step=5)
    with pytest.raises(KeyboardInterrupt):
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, tmp_path / "run"), base=peaked_base)
    assert _saved_step(tmp_path / "run") == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_installs_its_handlers_only_while_it_trains(
    peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    real_step, during = Trainer.train_step, []

    def step(self, index):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return real_step(self, index)

    monkeypatch.setattr(Trainer, "train_step", step)
    train(
        _config({**SHORT_RUN, "max_tokens": 4 * 32 * 2}, peaked_base_dir, text_dir, tmp_path / "run"), base=peaked_base
    )
    assert len(during) == 2 and all(handlers[0] not in before and handlers[1] not in before for handlers in during)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_training_outside_the_main_thread_leaves_signal_handlers_alone(
    peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    before = signal.getsignal(signal.SIGTERM)
    real_step, seen, failures = Trainer.train_step, [], []

    def step(self, index):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_step(self, index)

    monkeypatch.setattr(Trainer, "train_step", step)
    config = _config({**SHORT_RUN, "max_tokens": 4 * 32 * 2}, peaked_base_dir, text_dir, tmp_path / "run")

    def run():
        try:
            train(config, base=peaked_base)
        except BaseException as err:  # noqa: BLE001 - reported to the main thread below
            failures.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert failures == [] and seen == [before, before]
    assert _saved_step(tmp_path / "run") == 2


# --- a save killed between its two renames ------------------------------------------------------------------------


def test_resume_after_a_save_killed_between_its_two_renames_continues_from_the_moved_aside_checkpoint(
    short_run, peaked_base, peaked_base_dir, text_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_replace, moves_in = os.replace, []

    def replace(src, dst):
        if os.path.basename(src).startswith(".run.partial-"):
            moves_in.append(src)
            if len(moves_in) == 2:  # the final save: step 4's checkpoint is moved aside, step 8's not yet in
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base)
    monkeypatch.undo()
    assert not run.exists() and [p.name.startswith(".run.old-") for p in tmp_path.iterdir()] == [True]
    resumed = Trainer(_config(SHORT_RUN, peaked_base_dir, text_dir, run), base=peaked_base, resume=True)
    assert resumed.step == 4
    resumed.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _assert_same_weights(run, short_run)


# --- real runs killed at a random moment ----------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _command_line(settings, peaked_base_dir, text_dir, out) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "balcony_edge",
        "train",
        "--out",
        str(out),
        "--base",
        str(peaked_base_dir),
        "--data",
        str(text_dir),
    ]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if name == "exits" else str(value)]
    return args


@pytest.fixture(scope="module")
def long_run(peaked_base, peaked_base_dir, text_dir, tmp_path_factory):
    """The run folder of an uninterrupted LONG_RUN, trained in this process."""
    out = tmp_path_factory.mktemp("long") / "run"
    train(_config(LONG_RUN, peaked_base_dir, text_dir, out), base=peaked_base)
    return out


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_killed_at_a_random_moment_resumes_to_the_weights_of_an_uninterrupted_run(
    long_run, peaked_base_dir, text_dir, tmp_path, signum
):
    run, log_path = tmp_path / "run", tmp_path / "train.log"
    command = _command_line(LONG_RUN, peaked_base_dir, text_dir, run)
    # A terminal-like stderr makes the progress bar print the step reached (and refresh it ten times a second).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TTY_COMPATIBLE": "1", "TERM": "xterm", "COLUMNS": "200"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(lambda: (run / STATE_FILE).exists() or process.poll() is not None, timeout_s=120)
            seed = random.randrange(2**32)  # a new moment every run; printed, so a failure can be replayed
            print(f"killing with {signum.name} after random.Random({seed}).uniform(0, 0.5) s")
            time.sleep(random.Random(seed).uniform(0, 0.5))
            assert process.poll() is None, log_path.read_text()
            process.send_signal(signum)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = ANSI.sub("", log_path.read_text())
    shown = max(int(step) for step in re.findall(rf"(\d+)/{LONG_STEPS} steps", output))
    resumed_from = read_info(run).training["steps"]
    total = read_info(run).training["total_steps"]
    if signum == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM  # what the CLI exits with, as the signal itself would
        assert output.splitlines()[-1] == (
            f"error: training stopped by SIGTERM at step {resumed_from}/{LONG_STEPS}; checkpoint saved in {run}; "
            f"continue with `balcony-edge train --resume --out {run}` and the run's other options"
        )
        assert resumed_from >= shown  # nothing lost
    else:
        assert code == -signal.SIGKILL
        assert resumed_from >= shown - LONG_RUN["save_every"]  # at most one checkpoint interval lost
    assert 2 <= resumed_from < total == LONG_STEPS
    resumed = subprocess.run(
        [*command, "--resume"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.log"]
    _assert_same_weights(run, long_run)


def test_a_folder_of_the_users_own_files_is_never_trained_over(peaked_base, peaked_base_dir, text_dir, tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "thesis.txt").write_text("years of work")
    (home / "sub" / "photo.jpg").write_bytes(b"\xff\xd8")
    for force, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(
            CheckpointError, match=r"holds files that are not a balcony-edge checkpoint \(sub, thesis.txt\)"
        ):
            train(_config(SHORT_RUN, peaked_base_dir, text_dir, home), base=peaked_base, force=force, resume=resume)
    assert (home / "thesis.txt").read_text() == "years of work" and (home / "sub" / "photo.jpg").is_file()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, tmp_path / "a-file"), base=peaked_base)


def test_an_existing_run_is_replaced_only_with_force(peaked_base, peaked_base_dir, text_dir, short_run, tmp_path):
    run = shutil.copytree(short_run, tmp_path / "run")
    before = load_file(run / WEIGHTS_FILE)
    one_step = {**SHORT_RUN, "max_tokens": 4 * 32}
    with pytest.raises(CheckpointError, match="already holds a balcony-edge checkpoint; continue it with --resume"):
        train(_config(one_step, peaked_base_dir, text_dir, run), base=peaked_base)
    assert all(torch.equal(before[k], v) for k, v in load_file(run / WEIGHTS_FILE).items())
    with pytest.raises(BalconyError, match="--resume and --force both given"):
        train(_config(one_step, peaked_base_dir, text_dir, run), base=peaked_base, force=True, resume=True)
    assert train(_config(one_step, peaked_base_dir, text_dir, run), base=peaked_base, force=True)["steps"] == 1


def test_a_second_run_into_the_same_folder_is_refused_at_once(peaked_base, peaked_base_dir, text_dir, tmp_path):
    from balcony_edge.common.atomic import exclusive_target

    with exclusive_target(tmp_path / "run", "the training run"):  # as a first run holds it
        with pytest.raises(BalconyError, match="another process is writing the training run"):
            train(_config(SHORT_RUN, peaked_base_dir, text_dir, tmp_path / "run"), base=peaked_base)
    assert not (tmp_path / "run").exists()


def test_a_link_as_the_run_folder_is_refused(peaked_base, peaked_base_dir, text_dir, short_run, tmp_path):
    (tmp_path / "link").symlink_to(short_run)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        train(_config(SHORT_RUN, peaked_base_dir, text_dir, tmp_path / "link"), base=peaked_base, force=True)
