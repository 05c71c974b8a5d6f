"""The command line: train/eval/generate end to end on a tiny model, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from balcony_edge.cli import main

SMALL_STEPS = ("--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4")


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "balcony_edge", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_base_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "train",
        "--exits",
        "3,1",
        "--out",
        out,
        "--base",
        tiny_base_dir,
        "--data",
        text_dir,
        *SMALL_STEPS,
        "--max-tokens",
        4 * 32 * 3,
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_train_eval_and_generate_work_end_to_end(tiny_run, text_dir, tmp_path):
    result = run_cli(
        "eval",
        tiny_run,
        "--data",
        text_dir,
        "--seq-len",
        "32",
        "--max-tokens",
        "256",
        "--json",
        "--plot",
        tmp_path / "q.png",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [e["exit"] for e in report["exits"]] == [1, 3]
    assert report["tokens"] == 8 * 31 and report["full"]["ppl"] > 1
    for e in report["exits"]:
        assert e["ppl"] > 1 and 0 <= e["top1_agreement"] <= 1 and e["kl"] >= 0 and e["naive_ppl"] > 1
    assert (tmp_path / "q.png").stat().st_size > 10_000
    table = run_cli("eval", tiny_run, "--data", text_dir, "--seq-len", "32", "--max-tokens", "128")
    assert table.returncode == 0 and "naive ppl" in table.stderr
    generated = run_cli("generate", tiny_run, "--exit", "1", "--prompt", "the river", "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--exits", "0,2"], "exit 0 is out of range"),
        (["--exits", "2,2"], "exit 2 is given twice"),
        (["--exits", "2,x"], "not an integer"),
        (["--exits", "4"], "exits go from 1 to 3"),
        (["--data", "MISSING"], "does not exist"),
        (["--seq-len", "100000"], "shorter than one sequence"),
    ],
)
def test_bad_training_input_gives_one_line_and_writes_nothing(tiny_base_dir, text_dir, tmp_path, args, words):
    args = [tmp_path / "missing" if a == "MISSING" else a for a in args]
    base_args = ["train", "--out", tmp_path / "run", "--base", tiny_base_dir, "--max-tokens", "128", "--seq-len", "32"]
    base_args += [] if "--data" in args else ["--data", text_dir]
    base_args += [] if "--exits" in args else ["--exits", "1,2"]
    result = run_cli(*base_args, *args)
    assert result.returncode == 1
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "run").exists()


def test_bad_base_models_are_named(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.gguf").write_bytes(b"not a gguf at all")
    cases = [
        (tmp_path / "nowhere", "not found"),
        (tmp_path, "has no config.json"),
        (tmp_path / "bert", "'bert' model, not a Llama-family causal LM"),
        (tmp_path / "model.gguf", "not a readable GGUF file"),
    ]
    for base, words in cases:
        result = run_cli("train", "--out", tmp_path / "run", "--base", base)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_resume_from_another_run_is_refused(tiny_run, tiny_base_dir, text_dir):
    result = run_cli(
        "train",
        "--exits",
        "2",
        "--out",
        tiny_run,
        "--base",
        tiny_base_dir,
        "--data",
        text_dir,
        *SMALL_STEPS,
        "--max-tokens",
        "384",
        "--resume",
    )
    assert result.returncode == 1 and "resume with --exits 1,3" in result.stderr


def test_generate_refuses_an_untrained_exit(tiny_run):
    result = run_cli("generate", tiny_run, "--exit", "2", "--prompt", "x")
    assert result.returncode == 1 and "trained exits: 1, 3" in result.stderr


@pytest.mark.parametrize("command", ["train", "eval", "export", "chat", "serve", "bench", "inspect"])
def test_help_fits_80_columns_uncut(command):
    result = subprocess.run(
        [sys.executable, "-m", "balcony_edge", command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and max(map(len, lines)) <= 80
    assert not [line for line in lines if "…" in line], "a help text is cut; shorten it"


def test_eval_chat_records_answers_that_export_carries_to_the_controller(tiny_run, text_dir, tmp_path):
    args = ("eval", tiny_run, "--data", text_dir, "--seq-len", "32", "--max-tokens", "64", "--chat")
    result = run_cli(*args, "--answer-tokens", "4", "--seeds", "1", "--record", "--json", "--plot", tmp_path / "q.png")
    assert result.returncode == 0, result.stderr
    chat = json.loads(result.stdout)["chat"]
    depths = {d["depth"]: d for d in chat["depths"]}
    assert sorted(depths) == [1, 3, 4] and chat["prompts"] >= 100 and len(chat["answers"]) == chat["prompts"]
    recorded = json.loads((tiny_run / "balcony_config.json").read_text())["answers"]
    assert recorded["depths"]["1"]["loop_share"] == round(depths[1]["loop_share"], 4)
    export = run_cli("export", tiny_run, "--out", tmp_path / "export")
    assert export.returncode == 0, export.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    carried = {e["exit"]: e["answers"] for e in manifest["exits"]}
    assert carried[1]["measured_on"] == "checkpoint (torch fp32)" and carried[4]["judge_nll"] == round(
        depths[4]["judge_nll"], 4
    )
    table = run_cli(*args, "--answer-tokens", "3", "--seeds", "0", "--export", tmp_path / "export", "--record")
    assert table.returncode == 0 and "judge NLL" in table.stderr, table.stderr
    remeasured = json.loads((tmp_path / "export" / "manifest.json").read_text())["exits"][0]["answers"]
    assert remeasured["measured_on"] == "this export"
    checked = run_cli("inspect", tmp_path / "export")
    assert checked.returncode == 0 and "checks OK" in checked.stderr, checked.stderr


def test_eval_chat_judges_an_export_of_some_of_the_checkpoints_exits_and_refuses_foreign_ones(
    tiny_run, text_dir, tmp_path, monkeypatch, capsys
):
    export = run_cli("export", tiny_run, "--exits", "1", "--out", tmp_path / "export")
    assert export.returncode == 0, export.stderr
    args = ["eval", str(tiny_run), "--data", str(text_dir), "--seq-len", "32", "--max-tokens", "64", "--chat"]
    args += ["--answer-tokens", "3", "--seeds", "0", "--json"]
    judged = run_cli(*args, "--export", tmp_path / "export")
    assert judged.returncode == 0, judged.stderr
    assert [d["depth"] for d in json.loads(judged.stdout)["chat"]["depths"]] == [1, 4]
    from balcony_edge.runtime.core.engine import Engine

    real_load = Engine.load

    def with_exit_2(folder, *a, **k):  # as an export of another run of this base, with exits 1,2
        engine = real_load(folder, *a, **k)
        monkeypatch.setattr(type(engine), "exits", property(lambda self: [1, 2, 4]))
        return engine

    monkeypatch.setattr(Engine, "load", with_exit_2)
    with pytest.raises(SystemExit):
        main([*args, "--export", str(tmp_path / "export")])
    error = capsys.readouterr().err
    assert "has exit 2, which the checkpoint (exits 1,3) has not; give an export of this checkpoint" in error


def test_eval_record_shows_the_figures_before_a_failing_write_and_refuses_an_unwritable_folder_first(
    tiny_run, text_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    import balcony_edge.checkpoint as checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["eval", str(run), "--data", str(text_dir), "--seq-len", "32", "--max-tokens", "64", "--chat"]
    args += ["--answer-tokens", "3", "--seeds", "0", "--json", "--record"]

    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "write_text_atomically", full_disk)
    with pytest.raises(SystemExit):
        main(args)
    out, err = capsys.readouterr()
    assert [d["depth"] for d in json.loads(out)["chat"]["depths"]] == [1, 3, 4]  # shown, then the write failed
    assert "cannot write" in err and "No space left on device" in err
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if (path, mode) == (run, os.W_OK) else real_access(path, mode)
    )
    with pytest.raises(SystemExit):
        main(args)
    out, err = capsys.readouterr()
    assert out == "" and f"--record: cannot write into {run} (permission denied)" in err


def test_eval_record_and_export_need_chat(tiny_run):
    result = run_cli("eval", tiny_run, "--record")
    assert result.returncode != 0 and "--export and --record go with --chat" in result.stderr
