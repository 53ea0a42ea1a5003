"""CDR writing (open at answer, closed at end, chained) and the dialplan's decisions."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from pbx.calls import (
    BUSY,
    CANCELLED,
    CONGESTION,
    FAILED,
    NO_ANSWER,
    CDRWriter,
    Dialplan,
    best_final,
    check_hops,
    disposition_for_status,
)
from tests.unit.test_calls_support import CallerPhone, FakeCDR, Harness


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_answered_call_is_inserted_open_then_updated_closed_in_order() -> None:
    wall = Clock()
    sink = FakeCDR()
    gate: Deferred[int] = Deferred()
    sink.add_cdr = lambda record: (sink.adds.append(dict(record)) or gate)  # type: ignore
    writer = CDRWriter(sink, node="n1", wall=wall)
    record = writer.new_record("c1", "1001", "1002")
    wall.t = 1005.0
    writer.answered(record)
    assert sink.adds[0]["state"] == "open" and sink.adds[0]["answer_time"] == 1005.0
    wall.t = 1065.5
    writer.finished(record)
    assert sink.updates == []  # the update waits for the insert
    gate.callback(1)
    ((call_id, fields),) = sink.updates
    assert call_id == "c1" and fields["state"] == "closed"
    assert fields["duration"] == 65.5 and fields["billsec"] == 60.5
    assert fields["node"] == "n1" and "call_id" not in fields


def test_unanswered_call_is_one_closed_insert_and_store_errors_are_contained() -> None:
    sink = FakeCDR()
    writer = CDRWriter(sink, wall=Clock())
    record = writer.new_record("c2", "1001", "1002")
    record.disposition = BUSY
    writer.finished(record)
    assert [r["state"] for r in sink.adds] == ["closed"] and sink.updates == []
    sink.add_cdr = lambda record: fail(RuntimeError("db down"))  # type: ignore
    writer.finished(writer.new_record("c3", "1001", "1002"))
    assert writer.failures == 1


def test_recover_marks_this_nodes_open_rows() -> None:
    sink = FakeCDR()
    CDRWriter(sink, node="n7").recover()
    assert sink.interrupted_calls == ["n7"]


def test_dispositions_and_best_final() -> None:
    assert disposition_for_status(486) == BUSY
    assert disposition_for_status(603) == BUSY
    assert disposition_for_status(480) == NO_ANSWER
    assert disposition_for_status(487) == CANCELLED
    assert disposition_for_status(503) == CONGESTION
    assert disposition_for_status(404) == FAILED
    assert best_final([(404, "x"), (486, "Busy")]) == (486, "Busy")
    assert best_final([(486, "Busy"), (603, "Decline")]) == (603, "Decline")
    assert best_final([(503, "a"), (480, "b")]) == (480, "b")
    assert best_final([(408, "t"), (404, "n")]) == (404, "n")
    assert best_final([(407, "auth")]) == (480, "Temporarily Unavailable")
    assert best_final([]) == (480, "Temporarily Unavailable")


class Locator:
    def __init__(self, bindings: dict[str, list[Any]]) -> None:
        self.bindings = bindings

    def lookup(self, aor: str) -> list[Any]:
        return self.bindings.get(aor, [])


class Directory:
    def credentials(self, username: str) -> Deferred[Any]:
        return succeed(object() if username in ("100", "200") else None)


def route(plan: Dialplan, number: str | None) -> Any:
    results: list[Any] = []
    plan.route(number).addCallback(results.append)
    return results[0]


def test_dialplan_pattern_existence_and_registration() -> None:
    plan = Dialplan(r"^[0-9]{3}$", Locator({"100": ["binding"]}), Directory())
    assert route(plan, "100").ok and route(plan, "100").targets == ["binding"]
    assert route(plan, "200").status == 480   # exists, not registered
    assert route(plan, "300").status == 404   # matches, no such extension
    assert route(plan, "1000").status == 404  # does not match the pattern
    assert route(plan, None).status == 404


def test_hop_checks() -> None:
    h = Harness()
    a = CallerPhone(h)
    invite = a.build_invite(max_forwards=1)
    assert check_hops(invite, "z9hG4bKpbxzz", "n") is None
    invite.headers.set("Max-Forwards", "0")
    assert check_hops(invite, "z9hG4bKpbxzz", "n") == (483, "Too Many Hops")
    invite.headers.set("Max-Forwards", "5")
    invite.headers.add("Via", "SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKpbxzz123")
    assert check_hops(invite, "z9hG4bKpbxzz", "n") == (482, "Loop Detected")
