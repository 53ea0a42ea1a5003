"""LocationService: lookups, contact comparison, write-behind persistence, expiry."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from pbx.sip.location import Binding, LocationService, contact_key

ROW_COLUMNS = ["aor", "contact", "expires_at", "q", "call_id", "cseq", "transport",
               "source_host", "source_port", "user_agent", "instance_id", "reg_id", "node",
               "updated_at"]


class Wall:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeStore:
    """In-memory BindingPersistence that records each save call."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.saves: list[tuple[list[dict[str, Any]], list[tuple[str, str]]]] = []
        self.fail_next = 0
        self.hold: Deferred[None] | None = None

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([dict(r) for r in self.rows.values()])

    def save_bindings(self, upserts: list[dict[str, Any]],
                      deletes: list[tuple[str, str]]) -> Deferred[None]:
        self.saves.append((upserts, deletes))
        if self.fail_next:
            self.fail_next -= 1
            return fail(OSError("database unavailable"))
        for key in deletes:
            self.rows.pop(key, None)
        for row in upserts:
            self.rows[(row["aor"], row["contact"])] = dict(row)
        if self.hold is not None:
            return self.hold
        return succeed(None)


def binding(aor: str = "1001", contact: str = "sip:1001@192.0.2.5:5060", *,
            expires_in: float = 3600, now: float = 1_700_000_000.0, **kw: Any) -> Binding:
    return Binding(aor=aor, contact=contact, expires_at=now + expires_in, updated_at=now, **kw)


def service(store: FakeStore | None = None, **kw: Any) -> tuple[LocationService, Clock, Wall]:
    clock, wall = Clock(), Wall()
    return LocationService(clock, store, wall_clock=wall, **kw), clock, wall


# -- Binding -----------------------------------------------------------------------------


def test_binding_fields_are_the_store_columns_and_round_trip() -> None:
    assert [f.name for f in dataclasses.fields(Binding)] == ROW_COLUMNS
    b = binding(q=0.5, call_id="c", cseq=3, transport="tcp", source_host="198.51.100.1",
                source_port=40000, user_agent="Phone", instance_id="<urn:uuid:1>",
                reg_id=1, node="n1")
    row = b.as_row()
    assert list(row) == ROW_COLUMNS
    assert Binding.from_row(row) == b


def test_remaining_seconds() -> None:
    b = binding(expires_in=3600)
    assert b.remaining(1_700_000_000.0) == 3600
    assert b.remaining(1_700_000_000.0 + 3599.7) == 1
    assert b.remaining(1_700_000_000.0 + 3600) == 0


# -- contact comparison (RFC 3261 §19.1.4) ------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [
    ("sip:1001@Example.COM:5060", "SIP:1001@example.com:5060"),
    ("sip:1001@h;transport=UDP;ob", "sip:1001@h;ob;transport=udp"),
    ("sip:%61lice@h", "sip:alice@h"),
])
def test_equivalent_contacts(a: str, b: str) -> None:
    assert contact_key(a) == contact_key(b)


@pytest.mark.parametrize(("a", "b"), [
    ("sip:alice@h", "sip:ALICE@h"),          # user part is case-sensitive
    ("sip:alice@h", "sip:alice@h:5060"),     # omitted port is not the default port
    ("sip:alice@h", "sips:alice@h"),
    ("sip:alice@h;transport=tcp", "sip:alice@h;transport=udp"),
    ("sip:alice@h;line=1", "sip:alice@h;line=2"),
])
def test_different_contacts(a: str, b: str) -> None:
    assert contact_key(a) != contact_key(b)


# -- lookups -------------------------------------------------------------------------------


def test_lookup_orders_by_q_then_newest_and_hides_expired() -> None:
    loc, _, wall = service()
    now = wall.t
    loc.apply("1001", [
        binding(contact="sip:a@h", q=0.5, now=now),
        binding(contact="sip:b@h", q=1.0, now=now - 10),
        binding(contact="sip:c@h", q=1.0, now=now),
        binding(contact="sip:d@h", q=1.0, now=now, expires_in=5),
    ])
    assert [b.contact for b in loc.lookup("1001")] == ["sip:c@h", "sip:d@h", "sip:b@h",
                                                       "sip:a@h"]
    wall.t += 5
    assert [b.contact for b in loc.lookup("1001")] == ["sip:c@h", "sip:b@h", "sip:a@h"]
    assert loc.get("1001", "sip:d@h") is None
    assert loc.get("1001", "SIP:c@H") is not None
    assert loc.lookup("1002") == []


def test_equivalent_contact_replaces_and_deletes_the_old_spelling() -> None:
    store = FakeStore()
    loc, _, _ = service(store)
    loc.apply("1001", [binding(contact="sip:a@h;transport=UDP;ob")])
    loc.flush()
    loc.apply("1001", [binding(contact="sip:a@h;ob;transport=udp", cseq=2)])
    assert loc.binding_count == 1
    loc.flush()
    assert list(store.rows) == [("1001", "sip:a@h;ob;transport=udp")]


def test_counts_and_remove_aor() -> None:
    loc, _, _ = service()
    loc.apply("1001", [binding(contact="sip:a@h"), binding(contact="sip:b@h")])
    loc.apply("1002", [binding("1002", "sip:c@h")])
    assert (loc.registered_aors, loc.binding_count) == (2, 3)
    loc.apply("1001", removes=["sip:a@h"])
    assert (loc.registered_aors, loc.binding_count) == (2, 2)
    assert loc.remove_aor("1001") == 1
    assert (loc.registered_aors, loc.binding_count) == (1, 1)
    loc.apply("1002", removes=["sip:c@h", "sip:unknown@h"])
    assert (loc.registered_aors, loc.binding_count) == (0, 0)


# -- write-behind ---------------------------------------------------------------------------


def test_many_updates_are_coalesced_into_one_save() -> None:
    store = FakeStore()
    loc, clock, _ = service(store, flush_interval=0.2)
    for cseq in range(1, 51):
        loc.apply("1001", [binding(cseq=cseq)])
        loc.apply("1002", [binding("1002", "sip:1002@h", cseq=cseq)])
    loc.apply("1003", [binding("1003", "sip:1003@h")])
    loc.apply("1003", removes=["sip:1003@h"])
    assert store.saves == []
    clock.advance(0.2)
    assert len(store.saves) == 1
    upserts, deletes = store.saves[0]
    assert sorted((r["aor"], r["cseq"]) for r in upserts) == [("1001", 50), ("1002", 50)]
    assert deletes == [("1003", "sip:1003@h")]
    clock.advance(10)
    assert len(store.saves) == 1  # nothing dirty: no idle saves


def test_delete_then_re_add_saves_the_upsert() -> None:
    store = FakeStore()
    loc, clock, _ = service(store)
    loc.apply("1001", [binding()])
    loc.apply("1001", removes=[binding().contact])
    loc.apply("1001", [binding(cseq=9)])
    clock.advance(0.2)
    assert [(len(u), d) for u, d in store.saves] == [(1, [])]
    assert store.saves[0][0][0]["cseq"] == 9


def test_failed_flush_keeps_changes_and_retries() -> None:
    store = FakeStore()
    store.fail_next = 2
    loc, clock, _ = service(store, flush_interval=0.2)
    loc.apply("1001", [binding(cseq=1)])
    loc.apply("1002", [binding("1002", "sip:x@h", cseq=1)])
    clock.advance(0.2)
    assert len(store.saves) == 1 and store.rows == {}
    assert loc.pending_changes == 2
    loc.apply("1001", [binding(cseq=2)])  # a newer change made while failing wins
    clock.advance(0.4)   # backoff: 0.2 * 2
    assert len(store.saves) == 2 and store.rows == {}
    clock.advance(0.8)   # 0.2 * 4
    assert len(store.saves) == 3
    assert store.rows[("1001", "sip:1001@192.0.2.5:5060")]["cseq"] == 2
    assert ("1002", "sip:x@h") in store.rows
    assert loc.pending_changes == 0 and loc.flush_failures == 2


def test_explicit_flush_reports_failure_and_keeps_changes() -> None:
    store = FakeStore()
    store.fail_next = 1
    loc, _, _ = service(store)
    loc.apply("1001", [binding()])
    results: list[Any] = []
    loc.flush().addBoth(results.append)
    assert results and results[0].check(OSError)
    assert loc.pending_changes == 1
    results.clear()
    loc.flush().addBoth(results.append)
    assert results == [None] and len(store.rows) == 1


def test_flush_during_a_save_waits_and_then_saves_the_rest() -> None:
    store = FakeStore()
    store.hold = Deferred()
    loc, _, _ = service(store)
    loc.apply("1001", [binding()])
    first: list[Any] = []
    loc.flush().addBoth(first.append)
    loc.apply("1002", [binding("1002", "sip:y@h")])
    second: list[Any] = []
    loc.flush().addBoth(second.append)
    assert len(store.saves) == 1 and first == [] and second == []
    hold, store.hold = store.hold, None
    hold.callback(None)
    assert first == [None] and second == [None]
    assert len(store.saves) == 2 and len(store.rows) == 2


def test_stop_flushes_pending_changes() -> None:
    store = FakeStore()
    loc, _, _ = service(store)
    loc.start()
    loc.apply("1001", [binding()])
    done: list[Any] = []
    loc.stop().addBoth(done.append)
    assert done == [None] and len(store.rows) == 1


def test_without_persistence_everything_stays_in_memory() -> None:
    loc, clock, _ = service(None)
    loc.apply("1001", [binding()])
    clock.advance(1)
    done: list[Any] = []
    loc.flush().addBoth(done.append)
    assert done == [None] and len(loc.lookup("1001")) == 1


# -- load and sweep ---------------------------------------------------------------------------


def test_load_restores_live_bindings_and_drops_expired_ones() -> None:
    store = FakeStore()
    now = Wall().t
    for row in (binding(contact="sip:live@h", now=now).as_row(),
                binding(contact="sip:old@h", now=now - 7200).as_row(),
                {"aor": "broken"}):
        store.rows[(row["aor"], row.get("contact", ""))] = row
    loc, clock, _ = service(store)
    restored: list[Any] = []
    loc.load().addCallback(restored.append)
    assert restored == [1]
    assert [b.contact for b in loc.lookup("1001")] == ["sip:live@h"]
    clock.advance(0.2)
    assert ("1001", "sip:old@h") not in store.rows  # cleaned from the store too


def test_sweeper_removes_expired_bindings_and_persists_deletes() -> None:
    store = FakeStore()
    loc, clock, wall = service(store, sweep_interval=5.0)
    loc.start()
    loc.apply("1001", [binding(contact="sip:short@h", expires_in=60),
                       binding(contact="sip:long@h", expires_in=3600)])
    clock.advance(0.2)
    assert len(store.rows) == 2
    wall.t += 61
    clock.advance(5)
    assert loc.binding_count == 1 and loc.expired_total == 1
    clock.advance(0.2)
    assert list(store.rows) == [("1001", "sip:long@h")]
    wall.t += 3600
    clock.advance(5)
    assert (loc.registered_aors, loc.binding_count) == (0, 0)
    loc.stop()
    assert not clock.getDelayedCalls()
