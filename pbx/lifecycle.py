"""The PBX lifecycle machine (``statecharts/lifecycle.yaml``).

Everything that depends on "are we serving?" — the OPTIONS answer, the readiness probe,
whether a new INVITE is accepted, when the process exits — reads this machine's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from pbx.statechart_timers import TimedChartModel

log = logging.getLogger(__name__)

StateListener = Callable[[str, str], None]
"""Called with (old_state, new_state) after every state change."""


class Lifecycle(TimedChartModel):
    """starting → ready → draining → stopped (or failed).

    ``active_work`` reports how much in-flight work (calls) still blocks the end of a
    drain; while it is non-zero a drain waits, at most ``drain_timeout`` seconds (the
    chart's ``drain`` timer).
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
        self.start_timers()

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

    def state_changed(self, previous: str) -> None:
        self.entered_at = self.clock.seconds()
        log.info("lifecycle: %s -> %s", previous, self.state)
        for listener in list(self._listeners):
            listener(previous, self.state)
