"""Backends for the store tests: SQLite in tmp_path and the real PostgreSQL.

Each PostgreSQL test works in its own ``pbx_test_<hex>`` schema (through the store's
``schema`` option, i.e. ``search_path``) and drops it afterwards; ``public`` is never
touched. The DSN comes from ``PBX_TEST_POSTGRES_DSN``. An unreachable PostgreSQL skips
the PostgreSQL cases locally and fails them under ``CI=true``.

Import explicitly (``from .store_fixtures import backend``); this is not a conftest.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred

from pbx.store import Store, open_store

__all__ = [
    "PG_DSN",
    "Backend",
    "backend",
    "pg_admin",
    "postgres_backend",
    "require_postgres",
    "sleep",
    "wait_until",
]

PG_DSN = os.environ.get("PBX_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_postgres() -> None:
    """Skip (locally) or fail (CI) when the test PostgreSQL cannot be reached."""
    try:
        psycopg2.connect(PG_DSN, connect_timeout=3).close()
    except psycopg2.Error as err:
        message = (f"PostgreSQL at PBX_TEST_POSTGRES_DSN={PG_DSN} is unreachable "
                   f"({str(err).strip()}); start it or set the variable")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def pg_admin(sql: str, params: tuple[Any, ...] = (), *,
             schema: str | None = None) -> list[tuple[Any, ...]]:
    """Run one statement as the test superuser on a fresh autocommit connection."""
    kwargs = {"options": f"-csearch_path={schema}"} if schema else {}
    conn = psycopg2.connect(PG_DSN, **kwargs)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@dataclass
class Backend:
    """One database for one test: makes stores on it and runs raw SQL beside them."""

    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    schema: str | None = None
    sqlite_path: Path | None = None
    stores: list[Store] = field(default_factory=list)

    def make(self, **kw: Any) -> Store:
        """A new (unopened) store on this database; closed at teardown if still open."""
        store = open_store(self.url, reactor=reactor, **{**self.options, **kw})
        self.stores.append(store)
        return store

    def raw(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Blocking raw SQL (``?`` placeholders) outside the store: call via ``run_raw``."""
        if self.kind == "sqlite":
            assert self.sqlite_path is not None
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=10)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        return pg_admin(sql.replace("?", "%s"), params, schema=self.schema)

    def run_raw(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[list[Any]]:
        """``raw`` in a thread, so a test never blocks the reactor its stores run on."""
        return threads.deferToThread(self.raw, sql, params)

    def close_all(self) -> None:
        for store in self.stores:
            if store.state != "closed":
                pytest_twisted.blockon(store.close())


def _sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "var" / "nested" / "pbx.sqlite3"  # parents do not exist yet
    return Backend("sqlite", f"sqlite:///{path.as_posix()}", sqlite_path=path)


@pytest.fixture
def postgres_backend() -> Iterator[Backend]:
    """A PostgreSQL backend in a fresh schema, dropped afterwards."""
    require_postgres()
    schema = f"pbx_test_{secrets.token_hex(6)}"
    pg_admin(f"CREATE SCHEMA {schema}")
    app = f"pbx_test_{secrets.token_hex(4)}"
    db = Backend("postgresql", PG_DSN, options={"schema": schema, "application_name": app},
                 schema=schema)
    try:
        yield db
    finally:
        db.close_all()
        pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The same test against SQLite (tmp_path) and PostgreSQL (own schema)."""
    if request.param == "sqlite":
        db = _sqlite_backend(tmp_path)
        try:
            yield db
        finally:
            db.close_all()
    else:
        yield request.getfixturevalue("postgres_backend")


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(condition: Callable[[], bool], timeout: float,
                     what: str = "condition") -> float:
    """Poll ``condition`` on the running reactor; returns how long it took."""
    started = reactor.seconds()
    while not condition():
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await sleep(0.02)
    return float(reactor.seconds() - started)
