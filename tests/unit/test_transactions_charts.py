"""The four transaction charts and the generic timer driver they rely on."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from twisted.internet.task import Clock

from pbx.sip.transactions import (
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    Transaction,
)
from pbx.statechart_timers import TimedChartModel, compile_delay, compile_timers
from pbx.statecharts import Chart, ChartError, _parse_chart, load_chart

CLASSES: list[type[Transaction]] = [InviteClientTransaction, NonInviteClientTransaction,
                                    InviteServerTransaction, NonInviteServerTransaction]

# RFC 3261 §17 table 4 (+ RFC 6026 L/M, §16.6 Timer C, the IST's 100 Trying, the wait
# for the final response after Timer C's CANCEL, the server deadline for a silent TU):
# name -> (state(s), value on UDP, value on TCP; None = not armed), T1=0.5 T2=4 T4=5.
RFC_TIMERS: dict[str, dict[str, tuple[set[str], float | None, float | None]]] = {
    "ict": {"A": ({"calling"}, 0.5, None), "B": ({"calling"}, 32.0, 32.0),
            "C": ({"proceeding"}, 180.0, 180.0), "D": ({"completed"}, 32.0, 0.0),
            "M": ({"accepted"}, 32.0, 32.0), "cancel": ({"cancelling"}, 32.0, 32.0)},
    "nict": {"E": ({"trying", "proceeding"}, None, None), "F": ({"trying", "proceeding"},
                                                               32.0, 32.0),
             "K": ({"completed"}, 5.0, 0.0)},
    "ist": {"trying": ({"proceeding"}, 0.2, 0.2), "G": ({"completed"}, 0.5, None),
            "H": ({"completed"}, 32.0, 32.0), "I": ({"confirmed"}, 5.0, 0.0),
            "L": ({"accepted"}, 32.0, 32.0), "deadline": ({"proceeding"}, 32.0, 32.0)},
    "nist": {"J": ({"completed"}, 32.0, 0.0),
             "deadline": ({"trying", "proceeding"}, 32.0, 32.0)},
}


class _Values:
    def __init__(self, reliable: bool) -> None:
        self.reliable = reliable
        self.T1, self.T2, self.T4 = 0.5, 4.0, 5.0
        self.timer_c = 180.0
        self.trying_delay = 0.2


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.chart_name)
def test_chart_compiles_with_every_callback(cls: type[Transaction]) -> None:
    chart = cls.chart()  # ChartModel._compile checks every callback and guard exists
    assert chart.name == cls.chart_name == cls.kind
    assert "terminated" in chart.final_states
    assert chart.reachable() == set(chart.state_names)
    for name in chart.callback_names():
        assert callable(getattr(cls, name)), name
    # Every state but the end can reach the end: nothing is stuck forever.
    for state in chart.state_names:
        seen, todo = {state}, [state]
        while todo:
            for nxt in chart.successors(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert "terminated" in seen, state


@pytest.mark.parametrize("name", sorted(RFC_TIMERS))
def test_chart_timers_are_the_rfc_timers(name: str) -> None:
    chart = load_chart(name)
    table = compile_timers(chart)
    declared: dict[str, set[str]] = {}
    for state, timers in table.items():
        for timer, options in timers.items():
            declared.setdefault(timer, set()).add(state)
            for spec in options:
                expected = "timer_trying" if timer == "trying" else f"timer_{timer.lower()}"
                assert spec.trigger == expected
    assert declared == {t: states for t, (states, _, _) in RFC_TIMERS[name].items()}
    for timer, (states, on_udp, on_tcp) in RFC_TIMERS[name].items():
        for reliable, want in ((False, on_udp), (True, on_tcp)):
            if want is None and timer != "E":
                for state in states:
                    assert not [s for s in table[state][timer] if s.applies(_Values(reliable))]
                continue
            if want is None:
                continue
            model = _Values(reliable)
            for state in states:
                spec = next(s for s in table[state][timer] if s.applies(model))
                assert spec.after(model) == want, (timer, state, reliable)


def test_retransmission_timers_back_off_as_the_rfc_says() -> None:
    model = _Values(False)
    ict = compile_timers(load_chart("ict"))
    a = ict["calling"]["A"][0]
    intervals = [0.5]
    for _ in range(6):
        intervals.append(a.next_interval(model, intervals[-1]))
    assert intervals == [0.5, 1, 2, 4, 8, 16, 32]  # no cap: Timer B ends it first
    nict = compile_timers(load_chart("nict"))
    e = nict["trying"]["E"][0]
    assert [e.after(model)] + [e.next_interval(model, x) for x in (0.5, 1, 2, 4)] == [
        0.5, 1, 2, 4, 4]
    assert nict["proceeding"]["E"][0].next_interval(model, 1) == 4.0
    g = compile_timers(load_chart("ist"))["completed"]["G"][0]
    assert [g.next_interval(model, x) for x in (0.5, 1, 2, 4)] == [1, 2, 4, 4]
    for spec in (a, e, g):
        assert spec.reliable is False  # only over UDP


# -- the generic driver ----------------------------------------------------------------


@pytest.mark.parametrize(("expr", "value"), [
    (3, 3.0), (0.25, 0.25), ("T1", 0.5), ("64*T1", 32.0), ("max(32, 64*T1)", 32.0),
    ("min(T2, 2*T1) + 1", 2.0), ("(T4 - T1) / 2", 2.25), ("-T1 + 1", 0.5),
])
def test_delay_expressions(expr: object, value: float) -> None:
    assert compile_delay(expr)(_Values(False)) == value


@pytest.mark.parametrize("expr", [
    "__import__('os')", "T1 ** 2", "T1.real", "[1]", "open()", "max(a=1)", "'x'", "T1 if 1 else 2",
    "", -1, True, None, [1],
])
def test_bad_delay_expressions_are_chart_errors(expr: object) -> None:
    with pytest.raises(ChartError):
        compile_delay(expr)


def _chart(timers: list[dict[str, Any]], extra: list[dict[str, Any]] | None = None) -> Chart:
    return _parse_chart({
        "name": "t", "initial": "a",
        "states": [{"name": "a", "timers": timers}, "b", {"name": "z", "final": True}],
        "transitions": [{"trigger": "go", "source": "a", "dest": "b"},
                        {"trigger": "back", "source": "b", "dest": "a"},
                        {"trigger": "end", "source": ["a", "b"], "dest": "z"},
                        {"trigger": "tick", "source": "a", "dest": None, "after": "ticked"},
                        *(extra or [])],
    }, None)


@pytest.mark.parametrize(("timers", "message"), [
    ([{"name": "X", "after": 1}], "needs 'trigger'"),
    ([{"name": "X", "after": 1, "trigger": "go", "every": 2}], "unknown keys"),
    ([{"name": "X", "after": 1, "trigger": "back"}], "no transition"),
    ([{"name": "X", "after": 1, "trigger": "nope"}], "no transition"),
    ([{"name": "X", "after": 1, "trigger": "go"}, {"name": "X", "after": 2, "trigger": "go"}],
     "twice"),
    ([{"name": "X", "after": 1, "trigger": "go", "backoff": 0}], "backoff"),
    ([{"name": "X", "after": 1, "trigger": "go", "reliable": "no"}], "reliable"),
    ([{"name": "X", "after": "T1 +", "trigger": "go"}], "not an expression"),
    ("X", "must be a list"),
    (["X"], "mapping"),
])
def test_bad_timer_declarations_are_chart_errors(timers: Any, message: str) -> None:
    with pytest.raises(ChartError, match=message):
        compile_timers(_chart(timers))


def _model_class(chart: Chart) -> type[TimedChartModel]:
    """A timed model over an in-memory chart (bypassing statecharts/ on disk)."""

    class Model(TimedChartModel):
        chart_name = chart.name
        ticks: ClassVar[list[float]]

        def __init__(self, clock: Clock, reliable: bool = False) -> None:
            super().__init__()
            self.clock = clock
            self.reliable = reliable
            self.T1 = 1.0
            self.hold: float | None = 5.0
            self.log: list[tuple[float, str]] = []

        @classmethod
        def _compile(cls) -> None:
            cls._chart = chart
            cls._machine = chart.build_machine()
            cls._events = dict(cls._machine.events)
            cls._timer_table = compile_timers(chart)

        def ticked(self) -> None:
            self.log.append((self.clock.seconds(), self.state))

    return Model


def test_driver_arms_on_entry_cancels_on_exit_and_keeps_shared_names() -> None:
    chart = _parse_chart({
        "name": "t", "initial": "a",
        "states": [
            {"name": "a", "timers": [{"name": "R", "after": "T1", "backoff": 2, "cap": 3,
                                      "trigger": "tick"},
                                     {"name": "S", "after": 10, "trigger": "end"}]},
            {"name": "b", "timers": [{"name": "R", "after": 0.5, "repeat": True,
                                      "trigger": "tick"},
                                     {"name": "S", "after": 99, "trigger": "end"}]},
            {"name": "c"},
            {"name": "z", "final": True},
        ],
        "transitions": [{"trigger": "go", "source": "a", "dest": "b"},
                        {"trigger": "off", "source": "b", "dest": "c"},
                        {"trigger": "end", "source": ["a", "b", "c"], "dest": "z"},
                        {"trigger": "tick", "source": ["a", "b"], "dest": None,
                         "after": "ticked"}],
    }, None)
    clock = Clock()
    model = _model_class(chart)(clock)
    model.start_timers()
    assert model.active_timers() == {"R": 1.0, "S": 10.0}
    clock.advance(1)  # R: 1
    clock.advance(2)  # R: 3 (doubled)
    assert model.active_timers() == {"R": 3.0, "S": 10.0}
    clock.advance(1)
    model.fire("go")  # R and S keep running; R re-arms by b's rule when it fires
    clock.advance(2)  # R fires at 6 (3 + 3), then every 0.5
    clock.advance(0.5)
    clock.advance(0.5)
    assert [t for t, _ in model.log] == [1, 3, 6, 6.5, 7]
    assert model.log[-1][1] == "b"
    model.fire("off")
    assert model.active_timers() == {}
    assert not clock.calls
    clock.advance(100)
    assert model.state == "c"


def test_driver_zero_delay_runs_after_the_transition_and_none_disables() -> None:
    chart = _parse_chart({
        "name": "t", "initial": "a",
        "states": ["a",
                   {"name": "b", "timers": [{"name": "Z", "after": 0, "reliable": True,
                                             "trigger": "end"},
                                            {"name": "Z", "after": "hold", "reliable": False,
                                             "trigger": "end"}]},
                   {"name": "z", "final": True}],
        "transitions": [{"trigger": "go", "source": "a", "dest": "b", "after": "ticked"},
                        {"trigger": "end", "source": "b", "dest": "z"}],
    }, None)
    cls = _model_class(chart)
    clock = Clock()
    fast = cls(clock, reliable=True)
    fast.fire("go")
    assert fast.log == [(0, "b")]  # the callback ran in b, before Z ended it
    assert fast.state == "z"
    slow = cls(clock, reliable=False)
    slow.fire("go")
    assert slow.active_timers() == {"Z": 5.0}
    clock.advance(5)
    assert slow.state == "z"
    never = cls(clock, reliable=False)
    never.hold = None
    never.fire("go")
    assert never.active_timers() == {}
    assert never.state == "b"


def test_driver_queues_triggers_fired_from_callbacks() -> None:
    order: list[str] = []
    chart = _parse_chart({
        "name": "t", "initial": "a",
        "states": ["a", "b", {"name": "z", "final": True}],
        "transitions": [{"trigger": "go", "source": "a", "dest": "b",
                         "after": ["first", "second"]},
                        {"trigger": "end", "source": "b", "dest": "z", "after": "ended"}],
    }, None)
    base = _model_class(chart)

    class Model(base):  # type: ignore[misc, valid-type]
        def first(self) -> None:
            assert self.fire("end") is True  # queued: runs after `go` completes
            order.append(f"first:{self.state}")

        def second(self) -> None:
            order.append(f"second:{self.state}")

        def ended(self) -> None:
            order.append(f"ended:{self.state}")

    model = Model(Clock())
    model.fire("go")
    assert order == ["first:b", "second:b", "ended:z"]


def test_driver_is_compatible_with_the_lifecycle_chart() -> None:
    """The lifecycle's `after: drain_timeout` (a model attribute) works unchanged."""

    class TimedLifecycle(TimedChartModel):
        chart_name = "lifecycle"

        def __init__(self, clock: Clock) -> None:
            super().__init__()
            self.clock = clock
            self.drain_timeout = 30.0

    for cb in load_chart("lifecycle").callback_names():
        setattr(TimedLifecycle, cb, lambda self, *a, **k: None)
    clock = Clock()
    life = TimedLifecycle(clock)
    life.start_timers()
    life.fire("started")
    life.fire("drain")
    assert life.active_timers() == {"drain": 30.0}
    clock.advance(29.9)
    assert life.state == "draining"
    clock.advance(0.1)
    assert life.state == "stopped"
    life2 = TimedLifecycle(clock)
    life2.fire("drain")
    life2.fire("cancel_drain")
    assert life2.active_timers() == {}
