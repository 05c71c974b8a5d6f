"""Telemetry: one JSON line per generated token (exit, latency, catch-up, signals, reason), and a plot of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import fields
from pathlib import Path

from balcony_edge.common.atomic import atomic_path
from balcony_edge.common.console import log_warning
from balcony_edge.common.errors import TelemetryError
from balcony_edge.common.jsonl import read_jsonl
from balcony_edge.runtime.core.engine import GeneratedToken
from balcony_edge.runtime.device.sources import Signals

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
    "turn",  # which answer of the conversation (chat) or which request (serve) the token belongs to
    "budget",  # the budget it ran under (a latency target such as 40ms shows in the plot)
)
REQUIRED_FIELDS = ("token_index", "exit", "latency_ms")  # what `plot` reads of every record


class TelemetryWriter:
    """One JSON line per token, written as it goes (a crash or a tail -f sees every token); a failed write ends the
    telemetry, not the generation."""

    def __init__(
        self,
        path: str | Path,
        clock: Callable[[], float] = time.monotonic,
        on_warning: Callable[[str], None] | None = None,
    ):
        """Open path now, so that one that cannot be written is refused before generation; on_warning: default Python's
        warnings."""
        self.path = Path(path)
        self.warnings: list[str] = []
        self._on_warning = on_warning or log_warning
        # A raw descriptor, nothing buffered: after a failed write the file can be cut back to its last whole line.
        # An existing file is emptied only by the first line: a run that fails before its first token keeps it.
        self._created = not self.path.exists()
        if not self._created and not _is_telemetry_or_empty(self.path):
            raise TelemetryError(
                f"{self.path} exists and is not a telemetry file; give a "
                "new path (or remove that file yourself) (--telemetry)"
            )
        self._fd: int | None = _open_for_writing(self.path)
        self._lines = 0
        self._bytes = 0  # where the last whole line ends
        self._clock = clock
        self._start = clock()
        self._closed = False

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
        turn: int | str | None = None,
        budget: str | None = None,
    ) -> dict:
        """Append one token's record (latency in ms) and return it; after a failed write, only return it."""
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
            "turn": turn,
            "budget": budget,
        }
        if self._fd is not None:
            self._append(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        return record

    def follow(
        self, tokens: Iterable[GeneratedToken], turn: int | str | None = None, budget: str | None = None
    ) -> Generator[GeneratedToken, None, None]:
        """Hand on each token of a generation, its record written first (token_index counts from 0; `turn` and
        `budget` label every record)."""
        if self.closed:
            raise TelemetryError(f"the telemetry writer of {self.path} is closed; open a new TelemetryWriter")
        for index, token in enumerate(tokens):
            self.write(
                index,
                token.id,
                token.text,
                token.exit,
                token.latency_ms,
                token.catch_up_tokens,
                token.signals,
                token.reason,
                turn,
                budget,
            )
            yield token

    @property
    def closed(self) -> bool:
        return self._closed

    def _append(self, fd: int, line: bytes) -> None:
        """Write line to fd (the open file, self._fd)."""
        try:
            if self._lines == 0:
                os.ftruncate(fd, 0)
            # A line is a few hundred bytes: a regular file takes all of it, or only a part when the disk fills up.
            if os.write(fd, line) < len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            self._stop(fd, error)
        else:
            self._lines += 1
            self._bytes += len(line)

    def _stop(self, fd: int, error: OSError) -> None:
        """Close fd (the open file, self._fd) after a failed write, cut back to its last whole line."""
        self._fd = None
        with contextlib.suppress(
            OSError
        ):  # a device or pipe cannot be cut back, and a full disk may refuse: best effort
            os.ftruncate(fd, self._bytes)
        with contextlib.suppress(OSError):
            os.close(fd)
        self._warn(error)

    def _warn(self, error: OSError) -> None:
        message = (
            f"cannot write telemetry to {self.path} ({error.strerror or error}): it stops after {self._lines} tokens, "
            "which are kept; free disk space or give another --telemetry path"
        )
        self.warnings.append(message)
        self._on_warning(message)

    def close(self) -> None:
        """Close the file; a failure to (a network disk reporting a lost write) is reported like a failed write."""
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as error:
            self._warn(error)
        if self._lines == 0 and self._created:  # nothing was generated: leave no empty file that looks like a run
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_for_writing(path: Path) -> int:
    """A descriptor of path (not emptied yet), its folders made; TelemetryError naming the path and the fix when it
    cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as error:
        if path.is_dir():
            problem = f"it is a folder; give a file in it such as {path / 'telemetry.jsonl'}"
        elif isinstance(error, (FileExistsError, NotADirectoryError)):
            problem = "part of its folder path is a file; give a path whose folders are folders (or do not exist yet)"
        else:
            problem = f"{error.strerror}; give a file in a folder you can write"
        raise TelemetryError(f"cannot write telemetry to {path}: {problem} (--telemetry)") from None


def _is_telemetry_or_empty(path: Path) -> bool:
    """Whether an existing file may be replaced by telemetry: empty, or its first line a telemetry record."""
    if not path.is_file():
        return True  # a folder or a device: _open_for_writing says what is wrong with it
    with open(path, "rb") as file:
        first = file.readline(1 << 16)
    if not first.strip():
        return not first  # empty; a file that starts with a blank line is not telemetry
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "token_index" in record


IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg")  # what matplotlib writes, known by the file name


def read_telemetry(path: str | Path) -> list[dict]:
    """All records of a telemetry file, in order; a line that is no telemetry record (a signals trace's, say) is a
    one-line TelemetryError naming it."""
    fix = "give the JSONL file written with --telemetry"
    records = []
    for number, record in read_jsonl(path, "telemetry", "a JSON telemetry record", fix, TelemetryError):
        missing = [name for name in REQUIRED_FIELDS if not isinstance(record, dict) or name not in record]
        if missing:
            raise TelemetryError(
                f"{path}:{number} is not a telemetry record (no {missing[0]}); {fix} (a signals trace is not one)"
            )
        records.append(record)
    return records


def plot_telemetry(records: Sequence[dict], out_png: str | Path) -> Path:
    """Stacked plots over the token index: exit, latency (ms), temperatures (degC), power (mW), battery (%)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TelemetryError(
            "plotting telemetry needs matplotlib; pip install matplotlib (it is in the `train` extra)"
        ) from None
    if not records:
        raise TelemetryError("no telemetry records to plot; generate at least one token with telemetry on")
    out_png = Path(out_png)
    if out_png.is_dir() or out_png.suffix.lower() not in IMAGE_SUFFIXES:
        raise TelemetryError(
            f"-o {out_png} is not an image file name; give a path ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    tokens = list(range(len(records)))  # one axis for every turn: each answer's token_index starts at 0 again
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
        keys = sorted(
            {key for r in records for key in r.get("signals", {}) if keep(key)}, key=lambda k: (k not in HEADLINE, k)
        )
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
    starts = [
        t
        for t, r in zip(tokens, records)
        if t and (r["token_index"] == 0 or r.get("turn") != records[t - 1].get("turn"))
    ]
    for ax in axes:
        for t in starts:
            ax.axvline(t - 0.5, color="black", alpha=0.5, linestyle="--", linewidth=0.8)  # a new turn or request
    targets = {budget for r in records if isinstance(budget := r.get("budget"), str) and budget.endswith("ms")}
    for target in sorted(targets):
        axes[1].axhline(float(target[:-2]), color="tab:red", linestyle=":", label=f"target {target}")
    if targets:
        axes[1].legend(fontsize="small", loc="upper left")
    axes[0].set_yticks(sorted({r["exit"] for r in records}))
    axes[-1].set_xlabel("token")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as partial:
        figure.savefig(partial, dpi=100)
    return out_png
