"""SQLite backend: the embedded default, one database thread, the reactor never waits.

All statements run in the single thread of an ``adbapi.ConnectionPool`` (cp_min =
cp_max = 1): SQLite allows one writer at a time anyway, and one thread means one
connection, so transactions never contend inside the process. WAL journal mode lets
readers (``sqlite3`` CLI, backups) work while the PBX writes; ``synchronous=NORMAL`` is
durable across process crashes in WAL mode (only an OS crash can lose the last commits),
which suits location bindings and CDRs; ``busy_timeout`` waits for another process's
write lock instead of failing at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from pbx.store.base import (
    InteractionFactory,
    Result,
    SQLStore,
    StoreError,
    StoreUnavailable,
    drive_sync,
)
from pbx.store.schema import SQLITE

__all__ = ["SQLiteStore", "sqlite_path_from_url"]

log = logging.getLogger(__name__)

#: ON CONFLICT ... DO UPDATE needs 3.24, RETURNING needs 3.35
MIN_SQLITE = (3, 35, 0)


def sqlite_path_from_url(url: str) -> str:
    """``sqlite:///rel/path`` -> ``rel/path``; ``sqlite:////abs`` -> ``/abs``."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"expected sqlite:///path, got {url!r}")
    return url[len(prefix):].split("?", 1)[0]


class SQLiteStore(SQLStore):
    """:class:`pbx.store.Store` on a SQLite file (``:memory:`` works for one process)."""

    kind = "sqlite"
    dialect = SQLITE

    def __init__(self, path: str | Path, *, reactor: Any = None,
                 busy_timeout: float = 5.0, heartbeat_timeout: float = 1.0) -> None:
        super().__init__(reactor)
        self.path = str(path)
        self.busy_timeout = busy_timeout
        #: how long the health heartbeat waits for the write lock; kept below the health
        #: probe's own timeout so a locked database answers "locked", not "no answer", and
        #: the single database thread is not held for a whole ``busy_timeout``
        self.heartbeat_timeout = heartbeat_timeout
        self._heartbeat_key = f"{socket.gethostname()}:{os.getpid()}"
        self._pool: adbapi.ConnectionPool | None = None
        self._state = "closed"

    @property
    def state(self) -> str:
        return self._state

    def _is_connected(self) -> bool:
        return self._pool is not None and self._state == "connected"

    def _configure(self, conn: sqlite3.Connection) -> None:
        """Run by adbapi in the database thread on each new connection."""
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _connect_backend(self) -> Deferred[None]:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            return defer.fail(StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: the PBX needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or later"))
        self._state = "connecting"
        memory = self.path == ":memory:" or self.path.startswith("file::memory:")
        parent = None if memory else Path(self.path).parent
        mkdir = (threads.deferToThread(parent.mkdir, parents=True, exist_ok=True)
                 if parent is not None else defer.succeed(None))

        def start(_: Any) -> Deferred[None]:
            # isolation_level=None: the driver issues BEGIN/COMMIT itself, so a migration's
            # DDL is transactional too (the sqlite3 module would otherwise commit before it).
            pool = adbapi.ConnectionPool(
                "sqlite3", self.path, check_same_thread=False, isolation_level=None,
                timeout=self.busy_timeout, cp_min=1, cp_max=1, cp_noisy=False,
                cp_openfun=self._configure, cp_reactor=self._reactor)
            self._pool = pool
            # Open the connection now, so a bad path fails open() rather than a later query.
            return pool.runWithConnection(lambda conn: None)

        def connected(_: Any) -> None:
            self._state = "connected"

        def failed(reason: Any) -> Any:
            self._state = "closed"
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()
            raise StoreUnavailable(
                f"cannot open SQLite database {self.path}: {reason.getErrorMessage()}")

        return mkdir.addCallback(start).addCallbacks(connected, failed)

    def _execute(self, factory: InteractionFactory, args: tuple[Any, ...],
                 tx: bool) -> Deferred[Any]:
        if self._pool is None or self._state != "connected":
            return defer.fail(StoreUnavailable(f"SQLite store is {self._state}"))
        d = self._pool.runWithConnection(_run_in_thread, factory, args, tx)
        return d.addErrback(_wrap_driver_error)

    def ping(self) -> Deferred[float]:
        """Latency of a heartbeat *write*: an UPSERT of this process's row in
        ``health_heartbeat``, committed, with the write lock waited for at most
        ``heartbeat_timeout`` seconds.

        ``SELECT 1`` never touches the file, so a read-only, full or locked database
        would stay "ready"; a committed write fails in each of those cases. The table is
        created here (``IF NOT EXISTS``), not by a migration: it is health bookkeeping of
        the SQLite backend only, not part of the versioned schema both backends share.
        """
        if self._pool is None or self._state != "connected":
            return defer.fail(StoreUnavailable(f"SQLite store is {self._state}"))
        started = time.perf_counter()
        d = self._pool.runWithConnection(_heartbeat, self._heartbeat_key,
                                         self.heartbeat_timeout, self.busy_timeout)
        return d.addCallback(lambda _: time.perf_counter() - started).addErrback(
            _wrap_driver_error)

    def _disconnect(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        self._state = "closed"
        if pool is None:
            return defer.succeed(None)
        # Close the connection in its own thread (a WAL checkpoint may touch the disk),
        # then stop the now idle thread: the join in close() returns at once.
        d = threads.deferToThreadPool(self._reactor, pool.threadpool, _close_connection, pool)
        d.addErrback(lambda f: log.warning("closing SQLite database: %s", f.getErrorMessage()))
        d.addBoth(lambda _: pool.close())
        return d


def _run_in_thread(conn: Any, factory: InteractionFactory, args: tuple[Any, ...],
                   tx: bool) -> Any:
    """Drive one interaction on the database thread, in a transaction when ``tx``."""
    cursor = conn.cursor()

    def execute(sql: str, params: tuple[Any, ...]) -> Result:
        cursor.execute(sql, params)
        columns = tuple(c[0] for c in cursor.description) if cursor.description else ()
        rows = cursor.fetchall() if columns else []
        return Result(columns, rows, cursor.rowcount)

    try:
        if tx:
            cursor.execute(SQLITE.begin)
        result = drive_sync(factory(*args), execute)
        if tx:
            cursor.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    finally:
        cursor.close()


HEARTBEAT_TABLE = """CREATE TABLE IF NOT EXISTS health_heartbeat (
    node TEXT PRIMARY KEY,
    beat_at REAL NOT NULL
)"""


def _heartbeat(conn: Any, key: str, timeout: float, busy_timeout: float) -> None:
    """On the database thread: one committed UPSERT under a short lock wait, then the
    connection's normal ``busy_timeout`` again (other statements keep waiting longer)."""
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(HEARTBEAT_TABLE)
            now = time.time()
            conn.execute("INSERT INTO health_heartbeat (node, beat_at) VALUES (?, ?) "
                         "ON CONFLICT (node) DO UPDATE SET beat_at = excluded.beat_at",
                         (key, now))
            # One row per process (host:pid): forget processes silent for a day, so
            # restarts do not grow the table.
            conn.execute("DELETE FROM health_heartbeat WHERE beat_at < ?", (now - 86400,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")


def _close_connection(pool: adbapi.ConnectionPool) -> None:
    pool.disconnect(pool.connect())


def _wrap_driver_error(reason: Any) -> Any:
    # OverflowError: an int beyond SQLite's 64 bits, refused by the sqlite3 module.
    if reason.check(sqlite3.Error, OverflowError):
        raise StoreError(f"SQLite: {reason.getErrorMessage()}") from reason.value
    return reason
