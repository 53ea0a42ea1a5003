"""Statecharts: the YAML is valid, models match it, and the diagrams are not stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx.statecharts import (
    ChartError,
    ChartModel,
    MachineError,
    _parse_chart,
    all_chart_names,
    load_chart,
    render_markdown,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "statecharts"


@pytest.mark.parametrize("name", all_chart_names())
def test_generated_diagram_is_current(name: str) -> None:
    generated = DOCS / f"{name}.md"
    assert generated.exists(), f"run `make diagrams`: {generated} is missing"
    assert generated.read_text(encoding="utf-8") == render_markdown(load_chart(name)), (
        f"{generated} is stale; run `make diagrams`"
    )


@pytest.mark.parametrize("name", all_chart_names())
def test_every_chart_is_consistent(name: str) -> None:
    chart = load_chart(name)
    assert chart.initial in chart.state_names
    assert chart.reachable() == set(chart.state_names)
    mermaid = render_markdown(chart)
    for trigger in chart.triggers:
        assert trigger in mermaid


def test_no_orphan_diagrams() -> None:
    names = set(all_chart_names())
    orphans = {p.stem for p in DOCS.glob("*.md")} - names
    assert not orphans, f"diagrams without a chart: {orphans}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "initial": "a", "states": ["b"]}, "initial state"),
        ({"name": "x", "initial": "a", "states": ["a", "a"]}, "duplicate"),
        ({"name": "x", "initial": "a", "states": ["a", "b"]}, "unreachable"),
        ({"name": "x", "initial": "a", "states": ["a"],
          "transitions": [{"trigger": "t", "source": "a", "dest": "zz"}]}, "unknown state"),
        ({"name": "x", "initial": "a", "states": ["a"],
          "transitions": [{"trigger": "t", "source": "a", "dest": "a", "when": 1}]},
         "unknown keys"),
        ({"name": "x", "initial": "a",
          "states": ["a", {"name": "f", "final": True}],
          "transitions": [{"trigger": "t", "source": "a", "dest": "f"},
                          {"trigger": "u", "source": "f", "dest": "a"}]}, "final state"),
        (["not", "a", "mapping"], "mapping"),
        ({"name": "x", "states": ["a"]}, "missing key"),
    ],
)
def test_malformed_charts_are_rejected(data: object, message: str) -> None:
    with pytest.raises(ChartError, match=message):
        _parse_chart(data, None)


def test_model_without_declared_callbacks_is_refused() -> None:
    class Incomplete(ChartModel):
        chart_name = "nist"  # names send_response, resend_response, ...

    with pytest.raises(ChartError, match="lacks callbacks"):
        Incomplete()


def test_unknown_trigger_is_a_machine_error() -> None:
    from twisted.internet.task import Clock

    from pbx.lifecycle import Lifecycle

    life = Lifecycle(Clock())
    with pytest.raises(MachineError):
        life.fire("no_such_trigger")
    with pytest.raises(MachineError):
        life.fire("drained")  # valid trigger, invalid in `starting`
    assert life.state == "starting"
