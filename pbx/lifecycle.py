"""The PBX lifecycle machine (``statecharts/lifecycle.yaml``).

Everything that depends on "are we serving?" — the OPTIONS answer, the readiness probe,
whether a new INVITE is accepted, when the process exits — reads this machine's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pbx.statecharts import ChartModel

log = logging.getLogger(__name__)

StateListener = Callable[[str, str], None]
"""Called with (old_state, new_state) after every state change."""


class Lifecycle(ChartModel):
    """starting → ready → draining → stopped (or failed).

    ``active_work`` reports how much in-flight work (calls) still blocks the end of a
    drain; while it is non-zero a drain waits, at most ``drain_timeout`` seconds.
    """

    chart_name = "lifecycle"

    def __init__(self, clock: IReactorTime, *, drain_timeout: float = 30.0,
                 active_work: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.active_work = active_work
        self.failure_reason: str | None = None
        self.entered_at: float = clock.seconds()
        self._listeners: list[StateListener] = []
        self._timers: list[IDelayedCall] = []
        self._previous = self.state

    # -- public API -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Ready to take new work (OPTIONS 200, /ready 200, INVITE accepted)."""
        return self.state == "ready"

    @property
    def finished(self) -> bool:
        return self.is_final

    def subscribe(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def begin_drain(self) -> bool:
        """Stop taking new work; finish at once when nothing is in flight."""
        if not self.may_fire("drain"):
            return False
        self.fire("drain")
        self.work_finished()
        return True

    def work_finished(self) -> None:
        """Call when in-flight work ends; completes a drain once nothing is left."""
        if self.state == "draining" and self.active_work() <= 0:
            self.fire("drained")

    def fail(self, reason: str) -> None:
        if not self.is_final:
            self.failure_reason = reason
            self.fire("fail")

    # -- chart callbacks --------------------------------------------------------------
    def on_starting(self) -> None:
        self._changed()

    def on_ready(self) -> None:
        self._changed()

    def on_draining(self) -> None:
        self._changed()

    def on_stopped(self) -> None:
        self._changed()

    def on_failed(self) -> None:
        self._changed()

    # -- internals ------------------------------------------------------------------
    def _changed(self) -> None:
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers = [
            self.clock.callLater(self._timer_delay(spec), self._timer_fired, spec["trigger"],
                                 self.state)
            for spec in self._chart.state_meta.get(self.state, {}).get("timers", [])
        ]
        old, self._previous = self._previous, self.state
        self.entered_at = self.clock.seconds()
        log.info("lifecycle: %s -> %s", old, self.state)
        for listener in list(self._listeners):
            listener(old, self.state)

    def _timer_delay(self, spec: dict[str, Any]) -> float:
        after = spec["after"]
        return float(getattr(self, after)) if isinstance(after, str) else float(after)

    def _timer_fired(self, trigger: str, armed_in: str) -> None:
        if self.state == armed_in and self.may_fire(trigger):
            self.fire(trigger)
