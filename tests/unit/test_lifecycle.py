"""The lifecycle machine: transitions, drain timer, listeners."""

from __future__ import annotations

from twisted.internet.task import Clock

from pbx.lifecycle import Lifecycle


def test_happy_path_and_listeners() -> None:
    clock = Clock()
    life = Lifecycle(clock)
    seen: list[tuple[str, str]] = []
    life.subscribe(lambda old, new: seen.append((old, new)))
    assert not life.ready
    life.fire("started")
    assert life.ready
    assert life.begin_drain()
    # nothing in flight: the drain completes at once
    assert life.state == "stopped"
    assert seen == [("starting", "ready"), ("ready", "draining"), ("draining", "stopped")]
    assert not life.begin_drain()


def test_drain_waits_for_work_then_times_out() -> None:
    clock = Clock()
    work = [2]
    life = Lifecycle(clock, drain_timeout=30.0, active_work=lambda: work[0])
    life.fire("started")
    life.begin_drain()
    assert life.state == "draining"
    clock.advance(29.9)
    assert life.state == "draining"
    clock.advance(0.1)
    assert life.state == "stopped"


def test_drain_ends_when_work_ends() -> None:
    clock = Clock()
    work = [1]
    life = Lifecycle(clock, drain_timeout=30.0, active_work=lambda: work[0])
    life.fire("started")
    life.begin_drain()
    life.work_finished()
    assert life.state == "draining"
    work[0] = 0
    life.work_finished()
    assert life.state == "stopped"
    assert not clock.getDelayedCalls(), "the drain timer must be cancelled"


def test_cancel_drain_returns_to_ready_and_disarms_timer() -> None:
    clock = Clock()
    life = Lifecycle(clock, drain_timeout=10.0, active_work=lambda: 1)
    life.fire("started")
    life.begin_drain()
    life.fire("cancel_drain")
    assert life.ready
    clock.advance(60)
    assert life.ready


def test_fail_records_reason_once() -> None:
    life = Lifecycle(Clock())
    life.fail("database gone")
    assert life.state == "failed"
    assert life.failure_reason == "database gone"
    life.fail("again")
    assert life.failure_reason == "database gone"
