"""Random interleavings of lifecycle events (hypothesis RuleBasedStateMachine)."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock

from pbx.lifecycle import Lifecycle
from pbx.statecharts import load_chart

CHART = load_chart("lifecycle")


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.work = 0
        self.life = Lifecycle(self.clock, drain_timeout=30.0, active_work=lambda: self.work)
        self.history: list[tuple[str, str]] = []
        self.cancel_requested = False
        self.life.subscribe(lambda old, new: self.history.append((old, new)))

    @rule()
    def started(self) -> None:
        if self.life.may_fire("started"):
            self.life.fire("started")

    @rule()
    def drain(self) -> None:
        self.life.begin_drain()

    @rule()
    def cancel_drain(self) -> None:
        if self.life.may_fire("cancel_drain"):
            self.cancel_requested = True
            self.life.fire("cancel_drain")

    @rule(delta=st.integers(min_value=0, max_value=3))
    def work_changes(self, delta: int) -> None:
        self.work = delta
        self.life.work_finished()

    @rule(seconds=st.floats(min_value=0, max_value=40))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def stop(self) -> None:
        if self.life.may_fire("stop"):
            self.life.fire("stop")

    @precondition(lambda self: not self.life.finished)
    @rule()
    def fail(self) -> None:
        self.life.fail("boom")

    @invariant()
    def state_is_declared(self) -> None:
        assert self.life.state in CHART.state_names

    @invariant()
    def draining_returns_to_ready_only_by_cancel(self) -> None:
        for old, new in self.history:
            if old == "draining" and new == "ready":
                assert self.cancel_requested
        self.cancel_requested = False
        self.history.clear()

    @invariant()
    def final_states_are_final(self) -> None:
        if self.life.finished:
            for trigger in CHART.triggers:
                assert not self.life.may_fire(trigger)

    @invariant()
    def no_timer_outlives_draining(self) -> None:
        if self.life.state != "draining":
            assert not [c for c in self.clock.getDelayedCalls() if c.active()]

    @invariant()
    def idle_drain_never_lingers(self) -> None:
        if self.life.state == "draining":
            assert self.work > 0 or self.clock.getDelayedCalls()


TestLifecycleMachine = LifecycleMachine.TestCase
