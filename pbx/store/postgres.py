"""PostgreSQL backend on txpostgres: non-blocking psycopg2 connections, a small pool that
survives the server going away, and exponential-backoff reconnection.

Why not ``txpostgres.ConnectionPool``: it hands out an arbitrary connection even when
that one is dead, cannot replace a lost connection, and has a fixed size. Several PBX
nodes share one PostgreSQL (DESIGN.md, scale-out), so a database restart or failover
must cost a few failed queries, not a PBX restart. This module therefore keeps its own
pool of ``txpostgres.Connection`` objects:

* **Size.** ``pool_min`` connections (at least 1) are opened by ``open()``; when every
  connection is busy and a query waits, one more is opened, up to ``pool_max``.
  Connections are kept once opened (a PBX's load is steady; reconnecting costs more
  than an idle backend).
* **Loss.** A connection is known lost when the server closes it while idle (the
  socket is always watched, as txpostgres does for NOTIFY) or when a query fails and
  psycopg2 reports it closed. The query then errbacks :class:`StoreUnavailable`, or is
  retried once on another connection when nothing of it can have run (failure on
  ``BEGIN`` or on a read outside a transaction).
* **Reconnect.** Each lost connection is reopened at once, then after 0.5 s, 1 s, 2 s,
  ... capped at 30 s (±10 % jitter so nodes do not reconnect in lockstep), forever,
  until ``close()``.
* **State.** ``connected`` while one connection works; ``disconnected`` when none does:
  queries then errback :class:`StoreUnavailable` at once instead of queueing. A query
  waiting for a busy pool gives up after ``acquire_timeout``; a connection attempt after
  ``connect_timeout`` (libpq's own timeout does not apply to async connections).
  ``exhausted`` when every slot is busy, the pool cannot grow and more than
  ``queue_limit`` queries wait; ``degraded`` when a slot has been busy longer than
  ``stuck_after`` (a query or a server that hangs). Either way the pool cannot do what
  ``connected`` promises, so health checks must not say it can. :meth:`PostgresStore.
  pool_stats` gives the numbers behind the state.
* **Cancellation.** A query whose Deferred is cancelled (e.g. a health ping under
  ``addTimeout``) while it waits for a connection leaves the wait queue, so it cannot
  later take a connection nobody releases. Cancelled while running, its connection is
  discarded (closed; psycopg2 would otherwise be mid-protocol) and the slot reconnects
  at once: a connection is never handed out again with a query of unknown state on it.
  A slot busy longer than ``discard_after`` is discarded the same way and its query
  errbacks :class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from txpostgres import txpostgres

from pbx.store.base import (
    Interaction,
    InteractionFactory,
    Result,
    SQLStore,
    StoreError,
    StoreUnavailable,
)
from pbx.store.schema import POSTGRESQL, check_schema_name

__all__ = ["PostgresStore", "backoff_delay", "build_dsn"]

log = logging.getLogger(__name__)

#: libpq TCP keepalives: a server that vanishes without a RST is noticed in ~1 minute
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
               "keepalives_count": "3"}


def build_dsn(url: str, *, schema: str | None = None,
              application_name: str | None = None) -> str:
    """A libpq DSN from the configured URL, with our search_path and defaults.

    ``schema`` becomes ``options=-csearch_path=<schema>`` so every connection (also
    after a reconnect) works in it; ``application_name`` (default ``pbx``) lets
    operators find the PBX's backends in ``pg_stat_activity``.
    """
    params = psycopg2.extensions.parse_dsn(url)
    if schema is not None:
        check_schema_name(schema)
        params["options"] = f"{params.get('options', '')} -csearch_path={schema}".strip()
    if application_name is not None:
        params["application_name"] = application_name
    params.setdefault("application_name", "pbx")
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    return psycopg2.extensions.make_dsn(**params)


def backoff_delay(failures: int, *, initial: float = 0.5, cap: float = 30.0,
                  jitter: float = 0.1, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect attempt number ``failures`` (0 = at once)."""
    if failures <= 0:
        return 0.0
    base = min(cap, initial * 2 ** min(failures - 1, 32))
    return base * (1 - jitter + 2 * jitter * rng())


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """A txpostgres connection that reports when the server closes it while idle."""

    def __init__(self, reactor: Any, on_lost: Callable[[Any], None]) -> None:
        super().__init__(reactor)
        self._on_lost: Callable[[Any], None] | None = on_lost

    @property
    def is_closed(self) -> bool:
        return self._connection is None or bool(self._connection.closed)

    def doRead(self) -> None:
        try:
            super().doRead()
        except psycopg2.Error as err:
            # poll() raised with no query to report to: the server closed an idle
            # connection (restart, pg_terminate_backend). Not a reactor error.
            self.reactor.removeReader(self)
            self._report_lost(err)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._report_lost(reason)

    def shut(self) -> None:
        """Close without reporting a loss (we chose to close it)."""
        self._on_lost = None
        if self._connection is None:
            return
        with contextlib.suppress(Exception):
            self.close()

    def _report_lost(self, why: Any) -> None:
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback(why)


@dataclass(eq=False)
class _Slot:
    """One pooled connection and where it is in its life."""

    status: str = "connecting"  # connecting | idle | busy | down
    conn: _Connection | None = None
    failures: int = 0
    retry: IDelayedCall | None = None
    broken: bool = False
    busy_since: float | None = None  # reactor time it was handed out, while busy


@dataclass(eq=False)
class _Waiter:
    deferred: Deferred[_Slot]
    timer: IDelayedCall | None = None


@dataclass(eq=False)
class _Pool:
    dsn: str
    minimum: int
    maximum: int
    reactor: Any
    connect_timeout: float
    acquire_timeout: float
    backoff: Callable[[int], float]
    queue_limit: int = 10
    stuck_after: float = 30.0
    discard_after: float = 300.0
    slots: list[_Slot] = field(default_factory=list)
    waiters: deque[_Waiter] = field(default_factory=deque)
    started: bool = False
    closed: bool = False
    discarded: int = 0  # connections thrown away (cancelled or stuck queries)
    _watchdog: IDelayedCall | None = None

    # -- state ---------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return any(slot.status in ("idle", "busy") for slot in self.slots)

    def _busy_ages(self) -> list[float]:
        now = float(self.reactor.seconds())
        return [now - slot.busy_since for slot in self.slots
                if slot.status == "busy" and slot.busy_since is not None]

    @property
    def exhausted(self) -> bool:
        """No idle slot, no room to grow, and more than ``queue_limit`` queries wait."""
        return (len(self.waiters) > self.queue_limit
                and len(self.slots) >= self.maximum
                and not any(slot.status == "idle" for slot in self.slots))

    @property
    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.healthy:
            if self.exhausted:
                return "exhausted"
            if any(age >= self.stuck_after for age in self._busy_ages()):
                return "degraded"
            return "connected"
        return "disconnected" if self.started else "connecting"

    def stats(self) -> dict[str, Any]:
        """What the pool can do right now (for health details and operators)."""
        ages = self._busy_ages()
        return {
            "state": self.state,
            "size": len(self.slots),
            "max": self.maximum,
            "idle": sum(slot.status == "idle" for slot in self.slots),
            "busy": sum(slot.status == "busy" for slot in self.slots),
            "connecting": sum(slot.status == "connecting" for slot in self.slots),
            "down": sum(slot.status == "down" for slot in self.slots),
            "waiting": len(self.waiters),
            "stuck": sum(age >= self.stuck_after for age in ages),
            "oldest_busy_seconds": max(ages, default=0.0),
            "discarded": self.discarded,
        }

    # -- life ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Open ``minimum`` connections; succeed when at least one works."""
        self.slots = [_Slot() for _ in range(self.minimum)]
        attempts = [self._open(slot) for slot in self.slots]

        def started(results: list[tuple[bool, Any]]) -> None:
            if self.closed:
                raise StoreUnavailable("PostgreSQL store closed while connecting")
            self.started = True
            if not self.healthy:
                reason = next(r for ok, r in results if not ok)
                self.close()
                raise StoreUnavailable(
                    f"cannot connect to PostgreSQL {_where(self.dsn)}: {_message(reason)}")
            for slot in self.slots:
                if slot.status != "idle":  # keep retrying the ones that failed
                    slot.status = "down"
                    slot.failures = 1
                    self._schedule(slot)
            self._arm_watchdog()

        return defer.DeferredList(attempts, consumeErrors=True).addCallback(started)

    def close(self) -> None:
        self.closed = True
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        for slot in self.slots:
            if slot.retry is not None and slot.retry.active():
                slot.retry.cancel()
            if slot.conn is not None:
                slot.conn.shut()
        self.slots.clear()
        self._fail_waiters("PostgreSQL store is closed")

    def _open(self, slot: _Slot) -> Deferred[None]:
        """Connect ``slot`` (its status is set by the caller); errback on failure."""
        conn = _Connection(self.reactor, lambda why: self._lost(slot, conn, why))
        slot.conn = conn
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            conn.shut()

        timer = self.reactor.callLater(self.connect_timeout, give_up)
        d: Deferred[Any] = conn.connect(self.dsn)

        def connected(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if self.closed or slot.conn is not conn:
                conn.shut()
                raise StoreUnavailable("PostgreSQL store closed while connecting")
            slot.status = "idle"
            slot.failures = 0

        def failed(reason: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            conn.shut()
            if timed_out:
                return Failure(StoreUnavailable(
                    f"no connection within {self.connect_timeout:g} s"))
            return reason

        return d.addCallbacks(connected, failed)

    # -- stuck slots ---------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        """Check for busy-forever slots a few times per ``stuck_after``: a hung query
        must not hold a connection until the TCP keepalives (minutes) give up."""
        if self.closed:
            return
        interval = max(0.05, min(self.stuck_after, self.discard_after) / 4)
        self._watchdog = self.reactor.callLater(interval, self._check_stuck)

    def _check_stuck(self) -> None:
        self._watchdog = None
        if self.closed:
            return
        now = float(self.reactor.seconds())
        for slot in list(self.slots):
            if (slot.status == "busy" and slot.busy_since is not None
                    and now - slot.busy_since >= self.discard_after):
                log.warning("PostgreSQL connection busy for %.0f s: discarding it",
                            now - slot.busy_since)
                self.discard(slot)
        self._arm_watchdog()

    def discard(self, slot: _Slot) -> None:
        """Throw away ``slot``'s connection (its query's state is unknown) and open a
        new one at once; the query on it, if any, fails with the closed connection."""
        if self.closed or slot not in self.slots:
            return
        self.discarded += 1
        old, slot.conn = slot.conn, None
        slot.status = "connecting"
        slot.busy_since = None
        slot.broken = False
        if slot.retry is not None and slot.retry.active():
            slot.retry.cancel()
        slot.retry = None
        if old is not None:
            old.shut()  # errbacks a running query (synchronously, via txpostgres)
        if self.closed or slot not in self.slots or slot.status != "connecting":
            return

        def back(_: Any) -> None:
            self._serve()

        def failed(reason: Failure) -> None:
            if self.closed or slot not in self.slots:
                return
            log.info("PostgreSQL replacement connection failed: %s", _message(reason))
            slot.status = "down"
            slot.failures = 1
            self._schedule(slot)
            if not self.healthy:
                self._fail_waiters("PostgreSQL is unreachable; reconnecting")

        self._open(slot).addCallbacks(back, failed)

    # -- loss and reconnection -----------------------------------------------------

    def _lost(self, slot: _Slot, conn: _Connection, why: Any) -> None:
        if self.closed or slot.conn is not conn:
            return
        if slot.status == "idle":
            log.warning("PostgreSQL connection lost while idle: %s", _message(why))
            self._go_down(slot)
        elif slot.status == "busy":
            slot.broken = True  # its query fails; release() takes it down

    def _go_down(self, slot: _Slot) -> None:
        slot.status = "down"
        slot.broken = False
        slot.failures = 0
        if slot.conn is not None:
            slot.conn.shut()
        self._schedule(slot)
        if not self.healthy:
            log.warning("PostgreSQL unreachable: queries fail until a reconnect works")
            self._fail_waiters("PostgreSQL connection lost; reconnecting")

    def _schedule(self, slot: _Slot) -> None:
        delay = self.backoff(slot.failures)
        slot.retry = self.reactor.callLater(delay, self._reconnect, slot)

    def _reconnect(self, slot: _Slot) -> None:
        slot.retry = None
        if self.closed:
            return

        def back(_: Any) -> None:
            log.info("PostgreSQL connection re-established")
            self._serve()

        def again(reason: Failure) -> None:
            if self.closed:
                return
            slot.failures += 1
            log.info("PostgreSQL reconnect failed (attempt %d): %s", slot.failures,
                     _message(reason))
            self._schedule(slot)

        self._open(slot).addCallbacks(back, again)

    # -- checkout ------------------------------------------------------------------

    def acquire(self) -> Deferred[_Slot]:
        if self.closed:
            return defer.fail(StoreUnavailable("PostgreSQL store is closed"))
        for slot in self.slots:
            if slot.status == "idle":
                self._take(slot)
                return defer.succeed(slot)
        connecting = sum(slot.status == "connecting" for slot in self.slots)
        if not self.healthy and not connecting:
            return defer.fail(StoreUnavailable("PostgreSQL is unreachable; reconnecting"))
        if len(self.slots) < self.maximum and connecting <= len(self.waiters):
            self._grow()
        waiter = _Waiter(Deferred(lambda _: self._withdraw(waiter)))
        waiter.timer = self.reactor.callLater(self.acquire_timeout, self._expire, waiter)
        self.waiters.append(waiter)
        return waiter.deferred

    def _take(self, slot: _Slot) -> None:
        slot.status = "busy"
        slot.busy_since = float(self.reactor.seconds())

    def _withdraw(self, waiter: _Waiter) -> None:
        """Canceller of a queued acquire: leave the queue, so the connection that would
        have been handed to nobody (a timed-out ping) stays in the pool."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def release(self, slot: _Slot, conn: _Connection, *, broken: bool) -> None:
        if slot.conn is not conn:  # discarded meanwhile: the slot has a new one
            conn.shut()
            return
        if self.closed or slot not in self.slots:
            conn.shut()
            return
        slot.busy_since = None
        if broken or slot.broken or slot.conn is None or slot.conn.is_closed:
            log.warning("PostgreSQL connection lost during a query")
            self._go_down(slot)
            return
        slot.status = "idle"
        self._serve()

    def _grow(self) -> None:
        slot = _Slot()
        self.slots.append(slot)

        def grown(_: Any) -> None:
            self._serve()

        def dropped(reason: Failure) -> None:
            # A failed extra connection is not retried: the pool still has its others.
            if slot in self.slots:
                self.slots.remove(slot)
            log.info("extra PostgreSQL connection failed: %s", _message(reason))
            if not self.healthy and not self.closed:
                self._fail_waiters("PostgreSQL is unreachable; reconnecting")

        self._open(slot).addCallbacks(grown, dropped)

    def _serve(self) -> None:
        """Hand idle connections to queued queries, oldest first."""
        while self.waiters:
            slot = next((s for s in self.slots if s.status == "idle"), None)
            if slot is None:
                return
            waiter = self.waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            self._take(slot)
            waiter.deferred.callback(slot)

    def _expire(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
        waiter.deferred.errback(StoreUnavailable(
            f"no free PostgreSQL connection within {self.acquire_timeout:g} s"))

    def _fail_waiters(self, why: str) -> None:
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(StoreUnavailable(why))


class _Stale(Exception):
    """The connection was dead before any statement of the interaction ran."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(_message(reason))
        self.reason = reason


@inlineCallbacks
def _drive(conn: _Connection, gen: Interaction[Any],
           tx: bool) -> Generator[Deferred[Any], Any, Any]:
    """Run one interaction on ``conn``, in a transaction when ``tx``.

    Raises :class:`_Stale` when the connection failed before anything could have
    taken effect, so the caller may retry on another connection.
    """
    cursor = conn.cursor()
    first = True  # nothing has reached the server successfully yet
    try:
        if tx:
            try:
                yield cursor.execute(POSTGRESQL.begin)
            except Exception:
                if conn.is_closed:
                    raise _Stale(Failure()) from None
                raise
            first = False
        try:
            step = next(gen)
            while True:
                sql, params = step
                try:
                    yield cursor.execute(POSTGRESQL.sql(sql), params)
                except Exception:
                    # Outside a transaction only reads run (see SQLStore): safe to retry.
                    if first and not tx and conn.is_closed:
                        raise _Stale(Failure()) from None
                    raise
                first = False
                description = cursor.description
                columns = tuple(c[0] for c in description) if description else ()
                rows = cursor.fetchall() if columns else []
                step = gen.send(Result(columns, rows, cursor.rowcount))
        except StopIteration as done:
            value = done.value
        if tx:
            yield cursor.execute("COMMIT")
        return value
    except BaseException:
        if tx and not first and not conn.is_closed:
            try:
                yield cursor.execute("ROLLBACK")
            except Exception:
                conn.shut()  # unknown transaction state: never reuse it
        raise
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


class PostgresStore(SQLStore):
    """:class:`pbx.store.Store` on PostgreSQL (shared by all nodes of a cluster)."""

    kind = "postgresql"
    dialect = POSTGRESQL

    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 5,
                 reactor: Any = None, schema: str | None = None,
                 application_name: str | None = None, connect_timeout: float = 10.0,
                 acquire_timeout: float = 10.0, reconnect_initial: float = 0.5,
                 reconnect_max: float = 30.0, queue_limit: int | None = None,
                 stuck_after: float = 30.0, discard_after: float = 300.0) -> None:
        super().__init__(reactor)
        self.schema = schema
        self.dsn = build_dsn(url, schema=schema, application_name=application_name)
        self.pool_min = max(1, pool_min)  # one connection is needed to serve anything
        self.pool_max = max(self.pool_min, pool_max)
        self.connect_timeout = connect_timeout
        self.acquire_timeout = acquire_timeout
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        #: queued queries beyond which a fully busy pool reports ``exhausted``
        self.queue_limit = 2 * self.pool_max if queue_limit is None else queue_limit
        self.stuck_after = stuck_after
        self.discard_after = max(stuck_after, discard_after)
        self._pool: _Pool | None = None

    @property
    def state(self) -> str:
        if self._pool is None:
            return "closed"
        return self._pool.state

    def pool_stats(self) -> dict[str, Any]:
        """Slots idle/busy/down, queued queries, stuck slots: why ``state`` is what it
        is (health details show it; no host names or driver text in it)."""
        if self._pool is None:
            return {"state": "closed", "size": 0, "max": self.pool_max, "idle": 0,
                    "busy": 0, "connecting": 0, "down": 0, "waiting": 0, "stuck": 0,
                    "oldest_busy_seconds": 0.0, "discarded": 0}
        return self._pool.stats()

    def _is_connected(self) -> bool:
        return self._pool is not None and self._pool.started and not self._pool.closed

    def _prepare_migration(self) -> Interaction[None]:
        """Create the configured schema when missing. Checked first because CREATE SCHEMA
        (even IF NOT EXISTS) needs CREATE on the database, which a least-privilege PBX
        role owning only its schema does not have."""
        if self.schema is None:
            return
        found = yield ("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.schema,))
        if not found.rows:
            yield (f"CREATE SCHEMA IF NOT EXISTS {self.schema}", ())

    def _connect_backend(self) -> Deferred[None]:
        if self._pool is not None:
            self._pool.close()
        pool = _Pool(
            dsn=self.dsn, minimum=self.pool_min, maximum=self.pool_max,
            reactor=self._reactor, connect_timeout=self.connect_timeout,
            acquire_timeout=self.acquire_timeout, queue_limit=self.queue_limit,
            stuck_after=self.stuck_after, discard_after=self.discard_after,
            backoff=lambda n: backoff_delay(n, initial=self.reconnect_initial,
                                            cap=self.reconnect_max))
        self._pool = pool

        def failed(reason: Failure) -> Failure:
            if self._pool is pool:
                self._pool = None
            return reason

        return pool.start().addErrback(failed)

    def _execute(self, factory: InteractionFactory, args: tuple[Any, ...],
                 tx: bool) -> Deferred[Any]:
        pool = self._pool
        if pool is None:
            return defer.fail(StoreUnavailable("PostgreSQL store is not open"))
        return self._attempt(pool, factory, args, tx, retry=True)

    def _attempt(self, pool: _Pool, factory: InteractionFactory, args: tuple[Any, ...],
                 tx: bool, *, retry: bool) -> Deferred[Any]:
        """Acquire, drive, release, as one cancellable Deferred.

        The inner Deferreds (the acquire and txpostgres' query) are never chained to
        the caller's: cancelling a txpostgres query raises out of ``cancel()`` and
        would leave psycopg2 mid-protocol. Instead the canceller withdraws a queued
        acquire, or discards the connection of a running query (see the module doc).
        """
        phase: dict[str, Any] = {"pending": None, "slot": None, "conn": None,
                                 "cancelled": False}

        def cancel(_: Deferred[Any]) -> None:
            phase["cancelled"] = True
            slot = phase["slot"]
            if slot is not None:
                phase["slot"] = None
                pool.discard(slot)
            elif phase["pending"] is not None:
                phase["pending"].cancel()

        outer: Deferred[Any] = Deferred(cancel)

        def settle(result: Any) -> None:
            if phase["cancelled"] or outer.called:
                if isinstance(result, Failure):
                    result.trap(Exception)  # consumed: the caller gave up on it
                return
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        def run(slot: _Slot) -> None:
            assert slot.conn is not None
            conn = slot.conn
            if phase["cancelled"]:  # cannot happen (withdrawn), but never leak it
                pool.release(slot, conn, broken=False)
                return
            phase["slot"], phase["conn"] = slot, conn

            def done(result: Any) -> Any:
                phase["slot"] = None
                pool.release(slot, conn, broken=False)
                return result

            def failed(reason: Failure) -> Any:
                phase["slot"] = None
                discarded = slot.conn is not conn  # by cancel() or the stuck watchdog
                broken = conn.is_closed or bool(reason.check(
                    _Stale, ConnectionDone, ConnectionLost, txpostgres.RollbackFailed))
                pool.release(slot, conn, broken=broken)
                if phase["cancelled"]:
                    return reason
                if discarded:  # it ran (too long): never retried behind the caller
                    raise StoreUnavailable(
                        f"PostgreSQL query discarded after {pool.discard_after:g} s busy")
                if reason.check(_Stale):
                    if retry:
                        again = self._attempt(pool, factory, args, tx, retry=False)
                        phase["pending"] = again  # cancel() now cancels the retry
                        return again
                    raise StoreUnavailable(f"PostgreSQL connection lost: {reason.value}")
                if reason.check(StoreError):
                    return reason
                if broken:
                    raise StoreUnavailable(
                        f"PostgreSQL connection lost: {_message(reason)}") from reason.value
                if reason.check(psycopg2.Error):
                    raise StoreError(f"PostgreSQL: {_message(reason)}") from reason.value
                return reason

            _drive(conn, factory(*args), tx).addCallbacks(done, failed).addBoth(settle)

        acquiring = pool.acquire()
        phase["pending"] = acquiring
        acquiring.addCallbacks(run, settle).addErrback(settle)
        return outer

    def _disconnect(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return defer.succeed(None)


def _where(dsn: str) -> str:
    """user@host:port/dbname for messages (never the password)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    user = f"{params['user']}@" if "user" in params else ""
    host = params.get("host", "localhost")
    port = f":{params['port']}" if "port" in params else ""
    return f"{user}{host}{port}/{params.get('dbname', '')}"


def _message(reason: Any) -> str:
    value = reason.value if isinstance(reason, Failure) else reason
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0] if text else type(value).__name__
