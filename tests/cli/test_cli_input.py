"""Bad command lines: each is one `error:` line naming the problem and the fix, a non-zero exit, no traceback,
and nothing written."""

from __future__ import annotations

import shutil

import pytest

from balcony_edge.cli import main


def run_main(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    for word in words:
        assert word in lines[0], lines[0]


CHAT_CASES = [
    (["--max-new-tokens", "abc"], ["'--max-new-tokens'", "valid integer", "balcony-edge chat --help"]),
    (["--max-new-tokens", "0"], ["'--max-new-tokens'", "greater than or equal to 1"]),
    (["--max-new-tokens", "-5"], ["'--max-new-tokens'"]),
    (["--temperature", "abc"], ["'--temperature'"]),
    (["--temperature", "-1"], ["temperature -1.0 is outside 0 to 100", "0 for greedy"]),
    (["--temperature", "nan"], ["temperature nan is not a finite number"]),
    (["--top-p", "0"], ["top-p 0.0 is outside (0, 1]"]),
    (["--top-p", "1.5"], ["top-p 1.5 is outside (0, 1]"]),
    (["--top-k", "-1"], ["top-k -1 must be a whole number, 0 or more"]),
    (["--repetition-penalty", "0"], ["repetition penalty 0.0 is outside (0, 100]"]),
    (["--seed", "-3"], ["seed -3 must be a whole number"]),
    (["--budget", "abc"], ["budget 'abc' is not understood", "40ms"]),
    (["--budget", "-5"], ["budget '-5' is not understood"]),
    (["--budget", "0ms"], ["latency target 0 ms is not positive"]),
    (["--budget", "99"], ["budget exit 99 is not an available exit", "available exits: 1, 2, 4"]),
    (["--threads", "0"], ["'--threads'", "greater than or equal to 1"]),
    (["--threads", "two"], ["'--threads'"]),
    (["--provider", "gpu"], ["provider 'gpu' is unknown", "tensorrt, cuda, cpu"]),
    (["--signals-clock", "token"], ["--signals-clock token applies to a replayed trace"]),
    (["--signals", "temperature_degc=hot"], ["temperature_degc='hot' is not a number"]),
    (["--prompt", ""], ["the prompt is empty"]),
    (["--prompt", "   \n"], ["the prompt is empty"]),
    (["--prompt", "hi \x1b[31m red"], ["control character U+001B at character 3"]),
    (["--prompt", "caf\udce9"], ["not valid UTF-8 (byte 0xe9 at character 3)"]),
    (["--bogus"], ["No such option: --bogus", "balcony-edge chat --help"]),
]


@pytest.mark.parametrize("args, words", CHAT_CASES, ids=[" ".join(a) for a, _ in CHAT_CASES])
def test_bad_chat_options_are_one_line_errors(tiny_export, capsys, args, words):
    arguments = args if "--prompt" in args else [*args, "--prompt", "Hello"]
    assert_one_line_error(*run_main(capsys, "chat", tiny_export, "--budget", "full", *arguments), *words)


def test_chat_with_good_options_answers(tiny_export, capsys):
    code, out, err = run_main(
        capsys,
        "chat",
        tiny_export,
        "--prompt",
        "Hello",
        "--budget",
        "40ms",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--signals",
        "temperature_degc=50",
    )
    assert code == 0, err


def test_a_missing_export_folder_is_named(tmp_path, capsys):
    code, out, err = run_main(capsys, "chat", tmp_path / "nowhere", "--prompt", "Hello", "--budget", "full")
    assert_one_line_error(code, out, err, "nowhere does not exist", "balcony-edge export")


def test_an_absent_provider_is_named_with_the_fix(tiny_export, capsys, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code, out, err = run_main(capsys, "chat", tiny_export, "--prompt", "Hello", "--provider", "tensorrt")
    assert_one_line_error(code, out, err, "TensorrtExecutionProvider is in this onnxruntime", "cpu always works")


def test_telemetry_that_cannot_be_written_fails_before_generating(tiny_export, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = run_main(capsys, "chat", tiny_export, "--prompt", "Hello", "--telemetry", blocker / "t.jsonl")
    assert_one_line_error(code, out, err, str(blocker / "t.jsonl"))


@pytest.mark.parametrize(
    "args, words",
    [
        (["frobnicate"], ["No such command 'frobnicate'", "balcony-edge --help"]),
        (["exprot"], ["Did you mean 'export'"]),
        (["frobnicate", "--help"], ["No such command 'frobnicate'"]),
        (["eval", "--seq-len", "0"], ["'--seq-len'", "greater than or equal to 1"]),
        (["eval", "--max-tokens", "-1"], ["'--max-tokens'"]),
        (["eval", "--seq-len"], ["'--seq-len' requires an argument"]),
        (["generate", "--max-new-tokens", "0"], ["'--max-new-tokens'"]),
        (["generate", "--raw", "--prompt", ""], ["the prompt is empty"]),
        (["generate", "--prompt", "bell \x07"], ["control character U+0007 at character 5"]),
        (["export", "--dtype", "fp64"], ["--dtype 'fp64' is unknown", "fp32"]),
        (["export", "--quantize", "int3"], ["int3"]),
        (["bench", "--repeats", "0"], ["--repeats 0 must be at least 1"]),
        (["bench", "--threads", "-2"], ["'--threads'"]),
        (["chat", "--thread-pool", "spin"], ["'--thread-pool'", "'spin' is not one of session, process"]),
        (["bench", "--eval", "e.json", "--checkpoint", "c"], ["--eval and --checkpoint both set"]),
        (["bench", "--plot", "no/such/folder/b.png"], ["--plot no/such/folder/b.png", "does not exist"]),
        (["plot", "no-such-telemetry.jsonl"], ["no-such-telemetry.jsonl"]),
        (["train"], ["Missing option '--out'"]),
        (["free-text", "--out", "free.txt"], ["free.txt must end in .jsonl"]),
        (["free-text", "--out", "free.jsonl", "--top-p", "2"], ["--top-p must be in (0, 1], not 2.0"]),
        (["free-text", "--out", "no/such/free.jsonl"], ["folder no/such does not exist"]),
    ],
)
def test_bad_command_lines_are_one_line_errors(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_main(capsys, *args), *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "-1"], ["--epochs", "-1"]),
        (["--epochs", "1", "--max-tokens", "100"], ["--epochs and --max-tokens"]),
        (["--lr", "abc"], ["'--lr'"]),
        (["--lr", "0"], ["--lr"]),
        (["--seq-len", "0"], ["--seq-len"]),
        (["--max-minutes", "-3"], ["--max-minutes"]),
        (["--batch-size", "2", "--micro-batch-size", "4"], ["--micro-batch-size"]),
        (["--precision", "fp8"], ["precision 'fp8' is unknown"]),
        (["--exits", "abc"], ["exit 'abc' is not an integer"]),
    ],
)
def test_bad_training_options_fail_before_loading_anything(capsys, tmp_path, args, words):
    code, out, err = run_main(capsys, "train", "--out", tmp_path / "run", "--base", tmp_path / "no-model", *args)
    assert_one_line_error(code, out, err, *words)
    assert not (tmp_path / "run").exists()


def test_a_modified_export_needs_trust_modified_and_then_warns(tiny_export, tmp_path, capsys):
    folder = shutil.copytree(tiny_export, tmp_path / "export")
    with open(folder / "weights.bin", "r+b") as weights:  # the lowest mantissa byte of the first float
        first = weights.read(1)
        weights.seek(0)
        weights.write(bytes([first[0] ^ 1]))
    code, out, err = run_main(capsys, "chat", folder, "--prompt", "Hello", "--budget", "full", "--max-new-tokens", "2")
    assert_one_line_error(code, out, err, "weights.bin", "sha256 differs from manifest.json", "--trust-modified")
    code, out, err = run_main(
        capsys, "chat", folder, "--prompt", "Hello", "--budget", "full", "--max-new-tokens", "2", "--trust-modified"
    )
    assert code == 0 and "export: " in err and "weights.bin" in err


def test_an_export_file_leading_outside_is_refused_even_when_trusted(tiny_export, tmp_path, capsys):
    folder = shutil.copytree(tiny_export, tmp_path / "export")
    outside = tmp_path / "outside.json"
    (folder / "tokenizer.json").rename(outside)
    (folder / "tokenizer.json").symlink_to(outside)
    code, out, err = run_main(capsys, "chat", folder, "--prompt", "Hello", "--budget", "full", "--trust-modified")
    assert_one_line_error(code, out, err, "tokenizer.json")


def test_a_failed_chat_keeps_an_earlier_telemetry_file_and_leaves_no_new_one(tmp_path, capsys):
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text('{"token_index": 0}\n')
    for path in (earlier, tmp_path / "new.jsonl"):
        code, out, err = run_main(capsys, "chat", tmp_path / "nowhere", "--prompt", "Hello", "--telemetry", path)
        assert_one_line_error(code, out, err, "does not exist")
    assert earlier.read_text() == '{"token_index": 0}\n' and not (tmp_path / "new.jsonl").exists()


def test_prompt_bytes_that_are_not_utf8_are_named_from_argv_and_from_stdin(tiny_export):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [
        sys.executable,
        "-m",
        "balcony_edge",
        "chat",
        str(tiny_export),
        "--budget",
        "full",
        "--max-new-tokens",
        "2",
    ]
    one_shot = subprocess.run([*command, "--prompt", b"caf\xe9"], capture_output=True, env=env)
    assert one_shot.returncode == 1
    assert (
        one_shot.stderr.decode().strip()
        == "error: the prompt is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text"
    )
    interactive = subprocess.run(command + ["--plain"], input=b"caf\xe9\nHello\n/quit\n", capture_output=True, env=env)
    output = interactive.stdout.decode(errors="replace")
    assert interactive.returncode == 0, interactive.stderr
    assert "error: the prompt is not valid UTF-8 (byte 0xe9 at character 3)" in output
    assert "tok/s" in interactive.stderr.decode(errors="replace")


def test_version_and_a_thread_count_above_the_cores_are_one_line(tiny_export, capsys, monkeypatch):
    import os
    import sys

    from balcony_edge import __version__
    from balcony_edge.cli import main

    monkeypatch.setattr(sys, "argv", ["balcony-edge", "--version"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"balcony-edge {__version__}"
    too_many = (os.cpu_count() or 1) + 1
    monkeypatch.setattr(
        sys, "argv", ["balcony-edge", "chat", str(tiny_export), "--threads", str(too_many), "--prompt", "hi"]
    )
    with pytest.raises(SystemExit) as done:
        main()
    error = capsys.readouterr().err.strip()
    assert (
        done.value.code == 1
        and len(error.splitlines()) == 1
        and f"more than this machine's {too_many - 1} cores" in error
    )


def test_quiet_hides_status_lines_but_not_errors(tiny_export, capsys, monkeypatch):
    import sys

    from balcony_edge.cli import main
    from balcony_edge.common.console import console

    monkeypatch.setattr(
        sys, "argv", ["balcony-edge", "-q", "chat", str(tiny_export), "--budget", "nonsense", "--prompt", "hi"]
    )
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 1 and "budget" in capsys.readouterr().err
    console.quiet = False


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_signals_that_are_no_regular_file_are_refused_at_once(tiny_export, tmp_path, capsys, kind):
    import os

    if kind == "device":
        path = "/dev/zero"
    elif kind == "fifo":
        path = tmp_path / "trace.jsonl"
        os.mkfifo(path)  # nobody writes to it: reading it would block for ever
    else:
        path = tmp_path
    code, out, err = run_main(capsys, "chat", tiny_export, "--prompt", "Hi", "--signals", path)
    assert_one_line_error(code, out, err, f"signal trace {path} is not a regular file")


def test_training_data_that_is_a_device_is_named_as_such(tmp_path, capsys):
    code, out, err = run_main(capsys, "train", "--out", tmp_path / "run", "--data", "/dev/zero")
    assert_one_line_error(code, out, err, "data path /dev/zero is not a regular file or a folder")
