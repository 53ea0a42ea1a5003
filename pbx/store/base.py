"""The storage interface, its records and errors, and the SQL shared by both backends.

Theory of operation: every operation of the store is written once, in
:class:`SQLStore`, as a *generator interaction*: it yields ``(sql, params)`` steps and
receives a :class:`Result` for each, then returns its value. A backend only knows how to
drive such a generator inside one transaction: SQLite drives it synchronously in its
single database thread, PostgreSQL asynchronously on a pooled txpostgres connection.
So the SQL and its logic live in one room (here and in ``schema.py``), the I/O in two
small drivers, and the reactor never waits on the database.

Other packages see only :class:`Store` (a Protocol), :class:`ExtensionRecord`, plain
dict rows for bindings and CDRs, and the :class:`StoreError` family: no driver error
(sqlite3, psycopg2) escapes a backend.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pbx.store.schema import LATEST_VERSION, MIGRATIONS, Dialect

__all__ = [
    "BINDING_COLUMNS",
    "CDR_COLUMNS",
    "CDR_STATES",
    "EXTENSION_FIELDS",
    "ExtensionExists",
    "ExtensionRecord",
    "Result",
    "SQLStore",
    "SchemaOutdated",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "StoreUnavailable",
]

T = TypeVar("T")
P = ParamSpec("P")


# -- errors ----------------------------------------------------------------------------

class StoreError(Exception):
    """Any storage failure; driver errors are wrapped in it so callers need no driver."""


class ExtensionExists(StoreError):
    """An extension with this number is already stored (another node may have added it)."""


class SchemaTooNew(StoreError):
    """The database was migrated by newer code: running would risk corrupting it."""


class SchemaOutdated(StoreError):
    """The database has no schema or an older one; ``pbx db init`` creates/migrates it."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (not open, closed, or reconnecting)."""


# -- records ---------------------------------------------------------------------------

@dataclass(slots=True)
class ExtensionRecord:
    """A SIP account. Only digest HA1 hashes are stored, never the password."""

    number: str
    display_name: str | None
    enabled: bool
    realm: str
    ha1_md5: str | None
    ha1_sha256: str | None
    voicemail_pin: str | None = None  # stored as given; voicemail decides its format
    created_at: float | None = None  # unix seconds; set by the store when None
    updated_at: float | None = None


EXTENSION_COLUMNS: tuple[str, ...] = (
    "number", "display_name", "enabled", "realm", "ha1_md5", "ha1_sha256", "voicemail_pin",
    "created_at", "updated_at",
)
#: what ``update_extension`` may change
EXTENSION_FIELDS: frozenset[str] = frozenset(
    {"display_name", "enabled", "voicemail_pin", "ha1_md5", "ha1_sha256", "realm"})

#: columns of a location binding row, in table order (RFC 3261 §10.3 binding + where from)
BINDING_COLUMNS: tuple[str, ...] = (
    "aor", "contact", "expires_at", "q", "call_id", "cseq", "transport", "source_host",
    "source_port", "user_agent", "instance_id", "reg_id", "node", "updated_at",
)
_BINDING_REQUIRED = frozenset(
    {"aor", "contact", "expires_at", "call_id", "cseq", "transport", "source_host",
     "source_port"})

CDR_COLUMNS: tuple[str, ...] = (
    "id", "call_id", "caller", "callee", "start_time", "answer_time", "end_time",
    "duration", "billsec", "disposition", "hangup_cause", "hangup_side", "qos", "node",
    "state",
)
_CDR_REQUIRED = frozenset({"call_id", "caller", "callee", "start_time", "disposition"})
CDR_STATES = frozenset({"open", "closed", "interrupted"})
_CDR_UPDATABLE = frozenset(CDR_COLUMNS) - {"id", "call_id"}

#: rows per multi-row statement: far below SQLite's 32766 bound parameters
_CHUNK = 200


# -- the interface ---------------------------------------------------------------------

@runtime_checkable
class Store(Protocol):
    """What the PBX needs from storage. Every I/O method returns a Deferred."""

    kind: str  # "sqlite" | "postgresql"

    @property
    def state(self) -> str:
        """``connecting`` | ``connected`` | ``disconnected`` | ``closed`` (for health)."""
        ...

    def open(self) -> Deferred[None]: ...
    def migrate(self) -> Deferred[int]: ...
    def schema_version(self) -> Deferred[int]: ...
    def ping(self) -> Deferred[float]: ...
    def close(self) -> Deferred[None]: ...

    def add_extension(self, ext: ExtensionRecord) -> Deferred[None]: ...
    def update_extension(self, number: str, **fields: Any) -> Deferred[bool]: ...
    def remove_extension(self, number: str) -> Deferred[bool]: ...
    def get_extension(self, number: str) -> Deferred[ExtensionRecord | None]: ...
    def list_extensions(self) -> Deferred[list[ExtensionRecord]]: ...

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]: ...
    def save_bindings(self, upserts: Sequence[Mapping[str, Any]],
                      deletes: Sequence[tuple[str, str]]) -> Deferred[None]: ...
    def delete_bindings_for(self, aor: str) -> Deferred[int]: ...

    def add_cdr(self, record: Mapping[str, Any]) -> Deferred[int]: ...
    def update_cdr(self, call_id: str, fields: Mapping[str, Any]) -> Deferred[int]: ...
    def mark_open_cdrs_interrupted(self, node: str | None) -> Deferred[int]: ...
    def list_cdr(self, *, since: float | None = None, until: float | None = None,
                 extension: str | None = None, limit: int = 100,
                 offset: int = 0) -> Deferred[list[dict[str, Any]]]: ...


# -- the generator-interaction protocol ------------------------------------------------

Step = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Result:
    """What one executed statement gave back."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rowcount: int

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None


Interaction = Generator[Step, Result, T]
InteractionFactory = Callable[..., Interaction[Any]]


def drive_sync(gen: Interaction[T], execute: Callable[[str, tuple[Any, ...]], Result]) -> T:
    """Run an interaction with a blocking ``execute`` (used inside SQLite's thread)."""
    try:
        step = next(gen)
        while True:
            step = gen.send(execute(*step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _fails_as_deferred(method: Callable[P, Deferred[T]]) -> Callable[P, Deferred[T]]:
    """Turn a synchronous exception (bad arguments) into a failed Deferred: callers
    handle one error path, and nothing raises out of an "all I/O returns a Deferred"
    method."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        try:
            return method(*args, **kwargs)
        except Exception:
            return defer.fail()

    return wrapper


# -- value checks and conversions ------------------------------------------------------

def _text(name: str, value: Any, *, nullable: bool = False) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refuse it on both backends
        raise ValueError(f"{name} must not contain NUL characters")
    return value


def _number(name: str, value: Any, *, nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return float(value)


def _integer(name: str, value: Any, *, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
    return value


def _unknown(kind: str, keys: Any, allowed: Any) -> None:
    extra = set(keys) - set(allowed)
    if extra:
        raise ValueError(f"unknown {kind} field(s): {', '.join(sorted(extra))}")


_BINDING_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "aor": _text, "contact": _text, "call_id": _text, "transport": _text,
    "source_host": _text,
    "user_agent": functools.partial(_text, nullable=True),
    "instance_id": functools.partial(_text, nullable=True),
    "node": functools.partial(_text, nullable=True),
    "expires_at": _number, "updated_at": _number,
    "q": functools.partial(_number, nullable=True),
    "cseq": _integer, "source_port": _integer,
    "reg_id": functools.partial(_integer, nullable=True),
}

_CDR_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "call_id": _text, "caller": _text, "callee": _text, "disposition": _text,
    "hangup_cause": functools.partial(_text, nullable=True),
    "hangup_side": functools.partial(_text, nullable=True),
    "node": functools.partial(_text, nullable=True),
    "start_time": _number,
    "answer_time": functools.partial(_number, nullable=True),
    "end_time": functools.partial(_number, nullable=True),
    "duration": _number, "billsec": _number,
}


def _cdr_value(name: str, value: Any) -> Any:
    if name == "qos":
        return _encode_json(value)
    if name == "state":
        if value not in CDR_STATES:
            raise ValueError(f"CDR state must be one of {sorted(CDR_STATES)}, not {value!r}")
        return value
    return _CDR_CHECKS[name](name, value)


def _encode_json(value: Any) -> str | None:
    """QoS is stored as JSON text; a str must already be JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        json.loads(value)  # raises ValueError when it is not JSON
        return value
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _decode_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _extension_from_row(row: Mapping[str, Any]) -> ExtensionRecord:
    return ExtensionRecord(
        number=row["number"], display_name=row["display_name"], enabled=bool(row["enabled"]),
        realm=row["realm"], ha1_md5=row["ha1_md5"], ha1_sha256=row["ha1_sha256"],
        voicemail_pin=row["voicemail_pin"], created_at=row["created_at"],
        updated_at=row["updated_at"])


def _binding_from_row(row: dict[str, Any]) -> dict[str, Any]:
    for name in ("expires_at", "updated_at", "q"):
        if row[name] is not None:
            row[name] = float(row[name])
    return row


def _cdr_from_row(row: dict[str, Any]) -> dict[str, Any]:
    row["qos"] = _decode_json(row["qos"])
    return row


# -- the shared SQL store --------------------------------------------------------------

class SQLStore:
    """All store operations, expressed once as generator interactions.

    Subclasses provide the connection handling: ``_connect`` (idempotent),
    ``_execute`` (drive one interaction, in a transaction when asked), ``_disconnect``
    and the ``state`` property.
    """

    kind: str = ""
    dialect: Dialect
    #: how long close() lets queries already running finish before cutting them off
    close_grace: float = 5.0

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self._inflight: set[Deferred[Any]] = set()
        self._connect_waiters: list[Deferred[None]] | None = None

    # backend hooks --------------------------------------------------------------------

    @property
    def state(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _connect_backend(self) -> Deferred[None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _is_connected(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _execute(self, factory: InteractionFactory, args: tuple[Any, ...],
                 tx: bool) -> Deferred[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _disconnect(self) -> Deferred[None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prepare_migration(self) -> Interaction[None]:
        """Steps run first in the migration transaction (PostgreSQL: create the schema)."""
        yield from ()

    # plumbing -------------------------------------------------------------------------

    def _now(self) -> float:
        return float(IReactorTime(self._reactor).seconds())

    def _connect(self) -> Deferred[None]:
        """Connect once; concurrent callers share the attempt."""
        if self._is_connected():
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._connect_waiters is not None:
            self._connect_waiters.append(waiter)
            return waiter
        self._connect_waiters = [waiter]

        def done(result: Any) -> None:
            waiters, self._connect_waiters = self._connect_waiters or [], None
            for each in waiters:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(None)

        self._connect_backend().addBoth(done)
        return waiter

    def _run(self, factory: InteractionFactory, *args: Any, tx: bool = True) -> Deferred[Any]:
        d = self._execute(factory, args, tx)
        self._inflight.add(d)

        def forget(result: Any) -> Any:
            self._inflight.discard(d)
            return result

        return d.addBoth(forget)

    def _wait_inflight(self) -> Deferred[None]:
        """Fire when queries already running finish, or after ``close_grace``."""
        if not self._inflight:
            return defer.succeed(None)
        done: Deferred[None] = Deferred()
        waiting = defer.DeferredList(list(self._inflight), consumeErrors=False)

        def finished(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self._reactor.callLater(self.close_grace, finished)
        waiting.addBoth(finished)
        return done

    # schema ---------------------------------------------------------------------------

    def _read_version(self) -> Interaction[int]:
        exists = yield (self.dialect.table_exists, ("schema_version",))
        if not exists.rows:
            return 0
        found = yield ("SELECT MAX(version) FROM schema_version", ())
        return int(found.scalar() or 0)

    def _migrate(self, now: float) -> Interaction[int]:
        if self.dialect.migration_lock:
            yield (self.dialect.migration_lock, ())
        yield from self._prepare_migration()
        version = yield from self._read_version()
        _refuse_newer(version)
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            for statement in migration.statements:
                yield (self.dialect.ddl(statement), ())
            yield ("INSERT INTO schema_version (version, description, applied_at) "
                   "VALUES (?, ?, ?)", (migration.version, migration.description, now))
        return LATEST_VERSION

    def schema_version(self) -> Deferred[int]:
        """The database's schema version, 0 when it has no schema (connects if needed)."""
        return self._connect().addCallback(lambda _: self._run(self._read_version, tx=False))

    def open(self) -> Deferred[None]:
        """Connect and verify the schema; never migrates on its own.

        Start-up must not change a shared database behind an operator's back, so a
        missing/older schema errbacks :class:`SchemaOutdated` (run ``pbx db init``) and a
        newer one :class:`SchemaTooNew`. After such an errback the store stays
        connected: call :meth:`migrate` (then ``open()`` again) or :meth:`close`.
        """
        return self.schema_version().addCallback(_check_version)

    def migrate(self) -> Deferred[int]:
        """Create or migrate the schema in one transaction; idempotent; returns the version.

        Connects if needed, so ``migrate()`` then ``open()`` works as well as ``open()``,
        :class:`SchemaOutdated`, ``migrate()``. Refuses (:class:`SchemaTooNew`) a database
        migrated by newer code.
        """
        return self._connect().addCallback(lambda _: self._run(self._migrate, self._now()))

    def ping(self) -> Deferred[float]:
        """Latency in seconds of a real round trip (``SELECT 1``), for health checks."""
        started = time.perf_counter()

        def select_one() -> Interaction[Any]:
            result = yield ("SELECT 1", ())
            return result.scalar()

        def measured(value: Any) -> float:
            if value != 1:
                raise StoreError(f"SELECT 1 returned {value!r}")
            return time.perf_counter() - started

        return self._run(select_one, tx=False).addCallback(measured)

    def close(self) -> Deferred[None]:
        """Let running queries finish (bounded by ``close_grace``), then disconnect.

        Safe in any state, also after a failed open().
        """
        return self._wait_inflight().addCallback(lambda _: self._disconnect())

    # extensions -----------------------------------------------------------------------

    @_fails_as_deferred
    def add_extension(self, ext: ExtensionRecord) -> Deferred[None]:
        """Insert; errbacks :class:`ExtensionExists` when the number is taken."""
        now = self._now()
        row = (
            _text("number", ext.number), _text("display_name", ext.display_name, nullable=True),
            bool(ext.enabled), _text("realm", ext.realm),
            _text("ha1_md5", ext.ha1_md5, nullable=True),
            _text("ha1_sha256", ext.ha1_sha256, nullable=True),
            _text("voicemail_pin", ext.voicemail_pin, nullable=True),
            now if ext.created_at is None else _number("created_at", ext.created_at),
            now if ext.updated_at is None else _number("updated_at", ext.updated_at),
        )
        if not ext.number:
            raise ValueError("extension number must not be empty")
        sql = (f"INSERT INTO extensions ({', '.join(EXTENSION_COLUMNS)}) "
               f"VALUES ({_marks(len(row))}) ON CONFLICT (number) DO NOTHING")

        def insert() -> Interaction[None]:
            # DO NOTHING + rowcount instead of catching a unique violation: the same on
            # both backends and PostgreSQL's transaction is not left aborted.
            result = yield (sql, row)
            if result.rowcount == 0:
                raise ExtensionExists(f"extension {ext.number} already exists")

        return self._run(insert)

    @_fails_as_deferred
    def update_extension(self, number: str, **fields: Any) -> Deferred[bool]:
        """Change some fields; False when the extension does not exist."""
        _unknown("extension", fields, EXTENSION_FIELDS)
        values: list[Any] = []
        for name in sorted(fields):
            value = fields[name]
            if name == "enabled":
                values.append(bool(value))
            else:
                values.append(_text(name, value, nullable=name != "realm"))
        names = [*sorted(fields), "updated_at"]
        sql = (f"UPDATE extensions SET {', '.join(f'{n} = ?' for n in names)} "
               "WHERE number = ?")
        params = (*values, self._now(), number)

        def update() -> Interaction[bool]:
            result = yield (sql, params)
            return result.rowcount > 0

        return self._run(update)

    @_fails_as_deferred
    def remove_extension(self, number: str) -> Deferred[bool]:
        """Delete the extension and its location bindings; False when it did not exist.

        Bindings match when their AOR is the bare number or ``sip:``/``sips:`` +
        ``number@...`` (prefix compared with substr, not LIKE: LIKE's case rules differ
        between the two databases).
        """
        sip, sips = f"sip:{number}@", f"sips:{number}@"

        def remove() -> Interaction[bool]:
            yield ("DELETE FROM registrations WHERE aor = ? OR substr(aor, 1, ?) = ? "
                   "OR substr(aor, 1, ?) = ?", (number, len(sip), sip, len(sips), sips))
            result = yield ("DELETE FROM extensions WHERE number = ?", (number,))
            return result.rowcount > 0

        return self._run(remove)

    def get_extension(self, number: str) -> Deferred[ExtensionRecord | None]:
        sql = f"SELECT {', '.join(EXTENSION_COLUMNS)} FROM extensions WHERE number = ?"

        def get() -> Interaction[ExtensionRecord | None]:
            result = yield (sql, (number,))
            rows = result.dicts()
            return _extension_from_row(rows[0]) if rows else None

        return self._run(get, tx=False)

    def list_extensions(self) -> Deferred[list[ExtensionRecord]]:
        """All extensions ordered by number (code point order on both backends)."""
        sql = (f"SELECT {', '.join(EXTENSION_COLUMNS)} FROM extensions "
               f"ORDER BY number{self.dialect.collate_binary}")

        def list_all() -> Interaction[list[ExtensionRecord]]:
            result = yield (sql, ())
            return [_extension_from_row(row) for row in result.dicts()]

        return self._run(list_all, tx=False)

    # location bindings ----------------------------------------------------------------

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]:
        """Every stored binding (expired ones too: the registrar decides), as dicts."""
        c = self.dialect.collate_binary
        sql = (f"SELECT {', '.join(BINDING_COLUMNS)} FROM registrations "
               f"ORDER BY aor{c}, contact{c}")

        def load() -> Interaction[list[dict[str, Any]]]:
            result = yield (sql, ())
            return [_binding_from_row(row) for row in result.dicts()]

        return self._run(load, tx=False)

    @_fails_as_deferred
    def save_bindings(self, upserts: Sequence[Mapping[str, Any]],
                      deletes: Sequence[tuple[str, str]]) -> Deferred[None]:
        """Apply a batch of binding changes in ONE transaction.

        Deletes run first, then upserts: a key in both lists ends up stored, because
        losing a live binding is worse than keeping one that expires anyway. Within
        ``upserts`` the last row for a key wins. ``updated_at`` defaults to now.
        """
        now = self._now()
        rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        for binding in upserts:
            _unknown("binding", binding, BINDING_COLUMNS)
            missing = _BINDING_REQUIRED - set(binding)
            if missing:
                raise ValueError(f"binding lacks {', '.join(sorted(missing))}")
            row = tuple(
                now if name == "updated_at" and binding.get(name) is None
                else _BINDING_CHECKS[name](name, binding.get(name))
                for name in BINDING_COLUMNS)
            rows[(row[0], row[1])] = row
        keys = list(dict.fromkeys((_text("aor", a), _text("contact", c)) for a, c in deletes))
        if not rows and not keys:
            return defer.succeed(None)
        values = list(rows.values())
        update = ", ".join(f"{n} = excluded.{n}" for n in BINDING_COLUMNS[2:])
        row_marks = f"({_marks(len(BINDING_COLUMNS))})"

        def save() -> Interaction[None]:
            for chunk in _chunks(keys):
                yield ("DELETE FROM registrations WHERE (aor, contact) IN "
                       f"(VALUES {', '.join('(?, ?)' for _ in chunk)})",
                       tuple(v for key in chunk for v in key))
            for chunk in _chunks(values):
                yield (f"INSERT INTO registrations ({', '.join(BINDING_COLUMNS)}) VALUES "
                       f"{', '.join(row_marks for _ in chunk)} "
                       f"ON CONFLICT (aor, contact) DO UPDATE SET {update}",
                       tuple(v for row in chunk for v in row))

        return self._run(save)

    def delete_bindings_for(self, aor: str) -> Deferred[int]:
        """Remove every binding of one AOR; returns how many were removed."""

        def delete() -> Interaction[int]:
            result = yield ("DELETE FROM registrations WHERE aor = ?", (aor,))
            return result.rowcount

        return self._run(delete)

    # call detail records --------------------------------------------------------------

    @_fails_as_deferred
    def add_cdr(self, record: Mapping[str, Any]) -> Deferred[int]:
        """Insert a CDR; returns its id. ``state`` defaults to ``closed``; a call still up
        is written ``open`` at answer and finished with :meth:`update_cdr`."""
        _unknown("CDR", record, _CDR_UPDATABLE | {"call_id"})
        missing = _CDR_REQUIRED - set(record)
        if missing:
            raise ValueError(f"CDR lacks {', '.join(sorted(missing))}")
        names = sorted(record)
        params = tuple(_cdr_value(name, record[name]) for name in names)
        sql = (f"INSERT INTO cdr ({', '.join(names)}) VALUES ({_marks(len(names))}) "
               "RETURNING id")

        def insert() -> Interaction[int]:
            result = yield (sql, params)
            return int(result.scalar())

        return self._run(insert)

    @_fails_as_deferred
    def update_cdr(self, call_id: str, fields: Mapping[str, Any]) -> Deferred[int]:
        """Change the CDR(s) of a call (e.g. at hangup); returns how many rows changed."""
        if not fields:
            raise ValueError("update_cdr needs at least one field")
        _unknown("CDR", fields, _CDR_UPDATABLE)
        names = sorted(fields)
        params = (*(_cdr_value(name, fields[name]) for name in names), call_id)
        sql = f"UPDATE cdr SET {', '.join(f'{n} = ?' for n in names)} WHERE call_id = ?"

        def update() -> Interaction[int]:
            result = yield (sql, params)
            return result.rowcount

        return self._run(update)

    def mark_open_cdrs_interrupted(self, node: str | None) -> Deferred[int]:
        """At start-up: calls this node left ``open`` (it crashed mid-call) become
        ``interrupted``. Only this node's rows: other nodes' calls may still be up."""
        where = "node IS NULL" if node is None else "node = ?"
        params: tuple[Any, ...] = () if node is None else (node,)

        def mark() -> Interaction[int]:
            result = yield (f"UPDATE cdr SET state = 'interrupted' "
                            f"WHERE state = 'open' AND {where}", params)
            return result.rowcount

        return self._run(mark)

    @_fails_as_deferred
    def list_cdr(self, *, since: float | None = None, until: float | None = None,
                 extension: str | None = None, limit: int = 100,
                 offset: int = 0) -> Deferred[list[dict[str, Any]]]:
        """CDRs newest first. ``since`` <= start_time < ``until``; ``extension`` matches
        caller or callee; paging by ``limit``/``offset``."""
        _count("limit", limit)
        _count("offset", offset)
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("start_time >= ?")
            params.append(_number("since", since))
        if until is not None:
            clauses.append("start_time < ?")
            params.append(_number("until", until))
        if extension is not None:
            clauses.append("(caller = ? OR callee = ?)")
            params += [extension, extension]
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = (f"SELECT {', '.join(CDR_COLUMNS)} FROM cdr {where}"
               "ORDER BY start_time DESC, id DESC LIMIT ? OFFSET ?")
        args = (*params, limit, offset)

        def select() -> Interaction[list[dict[str, Any]]]:
            result = yield (sql, args)
            return [_cdr_from_row(row) for row in result.dicts()]

        return self._run(select, tx=False)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _refuse_newer(version: int) -> None:
    if version > LATEST_VERSION:
        raise SchemaTooNew(
            f"database schema version {version} is newer than this PBX supports "
            f"({LATEST_VERSION}): upgrade the PBX, or point it at another database")


def _check_version(version: int) -> None:
    _refuse_newer(version)
    if version == 0:
        raise SchemaOutdated(
            f"the database has no PBX schema (this PBX needs version {LATEST_VERSION}): "
            "run `pbx db init`")
    if version < LATEST_VERSION:
        raise SchemaOutdated(
            f"database schema version {version} is older than this PBX needs "
            f"({LATEST_VERSION}): run `pbx db init` to migrate it")
