"""Telemetry: one JSON line per generated token (exit, latency, catch-up, signals, reason), and a plot of it."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import TelemetryError
from .signals import Signals

HEADLINE = {f.name for f in fields(Signals)} - {"extra"}

TELEMETRY_FIELDS = (
    "t_s",  # seconds since the writer opened
    "token_index",  # index of the token in this generation
    "token_id",
    "token_text",
    "exit",  # exit that produced the token
    "latency_ms",  # wall time of this token's decode step, catch-up included (ms)
    "catch_up_tokens",  # positions recomputed through deeper layers before this token
    "signals",  # the non-None readings the controller saw
    "reason",  # why the controller chose this exit
)


class TelemetryWriter:
    """Writes one JSON line per token to `path` and flushes it, so a crash or a tail -f sees every token."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._start = clock()
        self._file = self.path.open("w", encoding="utf-8")

    def write(
        self,
        token_index: int,
        token_id: int,
        token_text: str,
        exit: int,
        latency_ms: float,
        catch_up_tokens: int = 0,
        signals: Signals | dict | None = None,
        reason: str = "",
    ) -> dict:
        """Append one token's record (latency in ms) and return it."""
        readings = signals.to_dict() if isinstance(signals, Signals) else dict(signals or {})
        record = {
            "t_s": round(self._clock() - self._start, 6),
            "token_index": int(token_index),
            "token_id": int(token_id),
            "token_text": token_text,
            "exit": int(exit),
            "latency_ms": round(float(latency_ms), 3),
            "catch_up_tokens": int(catch_up_tokens),
            "signals": readings,
            "reason": reason,
        }
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_telemetry(path: str | Path) -> list[dict]:
    """All records of a telemetry file, in order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise TelemetryError(f"cannot read telemetry {path}: {error.strerror}; give the file written with --telemetry") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise TelemetryError(f"{path}:{number} is not a JSON telemetry record ({error.msg})") from None
    return records


def plot_telemetry(records: Sequence[dict], out_png: str | Path) -> Path:
    """Stacked plots over the token index: exit, latency (ms), temperatures (degC), power (mW), battery (%)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TelemetryError("plotting telemetry needs matplotlib; pip install matplotlib (it is in the `train` extra)") from None
    if not records:
        raise TelemetryError("no telemetry records to plot; generate at least one token with telemetry on")
    tokens = [r["token_index"] for r in records]
    panels: list[tuple[str, dict[str, list[float | None]]]] = [
        ("exit", {"exit": [r["exit"] for r in records]}),
        ("latency (ms)", {"latency_ms": [r["latency_ms"] for r in records]}),
    ]
    for title, keep in (
        ("temperature (degC)", lambda key: key.endswith("_degc")),
        ("power (mW)", lambda key: key.endswith("_mw")),
        ("battery (%)", lambda key: key == "battery_percent"),
    ):
        # The merged readings first, then the per-zone / per-rail ones.
        keys = sorted({key for r in records for key in r.get("signals", {}) if keep(key)}, key=lambda k: (k not in HEADLINE, k))
        if keys:
            panels.append((title, {key: [r.get("signals", {}).get(key) for r in records] for key in keys}))

    figure = Figure(figsize=(10, 2.0 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels):
        for key, values in series.items():
            points = [(t, v) for t, v in zip(tokens, values) if v is not None]
            if points:
                xs, ys = zip(*points)
                if title == "exit":
                    ax.step(xs, ys, where="post", label=key, linewidth=1)
                else:
                    ax.plot(xs, ys, label=key, linewidth=1.6 if key in HEADLINE else 0.8)
        ax.set_ylabel(title)
        if len(series) > 1:
            ax.legend(fontsize="small", loc="upper left")
    catch_ups = [t for t, r in zip(tokens, records) if r.get("catch_up_tokens")]
    for t in catch_ups:
        axes[1].axvline(t, color="grey", alpha=0.3, linewidth=0.8)  # deepenings: their latency includes a catch-up
    axes[0].set_yticks(sorted({r["exit"] for r in records}))
    axes[-1].set_xlabel("token")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png
