"""Telemetry: one JSON line per token, read back, and plotted (torch-free)."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from balcony_edge.common.errors import TelemetryError
from balcony_edge.runtime.device import telemetry as telemetry_module
from balcony_edge.runtime.device.sources import Signals
from balcony_edge.runtime.device.telemetry import TELEMETRY_FIELDS, TelemetryWriter, plot_telemetry, read_telemetry


def _write_tokens(path, count: int = 40) -> list[dict]:
    now = [10.0]
    with TelemetryWriter(path, clock=lambda: now[0]) as writer:
        records = []
        for t in range(count):
            now[0] += 0.025
            exit = 30 if t < 15 else 16 if t < 30 else 24
            signals = Signals(
                temperature_degc=60.0 + t,
                battery_percent=90.0 - t / 4,
                on_battery=True,
                power_mw=5200.0,
                extra={"VDD_SOC_mw": 1400.0, "tj-thermal_degc": 60.0 + t},
            )
            records.append(
                writer.write(
                    token_index=t,
                    token_id=100 + t,
                    token_text=" wörd\n" if t == 3 else f" w{t}",
                    exit=exit,
                    latency_ms=25.0 + (40.0 if t == 30 else 0.0),
                    catch_up_tokens=30 if t == 30 else 0,
                    signals=signals,
                    reason=f"temperature {60.0 + t:.1f} degC < soft limit 77 degC: hold exit {exit}",
                )
            )
    return records


def test_telemetry_round_trips_one_line_per_token(tmp_path):
    path = tmp_path / "run" / "telemetry.jsonl"
    written = _write_tokens(path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 40
    records = read_telemetry(path)
    assert records == written
    assert tuple(records[0]) == TELEMETRY_FIELDS
    assert records[0]["t_s"] == pytest.approx(0.025)
    assert records[3]["token_text"] == " wörd\n"
    assert records[30]["catch_up_tokens"] == 30 and records[30]["latency_ms"] == 65.0 and records[30]["exit"] == 24
    assert records[1]["signals"] == {
        "VDD_SOC_mw": 1400.0,
        "tj-thermal_degc": 61.0,
        "temperature_degc": 61.0,
        "battery_percent": 89.75,
        "on_battery": True,
        "power_mw": 5200.0,
    }


def test_each_line_is_on_disk_before_the_writer_closes(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    with TelemetryWriter(path) as writer:
        writer.write(token_index=0, token_id=1, token_text="Hi", exit=8, latency_ms=12.5, reason="fixed budget 8")
        assert json.loads(path.read_text())["reason"] == "fixed budget 8"


def test_a_broken_telemetry_line_is_named(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    path.write_text('{"token_index": 0}\n{not json\n')
    with pytest.raises(TelemetryError, match=r"telemetry.jsonl:2 is not a JSON telemetry record"):
        read_telemetry(path)


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    _write_tokens(path)
    out = plot_telemetry(read_telemetry(path), tmp_path / "plots" / "telemetry.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("out", ["telemetry", "telemetry.dat", "folder"])
def test_plot_to_a_name_that_is_no_image_is_one_line(tmp_path, out):
    path = tmp_path / "telemetry.jsonl"
    _write_tokens(path, count=3)
    (tmp_path / "folder").mkdir()
    with pytest.raises(TelemetryError, match="is not an image file name; give a path ending in .png"):
        plot_telemetry(read_telemetry(path), tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "telemetry.jsonl"]


def test_a_binary_file_is_no_telemetry(tmp_path):
    path = tmp_path / "random.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TelemetryError, match="is not UTF-8 text"):
        read_telemetry(path)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TelemetryError, match="needs matplotlib; pip install matplotlib"):
        plot_telemetry([{"token_index": 0, "exit": 8, "latency_ms": 1.0}], tmp_path / "x.png")


def _token(writer: TelemetryWriter, t: int) -> dict:
    return writer.write(
        token_index=t, token_id=100 + t, token_text=f" w{t}", exit=16, latency_ms=20.0, reason="fixed budget 16"
    )


def test_a_telemetry_path_inside_a_file_is_refused_before_generation_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for path in (tmp_path / "notes.txt" / "telemetry.jsonl", tmp_path / "notes.txt" / "run" / "telemetry.jsonl"):
        with pytest.raises(TelemetryError) as caught:
            TelemetryWriter(path)
        assert str(caught.value) == (
            f"cannot write telemetry to {path}: part of its folder path is a file; give "
            "a path whose folders are folders (or do not exist yet) (--telemetry)"
        )
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_telemetry_path_that_is_a_folder_is_refused_naming_a_file_to_give(tmp_path):
    (tmp_path / "runs" / "old.jsonl").parent.mkdir()
    (tmp_path / "runs" / "old.jsonl").write_text("{}\n")
    with pytest.raises(TelemetryError) as caught:
        TelemetryWriter(tmp_path / "runs")
    assert str(caught.value) == (
        f"cannot write telemetry to {tmp_path / 'runs'}: it is a folder; give a "
        f"file in it such as {tmp_path / 'runs' / 'telemetry.jsonl'} (--telemetry)"
    )
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["old.jsonl"]


def test_a_telemetry_path_in_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    path = folder / "telemetry.jsonl"
    if os.access(folder, os.W_OK):  # root writes anyway: give the answer any other user gets
        real_open = os.open

        def refusing_open(target, *args, **kwargs):
            if os.fspath(target) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(target, *args, **kwargs)

        monkeypatch.setattr(telemetry_module.os, "open", refusing_open)
    try:
        with pytest.raises(TelemetryError) as caught:
            TelemetryWriter(path)
    finally:
        folder.chmod(0o755)
    assert str(caught.value) == (
        f"cannot write telemetry to {path}: Permission denied; give a file in a folder you can write (--telemetry)"
    )
    assert not path.exists()


@pytest.mark.parametrize("kept_of_the_failing_line", [0, 25])
def test_a_full_disk_stops_telemetry_with_one_warning_and_keeps_the_lines_written(
    tmp_path, monkeypatch, kept_of_the_failing_line
):
    path = tmp_path / "telemetry.jsonl"
    seen = []
    writer = TelemetryWriter(path, on_warning=seen.append)
    written = [_token(writer, t) for t in range(3)]
    real_write, attempts = os.write, []

    def full_disk(fd, data):  # the disk fills up during the fourth line: part of it (or none) lands, then ENOSPC
        attempts.append(data)
        if len(attempts) == 1 and kept_of_the_failing_line:
            return real_write(fd, data[:kept_of_the_failing_line])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(telemetry_module.os, "write", full_disk)
    records = [_token(writer, t) for t in range(3, 10)]  # generation goes on: no exception
    writer.close()
    assert [r["token_index"] for r in records] == list(range(3, 10))
    assert len(attempts) == 1  # stopped writing after the failure
    assert read_telemetry(path) == written  # whole lines only: the part of the fourth line was cut away
    assert (
        seen
        == writer.warnings
        == [
            (
                f"cannot write telemetry to {path} (No space left on device): it stops after 3 tokens, "
                "which are kept; free disk space or give another --telemetry path"
            )
        ]
    )


def test_a_failed_telemetry_write_warns_on_the_library_logger_by_default(tmp_path, monkeypatch, caplog):
    def broken_disk(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "telemetry.jsonl"
    with TelemetryWriter(path) as writer:
        monkeypatch.setattr(telemetry_module.os, "write", broken_disk)
        with caplog.at_level("WARNING", logger="balcony_edge"):
            _token(writer, 0)
    assert [r.name for r in caplog.records] == ["balcony_edge"]
    assert "(Input/output error): it stops after 0 tokens" in caplog.records[0].getMessage()
    assert path.read_text() == ""


def test_an_existing_file_that_is_not_telemetry_is_not_overwritten(tmp_path):
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "data"}\n')
    with pytest.raises(TelemetryError, match="exists and is not a telemetry file"):
        TelemetryWriter(mine)
    assert mine.read_text() == '{"my": "data"}\n'
    earlier = tmp_path / "run.jsonl"
    _write_tokens(earlier, count=2)
    with TelemetryWriter(earlier) as writer:  # an earlier run's telemetry is replaced, as before
        writer.write(token_index=0, token_id=1, token_text="Hi", exit=8, latency_ms=1.0)
    assert len(read_telemetry(earlier)) == 1


def test_plot_of_a_signals_trace_says_it_is_no_telemetry(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"t_s": 0, "temperature_degc": 60}\n{"t_s": 1, "temperature_degc": 70}\n')
    with pytest.raises(TelemetryError, match=r"trace.jsonl:1 is not a telemetry record \(no token_index\)"):
        read_telemetry(trace)


def test_a_closed_writer_refuses_to_follow_a_generation(tmp_path):
    writer = TelemetryWriter(tmp_path / "run.jsonl")
    writer.close()
    with pytest.raises(TelemetryError, match="is closed; open a new TelemetryWriter"):
        next(writer.follow(iter([])))


def test_turns_and_the_budget_label_every_record_and_the_plot_draws_them(tmp_path):
    from balcony_edge.runtime.core.engine import GeneratedToken

    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path) as writer:
        for turn in (1, 2):
            tokens = [GeneratedToken(5, "a", 8, 30.0 + i, 0, "latency") for i in range(3)]
            list(writer.follow(tokens, turn=turn, budget="40ms"))
    records = read_telemetry(path)
    assert [(r["turn"], r["token_index"]) for r in records] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert {r["budget"] for r in records} == {"40ms"}
    assert plot_telemetry(records, tmp_path / "run.png").stat().st_size > 0
