"""PostgreSQL pool correctness (issue 12 item 3), against the shared test server.

With ``pool_max=1`` any leak is visible at once: a connection taken by a timed-out
ping, or handed back mid-query by a cancelled one, leaves the pool unable to serve the
next query. Each test works in its own schema with its own ``application_name``, so
``pg_terminate_backend`` only ever hits this test's own backends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from pbx.store import StoreUnavailable
from pbx.store.postgres import PostgresStore

from .store_fixtures import Backend, pg_admin, postgres_backend, sleep, wait_until

_fixtures = (postgres_backend,)  # imported for pytest, not a conftest


async def _store(db: Backend, **kw: Any) -> PostgresStore:
    store = db.make(**kw)
    assert isinstance(store, PostgresStore)
    await store.migrate()
    await store.open()
    return store


def _slow(seconds: float) -> Any:
    """An interaction factory: ``SELECT pg_sleep(seconds)`` (a read: no transaction)."""
    def interaction() -> Any:
        yield (f"SELECT pg_sleep({seconds:g})", ())
        return seconds
    return interaction


def _backends(app: str) -> list[tuple[int, str, str]]:
    """(pid, state, query) of this test's PBX backends, from an admin connection."""
    return [(int(pid), str(state), str(query)) for pid, state, query in pg_admin(
        "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
        (app,))]


@pytest_twisted.ensureDeferred
async def test_timed_out_ping_does_not_leak_the_only_connection(postgres_backend: Backend):
    store = await _store(postgres_backend, pool_min=1, pool_max=1)
    slow = store._run(_slow(1.5), tx=False)
    await sleep(0.1)
    ping = store.ping()
    ping.addTimeout(0.2, reactor)
    with pytest.raises(defer.TimeoutError):
        await ping
    assert store.pool_stats()["waiting"] == 0  # the cancelled acquire left the queue
    assert await slow == 1.5
    stats = store.pool_stats()
    assert (stats["size"], stats["idle"], stats["busy"]) == (1, 1, 0)
    assert store.state == "connected"
    latency = await defer.Deferred.fromCoroutine(_ping_within(store, 2.0))
    assert latency < 2.0


async def _ping_within(store: PostgresStore, timeout: float) -> float:
    ping = store.ping()
    ping.addTimeout(timeout, reactor)
    return float(await ping)


@pytest_twisted.ensureDeferred
async def test_cancelled_query_connection_is_discarded_not_reused_mid_query(
        postgres_backend: Backend):
    app = postgres_backend.options["application_name"]
    store = await _store(postgres_backend, pool_min=1, pool_max=1)
    slow = store._run(_slow(5), tx=False)
    await wait_until(lambda: any("pg_sleep" in q and s == "active"
                                 for _, s, q in _backends(app)), 3, "slow query running")
    old_pids = {pid for pid, _, _ in _backends(app)}
    slow.addTimeout(0.1, reactor)
    with pytest.raises(defer.TimeoutError):
        await slow
    # the next query runs at once on a new connection, not after (or into) the slow one
    started = reactor.seconds()
    assert await _ping_within(store, 3.0) < 3.0
    assert reactor.seconds() - started < 3.0
    new_pids = {pid for pid, s, q in _backends(app) if "pg_sleep" not in q}
    assert new_pids and not new_pids & old_pids
    assert store.pool_stats()["discarded"] == 1
    assert store.pool_stats()["size"] == 1


@pytest_twisted.ensureDeferred
async def test_terminated_backends_are_replaced_and_the_store_serves_again(
        postgres_backend: Backend):
    app = postgres_backend.options["application_name"]
    store = await _store(postgres_backend, pool_min=1, pool_max=1, reconnect_initial=0.05)
    await store.ping()
    pids = [pid for pid, _, _ in _backends(app)]
    assert pids
    for pid in pids:  # only this test's own backends, by pid and application_name
        pg_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE pid = %s AND application_name = %s", (pid, app))

    async def served() -> bool:
        try:
            await _ping_within(store, 1.0)
        except (StoreUnavailable, defer.TimeoutError):
            return False
        return True

    deadline = reactor.seconds() + 10
    while not await served():
        assert reactor.seconds() < deadline, "store did not reconnect within 10 s"
        await sleep(0.05)
    assert store.state == "connected"
    assert not {pid for pid, _, _ in _backends(app)} & set(pids)


@pytest_twisted.ensureDeferred
async def test_health_says_exhausted_when_queries_queue_on_a_busy_pool(
        postgres_backend: Backend):
    store = await _store(postgres_backend, pool_min=1, pool_max=1, queue_limit=1)
    slow = store._run(_slow(1), tx=False)
    queued = [store.ping(), store.ping()]
    assert store.state == "exhausted"
    assert store.pool_stats()["waiting"] == 2
    await slow
    await defer.gatherResults(queued)
    assert store.state == "connected"


@pytest_twisted.ensureDeferred
async def test_busy_forever_slot_is_reported_then_discarded(postgres_backend: Backend):
    store = await _store(postgres_backend, pool_min=1, pool_max=1, stuck_after=0.2,
                         discard_after=0.8)
    slow = store._run(_slow(10), tx=False)
    await wait_until(lambda: store.state == "degraded", 2, "stuck slot reported")
    assert store.pool_stats()["stuck"] == 1
    with pytest.raises(StoreUnavailable):
        await slow  # discarded after discard_after, long before pg_sleep(10) ends
    assert await _ping_within(store, 3.0) < 3.0
    assert store.state == "connected"
    assert store.pool_stats()["discarded"] == 1


# -- a server of the test's own, to restart ---------------------------------------------

def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _as_server_user(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as ``postgres`` then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Server:
    """A throwaway PostgreSQL cluster under a temporary directory, on its own port."""

    bin: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(_as_server_user([str(self.bin / "pg_ctl"), "-D", str(self.data),
                                        "-s", *args]),
                       check=True, timeout=60, capture_output=True)

    def start(self) -> None:
        self.ctl("-w", "-l", str(self.data / "server.log"), "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self.ctl("-w", "-m", mode, "stop")


@pytest.fixture
def own_server() -> Iterator[_Server]:
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("no initdb under /usr/lib/postgresql/*/bin")
    root = Path(tempfile.mkdtemp(prefix="pbx_pg_"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    subprocess.run(_as_server_user([str(pg_bin / "initdb"), "-D", str(data), "-A", "trust",
                                    "-U", "postgres", "--no-sync"]),
                   check=True, timeout=120, capture_output=True)
    server = _Server(pg_bin, data, _free_port())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_store_survives_a_restart_of_its_own_server(own_server: _Server):
    store = PostgresStore(own_server.url, pool_min=1, pool_max=1, reactor=reactor,
                          connect_timeout=2, reconnect_initial=0.05, reconnect_max=0.3)
    try:
        await store.migrate()
        await store.open()
        await _ping_within(store, 2.0)
        await threads.deferToThread(own_server.stop, "fast")
        await wait_until(lambda: store.state == "disconnected", 5, "loss noticed")
        with pytest.raises(StoreUnavailable):
            await _ping_within(store, 2.0)  # fails at once, does not queue
        await threads.deferToThread(own_server.start)

        async def served() -> bool:
            try:
                await _ping_within(store, 1.0)
            except (StoreUnavailable, defer.TimeoutError):
                return False
            return True

        deadline = reactor.seconds() + 15
        while not await served():
            assert reactor.seconds() < deadline, "no reconnect within 15 s of the restart"
            await sleep(0.05)
        assert store.state == "connected"
        assert store.pool_stats()["size"] == 1
    finally:
        await store.close()
