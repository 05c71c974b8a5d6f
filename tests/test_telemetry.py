"""Telemetry: one JSON line per token, read back, and plotted (torch-free)."""

from __future__ import annotations

import json
import sys

import pytest

from balcony_edge.errors import TelemetryError
from balcony_edge.runtime.signals import Signals
from balcony_edge.runtime.telemetry import TELEMETRY_FIELDS, TelemetryWriter, plot_telemetry, read_telemetry


def _write_tokens(path, count: int = 40) -> list[dict]:
    now = [10.0]
    with TelemetryWriter(path, clock=lambda: now[0]) as writer:
        records = []
        for t in range(count):
            now[0] += 0.025
            exit = 30 if t < 15 else 16 if t < 30 else 24
            signals = Signals(temperature_degc=60.0 + t, battery_percent=90.0 - t / 4, on_battery=True, power_mw=5200.0,
                              extra={"VDD_SOC_mw": 1400.0, "tj-thermal_degc": 60.0 + t})
            records.append(writer.write(
                token_index=t, token_id=100 + t, token_text=" wörd\n" if t == 3 else f" w{t}", exit=exit,
                latency_ms=25.0 + (40.0 if t == 30 else 0.0), catch_up_tokens=30 if t == 30 else 0,
                signals=signals, reason=f"temperature {60.0 + t:.1f} degC < soft limit 77 degC: hold exit {exit}",
            ))
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
    assert records[1]["signals"] == {"VDD_SOC_mw": 1400.0, "tj-thermal_degc": 61.0, "temperature_degc": 61.0,
                                     "battery_percent": 89.75, "on_battery": True, "power_mw": 5200.0}


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


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TelemetryError, match="needs matplotlib; pip install matplotlib"):
        plot_telemetry([{"token_index": 0, "exit": 8, "latency_ms": 1.0}], tmp_path / "x.png")
