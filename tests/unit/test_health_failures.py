"""Health that can fail: each readiness reason is produced by breaking the real component.

The SIP check runs against a real :class:`SIPTransport` bound on loopback (real reactor,
pytest-twisted); the database check against a real SQLite file held under an exclusive
lock by a second connection, which works as root (chmod does not stop root's writes) and
is a real production failure mode (a backup or a stray ``sqlite3`` shell holding the
lock). ``SELECT 1`` passes under that lock; the heartbeat write does not.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor

from pbx.ops.health import (
    DatabaseProbe,
    DatabaseResult,
    HealthMonitor,
    Heartbeat,
    SystemResources,
    public_reason,
)
from pbx.ops.sources import ServiceView
from pbx.sip.transport import SIPTransport
from pbx.store.sqlite import SQLiteStore


class _ConnectedStore:
    kind = "sqlite"
    state = "connected"

    def ping(self) -> defer.Deferred[float]:
        return defer.succeed(0.001)


def _monitor(transport: Any, store: Any, tmp_path: Path) -> HealthMonitor:
    """A HealthMonitor over the real ServiceView of a minimal service (no SIP stack)."""
    service = SimpleNamespace(
        settings=None, lifecycle=SimpleNamespace(state="ready", entered_at=0.0),
        store=store, transport=transport, transactions=None, registrar=None, guard=None,
        location=None, node="pbx-node-7.internal.example")
    return HealthMonitor(ServiceView(service), reactor,
                         heartbeat=Heartbeat(reactor),
                         database=DatabaseProbe(store, reactor, timeout=2.0, cache_for=0.0),
                         resources=SystemResources(tmp_path), started_at=0.0)


def _turn() -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.05, d.callback, None)
    return d


@pytest_twisted.inlineCallbacks
def test_sip_check_fails_once_the_real_sockets_are_closed(tmp_path: Path) -> Any:
    transport = SIPTransport(reactor)
    monitor = _monitor(transport, _ConnectedStore(), tmp_path)
    (_, _, port), _ = transport.listen("127.0.0.1", 0)
    try:
        ready = monitor.readiness()
        assert ready.ok, ready.reasons
        assert any(f"udp 127.0.0.1:{port}" in r for r in ready.reasons), ready.reasons
        transport.stop_listening()
        yield _turn()
        ready = monitor.readiness()
        assert not ready.ok and "no SIP socket bound" in ready.reasons
        report = yield monitor.detailed()
        assert report["readiness"]["checks"]["sip_server"]["status"] == "unhealthy"
        assert report["readiness"]["checks"]["sip_server"]["sockets"] == []
    finally:
        transport.stop_listening()


@pytest_twisted.inlineCallbacks
def test_a_port_closed_behind_the_transport_drops_out_of_sockets_up() -> Any:
    """Readiness asks the port objects, not the list of what was once bound."""
    transport = SIPTransport(reactor)
    udp, tcp = transport.listen("127.0.0.1", 0)
    try:
        assert transport.sockets_up() == [udp, tcp]
        transport._bound[1][1].stopListening()  # the TCP port closes by another path
        yield _turn()
        assert transport.sockets_up() == [udp]
        assert transport.listening == [udp, tcp]  # still what was bound
    finally:
        transport.stop_listening()
    assert transport.listening == [] and transport.sockets_up() == []


def _until(predicate: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    @defer.inlineCallbacks
    def poll() -> Any:
        deadline = reactor.seconds() + timeout
        while not predicate():
            assert reactor.seconds() < deadline, "condition not reached in time"
            yield _turn()

    return poll()


@pytest_twisted.inlineCallbacks
def test_sqlite_check_fails_while_the_database_is_locked_and_recovers(tmp_path: Path) -> Any:
    path = tmp_path / "pbx.db"
    store = SQLiteStore(path, reactor=reactor, heartbeat_timeout=0.3)
    yield store.migrate()
    yield store.open()
    monitor = _monitor(SimpleNamespace(sockets_up=lambda: [("udp", "127.0.0.1", 5060)]),
                       store, tmp_path)
    monitor.database.failure_memory = 0.5
    locker = sqlite3.connect(str(path), isolation_level=None)
    try:
        latency = yield store.ping()
        assert latency >= 0
        assert locker.execute("SELECT count(*) FROM health_heartbeat").fetchone() == (1,)

        locker.execute("BEGIN EXCLUSIVE")  # what a stray writer holding the lock does
        result: DatabaseResult = yield monitor.database.check()
        assert not result.ok and result.reason == "database locked"
        assert "locked" in (result.error or "")  # the driver's own words, token only
        ready = monitor.readiness()
        assert not ready.ok
        assert "database ping failed: database locked" in ready.reasons

        public = yield monitor.detailed()
        db = public["readiness"]["checks"]["database"]
        assert db["status"] == "unhealthy" and db["error"] == "database locked"
        assert "node" not in public["readiness"]["checks"]["pbx_core"]
        full = yield monitor.detailed(full=True)
        assert full["readiness"]["checks"]["pbx_core"]["node"] == "pbx-node-7.internal.example"
        assert full["readiness"]["checks"]["database"]["error"].startswith("SQLite:")

        locker.execute("ROLLBACK")
        yield _until(lambda: monitor.readiness().ok)
    finally:
        locker.close()
        yield store.close()


def test_public_reasons_say_what_is_wrong_without_driver_text() -> None:
    assert public_reason("SQLite: database is locked") == "database locked"
    assert public_reason("SQLite: attempt to write a readonly database") == "database read-only"
    assert public_reason("SQLite: database or disk is full") == "disk or database full"
    assert public_reason('could not connect to server: Connection refused\n\tIs the server '
                         'running on host "db-7.internal" (10.1.2.3)') == "database unreachable"
    assert public_reason("something odd at db-7.internal") == "database error"
