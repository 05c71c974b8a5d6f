"""One controller for a whole device: every decode step of every request (a server's) asks it for the exit, and a
request's own budget only caps what it answers. Signals describe the device, not a request."""

from __future__ import annotations

import threading

from balcony_edge.runtime.controller import Budget, Controller, Decision
from balcony_edge.runtime.signals import Signals


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
