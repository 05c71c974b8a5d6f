"""Device signals: sysfs trees of a Jetson Orin and a laptop, psutil, jtop, NVML, traces, and the hub (torch-free)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcony_edge.common.errors import SignalError
from balcony_edge.runtime.device import sources as signals_module
from balcony_edge.runtime.device.hub import SignalHub, default_sources
from balcony_edge.runtime.device.sources import (
    VALID_RANGES,
    FixedSource,
    JtopSource,
    NvmlSource,
    PsutilSource,
    Signals,
    SysfsSource,
    TraceSource,
    jtop_signals,
)

INA3221 = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _zone(root: Path, index: int, kind: str, millidegc: int) -> None:
    _write(root, f"sys/devices/virtual/thermal/thermal_zone{index}/type", kind)
    _write(root, f"sys/devices/virtual/thermal/thermal_zone{index}/temp", str(millidegc))


def _rail(root: Path, hwmon: str, channel: int, label: str, millivolt: int, milliamp: int) -> None:
    _write(root, f"{hwmon}/in{channel}_label", label)
    _write(root, f"{hwmon}/in{channel}_input", str(millivolt))
    _write(root, f"{hwmon}/curr{channel}_input", str(milliamp))


def _supply(root: Path, name: str, **files: str) -> None:
    for key, value in files.items():
        _write(root, f"sys/class/power_supply/{name}/{key}", value)


def jetson_orin_tree(root: Path) -> Path:
    """A Jetson Orin Nano's sysfs: CPU/GPU/CV/SOC/junction zones (one offline) and one INA3221 with VDD_IN."""
    _zone(root, 0, "cpu-thermal", 48500)
    _zone(root, 1, "gpu-thermal", 51000)
    _zone(root, 2, "cv0-thermal", -256000)  # offline on an Orin Nano
    _zone(root, 3, "soc0-thermal", 47000)
    _zone(root, 4, "tj-thermal", 52250)
    _rail(root, INA3221, 1, "VDD_IN", 5036, 1032)
    _rail(root, INA3221, 2, "VDD_CPU_GPU_CV", 5028, 398)
    _rail(root, INA3221, 3, "VDD_SOC", 5032, 584)
    _rail(root, INA3221, 7, "sum of shunt voltages", 40, 2000)
    return root


def laptop_tree(root: Path, plugged: bool) -> Path:
    """A laptop's sysfs: ACPI and package zones, a Wi-Fi zone, BAT0, AC and a wireless mouse's battery."""
    _zone(root, 0, "acpitz", 45000)
    _zone(root, 1, "x86_pkg_temp", 67000)
    _zone(root, 2, "iwlwifi_1", 80000)  # the Wi-Fi card: not the compute die
    _supply(
        root,
        "BAT0",
        type="Battery",
        capacity="64",
        status="Charging" if plugged else "Discharging",
        power_now="12345000",
    )
    _supply(root, "AC", type="Mains", online="1" if plugged else "0")
    _supply(root, "hid-00:11:22-battery", type="Battery", scope="Device", capacity="5", status="Discharging")
    return root


def test_sysfs_reads_jetson_orin_zones_and_vdd_in(tmp_path):
    reading = SysfsSource(jetson_orin_tree(tmp_path)).read()
    assert reading.temperature_degc == 52.25  # tj-thermal, the hottest; the offline CV zone is ignored
    assert reading.gpu_temperature_degc == 51.0
    assert reading.power_mw == pytest.approx(5036 * 1032 / 1000)  # VDD_IN is the board's input: 5197.152 mW
    assert reading.extra["VDD_CPU_GPU_CV_mw"] == pytest.approx(2001.144)
    assert reading.extra["VDD_SOC_mw"] == pytest.approx(2938.688)
    assert reading.extra["cpu-thermal_degc"] == 48.5
    assert "cv0-thermal_degc" not in reading.extra
    assert not any("sum" in key for key in reading.extra)
    assert reading.battery_percent is None and reading.on_battery is None and reading.gpu_power_mw is None


def test_sysfs_sums_rails_without_vdd_in_and_finds_the_gpu_rail(tmp_path):
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    _rail(tmp_path, hwmon, 1, "GPU", 19000, 100)
    _rail(tmp_path, hwmon, 2, "CPU", 19000, 200)
    _rail(tmp_path, hwmon, 3, "NC", 19000, 999)  # not connected
    reading = SysfsSource(tmp_path).read()
    assert reading.power_mw == pytest.approx(1900 + 3800)
    assert reading.gpu_power_mw == pytest.approx(1900)


def test_sysfs_reads_a_laptop_on_battery(tmp_path):
    reading = SysfsSource(laptop_tree(tmp_path, plugged=False)).read()
    assert reading.temperature_degc == 67.0  # x86_pkg_temp; the 80 degC Wi-Fi zone does not count
    assert reading.battery_percent == 64.0  # the mouse's 5% battery is not the machine's
    assert reading.on_battery is True
    assert reading.power_mw == pytest.approx(12345.0)  # power_now 12345000 uW while discharging
    assert reading.extra == {"acpitz_degc": 45.0, "x86_pkg_temp_degc": 67.0}


def test_sysfs_reads_a_laptop_plugged_in(tmp_path):
    reading = SysfsSource(laptop_tree(tmp_path, plugged=True)).read()
    assert reading.on_battery is False
    assert reading.battery_percent == 64.0
    assert reading.power_mw is None  # battery power while charging is not the board's input


def test_sysfs_leaves_out_an_unreadable_zone(tmp_path):
    jetson_orin_tree(tmp_path)
    broken = tmp_path / "sys/devices/virtual/thermal/thermal_zone4/temp"
    broken.unlink()
    broken.mkdir()  # reading it raises IsADirectoryError, like a zone that errors on a real board
    reading = SysfsSource(tmp_path).read()
    assert reading.temperature_degc == 51.0
    assert reading.power_mw == pytest.approx(5197.152)


def test_sysfs_on_an_empty_tree_reads_nothing(tmp_path):
    assert SysfsSource(tmp_path).read().is_empty()


def test_psutil_source_reads_battery_and_hottest_sensor(monkeypatch):
    battery = namedtuple("sbattery", "percent secsleft power_plugged")
    shwtemp = namedtuple("shwtemp", "label current high critical")
    monkeypatch.setattr(psutil, "sensors_battery", lambda: battery(41.5, 3600, False), raising=False)
    monkeypatch.setattr(
        psutil,
        "sensors_temperatures",
        lambda: {
            "coretemp": [shwtemp("Package id 0", 71.0, 100.0, 100.0), shwtemp("Core 0", 69.0, 100.0, 100.0)],
            "iwlwifi_1": [shwtemp("", 90.0, None, None)],
            "nvme": [shwtemp("Composite", -273.0, None, None)],
        },
        raising=False,
    )
    reading = PsutilSource().read()
    assert (reading.battery_percent, reading.on_battery, reading.temperature_degc) == (41.5, True, 71.0)


def test_jtop_dicts_become_signals():
    temperature = {
        "cpu": {"online": True, "temp": 55.5},
        "gpu": {"online": True, "temp": 53.0},
        "cv0": {"online": False, "temp": -256},
        "tj": {"online": True, "temp": 56.25},
    }
    power = {
        "rail": {"VDD_CPU_GPU_CV": {"power": 2400, "online": True}, "VDD_SOC": {"power": 1400}},
        "tot": {"power": 6100, "name": "VDD_IN"},
    }
    reading = jtop_signals(temperature, power)
    assert (reading.temperature_degc, reading.gpu_temperature_degc, reading.power_mw) == (56.25, 53.0, 6100.0)
    assert reading.extra == {
        "cpu_degc": 55.5,
        "gpu_degc": 53.0,
        "tj_degc": 56.25,
        "VDD_CPU_GPU_CV_mw": 2400.0,
        "VDD_SOC_mw": 1400.0,
    }


def test_jtop_and_nvml_without_their_packages_fail_once_in_the_hub(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "jtop", None)  # import fails as if jetson-stats were not installed
    monkeypatch.setitem(sys.modules, "pynvml", None)
    hub = SignalHub([JtopSource(), NvmlSource(), FixedSource(temperature_degc=40)])
    with caplog.at_level("WARNING", logger="balcony_edge"):  # no on_warning: the library's logger
        assert hub.read().temperature_degc == 40.0
    assert [record.getMessage() for record in caplog.records] == hub.warnings
    assert hub.read().temperature_degc == 40.0
    assert len(hub.warnings) == 2
    assert "jetson-stats is not installed" in hub.warnings[0]
    assert [source.name for source in hub.sources] == ["fixed"]


def test_nvml_source_reads_gpu_temperature_and_power(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetTemperature=lambda handle, sensor: 63,
        nvmlDeviceGetPowerUsage=lambda handle: 71250,  # NVML reports mW
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    source = NvmlSource()
    reading = source.read()
    assert (reading.gpu_temperature_degc, reading.gpu_power_mw, reading.temperature_degc) == (63.0, 71250.0, None)
    source.read()
    source.close()
    assert calls == ["init", "shutdown"]


def test_merge_takes_the_hottest_temperature_and_fills_gaps():
    first = Signals(temperature_degc=60.0, power_mw=5000.0, extra={"a_degc": 1.0})
    second = Signals(
        temperature_degc=72.0,
        power_mw=9000.0,
        battery_percent=80.0,
        on_battery=False,
        extra={"a_degc": 2.0, "b_mw": 3.0},
    )
    merged = first.merge(second)
    assert merged == Signals(
        temperature_degc=72.0,
        power_mw=5000.0,
        battery_percent=80.0,
        on_battery=False,
        extra={"a_degc": 1.0, "b_mw": 3.0},
    )


def test_signals_round_trip_through_a_flat_dict():
    reading = Signals(temperature_degc=70.0, on_battery=True, extra={"tj-thermal_degc": 70.0})
    assert reading.to_dict() == {"tj-thermal_degc": 70.0, "temperature_degc": 70.0, "on_battery": True}
    assert Signals.from_dict(reading.to_dict()) == reading


class _Failing:
    name = "broken"
    live = True

    def __init__(self):
        self.calls = 0

    def read(self, token_index=None):
        self.calls += 1
        raise OSError("Input/output error: /sys/devices/virtual/thermal/thermal_zone9/temp")


def test_a_failing_source_is_reported_once_and_skipped(tmp_path):
    seen = []
    broken = _Failing()
    hub = SignalHub([broken, SysfsSource(jetson_orin_tree(tmp_path))], min_interval_s=0, on_warning=seen.append)
    for _ in range(5):
        reading = hub.read()
        assert reading.temperature_degc == 52.25 and reading.power_mw == pytest.approx(5197.152)
    assert broken.calls == 1
    assert seen == hub.warnings
    assert hub.warnings == [
        "signal source broken failed and is skipped from now on: OSError: "
        "Input/output error: /sys/devices/virtual/thermal/thermal_zone9/temp"
    ]


def test_an_unreadable_trace_is_a_clear_error(tmp_path):
    with pytest.raises(SignalError, match="cannot read signal trace .*missing.jsonl"):
        TraceSource(tmp_path / "missing.jsonl")


def test_a_binary_trace_is_named_in_one_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(
        SignalError, match=r"signal trace .*trace.jsonl is not UTF-8 text; write one JSON object per line"
    ):
        TraceSource(path)


class _Counting:
    name = "counting"
    live = True

    def __init__(self):
        self.calls = 0

    def read(self, token_index=None):
        self.calls += 1
        return Signals(temperature_degc=50.0 + self.calls)


def test_hub_reads_live_sources_at_most_once_per_interval():
    now = [0.0]
    live = _Counting()
    hub = SignalHub([live, FixedSource(battery_percent=90)], min_interval_s=0.2, clock=lambda: now[0])
    assert hub.read().temperature_degc == 51.0
    now[0] = 0.15
    assert hub.read() == Signals(temperature_degc=51.0, battery_percent=90.0)  # cached
    now[0] = 0.25
    assert hub.read().temperature_degc == 52.0
    assert live.calls == 2


def _trace(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_trace_replays_on_the_clock(tmp_path):
    path = _trace(
        tmp_path,
        [
            {"t_s": 0.5, "temperature_degc": 55, "battery_percent": 80, "on_battery": True},
            {"t_s": 2.5, "temperature_degc": 70},
            {"t_s": 1.0, "temperature_degc": 60, "battery_percent": 79},
        ],
    )
    now = [100.0]
    source = TraceSource(path, clock="time", now=lambda: now[0])
    readings = []
    for at in (100.0, 100.5, 100.9, 101.0, 102.49, 102.5, 500.0):
        now[0] = at
        readings.append(source.read(token_index=999))  # the token index does not matter on the time clock
    assert readings[0] == Signals()  # before the first line
    assert readings[1] == Signals(temperature_degc=55.0, battery_percent=80.0, on_battery=True)
    assert readings[2] == readings[1]
    assert readings[3] == readings[4] == Signals(temperature_degc=60.0, battery_percent=79.0)
    assert readings[5] == readings[6] == Signals(temperature_degc=70.0)


def test_trace_replays_by_token(tmp_path):
    path = _trace(
        tmp_path, [{"token": 0, "temperature_degc": 50}, {"token": 10, "temperature_degc": 80, "fan_rpm": 3000}]
    )
    source = TraceSource(path, clock="token")
    assert source.read(0).temperature_degc == 50.0
    assert source.read(9).temperature_degc == 50.0
    assert source.read(10) == Signals(temperature_degc=80.0, extra={"fan_rpm": 3000.0})
    assert source.read().temperature_degc == 80.0  # no index: the last one given
    hub = SignalHub([source], min_interval_s=10.0)  # a trace is not rate-limited
    assert [hub.read(t).temperature_degc for t in (3, 12, 4)] == [50.0, 80.0, 50.0]


def test_trace_lines_without_their_clock_key_are_refused(tmp_path):
    path = _trace(tmp_path, [{"t_s": 0, "temperature_degc": 50}, {"temperature_degc": 60}])
    with pytest.raises(SignalError, match=r"trace.jsonl:2 has no 't_s'"):
        TraceSource(path)
    path.write_text('{"token": 0, "temperature_degc": "hot"}\n')
    with pytest.raises(SignalError, match=r"trace.jsonl:1: signal temperature_degc='hot' is not a number"):
        TraceSource(path, clock="token")
    with pytest.raises(SignalError, match="trace clock 'tokens' is not one of time, token"):
        TraceSource(path, clock="tokens")
    path.write_text('{"t_s": null, "temperature_degc": 50}\n')
    with pytest.raises(SignalError, match=r"trace.jsonl:1: t_s is null; give a number"):
        TraceSource(path)


def test_fixed_source_parses_key_value_text():
    source = FixedSource.from_text("temperature_degc=83, battery_percent=40,on_battery=true,fan_rpm=2500")
    assert source.read() == Signals(
        temperature_degc=83.0, battery_percent=40.0, on_battery=True, extra={"fan_rpm": 2500.0}
    )
    with pytest.raises(SignalError, match="'temperature_degc' is not key=value"):
        FixedSource.from_text("temperature_degc")
    with pytest.raises(SignalError, match="on_battery='maybe' is not a boolean"):
        FixedSource.from_text("on_battery=maybe")


def test_default_sources_keep_only_what_reads_something(tmp_path, monkeypatch):
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None, raising=False)
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    monkeypatch.setattr(signals_module.JtopSource, "available", staticmethod(lambda: False))
    monkeypatch.setattr(signals_module.NvmlSource, "available", staticmethod(lambda: False))
    assert [source.name for source in default_sources(jetson_orin_tree(tmp_path))] == ["sysfs"]
    assert default_sources(tmp_path / "nothing") == []


def test_signals_controller_and_telemetry_import_without_torch():
    code = (
        "import sys\n"
        "import balcony_edge.runtime.device.sources, balcony_edge.runtime.device.hub, "
        "balcony_edge.runtime.device.controller, balcony_edge.runtime.device.telemetry\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _Hanging:
    """A live source whose read blocks until released, like a driver stuck on a dead i2c bus."""

    name = "stuck"
    live = True

    def __init__(self):
        self.release, self.closed = threading.Event(), threading.Event()
        self.calls = 0

    def read(self, token_index=None):
        self.calls += 1
        self.release.wait()
        return Signals(temperature_degc=99.0)

    def close(self):
        self.closed.set()


def test_a_hanging_source_is_dropped_after_the_timeout_and_generation_goes_on():
    seen = []
    stuck = _Hanging()
    hub = SignalHub(
        [stuck, FixedSource(battery_percent=70)], min_interval_s=0, read_timeout_s=0.2, on_warning=seen.append
    )
    try:
        started = time.monotonic()
        assert hub.read(0) == Signals(battery_percent=70.0)
        assert 0.19 <= time.monotonic() - started < 1.0
        started = time.monotonic()
        assert [hub.read(t) for t in range(1, 21)] == [Signals(battery_percent=70.0)] * 20
        assert time.monotonic() - started < 0.1  # the stuck source is not waited for again
        assert stuck.calls == 1
        assert seen == hub.warnings == ["signal source stuck did not answer within 0.2 s and is skipped from now on"]
        assert [source.name for source in hub.sources] == ["fixed"]
    finally:
        stuck.release.set()
    assert stuck.closed.wait(timeout=5)  # closed once its read has come back, on its own thread


def test_several_hanging_sources_cost_one_timeout_together():
    first, second = _Hanging(), _Hanging()
    second.name = "stuck too"
    hub = SignalHub([first, second, FixedSource(temperature_degc=45)], read_timeout_s=0.4, on_warning=lambda text: None)
    try:
        started = time.monotonic()
        assert hub.read() == Signals(temperature_degc=45.0)
        assert time.monotonic() - started < 0.75  # both asked at once: one 0.4 s wait, not two
        assert len(hub.warnings) == 2
    finally:
        first.release.set()
        second.release.set()


def test_a_hanging_source_does_not_keep_the_program_from_exiting():
    code = textwrap.dedent("""
        import threading
        from balcony_edge.runtime.device.hub import SignalHub

        class Stuck:
            name, live = "stuck", True
            def read(self, token_index=None):
                threading.Event().wait()
            def close(self):
                threading.Event().wait()

        with SignalHub([Stuck()], read_timeout_s=0.1, on_warning=print) as hub:
            print(hub.read())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "signal source stuck did not answer within 0.1 s and is skipped from now on",
        repr(Signals()),
    ]


class _Fast:
    name = "fast"
    live = True

    def read(self, token_index=None):
        return Signals(temperature_degc=50.0, power_mw=5000.0, extra={"VDD_SOC_mw": 1400.0})


def test_an_answering_live_source_costs_well_under_a_millisecond_per_read():
    hub = SignalHub([_Fast()], min_interval_s=0, on_warning=pytest.fail)  # a hand-over to its thread on every read
    hub.read()
    started = time.perf_counter()
    readings = [hub.read(t) for t in range(500)]
    assert (time.perf_counter() - started) / 500 < 2e-3  # about 0.05 ms on a laptop core
    assert readings[-1] == _Fast().read()


def test_read_timeout_must_be_positive():
    with pytest.raises(SignalError, match=r"read_timeout_s 0 is not positive; give the seconds a read may take"):
        SignalHub([], read_timeout_s=0)


class _Returning:
    """A source that returns whatever it is given."""

    name = "odd"

    def __init__(self, value, live: bool = True):
        self.value, self.live, self.calls = value, live, 0

    def read(self, token_index=None):
        self.calls += 1
        return self.value


GOOD = {
    "temperature_degc": 55.0,
    "gpu_temperature_degc": 50.0,
    "battery_percent": 60.0,
    "on_battery": True,
    "power_mw": 4000.0,
    "gpu_power_mw": 1500.0,
}


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("battery_percent", -5.0, "outside 0..100 %"),
        ("battery_percent", 250.0, "outside 0..100 %"),
        ("temperature_degc", 500.0, "outside -40..150 degC"),
        ("temperature_degc", -300.0, "outside -40..150 degC"),
        ("gpu_temperature_degc", math.nan, "not finite"),
        ("power_mw", math.inf, "not finite"),
        ("power_mw", -1200.0, "outside 0..2e+06 mW"),
        ("gpu_power_mw", 1e9, "outside 0..2e+06 mW"),
        ("on_battery", "yes", "not true or false"),
        ("on_battery", 1, "not true or false"),
        ("battery_percent", "80", "not a number"),
        ("temperature_degc", True, "not a number"),
    ],
)
def test_nonsense_battery_and_temperature_are_ignored_with_one_warning(key, value, why):
    seen = []
    source = _Returning(Signals(**{**GOOD, key: value}))
    hub = SignalHub([source], min_interval_s=0, on_warning=seen.append)
    readings = [hub.read(t) for t in range(5)]
    assert readings == [Signals(**{k: v for k, v in GOOD.items() if k != key})] * 5  # the rest of the reading is kept
    assert source.calls == 5 and hub.sources == [source]
    assert (
        seen
        == hub.warnings
        == [
            f"signal source odd gave {key}={value!r}, {why}; that field of it is ignored from now on (check the sensor)"
        ]
    )


def test_nonsense_per_zone_and_per_rail_readings_are_ignored_by_their_unit():
    extra = {
        "tj_degc": -256.0,
        "cpu_degc": 58.0,
        "VDD_IN_mw": -5.0,
        "VDD_SOC_mw": 1400.0,
        "fan_rpm": math.nan,
        "fan_pwm": 120.0,
    }
    hub = SignalHub([_Returning(Signals(temperature_degc=58.0, extra=extra))], on_warning=lambda text: None)
    assert hub.read() == Signals(
        temperature_degc=58.0, extra={"cpu_degc": 58.0, "VDD_SOC_mw": 1400.0, "fan_pwm": 120.0}
    )
    assert [warning.split(",")[0] for warning in hub.warnings] == [
        "signal source odd gave tj_degc=-256.0",
        "signal source odd gave VDD_IN_mw=-5.0",
        "signal source odd gave fan_rpm=nan",
    ]


def test_each_source_and_field_is_warned_about_once():
    first, second = _Returning(Signals(battery_percent=101.0)), _Returning(Signals(battery_percent=-1.0), live=False)
    second.name = "other"
    hub = SignalHub([first, second, FixedSource(temperature_degc=40)], min_interval_s=0, on_warning=lambda text: None)
    for percent in (101.0, 180.0, 1e6):
        first.value = Signals(battery_percent=percent)  # a different bad value of the same field: no new warning
        assert hub.read() == Signals(temperature_degc=40.0)
    first.value = Signals(battery_percent=42.0)  # the sensor recovers: its readings count again
    assert hub.read().battery_percent == 42.0
    assert [warning.split(",")[0] for warning in hub.warnings] == [
        "signal source odd gave battery_percent=101.0",
        "signal source other gave battery_percent=-1.0",
    ]


READINGS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3))


@settings(max_examples=150, deadline=None)
@given(
    headline=st.fixed_dictionaries({key: READINGS for key in GOOD}),
    extra=st.dictionaries(st.sampled_from(["tj_degc", "VDD_IN_mw", "level_percent", "fan_rpm"]), READINGS, max_size=4),
)
def test_whatever_a_source_returns_the_hub_passes_on_only_possible_readings(headline, extra):
    seen = []
    hub = SignalHub([_Returning(Signals(**headline, extra=extra), live=False)], on_warning=seen.append)
    reading = hub.read()
    assert hub.read() == reading and len(seen) == len(set(seen))  # the same nonsense is not reported twice
    given_fields = [value for value in (*headline.values(), *extra.values()) if value is not None]
    assert len(reading.to_dict()) + len(seen) == len(given_fields)  # every field is either passed on or reported
    for key, value in reading.to_dict().items():
        if key == "on_battery":
            assert isinstance(value, bool)
            continue
        assert type(value) is float and math.isfinite(value)
        for unit, ((low, high), _) in VALID_RANGES.items():
            assert low <= value <= high or not key.endswith(unit)


@pytest.mark.parametrize("value", [{"temperature_degc": 50}, None, 55.0, "temperature_degc=50"])
def test_a_source_returning_something_other_than_signals_is_dropped_with_one_warning(value):
    odd = _Returning(value)
    hub = SignalHub([odd, FixedSource(temperature_degc=40)], min_interval_s=0, on_warning=lambda text: None)
    assert [hub.read(t) for t in range(3)] == [Signals(temperature_degc=40.0)] * 3
    assert odd.calls == 1
    assert hub.warnings == [
        f"signal source odd gave a {type(value).__name__} instead of Signals and is skipped from now on"
    ]


class _FailingToClose(_Fast):
    name = "nvml:0"

    def __init__(self):
        self.close_calls = 0

    def close(self):
        self.close_calls += 1
        raise RuntimeError("NVML_ERROR_UNINITIALIZED")


def test_a_source_whose_close_raises_is_reported_once_when_the_hub_closes():
    source = _FailingToClose()
    with SignalHub([source], on_warning=lambda text: None) as hub:
        assert hub.read().temperature_degc == 50.0
    assert source.close_calls == 1
    assert hub.warnings == [
        "signal source nvml:0 failed while closing and is dropped: RuntimeError: NVML_ERROR_UNINITIALIZED"
    ]
    assert hub.sources == [] and hub.read() == Signals()
    hub.close()  # closing twice closes nothing twice
    assert source.close_calls == 1


def test_a_failing_source_whose_close_also_raises_is_reported_once():
    class Broken(_FailingToClose):
        name = "broken"

        def read(self, token_index=None):
            raise OSError("Input/output error")

    broken = Broken()
    with SignalHub([broken, FixedSource(temperature_degc=40)], min_interval_s=0, on_warning=lambda text: None) as hub:
        assert [hub.read().temperature_degc for _ in range(3)] == [40.0] * 3
    deadline = time.monotonic() + 5
    while broken.close_calls == 0 and time.monotonic() < deadline:  # closed on its own thread, nobody waits
        time.sleep(0.01)
    assert broken.close_calls == 1
    assert hub.warnings == ["signal source broken failed and is skipped from now on: OSError: Input/output error"]


def test_a_source_whose_close_hangs_does_not_hold_up_closing_the_hub():
    stuck = _Hanging()
    stuck.read = lambda token_index=None: Signals(temperature_degc=61.0)
    stuck.close = stuck.release.wait
    hub = SignalHub([stuck], read_timeout_s=0.2, on_warning=lambda text: None)
    assert hub.read().temperature_degc == 61.0
    started = time.monotonic()
    try:
        hub.close()
        assert time.monotonic() - started < 1.0
    finally:
        stuck.release.set()
    assert hub.warnings == ["signal source stuck did not close within 0.2 s; it is left to finish in the background"]


def test_default_sources_leave_out_a_source_that_hangs_while_probed(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(signals_module.PsutilSource, "read", lambda self, token_index=None: release.wait())
    monkeypatch.setattr(signals_module.JtopSource, "available", staticmethod(lambda: False))
    monkeypatch.setattr(signals_module.NvmlSource, "available", staticmethod(lambda: False))
    started = time.monotonic()
    try:
        found = default_sources(jetson_orin_tree(tmp_path), timeout_s=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        release.set()
    assert [source.name for source in found] == ["sysfs"]


def test_a_huge_field_in_a_trace_is_echoed_short(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"t_s": 0, "temperature_degc": "x" * 50_000_000}) + "\n")
    with pytest.raises(SignalError) as refused:
        TraceSource(trace).read(0)
    assert len(str(refused.value)) < 400 and "is not a number" in str(refused.value)
    key = "k" * 1000
    with pytest.raises(SignalError) as refused:
        FixedSource.from_text(f"{key}=abc")
    assert len(str(refused.value)) < 400
