"""Load ``statecharts/*.yaml`` into ``transitions`` machines.

The YAML files are the single source of truth for behaviour: states, triggers, guards,
callback names and timers.  Python classes only supply the callbacks.

Why a *shared* machine: building a ``transitions.Machine`` costs ~130 µs and
``Machine.add_model`` ~190 µs on our hardware, which would cap the SIP transaction rate
near 2,000/s.  A chart is therefore compiled into one machine per process and models
are driven through it without ``add_model`` (see :class:`ChartModel`): a new model
costs an attribute assignment, a trigger the ~7 µs of a ``transitions`` event.

Chart format (maps onto ``Machine(states=..., transitions=..., initial=...)``)::

    name: lifecycle
    initial: starting
    ignore_invalid_triggers: false     # optional, default false
    states:
      - name: starting
        on_enter: [callback_name]      # transitions State kwargs
        timers: {...}                  # anything else is kept as metadata
      - {name: stopped, final: true}
    transitions:
      - {trigger: start_done, source: starting, dest: ready,
         conditions: [guard], after: [callback]}

Transitions whose ``dest`` is null are internal (no exit/enter).  Extra keys on states
(``timers``, ``doc``...) are exposed through :attr:`Chart.state_meta`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transitions import Machine, MachineError

__all__ = [
    "CHART_DIR",
    "Chart",
    "ChartError",
    "ChartModel",
    "MachineError",
    "load_chart",
    "mermaid_diagram",
]

CHART_DIR = Path(__file__).resolve().parent.parent / "statecharts"

_STATE_KEYS = {"name", "on_enter", "on_exit", "ignore_invalid_triggers", "final"}
_TRANSITION_KEYS = {"trigger", "source", "dest", "conditions", "unless", "before", "after",
                    "prepare"}
_TRANSITION_META = {"doc", "internal"}


class ChartError(ValueError):
    """A statechart file is malformed or inconsistent."""


@dataclass(frozen=True)
class Chart:
    """A validated statechart: the data needed to build a ``transitions`` Machine."""

    name: str
    initial: str
    states: tuple[dict[str, Any], ...]
    transitions: tuple[dict[str, Any], ...]
    ignore_invalid_triggers: bool = False
    description: str = ""
    state_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Path | None = None

    @property
    def state_names(self) -> list[str]:
        return [s["name"] for s in self.states]

    @property
    def final_states(self) -> set[str]:
        return {s["name"] for s in self.states if s.get("final")}

    @property
    def triggers(self) -> set[str]:
        return {t["trigger"] for t in self.transitions}

    def callback_names(self) -> set[str]:
        """Every callback or guard name the chart refers to (models must provide them)."""
        names: set[str] = set()
        for state in self.states:
            for key in ("on_enter", "on_exit"):
                names.update(_as_list(state.get(key)))
        for trans in self.transitions:
            for key in ("conditions", "unless", "before", "after", "prepare"):
                names.update(_as_list(trans.get(key)))
        return names

    def machine_kwargs(self) -> dict[str, Any]:
        """Arguments for ``transitions.Machine`` (and ``GraphMachine``)."""
        return {
            "states": [dict(s) for s in self.states],
            "transitions": [dict(t) for t in self.transitions],
            "initial": self.initial,
            "auto_transitions": False,
            "ignore_invalid_triggers": self.ignore_invalid_triggers,
            "name": self.name,
        }

    def build_machine(self) -> Machine:
        """A model-less machine, shared by every :class:`ChartModel` of this chart."""
        return Machine(model=None, **self.machine_kwargs())

    def successors(self, state: str) -> set[str]:
        return {
            t["dest"] for t in self.transitions
            if t.get("dest") is not None and state in _sources(t, self.state_names)
        }

    def reachable(self) -> set[str]:
        seen = {self.initial}
        todo = [self.initial]
        while todo:
            for nxt in self.successors(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _sources(trans: dict[str, Any], all_states: Iterable[str]) -> list[str]:
    src = trans["source"]
    if src == "*":
        return list(all_states)
    return _as_list(src)


def _parse_chart(data: Any, source: Path | None) -> Chart:
    where = str(source) if source else "<chart>"
    if not isinstance(data, dict):
        raise ChartError(f"{where}: top level must be a mapping")
    try:
        name = str(data["name"])
        initial = str(data["initial"])
        raw_states = data["states"]
        raw_transitions = data.get("transitions") or []
    except KeyError as exc:
        raise ChartError(f"{where}: missing key {exc.args[0]!r}") from None
    states: list[dict[str, Any]] = []
    meta: dict[str, dict[str, Any]] = {}
    for raw in raw_states:
        entry = {"name": raw} if isinstance(raw, str) else dict(raw)
        if "name" not in entry:
            raise ChartError(f"{where}: a state has no name: {raw!r}")
        state = {k: v for k, v in entry.items() if k in _STATE_KEYS}
        meta[state["name"]] = {k: v for k, v in entry.items() if k not in _STATE_KEYS}
        states.append(state)
    names = [s["name"] for s in states]
    if len(set(names)) != len(names):
        raise ChartError(f"{where}: duplicate state names")
    if initial not in names:
        raise ChartError(f"{where}: initial state {initial!r} is not declared")
    transitions: list[dict[str, Any]] = []
    for raw in raw_transitions:
        unknown = set(raw) - _TRANSITION_KEYS - _TRANSITION_META
        if unknown:
            raise ChartError(f"{where}: transition {raw!r} has unknown keys {sorted(unknown)}")
        if "trigger" not in raw or "source" not in raw or "dest" not in raw:
            raise ChartError(f"{where}: transition needs trigger, source and dest: {raw!r}")
        trans = {k: v for k, v in raw.items() if k in _TRANSITION_KEYS}
        for src in _sources(trans, names):
            if src not in names:
                raise ChartError(f"{where}: transition {raw['trigger']!r} from unknown state "
                                 f"{src!r}")
        if trans["dest"] is not None and trans["dest"] not in names:
            raise ChartError(f"{where}: transition {raw['trigger']!r} to unknown state "
                             f"{trans['dest']!r}")
        transitions.append(trans)
    chart = Chart(
        name=name,
        initial=initial,
        states=tuple(states),
        transitions=tuple(transitions),
        ignore_invalid_triggers=bool(data.get("ignore_invalid_triggers", False)),
        description=str(data.get("description", "")).strip(),
        state_meta=meta,
        source=source,
    )
    unreachable = set(names) - chart.reachable()
    if unreachable:
        raise ChartError(f"{where}: unreachable states {sorted(unreachable)}")
    for final in chart.final_states:
        leaving = [t["trigger"] for t in transitions
                   if t["dest"] not in (None, final) and final in _sources(t, names)
                   and t["source"] != "*"]
        if leaving:
            raise ChartError(f"{where}: final state {final!r} has outgoing transitions {leaving}")
    return chart


@cache
def load_chart(name: str, directory: Path | None = None) -> Chart:
    """Load and validate ``statecharts/<name>.yaml`` (cached: charts are immutable)."""
    path = (directory or CHART_DIR) / f"{name}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChartError(f"cannot read statechart {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ChartError(f"{path}: invalid YAML: {exc}") from None
    chart = _parse_chart(data, path)
    if chart.name != name:
        raise ChartError(f"{path}: chart name {chart.name!r} does not match the file name")
    return chart


class ChartModel:
    """Base class for objects whose behaviour a statechart defines.

    Subclasses set ``chart_name``; the chart is compiled into one machine per class the
    first time it is needed.  Instances start in the chart's initial state and change
    state only through :meth:`fire`.
    """

    chart_name: ClassVar[str]
    _machine: ClassVar[Machine]
    _chart: ClassVar[Chart]
    _events: ClassVar[dict[str, Any]]

    state: str

    def __init__(self) -> None:
        cls = type(self)
        if "_machine" not in cls.__dict__:
            cls._compile()
        self.state = cls._chart.initial

    @classmethod
    def _compile(cls) -> None:
        chart = load_chart(cls.chart_name)
        missing = sorted(n for n in chart.callback_names() if not hasattr(cls, n))
        if missing:
            raise ChartError(f"{cls.__name__} lacks callbacks {missing} named by chart "
                             f"{chart.name!r}")
        cls._chart = chart
        cls._machine = chart.build_machine()
        cls._events = dict(cls._machine.events)

    @classmethod
    def chart(cls) -> Chart:
        if "_machine" not in cls.__dict__:
            cls._compile()
        return cls._chart

    def fire(self, trigger: str, *args: Any, **kwargs: Any) -> bool:
        """Send ``trigger`` to this model; True when a transition happened.

        Raises ``MachineError`` for a trigger the current state does not accept, unless
        the chart sets ``ignore_invalid_triggers``.
        """
        try:
            event = self._events[trigger]
        except KeyError:
            raise MachineError(f"{self.chart_name}: unknown trigger {trigger!r}") from None
        return event.trigger(self, *args, **kwargs)

    def may_fire(self, trigger: str) -> bool:
        """Whether ``trigger`` has a transition from the current state (guards not run)."""
        event = self._events.get(trigger)
        return event is not None and bool(event.transitions.get(self.state))

    @property
    def is_final(self) -> bool:
        return self.state in self._chart.final_states


def mermaid_diagram(chart: Chart) -> str:
    """Render a chart as a mermaid ``stateDiagram-v2`` with transitions' GraphMachine."""
    from transitions.extensions.diagrams import GraphMachine

    class _Subject:
        pass

    subject = _Subject()
    kwargs = chart.machine_kwargs()
    kwargs["ignore_invalid_triggers"] = True
    machine = GraphMachine(model=subject, graph_engine="mermaid", show_conditions=True,
                           show_state_attributes=False, title=chart.name, **kwargs)
    source = machine.get_graph().draw(None)
    text = source if isinstance(source, str) else source.decode()
    # transitions 0.9.3 writes a bare title between the front-matter fences and a
    # capitalised ``Class`` statement; mermaid wants ``title: ...`` and ``class``.
    lines = text.strip().splitlines()
    if len(lines) > 2 and lines[0] == "---" and lines[2] == "---":
        lines[1] = f"title: {lines[1]}"
    lines = ["  class " + ln.strip()[len("Class "):] if ln.strip().startswith("Class ") else ln
             for ln in lines]
    return "\n".join(ln.rstrip() for ln in lines) + "\n"


def render_markdown(chart: Chart) -> str:
    """The generated ``docs/statecharts/<name>.md`` for a chart."""
    lines = [
        f"# Statechart `{chart.name}`",
        "",
        f"Generated from `statecharts/{chart.name}.yaml` by `scripts/generate_statecharts.py`;"
        " do not edit.",
        "",
    ]
    if chart.description:
        lines += [chart.description, ""]
    lines += ["```mermaid", mermaid_diagram(chart).rstrip("\n"), "```", ""]
    timed = {s: m["timers"] for s, m in chart.state_meta.items() if m.get("timers")}
    if timed:
        lines += ["## Timers", "", "| state | timer | after | fires |", "|---|---|---|---|"]
        for state, timers in timed.items():
            for timer in timers:
                lines.append(f"| {state} | {timer.get('name', '')} | {timer.get('after', '')} "
                             f"| {timer.get('trigger', '')} |")
        lines.append("")
    return "\n".join(lines)


def all_chart_names(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or CHART_DIR).glob("*.yaml"))
