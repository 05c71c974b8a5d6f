"""Device signals (temperature, battery, power) and the sources that read them; `hub` merges them per token.

Torch-free: the standard library and psutil; jetson-stats (`jtop`) and NVML (`pynvml`) are imported only when
their source is used, so a machine without them loses those readings and nothing else.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import numbers
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from balcony_edge.common.errors import SignalError
from balcony_edge.common.jsonl import read_jsonl
from balcony_edge.runtime.core.manifest import short_repr

if TYPE_CHECKING:
    from jtop import jtop

# Readings outside these ranges are offline sensors (Orin reports -256 degC) or garbage, never a real device.
VALID_TEMPERATURE_DEGC = (-40.0, 150.0)
VALID_PERCENT = (0.0, 100.0)
# 2 kW is more than any one board or GPU draws (an H100 SXM: 700 W); 1e9 mW is a unit slip or garbage.
VALID_POWER_MW = (0.0, 2e6)
# The range of every reading, headline or extra, by the unit that ends its name.
VALID_RANGES = {
    "_degc": (VALID_TEMPERATURE_DEGC, "degC"),
    "_percent": (VALID_PERCENT, "%"),
    "_mw": (VALID_POWER_MW, "mW"),
}
# Thermal zones that do not measure the compute die: a hot PMIC or Wi-Fi card should not slow the model.
# TX-family PMIC-Die zones read a fixed 100 degC (jetson-stats skips them too).
IRRELEVANT_ZONES = ("pmic", "wifi", "iwlwifi", "battery", "charger")
# INA3221 rails that measure the whole board's input (Orin / Xavier NX: VDD_IN; Nano / TX2: POM_5V_IN).
TOTAL_POWER_RAILS = ("VDD_IN", "POM_5V_IN")
GPU_RAIL = re.compile(r"^(VDD_|POM_5V_)?GPU$")
# hwmon channel 7 of an INA3221 is the "sum of shunt voltages", not a rail.
INA3221_SUM_CHANNEL = 7


@dataclass
class Signals:
    """One reading of the device; None where no source could tell."""

    temperature_degc: float | None = None  # hottest relevant thermal zone (junction on a Jetson)
    battery_percent: float | None = None  # 0..100
    on_battery: bool | None = None  # True: discharging / not plugged in
    power_mw: float | None = None  # total input power of the board (battery discharge power on a laptop)
    gpu_temperature_degc: float | None = None
    gpu_power_mw: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # per-zone / per-rail readings, units in the key

    def merge(self, other: Signals) -> Signals:
        """Combine two readings: temperatures take the max (the hottest sensor governs); elsewhere self wins and other
        fills gaps."""
        values = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name.endswith("_degc") and mine is not None and theirs is not None:
                values[f.name] = max(mine, theirs)
            else:
                values[f.name] = mine if mine is not None else theirs
        return Signals(**values, extra={**other.extra, **self.extra})

    def is_empty(self) -> bool:
        """True when nothing was read."""
        return not self.to_dict()

    def to_dict(self) -> dict[str, float | bool]:
        """The readings that are not None, extra flattened in (keys carry their units)."""
        out: dict[str, float | bool] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {key: value for key, value in out.items() if value is not None}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> Signals:
        """Readings from a flat mapping (a trace line, `key=value` text); unknown numeric keys go to extra."""
        known = {f.name for f in fields(cls)} - {"extra"}
        out = cls()
        for key, value in values.items():
            if key == "on_battery":
                out.on_battery = _as_bool(key, value)
            elif key in known:
                setattr(out, key, _as_float(key, value))
            elif value is not None:
                out.extra[key] = _to_float(key, value)
        return out


def _as_float(key: str, value: object) -> float | None:
    return None if value is None else _to_float(key, value)


def _to_float(key: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]  # any object: what float() cannot take raises TypeError here
    except (TypeError, ValueError):
        raise SignalError(
            f"signal {_name(key)}={short_repr(value)} is not a number; give a number such as {_name(key)}=42.5"
        ) from None
    if not math.isfinite(number):
        raise SignalError(f"signal {_name(key)}={short_repr(value)} is not finite; give a finite number")
    return number


def _as_bool(key: str, value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SignalError(f"signal {_name(key)}={short_repr(value)} is not a boolean; give true or false")


def _name(key: object) -> str:
    """A signal name from an untrusted file, as echoed in a message: at most 60 characters."""
    text = str(key)
    return text if len(text) <= 60 else text[:57] + "..."


class SignalSource(Protocol):
    """Anything that can read Signals (close() optional); `live` ones touch hardware: the hub rate-limits them and
    bounds each call."""

    name: str
    live: bool

    def read(self, token_index: int | None = None) -> Signals:
        """The current reading; token_index (tokens generated so far) matters only to token-clocked traces."""
        ...


def _read_text(path: Path) -> str:
    return path.read_text().strip()


def _read_number(path: Path) -> float:
    # INA3221 limit files can read "32760 ma": the number is the first word.
    return float(_read_text(path).split()[0])


def _relevant_zone(name: str) -> bool:
    lowered = name.lower()
    return not any(word in lowered for word in IRRELEVANT_ZONES)


def _valid_temperature(degc: float) -> bool:
    return VALID_TEMPERATURE_DEGC[0] <= degc <= VALID_TEMPERATURE_DEGC[1]


def why_impossible(key: str, value: object) -> str | None:
    """Why a reading named key cannot come from a working sensor (e.g. "outside 0..100 %"), or None when it can."""
    if key == "on_battery":
        return None if isinstance(value, bool) else "not true or false"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "not a number"
    try:
        number = float(value)
    except OverflowError:
        return "not finite"
    if not math.isfinite(number):
        return "not finite"
    for unit, ((low, high), shown) in VALID_RANGES.items():
        if key.endswith(unit) and not low <= number <= high:
            return f"outside {low:g}..{high:g} {shown}"
    return None


class SysfsSource:
    """Linux sysfs: thermal zones (milli-degC), power supplies and Jetson INA3221 rails (mV, mA); root points at a fake
    tree in tests."""

    name = "sysfs"
    live = True

    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)

    def read(self, token_index: int | None = None) -> Signals:
        """Thermal zones, power supplies and INA3221 rails; a file that cannot be read is left out of this reading."""
        out = Signals()
        self._read_thermal_zones(out)
        self._read_power_supplies(out)
        self._read_ina3221(out)
        return out

    def _read_thermal_zones(self, out: Signals) -> None:
        for zone in sorted((self.root / "sys/devices/virtual/thermal").glob("thermal_zone*")):
            try:
                kind = _read_text(zone / "type")
                degc = _read_number(zone / "temp") / 1000.0
            except (OSError, ValueError, IndexError):
                continue  # offline zones raise on read (ENODATA, EINVAL) on real boards
            if not (_relevant_zone(kind) and _valid_temperature(degc)):
                continue
            key = f"{kind}_degc"
            out.extra[key] = max(degc, out.extra.get(key, degc))
            out.temperature_degc = degc if out.temperature_degc is None else max(out.temperature_degc, degc)
            if kind.lower().startswith("gpu"):
                out.gpu_temperature_degc = (
                    degc if out.gpu_temperature_degc is None else max(out.gpu_temperature_degc, degc)
                )

    def _read_power_supplies(self, out: Signals) -> None:
        capacities: list[float] = []
        discharging = charging_or_plugged = False
        discharge_mw = 0.0
        for supply in sorted((self.root / "sys/class/power_supply").glob("*")):
            kind = _optional_text(supply / "type")
            if kind == "Battery":
                if _optional_text(supply / "scope") == "Device":
                    continue  # a wireless mouse's battery, not the machine's
                capacity = _optional_number(supply / "capacity")
                if capacity is not None:
                    capacities.append(capacity)
                status = _optional_text(supply / "status")
                if status == "Discharging":
                    discharging = True
                    discharge_mw += _battery_power_mw(supply) or 0.0
                elif status in ("Charging", "Full", "Not charging"):
                    charging_or_plugged = True
            elif kind is not None and (kind == "Mains" or kind.startswith("USB")):
                if _optional_number(supply / "online") == 1:
                    charging_or_plugged = True
        if capacities:
            out.battery_percent = sum(capacities) / len(capacities)
        if discharging:
            out.on_battery = True
            if discharge_mw > 0:
                out.power_mw = discharge_mw
        elif charging_or_plugged:
            out.on_battery = False

    def _read_ina3221(self, out: Signals) -> None:
        rails: dict[str, float] = {}
        for hwmon in sorted((self.root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
            for label_file in sorted(hwmon.glob("in*_label")):
                channel = label_file.name[2 : -len("_label")]
                if not channel.isdigit() or int(channel) == INA3221_SUM_CHANNEL:
                    continue
                try:
                    label = _read_text(label_file)
                    millivolt = _read_number(hwmon / f"in{channel}_input")
                    milliamp = _read_number(hwmon / f"curr{channel}_input")
                except (OSError, ValueError, IndexError):
                    continue
                if label.upper().startswith("NC") or "sum of shunt" in label.lower():
                    continue  # not-connected channels and the sum channel are not rails
                rails[label] = millivolt * milliamp / 1000.0
        if not rails:
            return
        for label, milliwatt in rails.items():
            out.extra[f"{label}_mw"] = milliwatt
            if GPU_RAIL.match(label.upper()):
                out.gpu_power_mw = milliwatt
        totals = [rails[label] for label in rails if label.upper() in TOTAL_POWER_RAILS]
        # The rails measure the board's input, so they replace a battery-based estimate.
        out.power_mw = totals[0] if totals else sum(rails.values())


def _optional_text(path: Path) -> str | None:
    try:
        return _read_text(path)
    except OSError:
        return None


def _optional_number(path: Path) -> float | None:
    try:
        return _read_number(path)
    except (OSError, ValueError, IndexError):
        return None


def _battery_power_mw(supply: Path) -> float | None:
    """Discharge power of one battery in mW, from power_now (uW) or current_now (uA) x voltage_now (uV)."""
    microwatt = _optional_number(supply / "power_now")
    if microwatt is not None:
        return microwatt / 1000.0
    microamp, microvolt = _optional_number(supply / "current_now"), _optional_number(supply / "voltage_now")
    if microamp is None or microvolt is None:
        return None
    return abs(microamp) * microvolt / 1e9


class PsutilSource:
    """psutil: battery percent and plug state, and the hottest current temperature of psutil's sensors."""

    name = "psutil"
    live = True

    def read(self, token_index: int | None = None) -> Signals:
        """Battery and temperatures through psutil (a platform without a sensor simply lacks that reading)."""
        out = Signals()
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if battery is not None:
            out.battery_percent = float(battery.percent)
            if battery.power_plugged is not None:
                out.on_battery = not battery.power_plugged
        sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        for chip, entries in sensors.items():
            for entry in entries:
                degc = entry.current
                if degc is None or not _relevant_zone(f"{chip} {entry.label}") or not _valid_temperature(degc):
                    continue
                out.temperature_degc = degc if out.temperature_degc is None else max(out.temperature_degc, degc)
        return out


class JtopSource:
    """jetson-stats (`from jtop import jtop`): temperatures (degC) and rail power (mW) from the jtop service."""

    name = "jtop"
    live = True

    def __init__(self) -> None:
        self._jetson: jtop | None = None

    @staticmethod
    def available() -> bool:
        """True when jetson-stats is installed."""
        return importlib.util.find_spec("jtop") is not None

    def read(self, token_index: int | None = None) -> Signals:
        """The jtop service's latest temperatures and power; connects on the first call."""
        if self._jetson is None:
            try:
                from jtop import jtop
            except ImportError:
                raise SignalError(
                    "jetson-stats is not installed; pip install jetson-stats, or leave out the jtop source"
                ) from None
            jetson = jtop()
            jetson.start()
            self._jetson = jetson
        self._jetson.ok(spin=True)  # non-blocking; raises the client thread's error, if any
        return jtop_signals(self._jetson.temperature, self._jetson.power)

    def close(self) -> None:
        """Disconnect from the jtop service."""
        if self._jetson is not None:
            self._jetson.close()
            self._jetson = None


def jtop_signals(temperature: Mapping, power: Mapping) -> Signals:
    """Signals from jtop's `temperature` ({name: {temp, online}} in degC) and `power` ({rail, tot} in mW) dicts."""
    out = Signals()
    for name, sensor in temperature.items():
        degc = sensor.get("temp") if isinstance(sensor, Mapping) else sensor
        online = sensor.get("online", True) if isinstance(sensor, Mapping) else True
        if degc is None or not online or not _relevant_zone(name) or not _valid_temperature(float(degc)):
            continue
        degc = float(degc)
        out.extra[f"{name}_degc"] = degc
        out.temperature_degc = degc if out.temperature_degc is None else max(out.temperature_degc, degc)
        if name.lower().startswith("gpu"):
            out.gpu_temperature_degc = degc
    for label, rail in power.get("rail", {}).items():
        if isinstance(rail, Mapping) and rail.get("power") is not None:
            out.extra[f"{label}_mw"] = float(rail["power"])
            if GPU_RAIL.match(label.upper()):
                out.gpu_power_mw = float(rail["power"])
    total = power.get("tot", {})
    if isinstance(total, Mapping) and total.get("power") is not None:
        out.power_mw = float(total["power"])
    return out


class NvmlSource:
    """NVML (`pynvml`, from nvidia-ml-py): one NVIDIA GPU's temperature (degC) and power draw (mW); not on Jetson."""

    live = True

    def __init__(self, index: int = 0):
        self.index = index
        self.name = f"nvml:{index}"
        self._handle = None

    @staticmethod
    def available() -> bool:
        """True when nvidia-ml-py is installed (NVML itself may still be missing)."""
        return importlib.util.find_spec("pynvml") is not None

    def read(self, token_index: int | None = None) -> Signals:
        """GPU temperature and power; initialises NVML on the first call."""
        import pynvml

        if self._handle is None:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        return Signals(
            gpu_temperature_degc=float(pynvml.nvmlDeviceGetTemperature(self._handle, pynvml.NVML_TEMPERATURE_GPU)),
            gpu_power_mw=float(pynvml.nvmlDeviceGetPowerUsage(self._handle)),  # NVML reports mW
        )

    def close(self) -> None:
        """Shut NVML down."""
        if self._handle is not None:
            import pynvml

            pynvml.nvmlShutdown()
            self._handle = None


TRACE_CLOCKS = ("time", "token")


class TraceSource:
    """Replays a JSONL trace: one reading per line, keyed by `t_s` (seconds since the first read) or `token` (index)."""

    live = False

    def __init__(self, path: str | Path, clock: str = "time", now: Callable[[], float] = time.monotonic):
        if clock not in TRACE_CLOCKS:
            raise SignalError(f"trace clock {clock!r} is not one of {', '.join(TRACE_CLOCKS)}")
        self.path = Path(path)
        self.clock = clock
        self.name = f"trace:{self.path.name}"
        self._now = now
        self._start: float | None = None
        self._token = 0
        self._keys, self._readings = _load_trace(self.path, "t_s" if clock == "time" else "token")

    def read(self, token_index: int | None = None) -> Signals:
        """The last line at or before now (time clock) or token_index (token clock; the last index given, else 0)."""
        if self.clock == "time":
            if self._start is None:
                self._start = self._now()
            position = self._now() - self._start
        else:
            if token_index is not None:
                self._token = token_index
            position = self._token
        line = bisect.bisect_right(self._keys, position) - 1
        return replace(self._readings[line], extra=dict(self._readings[line].extra)) if line >= 0 else Signals()


def _load_trace(path: Path, key: str) -> tuple[list[float], list[Signals]]:
    example = f'{{"{key}": 0, "temperature_degc": 55}}'
    rows: list[tuple[float, Signals]] = []
    for number, values in read_jsonl(
        path, "signal trace", "JSON", f"write one JSON object per line, e.g. {example}", SignalError
    ):
        if not isinstance(values, dict) or key not in values:
            raise SignalError(f"{path}:{number} has no {key!r}; with this clock every line needs one, e.g. {example}")
        at = values.pop(key)
        values.pop("t_s" if key == "token" else "token", None)
        try:
            when = _as_float(key, at)
            if when is None:
                raise SignalError(f"{key} is null; give a number")
            rows.append((when, Signals.from_dict(values)))
        except SignalError as error:
            raise SignalError(f"{path}:{number}: {error}") from None
    if not rows:
        raise SignalError(f"signal trace {path} has no readings; write one JSON object per line")
    rows.sort(key=lambda row: row[0])  # stable: equal keys keep file order, the later line wins
    return [at for at, _ in rows], [signals for _, signals in rows]


class FixedSource:
    """Constant readings (tests, demos, `--signals temperature_degc=80,on_battery=true`)."""

    name = "fixed"
    live = False

    def __init__(self, **values: float | bool | str):  # text as from_text gives it: Signals.from_dict parses it
        self.signals = Signals.from_dict(values)

    @classmethod
    def from_text(cls, text: str) -> FixedSource:
        """Parse `key=value[,key=value...]`, e.g. `temperature_degc=83,battery_percent=40,on_battery=true`."""
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise SignalError(f"signal setting {short_repr(part)} is not key=value; write e.g. temperature_degc=83")
            values[key.strip()] = value.strip()
        return cls(**values)

    def read(self, token_index: int | None = None) -> Signals:
        """The constant reading."""
        return replace(self.signals, extra=dict(self.signals.extra))
