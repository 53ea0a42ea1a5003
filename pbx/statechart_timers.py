"""State timers for statechart models: arm on entering a state, cancel on leaving it.

Charts declare timers as state metadata, so the RFC timer table lives in the YAML next
to the transitions it drives instead of being scattered through Python.  The driver is
generic (the SIP transactions and the PBX lifecycle use it) and talks to time only
through an injectable ``IReactorTime``, so tests drive it with ``task.Clock``.

Schema, per state (``timers`` is a list)::

    timers:
      - name: E          # timer name (the RFC letter for SIP); one per state, except
                         # alternatives told apart by ``reliable``
        after: T1        # seconds: a number, a model attribute name, or an expression
                         # over attributes with + - * / ( ) min() max(), e.g. "64*T1".
                         # Evaluated when armed; an attribute that is None disables it.
        trigger: timer_e # fired on expiry; the state must have a transition for it
        reliable: false  # optional: armed only when ``model.reliable`` equals this
        backoff: 2       # optional: after each expiry re-arm with interval * backoff...
        cap: T2          # ...at most this (an ``after``-style expression)
        repeat: true     # optional: after each expiry re-arm with ``after`` again
        restart_on: [t]  # optional: these triggers, handled without leaving the state,
                         # re-arm the timer from ``after`` (RFC 3261 §16.7: Timer C is
                         # reset by each provisional response)
        stop_on: [t]     # optional: these triggers, handled without leaving the state,
                         # cancel the timer for the rest of the state (a deadline that
                         # only the first answer of the TU has to meet)
        doc: ...         # optional, ignored

Semantics:

* After each transition that changes the state, running timers the new state does not
  declare are cancelled and declared timers that are not running are armed.  A timer
  whose name the new state also declares **keeps running**: RFC 3261's Timer F spans
  Trying and Proceeding, and Timer E keeps its countdown when a provisional arrives and
  is re-armed by the new state's rule (T2) when it next fires.  Internal transitions
  (``dest: null``) do not touch timers.
* On expiry the timer's trigger is fired; if the state then still declares the timer and
  its spec repeats (``repeat`` or ``backoff``), it is re-armed.
* A delay of zero (e.g. Timer K over TCP) expires as soon as the current transition has
  completed, without a reactor turn.
* ``restart_on``/``stop_on`` act after a transition that stays in the state (internal
  or reflexive) and ran; a guard that refused the transition leaves the timer alone.
  A stopped timer stays stopped until the model enters a state that does not declare
  it (like a running one, it carries over into a next state declaring the same name),
  also when the stop came before :meth:`TimedChartModel.start_timers`.
* Run-to-completion: a trigger fired from inside a callback (a transport error while
  sending, a zero timer) is queued and processed after the current transition, so
  callbacks never run in the middle of another transition.  An exception from a
  callback still lets the reached state's timers be set and the queue be processed;
  it is re-raised afterwards.

Models provide ``clock`` (``IReactorTime``), the attributes their expressions name and,
for charts using ``reliable``, a boolean ``reliable`` attribute.  The initial state is
not entered by a transition: call :meth:`TimedChartModel.start_timers` once.
"""

from __future__ import annotations

import ast
import operator
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pbx.statecharts import Chart, ChartError, ChartModel

__all__ = [
    "Delay",
    "TimedChartModel",
    "TimerSpec",
    "compile_delay",
    "compile_timer_hooks",
    "compile_timers",
]

Delay = Callable[[Any], "float | None"]

_SPEC_KEYS = {"name", "after", "trigger", "reliable", "backoff", "cap", "repeat",
              "restart_on", "stop_on", "doc"}
_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_FUNCS: dict[str, Callable[..., Any]] = {"min": min, "max": max}


def compile_delay(expr: object) -> Delay:
    """Turn an ``after``/``cap`` value into a function of the model.

    Compiled once per chart into closures (no ``eval``): only numbers, attribute names,
    arithmetic and min/max are accepted, so a chart cannot run arbitrary code.
    """
    if isinstance(expr, bool) or not isinstance(expr, int | float | str):
        raise ChartError(f"timer delay must be a number or an expression, not {expr!r}")
    if isinstance(expr, int | float):
        if expr < 0:
            raise ChartError(f"timer delay {expr!r} is negative")
        value = float(expr)
        return lambda _model: value
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ChartError(f"timer delay {expr!r} is not an expression") from None
    return _compile_node(tree.body, expr)


def _compile_node(node: ast.expr, text: str) -> Delay:
    if (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)):
        value = float(node.value)
        return lambda _model: value
    if isinstance(node, ast.Name):
        return operator.attrgetter(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        binop = _BINOPS[type(node.op)]
        left, right = _compile_node(node.left, text), _compile_node(node.right, text)
        return lambda model: binop(left(model), right(model))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _compile_node(node.operand, text)
        return lambda model: -inner(model)  # type: ignore[operator]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords and node.args):
        func = _FUNCS[node.func.id]
        args = [_compile_node(arg, text) for arg in node.args]
        return lambda model: func(*(arg(model) for arg in args))
    raise ChartError(f"timer delay {text!r}: unsupported {ast.dump(node)[:40]}")


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """One compiled timer declaration of one state."""

    name: str
    trigger: str
    after: Delay
    after_text: str
    reliable: bool | None = None
    backoff: float | None = None
    cap: Delay | None = None
    repeat: bool = False
    restart_on: frozenset[str] = frozenset()
    stop_on: frozenset[str] = frozenset()

    def applies(self, model: Any) -> bool:
        return self.reliable is None or bool(model.reliable) is self.reliable

    def next_interval(self, model: Any, previous: float) -> float | None:
        """Interval after an expiry, or None when the timer does not repeat."""
        if self.backoff is not None:
            interval = previous * self.backoff
            if self.cap is not None:
                cap = self.cap(model)
                if cap is not None:
                    interval = min(interval, cap)
            return interval
        if self.repeat:
            return self.after(model)
        return None


TimerTable = dict[str, dict[str, tuple[TimerSpec, ...]]]
# (state, trigger) -> ((timer name, restart: True / stop: False), ...)
TimerHooks = dict[tuple[str, str], tuple[tuple[str, bool], ...]]


def compile_timers(chart: Chart) -> TimerTable:
    """Validate and compile a chart's timer metadata: state -> name -> alternatives."""
    table: TimerTable = {}
    for state in chart.state_names:
        raw_timers = chart.state_meta.get(state, {}).get("timers") or []
        if not isinstance(raw_timers, list):
            raise ChartError(f"{chart.name}: timers of state {state!r} must be a list")
        by_name: dict[str, list[TimerSpec]] = {}
        for raw in raw_timers:
            spec = _compile_spec(chart, state, raw)
            by_name.setdefault(spec.name, []).append(spec)
        for name, options in by_name.items():
            kinds = [o.reliable for o in options]
            if len(options) > 1 and (None in kinds or len(set(kinds)) != len(kinds)):
                raise ChartError(f"{chart.name}: state {state!r} declares timer {name!r} "
                                 "twice without distinct `reliable` values")
        if by_name:
            table[state] = {name: tuple(options) for name, options in by_name.items()}
    return table


def compile_timer_hooks(table: TimerTable) -> TimerHooks:
    """The ``restart_on``/``stop_on`` declarations as (state, trigger) -> actions."""
    hooks: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for state, timers in table.items():
        for name, options in timers.items():
            for spec in options:
                for trigger in spec.restart_on:
                    action = (name, True)
                    if action not in hooks.setdefault((state, trigger), []):
                        hooks[(state, trigger)].append(action)
                for trigger in spec.stop_on:
                    action = (name, False)
                    if action not in hooks.setdefault((state, trigger), []):
                        hooks[(state, trigger)].append(action)
    return {key: tuple(actions) for key, actions in hooks.items()}


def _compile_spec(chart: Chart, state: str, raw: Any) -> TimerSpec:
    where = f"{chart.name}: timer in state {state!r}"
    if not isinstance(raw, dict):
        raise ChartError(f"{where} must be a mapping: {raw!r}")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise ChartError(f"{where} has unknown keys {sorted(unknown)}")
    for key in ("name", "after", "trigger"):
        if key not in raw:
            raise ChartError(f"{where} needs {key!r}: {raw!r}")
    trigger = str(raw["trigger"])
    accepting = [t for t in chart.transitions
                 if t["trigger"] == trigger
                 and (t["source"] == "*" or state in _as_list(t["source"]))]
    if not accepting:
        raise ChartError(f"{where}: no transition from {state!r} on {trigger!r}")
    backoff = raw.get("backoff")
    if backoff is not None and (isinstance(backoff, bool) or not isinstance(backoff, int | float)
                                or backoff <= 0):
        raise ChartError(f"{where}: backoff must be a positive number")
    reliable = raw.get("reliable")
    if reliable is not None and not isinstance(reliable, bool):
        raise ChartError(f"{where}: reliable must be true or false")
    cap = raw.get("cap")
    hooks: dict[str, frozenset[str]] = {}
    for key in ("restart_on", "stop_on"):
        value = raw.get(key) or []
        if isinstance(value, str) or not isinstance(value, list):
            raise ChartError(f"{where}: {key} must be a list of triggers")
        for hook in value:
            if not any(t["trigger"] == hook
                       and (t["source"] == "*" or state in _as_list(t["source"]))
                       for t in chart.transitions):
                raise ChartError(f"{where}: {key} names {hook!r}, which has no "
                                 f"transition from {state!r}")
        hooks[key] = frozenset(str(v) for v in value)
    if hooks["restart_on"] & hooks["stop_on"]:
        raise ChartError(f"{where}: a trigger cannot both restart and stop a timer")
    return TimerSpec(
        name=str(raw["name"]),
        trigger=trigger,
        after=compile_delay(raw["after"]),
        after_text=str(raw["after"]),
        reliable=reliable,
        backoff=float(backoff) if backoff is not None else None,
        cap=compile_delay(cap) if cap is not None else None,
        repeat=bool(raw.get("repeat", False)),
        restart_on=hooks["restart_on"],
        stop_on=hooks["stop_on"],
    )


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class _Running:
    """A running timer: its spec, current interval, and where it waits (None = an
    immediate timer, or one that has fired or been cancelled)."""

    __slots__ = ("deadline", "interval", "model", "queue", "spec")

    def __init__(self, spec: TimerSpec, interval: float) -> None:
        self.spec = spec
        self.interval = interval
        self.queue: _DelayQueue | None = None
        self.model: TimedChartModel | None = None
        self.deadline = 0.0


class _Stopped(_Running):
    """Marks a timer that ``stop_on`` stopped: it occupies the name, so the state's
    timers are not armed again, and is never queued."""

    __slots__ = ()

    def __init__(self) -> None:
        self.queue = None
        self.model = None
        self.interval = 0.0
        self.deadline = 0.0


_STOPPED = _Stopped()


class _DelayQueue:
    """Every running timer of one delay on one clock, in one FIFO with one reactor call.

    Timers armed with the same delay on a monotonic clock expire in the order they
    were armed, so they need no heap: the queue keeps one ``callLater`` for its
    earliest entry and, when it fires, expires every entry that is due.  Thousands of
    transactions each waiting 32 s for Timer J then cost a deque slot each instead of
    a reactor ``DelayedCall`` (with its argument tuple and bound methods), which
    matters to memory and to the garbage collector.

    Cancelling is lazy: the entry is marked and stays in the deque until its deadline
    (it no longer refers to its model); when no live entry is left the reactor call
    is cancelled too, so an idle clock has nothing scheduled.  If the clock goes back
    (a wall-clock step), timers armed after the step wait behind earlier ones: late,
    never early, as with the reactor's own timers.
    """

    __slots__ = ("_clock", "call", "delay", "entries", "firing", "live")

    def __init__(self, clock: IReactorTime, delay: float) -> None:
        self._clock = weakref.ref(clock)  # the registry is keyed weakly by the clock
        self.delay = delay
        self.entries: deque[_Running] = deque()
        self.call: IDelayedCall | None = None
        self.firing = False
        self.live = 0

    def add(self, entry: _Running, model: TimedChartModel) -> None:
        clock = model.clock
        entry.deadline = clock.seconds() + self.delay
        entry.model = model
        entry.queue = self
        self.entries.append(entry)
        self.live += 1
        if self.call is None and not self.firing:
            self.call = clock.callLater(self.delay, self._fire)

    def discard(self, entry: _Running) -> None:
        entry.queue = None
        entry.model = None
        self.live -= 1
        if self.live == 0:
            self.entries.clear()
            call, self.call = self.call, None
            if call is not None and call.active():
                call.cancel()
            if not self.firing:
                self._retire()

    def _retire(self) -> None:
        """Leave the registry once empty: delays computed from the time (a session
        timer's ``time_left``) are all different, and a queue kept per delay would make
        the registry grow by one queue per call, forever."""
        clock = self._clock()
        queues = _QUEUES.get(clock) if clock is not None else None
        if queues is not None and queues.get(self.delay) is self:
            del queues[self.delay]

    def _fire(self) -> None:
        self.call = None
        clock = self._clock()
        if clock is None:  # pragma: no cover - a clock that is gone fires nothing
            return
        now = clock.seconds()
        due = now + 1e-9  # the call was set for ``deadline - now``: allow the rounding
        entries = self.entries
        error: Exception | None = None
        self.firing = True
        try:
            while entries and entries[0].deadline <= due:
                entry = entries.popleft()
                model = entry.model
                if entry.queue is not self or model is None:
                    continue  # cancelled
                entry.queue = None
                entry.model = None
                self.live -= 1
                try:
                    model._run(model._expire, entry.spec.name, entry)
                except Exception as exc:  # the other models' timers still expire
                    error = error or exc
        finally:
            self.firing = False
            while entries and entries[0].queue is not self:
                entries.popleft()
            if entries and self.call is None:
                self.call = clock.callLater(max(0.0, entries[0].deadline - now), self._fire)
            elif self.live == 0:
                self._retire()
        if error is not None:
            raise error


_QUEUES: weakref.WeakKeyDictionary[Any, dict[float, _DelayQueue]] = weakref.WeakKeyDictionary()
_last_clock: list[Any] = [None, None]  # (clock, its queues): the registry's hot path


def _queue(clock: IReactorTime, delay: float) -> _DelayQueue:
    if _last_clock[0] is clock:
        queues = _last_clock[1]
    else:
        queues = _QUEUES.get(clock)
        if queues is None:
            queues = _QUEUES[clock] = {}
        _last_clock[0], _last_clock[1] = clock, queues
    queue = queues.get(delay)
    if queue is None:
        queue = queues[delay] = _DelayQueue(clock, delay)
    return queue


def _cancel(entry: _Running) -> None:
    queue = entry.queue
    if queue is not None:
        queue.discard(entry)


class TimedChartModel(ChartModel):
    """A :class:`ChartModel` whose states carry timers, with run-to-completion firing.

    Per-instance cost is two attributes; the timer table is compiled once per class with
    the shared machine.
    """

    clock: IReactorTime
    _timer_table: ClassVar[TimerTable]
    _timer_hooks: ClassVar[TimerHooks] = {}

    def __init__(self) -> None:
        super().__init__()
        self._running_timers: dict[str, _Running] = {}
        self._rtc_queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None

    @classmethod
    def _compile(cls) -> None:
        super()._compile()
        cls._timer_table = compile_timers(cls._chart)
        cls._timer_hooks = compile_timer_hooks(cls._timer_table)

    # -- firing ---------------------------------------------------------------------
    def fire(self, trigger: str, *args: Any, **kwargs: Any) -> bool:
        """Fire ``trigger``; from inside a callback it is queued (and True returned)."""
        return self._run(self._step, trigger, args, kwargs)

    def start_timers(self) -> None:
        """Arm the initial state's timers (the initial state is entered by no transition)."""
        self._run(self._sync_timers)

    def cancel_timers(self) -> None:
        """Cancel every running timer without changing state (shutdown, tests)."""
        running, self._running_timers = self._running_timers, {}
        for entry in running.values():
            _cancel(entry)

    def active_timers(self) -> dict[str, float]:
        """Running timers and their current intervals (introspection, health, tests)."""
        return {name: entry.interval for name, entry in self._running_timers.items()
                if entry is not _STOPPED}

    def state_changed(self, previous: str) -> None:
        """Hook run after every state change, once the new state's timers are set."""

    def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        queue = self._rtc_queue
        if queue is not None:
            queue.append((func, args))
            return True
        queue = self._rtc_queue = deque()
        error: Exception | None = None
        result: Any = False
        try:
            try:
                result = func(*args)
            except Exception as exc:  # a callback's bug must not lose queued events
                error = exc
            while queue:
                func, args = queue.popleft()
                try:
                    func(*args)
                except Exception as exc:
                    error = error or exc
        finally:
            self._rtc_queue = None
        if error is not None:
            raise error
        return result

    def _step(self, trigger: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        previous = self.state
        if self._chart.ignore_invalid_triggers:
            # Discarding is the norm for these charts (absorbed retransmissions): skip
            # transitions' per-event warning log and its cost.
            event = self._events.get(trigger)
            if event is not None and previous not in event.transitions:
                return False
        try:
            result = ChartModel.fire(self, trigger, *args, **kwargs)
        finally:
            # Even when a callback raised, the state it reached gets its timers: a model
            # must never sit in a state without the timers that end it.
            if self.state != previous:
                self._sync_timers()
                self.state_changed(previous)
        if result and self._timer_hooks and self.state == previous:
            hooks = self._timer_hooks.get((previous, trigger))
            if hooks is not None:
                self._apply_timer_hooks(hooks)
        return result

    def _apply_timer_hooks(self, hooks: tuple[tuple[str, bool], ...]) -> None:
        running = self._running_timers
        for name, restart in hooks:
            entry = running.pop(name, None)
            if entry is not None:
                _cancel(entry)
            if not restart:
                running[name] = _STOPPED
                continue
            for spec in self._timer_table[self.state][name]:
                if spec.applies(self):
                    self._arm(spec, spec.after(self))
                    break

    # -- timers ---------------------------------------------------------------------
    def _sync_timers(self) -> None:
        declared = self._timer_table.get(self.state)
        running = self._running_timers
        if running:
            for name in [n for n in running if declared is None or n not in declared]:
                _cancel(running.pop(name))
        if declared is None:
            return
        for name, options in declared.items():
            if name in running:
                continue
            for spec in options:
                if spec.applies(self):
                    self._arm(spec, spec.after(self))
                    break

    def _arm(self, spec: TimerSpec, delay: float | None) -> None:
        if delay is None:
            return
        entry = _Running(spec, delay)
        self._running_timers[spec.name] = entry
        if delay <= 0:
            self._run(self._expire, spec.name, entry)
        else:
            _queue(self.clock, delay).add(entry, self)

    def _expire(self, name: str, entry: _Running) -> None:
        if self._running_timers.get(name) is not entry:
            return  # cancelled (or replaced) after being queued
        del self._running_timers[name]
        self._step(entry.spec.trigger, (), {})
        if name in self._running_timers:
            return  # a state change re-armed it
        declared = self._timer_table.get(self.state)
        if declared is None or name not in declared:
            return
        for spec in declared[name]:
            if spec.applies(self):
                self._arm(spec, spec.next_interval(self, entry.interval))
                return
