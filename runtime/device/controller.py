"""Choose the exit before every token from a budget, the device signals and the last token's latency.

A governor with hysteresis: each signal caps the depth (temperature, battery, latency, the budget itself);
stepping down to the tightest cap is immediate (safety), stepping up is one exit at a time and only after a
dwell since the last switch and headroom on every signal for several consecutive tokens, because each
deepening costs a catch-up of the positions the skipped layers never saw.

A server shares one Controller among its requests (`DeviceController`): every decode step of every request asks it
for the exit, and a request's own budget only caps what it answers. Signals describe the device, not a request.
"""

from __future__ import annotations

import re
import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from balcony_edge.common.errors import ControllerError
from balcony_edge.runtime.device.sources import Signals

BUDGET_KINDS = ("auto", "full", "exit", "latency", "eco")
_LATENCY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*ms")  # ASCII digits: \d would take "٤٠ms" too
_EXIT_NUMBER = re.compile(r"[1-9][0-9]*")  # str.isdigit takes "²" (which int() refuses), "٢" and "01" too
BUDGET_HELP = "use auto, full, eco, an exit such as 16, or a per-token latency target such as 40ms"
QUALITY_FLOORS = ("auto", "off")


def parse_exit(text: str) -> int | None:
    """The exit `text` names in canonical ASCII digits ("16"; not "016", "١٦" or "²"), else None."""
    return int(text) if _EXIT_NUMBER.fullmatch(text) else None


@dataclass(frozen=True)
class Budget:
    """What the controller aims for: auto, full, a fixed exit, a per-token latency target (ms) or eco (battery
    first)."""

    kind: str
    exit: int | None = None  # kind "exit": the exit to pin
    latency_target_ms: float | None = None  # kind "latency": per-token latency to stay under (ms)

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ControllerError(f"budget kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if (self.kind == "exit") != (self.exit is not None):
            raise ControllerError(f"budget {self.kind!r} with exit {self.exit!r}: only an exit budget names an exit")
        if self.exit is not None and self.exit < 1:
            raise ControllerError(f"budget exit {self.exit} is not a depth; give a positive layer count such as 16")
        if (self.kind == "latency") != (self.latency_target_ms is not None):
            raise ControllerError(
                f"budget {self.kind!r} with latency target {self.latency_target_ms!r}: only a latency budget has one"
            )
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise ControllerError(f"latency target {self.latency_target_ms:g} ms is not positive; give e.g. 40ms")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse `auto`, `full`, `eco`, an exit (`16`) or a latency target (`40ms`, per token)."""
        value = text.strip().lower()
        if value in ("auto", "full", "eco"):
            return cls(value)
        exit = parse_exit(value)
        if exit is not None:
            return cls("exit", exit=exit)
        match = _LATENCY.fullmatch(value)
        if match:
            return cls("latency", latency_target_ms=float(match.group(1)))
        raise ControllerError(f"budget {text!r} is not understood; {BUDGET_HELP}")

    @property
    def is_fixed(self) -> bool:
        """True for `full` and an exit: the exit is pinned and the signals are not consulted."""
        return self.kind in ("full", "exit")

    def __str__(self) -> str:
        if self.kind == "exit":
            return str(self.exit)
        if self.kind == "latency":
            return f"{self.latency_target_ms:g}ms"
        return self.kind


@dataclass(frozen=True)
class ExitProfile:
    """What one exit costs on this device and how good it is."""

    exit: int  # backbone layers before the head
    ms_per_token: float  # one decode step at this exit, measured on this device (ms)
    weight_bytes_per_token: int = 0  # bytes of weights read per decode step
    quality: float | None = None  # agreement with the full model's next token, 0..1 (None: not measured)
    loop_share: float | None = None  # held-out greedy answers caught in a repetition loop, 0..1 (None: not measured)

    def __post_init__(self) -> None:
        if self.exit < 1:
            raise ControllerError(f"exit profile exit {self.exit} is not a depth; give a positive layer count")
        if not self.ms_per_token > 0:
            raise ControllerError(
                f"exit {self.exit}: ms_per_token {self.ms_per_token!r} is not positive; measure a decode step"
            )
        if self.quality is not None and not 0.0 <= self.quality <= 1.0:
            raise ControllerError(
                f"exit {self.exit}: quality {self.quality!r} is not in 0..1 (agreement with the full model)"
            )
        if self.loop_share is not None and not 0.0 <= self.loop_share <= 1.0:
            raise ControllerError(f"exit {self.exit}: loop_share {self.loop_share!r} is not in 0..1")


@dataclass(frozen=True)
class ControllerConfig:
    """Thresholds of the controller; defaults follow the Jetson Orin thermal guidance (junction under 87 degC)."""

    temperature_limit_degc: float = 87.0  # shallowest exit at or above this (Orin shuts down near 97 degC)
    soft_zone_degc: float = 10.0  # start stepping down this far below the limit (degC)
    temperature_hysteresis_degc: float = 2.0  # a step back up needs the temperature this far below its step (degC)
    battery_low_percent: float = 50.0  # on battery below this: one exit below the budget
    battery_critical_percent: float = 10.0  # on battery below this: shallowest exit, below any quality floor
    battery_hysteresis_percent: float = 3.0  # on battery, a step back up needs this much above the threshold (%)
    latency_target_ms: float | None = None  # per-token latency target for the auto and eco budgets (ms)
    latency_up_margin: float = 0.10  # step up only if the deeper exit is predicted this fraction under the target
    latency_smoothing: float = 0.3  # weight of the newest latency sample in its moving average, 0..1
    latency_settle_tokens: int = 4  # latency samples after a switch that learn the new exit's own error (tokens)
    min_dwell_tokens: int = 8  # no deepening within this many tokens of any switch
    headroom_tokens: int = 8  # deepen only after this many consecutive tokens with headroom
    eco_min_quality: float = 0.6  # eco without measured answers: the shallowest exit with at least this quality
    # The shallowest exit auto, eco and latency budgets step down to (hard limits excepted): "auto", the shallowest
    # exit whose held-out answers loop no more often than the full model's plus loop_margin; "off"; or an exit.
    quality_floor: str | int = "auto"
    loop_margin: float = 0.05  # 0..1: the loop share an exit may exceed the full model's by and still be usable

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise ControllerError(f"controller setting {f.name}={value!r} is negative; give 0 or more")
        if self.soft_zone_degc <= 0:
            raise ControllerError(
                f"soft_zone_degc={self.soft_zone_degc!r} must be positive so that the exit steps down before the limit"
            )
        if self.battery_critical_percent > self.battery_low_percent:
            raise ControllerError(
                f"battery_critical_percent={self.battery_critical_percent:g} "
                f"is above battery_low_percent={self.battery_low_percent:g}; "
                "the critical threshold must be the lower one"
            )
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ControllerError(f"latency_target_ms={self.latency_target_ms!r} is not positive; give e.g. 40")
        if not 0 < self.latency_smoothing <= 1:
            raise ControllerError(f"latency_smoothing={self.latency_smoothing!r} is not in (0, 1]")
        if not 0 <= self.latency_up_margin < 1:
            raise ControllerError(f"latency_up_margin={self.latency_up_margin!r} is not in [0, 1)")
        if self.eco_min_quality > 1:
            raise ControllerError(f"eco_min_quality={self.eco_min_quality!r} is not in 0..1")
        if self.loop_margin > 1:
            raise ControllerError(f"loop_margin={self.loop_margin!r} is not in 0..1")
        floor = self.quality_floor
        if not (floor in QUALITY_FLOORS or (isinstance(floor, int) and not isinstance(floor, bool) and floor >= 1)):
            raise ControllerError(f"quality floor {floor!r} is not auto, off or an exit such as 16")

    @property
    def soft_limit_degc(self) -> float:
        """Temperature where stepping down starts (degC)."""
        return self.temperature_limit_degc - self.soft_zone_degc


@dataclass(frozen=True)
class Decision:
    """The exit for the next token and the signal that drove the choice."""

    exit: int
    reason: str
    short: str = ""  # the reason in a few words, for a status line ("plugged in and cool", "battery 15%")
    below_floor: bool = False  # a hard limit (battery critical, thermal trip) took it below the quality floor


class Chooser(Protocol):
    """What picks the exit of each token: a Controller, or a request's view of one shared by a server."""

    def choose(self, signals: Signals, last_latency_ms: float | None, token_index: int) -> Decision: ...


@dataclass(frozen=True)
class _Cap:
    """The deepest exit index one signal allows now; `binds` is False when the signal does not limit at all."""

    level: int
    why: str
    binds: bool = True
    short: str = ""
    hard: bool = False  # a safety limit that may go below the quality floor


class Controller:
    """Picks the exit before every token; see the module docstring for the rules."""

    def __init__(
        self, profiles: Sequence[ExitProfile], budget: Budget | str = "auto", config: ControllerConfig | None = None
    ):
        if not profiles:
            raise ControllerError("no exit profiles; give one ExitProfile per exported exit")
        self.profiles = sorted(profiles, key=lambda p: p.exit)
        self.exits = [p.exit for p in self.profiles]
        if len(set(self.exits)) != len(self.exits):
            raise ControllerError(
                f"exit profiles repeat an exit: {', '.join(map(str, self.exits))}; give one profile per exit"
            )
        self.budget = Budget.parse(budget) if isinstance(budget, str) else budget
        self.config = config or ControllerConfig()
        self.check_budget(self.budget)
        self.latency_target_ms = self.budget.latency_target_ms or self.config.latency_target_ms
        self._top = len(self.exits) - 1
        self._floor, self.floor_note = self._quality_floor_level()
        self._eco_floor = self._eco_floor_level()
        self._level = self._top  # index into exits of the exit in use
        self._temperature_level = self._top
        self._battery_severity = 0  # 0 fine, 1 low, 2 critical
        self._switch_token: int | None = None
        self._last_token: int | None = None
        self._headroom = 0
        self._catching_up = False  # the last decision deepened: its token's latency includes the catch-up
        # Latency model: measured = profiled x slowdown (common to all exits: clocks, load) x correction (this exit's
        # own).
        self._slowdown = 1.0
        self._slowdown_samples = 0
        self._correction = [1.0] * len(self.exits)
        # measured / profiled at the current exit; median drops one-off spikes
        self._recent: deque[float] = deque(maxlen=3)
        self._settling = 0  # samples still to attribute to the current exit's correction

    @property
    def floor_exit(self) -> int | None:
        """The shallowest exit auto, eco and latency budgets step down to (None: no floor, every exit)."""
        return self.exits[self._floor] if self._floor else None

    @property
    def exit(self) -> int:
        """The exit of the last decision."""
        return self.exits[self._level]

    def choose(self, signals: Signals, last_latency_ms: float | None, token_index: int) -> Decision:
        """The exit for token `token_index`; last_latency_ms is the previous token's decode time (ms), None if
        unknown."""
        if self.budget.is_fixed:
            exit = self.budget.exit if self.budget.exit is not None else self.exits[-1]
            if self.budget.kind == "exit":
                return Decision(exit, f"fixed budget {exit}", "fixed budget")
            return Decision(exit, f"full budget: exit {exit}", "full budget")
        if self._last_token is not None and token_index < self._last_token:
            self._switch_token = None  # a new sequence: nothing to catch up, no dwell
        self._last_token = token_index
        self._observe_latency(last_latency_ms)
        temperature = self._temperature_cap(signals.temperature_degc)
        goal = self._goal_cap(signals)
        caps = [temperature, self._battery_cap(signals, goal.level), self._latency_cap(), goal]
        # Tightest cap wins; among equals a hard limit, then a binding one, then safety first (list order).
        cap = min(caps, key=lambda c: (c.level, not c.hard, not c.binds))
        if cap.level < self._floor and not cap.hard:
            floor = self.exits[self._floor]
            cap = _Cap(self._floor, f"{cap.why}; held at the quality floor, exit {floor}", short="quality floor")
        return self._step_towards(cap, signals, token_index)

    def _step_towards(self, cap: _Cap, signals: Signals, token_index: int) -> Decision:
        current = self._level
        short = cap.short if cap.binds else self._at_ease(signals)
        if cap.level < current:
            reason = f"{cap.why}: step down to exit {self.exits[cap.level]}"
            if cap.level < self._floor:
                reason += f", below the quality floor (exit {self.exits[self._floor]}): no other way"
            return self._switch(cap.level, token_index, reason, short)
        if cap.level == current:
            self._headroom = 0
            return Decision(self.exit, f"{cap.why}: hold exit {self.exit}", short, current < self._floor)
        self._headroom += 1
        dwell, need = self._tokens_since_switch(token_index), self.config.min_dwell_tokens
        below = current < self._floor
        if dwell is not None and dwell < need:
            return Decision(
                self.exit,
                f"dwell {dwell}/{need} tokens since the last switch ({self._summary(signals)}): hold exit {self.exit}",
                "stepping back up",
                below,
            )
        if self._headroom < self.config.headroom_tokens:
            return Decision(
                self.exit,
                f"headroom {self._headroom}/{self.config.headroom_tokens} "
                f"tokens ({self._summary(signals)}): hold exit {self.exit}",
                "stepping back up",
                below,
            )
        return self._switch(
            current + 1,
            token_index,
            f"headroom {self._headroom} tokens ({self._summary(signals)}): step up to exit {self.exits[current + 1]}",
            "stepping back up",
        )

    def _switch(self, level: int, token_index: int, reason: str, short: str) -> Decision:
        self._catching_up = level > self._level
        self._recent.clear()
        # Once the slowdown is known, the first samples at the new exit measure how wrong its profile is.
        self._settling = (
            self.config.latency_settle_tokens if self._slowdown_samples >= self.config.latency_settle_tokens else 0
        )
        self._level = level
        self._switch_token = token_index
        self._headroom = 0
        return Decision(self.exit, reason, short, level < self._floor)

    def _tokens_since_switch(self, token_index: int) -> int | None:
        return None if self._switch_token is None else token_index - self._switch_token

    def check_budget(self, budget: Budget) -> None:
        """Refuse a budget that pins an exit this controller does not have."""
        if budget.kind == "exit" and budget.exit not in self.exits:
            raise ControllerError(
                f"budget exit {budget.exit} is not an available exit; "
                f"available exits: {', '.join(map(str, self.exits))}"
            )

    def deepest_allowed(self, budget: Budget) -> int:
        """The deepest exit another budget allows now (a server's request capping this device-wide controller):
        an exit budget its exit, eco the eco floor, a latency target the deepest exit predicted within it."""
        if budget.exit is not None:
            return max([e for e in self.exits if e <= budget.exit], default=self.exits[0])
        if budget.kind == "eco":
            return self.exits[self._eco_floor]
        if budget.latency_target_ms is not None:
            within = [
                level for level in range(len(self.exits)) if self._predicted_ms(level) <= budget.latency_target_ms
            ]
            return self.exits[max(within + [self._floor])]
        return self.exits[-1]

    # --- temperature: banded caps between the soft limit and the limit, with hysteresis on the way back up

    def _temperature_band(self, degc: float) -> int:
        """Deepest exit index allowed at degc: all below the soft limit, one less per band, the shallowest at the
        limit."""
        limit, soft = self.config.temperature_limit_degc, self.config.soft_limit_degc
        if degc >= limit:
            return 0
        if degc < soft:
            return self._top
        bands = max(1, self._top - 1)  # the soft zone holds the levels top-1 .. 1; the limit itself is level 0
        band = min(bands - 1, int((degc - soft) / ((limit - soft) / bands)))
        return max(0, self._top - 1 - band)

    def _temperature_cap(self, degc: float | None) -> _Cap:
        if degc is not None:
            now = self._temperature_band(degc)
            cooled = self._temperature_band(degc + self.config.temperature_hysteresis_degc)
            self._temperature_level = now if now < self._temperature_level else max(self._temperature_level, cooled)
        level = self._temperature_level
        binds = level < self._top
        if degc is None:
            return _Cap(level, "no temperature reading, last temperature cap", binds, short="warm (last reading)")
        limit, soft = self.config.temperature_limit_degc, self.config.soft_limit_degc
        if degc >= limit:
            return _Cap(
                level, f"temperature {degc:.1f} degC >= limit {limit:g} degC", short=f"{degc:.0f} degC", hard=True
            )
        if degc >= soft:
            return _Cap(level, f"temperature {degc:.1f} degC >= soft limit {soft:g} degC", short=f"{degc:.0f} degC")
        if binds:
            return _Cap(
                level,
                f"temperature {degc:.1f} degC cooling (hysteresis {self.config.temperature_hysteresis_degc:g} degC)",
                short=f"cooling, {degc:.0f} degC",
                hard=level == 0,  # still the trip's shallowest exit until cooled past the hysteresis
            )
        return _Cap(level, f"temperature {degc:.1f} degC < soft limit {soft:g} degC", binds=False)

    # --- the budget's own goal (eco: the shallowest acceptable exit unless plugged in and cool)

    def _quality_floor_level(self) -> tuple[int, str]:
        """The shallowest exit index auto, eco and latency budgets may use, and a line saying why."""
        floor = self.config.quality_floor
        if floor == "off":
            return 0, "no quality floor (off)"
        if isinstance(floor, int):
            if floor not in self.exits:
                raise ControllerError(
                    f"quality floor {floor} is not an available exit; exits: {', '.join(map(str, self.exits))}"
                )
            return self.exits.index(floor), f"quality floor exit {floor} (set)"
        shares = [p.loop_share for p in self.profiles if p.loop_share is not None]
        if len(shares) < len(self.profiles):
            return 0, "no quality floor: the export records no measured answers (`balcony-edge eval --chat --record`)"
        limit = shares[-1] + self.config.loop_margin
        level = next(level for level, share in enumerate(shares) if share <= limit)
        return level, (
            f"quality floor exit {self.exits[level]}: the shallowest whose held-out answers loop at most "
            f"{self.config.loop_margin * 100:g} points more often than the full model's ({shares[-1]:.0%})"
        )

    def _eco_floor_level(self) -> int:
        """eco's exit on battery or while warm: the quality floor where answers are measured (or a floor is set), else
        the shallowest exit with top-1 agreement >= eco_min_quality (nothing measured: the shallowest)."""
        measured = all(p.loop_share is not None for p in self.profiles)
        if self.config.quality_floor != "off" and (measured or isinstance(self.config.quality_floor, int)):
            return self._floor
        if all(p.quality is None for p in self.profiles):
            return self._floor
        for level, profile in enumerate(self.profiles):
            quality = 1.0 if level == self._top and profile.quality is None else profile.quality
            if quality is not None and quality >= self.config.eco_min_quality:
                return max(level, self._floor)
        return self._top

    def _goal_cap(self, signals: Signals) -> _Cap:
        if self.budget.kind != "eco":
            return _Cap(self._top, f"{self.budget} budget: deepest exit {self.exits[-1]}", short=self._at_ease(signals))
        plugged = signals.on_battery is False or (signals.on_battery is None and signals.battery_percent is None)
        cool = self._temperature_level == self._top
        if plugged and cool:
            return _Cap(
                self._top,
                f"eco budget, plugged in and cool: deepest exit {self.exits[-1]} (eco changes nothing here)",
                short="plugged in and cool: eco changes nothing",
            )
        floor = self.profiles[self._eco_floor]
        if floor.loop_share is not None:
            full = self.profiles[-1].loop_share or 0.0
            quality = f"its answers loop {floor.loop_share:.0%} of the time, the full model's {full:.0%}"
        elif floor.quality is not None:
            quality = f"quality {floor.quality:.2f} >= {self.config.eco_min_quality:g}"
        else:
            quality = "quality not measured"
        place = "on battery" if not plugged else "while warm"
        return _Cap(self._eco_floor, f"eco budget {place}: exit {floor.exit} ({quality})", short=f"eco {place}")

    # --- battery: on battery below the low / critical thresholds, with hysteresis on the way back up

    def _battery_severity_at(self, percent: float) -> int:
        if percent < self.config.battery_critical_percent:
            return 2
        return 1 if percent < self.config.battery_low_percent else 0

    def _battery_cap(self, signals: Signals, goal_level: int) -> _Cap:
        percent = signals.battery_percent
        discharging = signals.on_battery is True or (signals.on_battery is None and percent is not None)
        if not discharging:
            self._battery_severity = 0  # plugged in (or no battery): charging lifts the limits at once
            return _Cap(self._top, "no battery limit, plugged in", binds=False)
        if percent is not None:
            now = self._battery_severity_at(percent)
            recovered = self._battery_severity_at(percent - self.config.battery_hysteresis_percent)
            self._battery_severity = now if now > self._battery_severity else min(self._battery_severity, recovered)
        shown = "unknown" if percent is None else _percent(percent)
        if self._battery_severity == 0:
            return _Cap(self._top, f"battery {shown} on battery", binds=False)
        critical = self._battery_severity == 2
        threshold = self.config.battery_critical_percent if critical else self.config.battery_low_percent
        below = f"< {threshold:g}%"
        if percent is not None and percent >= threshold:
            below += f" + {self.config.battery_hysteresis_percent:g}% hysteresis"
        return _Cap(
            0 if critical else max(0, goal_level - 1),
            f"battery {shown} {below} on battery",
            short=f"battery {shown}{' (critical)' if critical else ''}",
            hard=critical,
        )

    # --- latency: profiled ms x a slowdown shared by all exits x each exit's own correction, both moving averages

    def _observe_latency(self, latency_ms: float | None) -> None:
        catching_up, self._catching_up = self._catching_up, False
        if latency_ms is None or catching_up or not latency_ms > 0:
            return  # the first token after a deepening also paid the catch-up: not the exit's own cost
        level, alpha = self._level, self.config.latency_smoothing
        self._recent.append(latency_ms / self.profiles[level].ms_per_token)
        ratio = statistics.median(self._recent)
        if self._settling > 0:
            self._settling -= 1
            self._correction[level] += alpha * (ratio / self._slowdown - self._correction[level])
        else:
            self._slowdown_samples += 1
            self._slowdown += alpha * (ratio / self._correction[level] - self._slowdown)

    def _predicted_ms(self, level: int) -> float:
        """Predicted decode time at exit index `level` (ms)."""
        return self.profiles[level].ms_per_token * self._slowdown * self._correction[level]

    def _latency_cap(self) -> _Cap:
        target = self.latency_target_ms
        if target is None:
            return _Cap(self._top, "no latency target", binds=False)
        current = self._level
        here = self._predicted_ms(current)
        if here > target:
            fitting = [level for level in range(current) if self._predicted_ms(level) <= target]
            return _Cap(
                max(fitting, default=0), f"latency {here:.1f} ms > target {target:g} ms", short=f"{target:g} ms target"
            )
        room = target * (1 - self.config.latency_up_margin)
        level = current
        while level < self._top and self._predicted_ms(level + 1) <= room:
            level += 1
        if level > current:
            return _Cap(
                level,
                f"latency {here:.1f} ms, exit {self.exits[current + 1]} predicted "
                f"{self._predicted_ms(current + 1):.1f} ms <= {room:.1f} ms",
                binds=level < self._top,
                short=f"{target:g} ms target",
            )
        if current == self._top:
            return _Cap(current, f"latency {here:.1f} ms <= target {target:g} ms", binds=False)
        return _Cap(
            current,
            f"latency {here:.1f} ms <= target {target:g} ms, exit {self.exits[current + 1]} "
            f"predicted {self._predicted_ms(current + 1):.1f} ms > {room:.1f} ms",
            short=f"{target:g} ms target",
        )

    def _at_ease(self, signals: Signals) -> str:
        """A few words for a step nothing limits: what the device looks like."""
        plugged = signals.on_battery is False or (signals.on_battery is None and signals.battery_percent is None)
        power = "plugged in" if plugged else f"on battery {_percent(signals.battery_percent or 0)}"
        if signals.on_battery and signals.battery_percent is None:
            power = "on battery"
        return (
            f"{power} and cool" if signals.temperature_degc is None or self._temperature_level == self._top else power
        )

    def _summary(self, signals: Signals) -> str:
        """The signals behind a step up, in words."""
        parts = []
        if signals.temperature_degc is not None:
            parts.append(f"temperature {signals.temperature_degc:.1f} degC")
        if signals.battery_percent is not None:
            parts.append(f"battery {_percent(signals.battery_percent)}{' on battery' if signals.on_battery else ''}")
        elif signals.on_battery is False:
            parts.append("plugged in")
        if self.latency_target_ms is not None and self._level < self._top:
            parts.append(
                f"latency {self._predicted_ms(self._level):.1f} ms, exit {self.exits[self._level + 1]} predicted "
                f"{self._predicted_ms(self._level + 1):.1f} ms, target {self.latency_target_ms:g} ms"
            )
        return ", ".join(parts) or "no limiting signal"


def _percent(value: float) -> str:
    return f"{round(value, 1):g}%"


class DeviceController:
    """A Controller shared by several sequences; its steps are counted across all of them."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self._steps = 0
        self._lock = threading.Lock()
        self.last: Decision | None = None

    def for_request(self, budget: Budget) -> RequestController:
        """What one request's generation asks (Engine.generate's `controller`)."""
        self.controller.check_budget(budget)
        return RequestController(self, budget)

    def choose(self, signals: Signals, last_latency_ms: float | None) -> Decision:
        with self._lock:
            decision = self.controller.choose(signals, last_latency_ms, self._steps)
            self._steps += 1
            self.last = decision
            return decision

    def deepest_allowed(self, budget: Budget) -> int:
        with self._lock:
            return self.controller.deepest_allowed(budget)


class RequestController:
    """One request's view of the device controller: its exit, capped by the request's budget."""

    def __init__(self, device: DeviceController, budget: Budget):
        self.device, self.budget = device, budget
        self._capped = False

    def choose(self, signals: Signals, last_latency_ms: float | None, token_index: int) -> Decision:
        # A step this request ran below the device's exit says nothing about the device's exit: not observed.
        decision = self.device.choose(signals, None if self._capped else last_latency_ms)
        cap = self.device.deepest_allowed(self.budget)
        self._capped = decision.exit > cap
        if self._capped:
            return Decision(cap, f"request budget {self.budget}: exit {cap} (device: {decision.reason})")
        return decision
