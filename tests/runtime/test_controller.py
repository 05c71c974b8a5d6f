"""The controller: budgets, and its choices on replayed signal traces and synthetic latencies (torch-free)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence

import pytest

from balcony_edge.common.errors import ControllerError
from balcony_edge.runtime.device.controller import Budget, Controller, ControllerConfig, Decision, ExitProfile
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.sources import Signals, TraceSource

# SmolLM2-135M on two CPU threads: about 5.3 ms fixed + 0.8 ms per layer (balcony included); agreement with the full
# model.
PROFILES = [
    ExitProfile(8, 12.5, quality=0.39),
    ExitProfile(16, 18.9, quality=0.46),
    ExitProfile(24, 25.3, quality=0.66),
    ExitProfile(30, 29.3),
]
MS = {p.exit: p.ms_per_token for p in PROFILES}
SIGNAL_WORDS = ("temperature", "battery", "latency", "headroom", "dwell", "budget")


def replay(
    controller: Controller,
    readings: Sequence[Signals],
    slowdown: Callable[[int], float] = lambda t: 1.0,
    noise: float = 0.05,
    catch_up_ms: float = 40.0,
    seed: int = 0,
) -> list[Decision]:
    """Drive the controller token by token; a token's latency is its exit's profile x slowdown x noise, plus a catch-up
    after deepening."""
    rng = random.Random(seed)
    decisions: list[Decision] = []
    latency = None
    for t, signals in enumerate(readings):
        decision = controller.choose(signals, latency, t)
        deepened = bool(decisions) and decision.exit > decisions[-1].exit
        latency = MS[decision.exit] * slowdown(t) * (1 + rng.gauss(0, noise)) + (catch_up_ms if deepened else 0.0)
        decisions.append(decision)
    return decisions


def switches(decisions: Sequence[Decision]) -> list[int]:
    """Token indices where the exit changed."""
    return [t for t in range(1, len(decisions)) if decisions[t].exit != decisions[t - 1].exit]


def exits(decisions: Sequence[Decision]) -> list[int]:
    return [d.exit for d in decisions]


def assert_reasons_name_a_signal(decisions: Sequence[Decision]) -> None:
    for d in decisions:
        assert d.reason and any(word in d.reason for word in SIGNAL_WORDS), d.reason


def test_budget_parses_every_form():
    assert Budget.parse("auto") == Budget("auto")
    assert Budget.parse(" FULL ") == Budget("full")
    assert Budget.parse("eco") == Budget("eco")
    assert Budget.parse("16") == Budget("exit", exit=16)
    assert Budget.parse("40ms") == Budget("latency", latency_target_ms=40.0)
    assert Budget.parse("12.5 ms") == Budget("latency", latency_target_ms=12.5)
    assert [str(Budget.parse(text)) for text in ("auto", "full", "eco", "16", "40ms")] == [
        "auto",
        "full",
        "eco",
        "16",
        "40ms",
    ]


@pytest.mark.parametrize("text", ["fast", "", "-3", "40s", "ms", "0ms", "0", "²", "١٦", "016", "１", "٤٠ms"])
def test_bad_budgets_are_refused_with_the_forms_that_work(text):
    with pytest.raises(ControllerError, match=r"budget|latency target"):
        Budget.parse(text)


def test_an_unknown_budget_names_the_forms_that_work():
    with pytest.raises(
        ControllerError,
        match="budget 'fast' is not understood; use auto, full, eco, an "
        "exit such as 16, or a per-token latency target such as 40ms",
    ):
        Budget.parse("fast")


def test_an_exit_budget_must_be_an_available_exit():
    with pytest.raises(
        ControllerError, match="budget exit 12 is not an available exit; available exits: 8, 16, 24, 30"
    ):
        Controller(PROFILES, "12")


def test_bad_settings_are_refused():
    with pytest.raises(ControllerError, match="battery_critical_percent=60 is above battery_low_percent=50"):
        ControllerConfig(battery_critical_percent=60)
    with pytest.raises(ControllerError, match="min_dwell_tokens=-1 is negative"):
        ControllerConfig(min_dwell_tokens=-1)
    with pytest.raises(ControllerError, match="ms_per_token 0 is not positive"):
        ExitProfile(8, 0)
    with pytest.raises(ControllerError, match="repeat an exit"):
        Controller([ExitProfile(8, 1.0), ExitProfile(8, 2.0)])


def test_fixed_budgets_pin_the_exit_whatever_the_signals():
    hot = Signals(temperature_degc=95.0, battery_percent=5.0, on_battery=True)
    assert Controller(PROFILES, "16").choose(hot, 80.0, 0) == Decision(16, "fixed budget 16", "fixed budget")
    assert Controller(PROFILES, "full").choose(hot, 80.0, 0) == Decision(30, "full budget: exit 30", "full budget")


def test_falling_battery_steps_down_at_the_thresholds_and_never_back_up():
    rng = random.Random(1)
    # 100% -> 0.5% on battery over 200 tokens; the gauge jitters by a percent either way.
    percents = [max(0.0, 100 - t / 2 + rng.choice((-1.0, 0.0, 1.0))) for t in range(200)]
    decisions = replay(Controller(PROFILES, "auto"), [Signals(battery_percent=p, on_battery=True) for p in percents])
    lowest = [min(percents[: t + 1]) for t in range(200)]
    expected = [30 if low >= 50 else 24 if low >= 10 else 8 for low in lowest]
    assert exits(decisions) == expected  # immediate at each threshold; jitter back over it does not step up
    assert [decisions[t].reason for t in switches(decisions)] == [
        f"battery {round(percents[t], 1):g}% < {limit}% on battery: step down to exit {e}"
        for t, limit, e in zip(switches(decisions), (50, 10), (24, 8))
    ]
    assert_reasons_name_a_signal(decisions)


def test_plugging_in_lifts_the_battery_limit_after_the_dwell():
    readings = [Signals(battery_percent=5.0, on_battery=True)] * 20 + [
        Signals(battery_percent=5.0, on_battery=False)
    ] * 60
    decisions = replay(Controller(PROFILES, "auto"), readings)
    assert exits(decisions)[:20] == [8] * 20
    assert [decisions[t].exit for t in switches(decisions)] == [16, 24, 30]  # one exit at a time
    assert all(b - a >= 8 for a, b in zip(switches(decisions), switches(decisions)[1:]))


def test_rising_temperature_steps_down_before_the_limit_and_is_shallowest_at_the_limit(tmp_path):
    trace = tmp_path / "heat.jsonl"
    trace.write_text(
        "".join(json.dumps({"token": t, "temperature_degc": 60 + 35 * t / 199}) + "\n" for t in range(200))
    )
    hub = SignalHub([TraceSource(trace, clock="token")])
    controller = Controller(PROFILES, "auto")
    decisions, temperatures = [], []
    for t in range(200):
        signals = hub.read(t)
        temperatures.append(signals.temperature_degc)
        decisions.append(controller.choose(signals, MS[controller.exit], t))
    # Soft limit 77 degC; the soft zone 77..87 holds exits 24 and 16 in two 5-degree bands; 87 degC and up: exit 8.
    expected = [30 if c < 77 else 24 if c < 82 else 16 if c < 87 else 8 for c in temperatures]
    assert exits(decisions) == expected
    first_at_limit = next(t for t, c in enumerate(temperatures) if c >= 87)
    assert (
        decisions[first_at_limit].reason
        == f"temperature {temperatures[first_at_limit]:.1f} degC >= limit 87 degC: step down to exit 8"
    )
    assert "soft limit 77 degC: step down to exit 24" in decisions[switches(decisions)[0]].reason
    assert_reasons_name_a_signal(decisions)


def test_latency_target_settles_on_the_deepest_exit_under_it():
    decisions = replay(Controller(PROFILES, "22ms"), [Signals()] * 200)
    assert exits(decisions) == [16] * 200  # 16 costs 18.9 ms; 24 would cost 25.3 ms
    assert decisions[0].reason == "latency 29.3 ms > target 22 ms: step down to exit 16"
    assert_reasons_name_a_signal(decisions)


def test_latency_target_on_a_slower_device_settles_one_exit_lower():
    decisions = replay(Controller(PROFILES, "22ms"), [Signals()] * 200, slowdown=lambda t: 1.3)  # 16 now costs 24.6 ms
    assert exits(decisions)[-190:] == [8] * 190
    assert len(switches(decisions)) <= 1


def test_latency_recovers_depth_after_a_slowdown_without_tripping_on_the_catch_up():
    decisions = replay(Controller(PROFILES, "22ms"), [Signals()] * 200, slowdown=lambda t: 1.5 if t < 60 else 1.0)
    assert exits(decisions)[5:60] == [8] * 55
    up = switches(decisions)[-1]
    assert 60 < up < 90 and decisions[up].exit == 16 and decisions[up].reason.startswith("headroom 8 tokens (latency")
    assert exits(decisions)[up:] == [16] * (
        200 - up
    )  # the 40 ms catch-up on the first deeper token is not held against it
    assert_reasons_name_a_signal(decisions)


def test_an_exit_slower_than_its_profile_is_not_retried_over_and_over():
    profiles = [
        *PROFILES[:2],
        ExitProfile(24, 22.0, quality=0.66),
        PROFILES[3],
    ]  # 24 profiled at 22.0 ms, really 25.3 ms
    controller = Controller(profiles, "26ms")
    rng = random.Random(3)
    decisions, latency = [], None
    for t in range(200):
        decision = controller.choose(Signals(), latency, t)
        latency = MS[decision.exit] * (1 + rng.gauss(0, 0.03)) * (1.2 if decision.exit == 24 else 1.0)  # 24: 30.4 ms
        decisions.append(decision)
    assert len(switches(decisions)) <= 3  # down from 24, at most one retry of 24, then it stays away
    assert exits(decisions)[-150:] == [16] * 150


def test_steady_noisy_signals_do_not_oscillate():
    rng = random.Random(7)
    readings = [
        Signals(temperature_degc=rng.gauss(78.0, 0.6), battery_percent=60 + rng.choice((-1, 0, 1)), on_battery=True)
        for _ in range(200)
    ]
    for budget in ("auto", "22ms", "eco"):
        decisions = replay(Controller(PROFILES, budget), readings, noise=0.1)
        assert len(switches(decisions)) <= 2, (budget, switches(decisions))
        assert_reasons_name_a_signal(decisions)


def test_no_deepening_within_the_dwell_of_a_switch():
    config = ControllerConfig(min_dwell_tokens=12, headroom_tokens=2)
    # Heat spikes of 3 tokens every 20 tokens: each spike forces the shallowest exit at once.
    readings = [Signals(temperature_degc=90.0 if t % 20 < 3 else 60.0) for t in range(200)]
    decisions = replay(Controller(PROFILES, "auto", config), readings)
    changes = switches(decisions)
    for previous, t in zip(changes, changes[1:]):
        if decisions[t].exit > decisions[t - 1].exit:
            assert t - previous >= 12, (previous, t)
    assert all(d.exit == 8 for t, d in enumerate(decisions) if t % 20 < 3)  # stepping down never waits
    assert any(d.reason.startswith("dwell ") for d in decisions)
    assert any(decisions[t].exit > decisions[t - 1].exit for t in changes)
    assert_reasons_name_a_signal(decisions)


def test_eco_runs_the_shallowest_good_enough_exit_on_battery_and_deepens_when_plugged_in_and_cool():
    on_battery = [Signals(battery_percent=80.0, on_battery=True)] * 30
    plugged_warm = [Signals(battery_percent=80.0, on_battery=False, temperature_degc=80.0)] * 30
    plugged_cool = [Signals(battery_percent=80.0, on_battery=False, temperature_degc=60.0)] * 40
    decisions = replay(Controller(PROFILES, "eco"), on_battery + plugged_warm + plugged_cool)
    assert exits(decisions)[:60] == [24] * 60  # quality 0.66 >= 0.6: the shallowest acceptable exit
    assert decisions[0].reason == "eco budget on battery: exit 24 (quality 0.66 >= 0.6): step down to exit 24"
    assert exits(decisions)[-1] == 30 and decisions[switches(decisions)[-1]].reason.startswith(
        "headroom 8 tokens (temperature 60.0 degC"
    )
    low = replay(Controller(PROFILES, "eco"), [Signals(battery_percent=40.0, on_battery=True)] * 5)
    assert exits(low) == [16] * 5  # below 50%: one exit below eco's choice
    assert_reasons_name_a_signal(decisions + low)


# Held-out answers caught in a loop at each exit (the full model's own: 0.20): exit 16 is the shallowest usable.
LOOPING = [dataclasses.replace(p, loop_share=share) for p, share in zip(PROFILES, (0.56, 0.24, 0.13, 0.20))]


def test_the_quality_floor_is_the_shallowest_exit_that_loops_no_more_than_the_full_model():
    controller = Controller(LOOPING, "auto")
    assert controller.exits[controller._floor] == 16
    assert controller.floor_note.startswith("quality floor exit 16") and "at most 5 points more often" in (
        controller.floor_note
    )
    strict = Controller(LOOPING, "auto", ControllerConfig(loop_margin=0.0))
    assert strict.exits[strict._floor] == 24
    assert Controller(PROFILES, "auto")._floor == 0 and "records no measured answers" in Controller(PROFILES).floor_note
    assert Controller(LOOPING, "auto", ControllerConfig(quality_floor="off"))._floor == 0
    assert Controller(LOOPING, "auto", ControllerConfig(quality_floor=24))._floor == 2
    with pytest.raises(ControllerError, match="quality floor 12 is not an available exit"):
        Controller(LOOPING, "auto", ControllerConfig(quality_floor=12))
    with pytest.raises(ControllerError, match="quality floor 'low' is not auto, off or an exit"):
        ControllerConfig(quality_floor="low")


def test_low_battery_and_tight_latency_stop_at_the_floor_but_a_critical_battery_goes_below_and_says_so():
    low = replay(Controller(LOOPING, "auto"), [Signals(battery_percent=30.0, on_battery=True)] * 3)
    assert exits(low) == [24, 24, 24]  # one exit below the budget's deepest: still above the floor
    tight = replay(Controller(LOOPING, "5ms"), [Signals()] * 12)
    assert set(exits(tight)) == {16} and "held at the quality floor, exit 16" in tight[0].reason
    assert tight[0].short == "quality floor" and not tight[0].below_floor
    low_15 = replay(Controller(LOOPING, "auto"), [Signals(battery_percent=15.0, on_battery=True)] * 3)
    assert exits(low_15) == [24, 24, 24] and not low_15[0].below_floor  # 15% is low, not critical (10%)
    critical = replay(Controller(LOOPING, "auto"), [Signals(battery_percent=5.0, on_battery=True)] * 3)
    assert exits(critical) == [8, 8, 8] and all(d.below_floor for d in critical)
    assert "below the quality floor (exit 16): no other way" in critical[0].reason
    assert critical[0].short == "battery 5% (critical)"
    hot = replay(Controller(LOOPING, "auto"), [Signals(temperature_degc=90.0)] * 2)
    assert exits(hot) == [8, 8] and hot[0].below_floor
    assert exits(replay(Controller(LOOPING, "8"), [Signals()] * 2)) == [8, 8]  # a named exit is the user's choice


def test_eco_runs_the_floor_on_battery_and_says_when_it_changes_nothing():
    on_battery = replay(Controller(LOOPING, "eco"), [Signals(battery_percent=80.0, on_battery=True)] * 3)
    assert exits(on_battery) == [16] * 3 and "loop 24% of the time, the full model's 20%" in on_battery[0].reason
    desk = replay(Controller(LOOPING, "eco"), [Signals(on_battery=False, temperature_degc=50.0)] * 3)
    assert exits(desk) == [30] * 3 and "eco changes nothing here" in desk[0].reason
    assert desk[0].short == "plugged in and cool: eco changes nothing"


def test_a_critical_battery_while_cooling_from_a_trip_stays_below_the_floor():
    controller = Controller(LOOPING, "auto")
    tripped = replay(controller, [Signals(temperature_degc=88.0)] * 3)
    assert exits(tripped) == [8] * 3 and tripped[0].below_floor
    # cooling inside the hysteresis: still the trip's exit, then a critical battery too: a tie of hard limits
    after = [
        controller.choose(Signals(temperature_degc=86.0, battery_percent=5.0, on_battery=True), 12.5, t)
        for t in range(3, 30)
    ]
    assert {d.exit for d in after} == {8} and all(d.below_floor for d in after)


def test_auto_on_an_idle_desk_says_why_in_a_few_words():
    decisions = replay(Controller(LOOPING, "auto"), [Signals(on_battery=False, temperature_degc=45.0)] * 2)
    assert decisions[0].exit == 30 and decisions[0].short == "plugged in and cool"
