"""Derived health: liveness, readiness and the detailed report, read from live state.

Nothing here keeps a health flag of its own (DESIGN.md, "Derived health"):

- **Liveness** = the reactor turns. A :class:`Heartbeat` ``LoopingCall`` stamps the time
  at every tick; when a tick comes late by more than ``max_lag`` (or none came for that
  long), the reactor was stalled and ``/live`` fails. A reactor stalled *now* cannot
  answer at all, which the probe's own timeout reports.
- **Readiness** = the lifecycle is ``ready`` and the required components are up: the
  database connected and its last ping not failing, the SIP sockets bound.
- **Detailed** adds a real database round trip (``store.ping()`` under a timeout, cached
  ~1 s so probes stay cheap) and psutil CPU/memory/disk against thresholds; a resource
  over its threshold makes health ``degraded``, never unready (draining a node because
  its disk is 91 % full would only move the load to its twin).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from pbx.ops.sources import ServiceView

__all__ = [
    "Check",
    "DatabaseProbe",
    "DatabaseResult",
    "HealthMonitor",
    "Heartbeat",
    "SystemResources",
]

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"


@dataclass(frozen=True, slots=True)
class Check:
    """A probe's answer: ok or not, and why (for ``?verbose`` and the detailed report)."""

    ok: bool
    reasons: tuple[str, ...] = ()


class Heartbeat:
    """Measures reactor lag: how late a periodic tick runs compared with its schedule."""

    def __init__(self, clock: IReactorTime, *, interval: float = 0.25,
                 max_lag: float = 2.0) -> None:
        self.clock = clock
        self.interval = interval
        self.max_lag = max_lag
        self.last_tick: float | None = None
        self.last_lag = 0.0
        self.worst_lag = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        if not self._loop.running:
            self.last_tick = self.clock.seconds()
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self.last_tick is not None:
            self.last_lag = max(0.0, now - self.last_tick - self.interval)
            self.worst_lag = max(self.worst_lag, self.last_lag)
        self.last_tick = now

    def lag(self) -> float:
        """The larger of the last tick's lateness and how overdue the next tick is."""
        if self.last_tick is None:
            return 0.0
        overdue = self.clock.seconds() - self.last_tick - self.interval
        return max(self.last_lag, overdue, 0.0)

    def check(self) -> Check:
        if self.last_tick is None:
            return Check(True, ("heartbeat not started",))
        lag = self.lag()
        if lag > self.max_lag:
            return Check(False, (f"reactor stalled: lag {lag:.3f}s > {self.max_lag:.3f}s",))
        return Check(True, (f"reactor lag {lag * 1000:.1f}ms",))


@dataclass(frozen=True, slots=True)
class DatabaseResult:
    """One ping's outcome. ``error`` is the full text (driver message, host names: for
    token holders and the log); ``reason`` says what is wrong without those details, for
    the unauthenticated probes and report."""

    ok: bool
    latency: float | None
    error: str | None
    at: float
    reason: str | None = None

    @property
    def public_error(self) -> str | None:
        return self.reason if self.reason is not None else self.error


def public_reason(message: str) -> str:
    """What a database failure means, in words that leak no driver text or host name."""
    text = message.lower()
    for needles, meaning in ((("locked", "busy"), "database locked"),
                             (("readonly", "read-only", "read only"), "database read-only"),
                             (("full", "no space"), "disk or database full"),
                             (("disk i/o", "i/o error"), "disk I/O error"),
                             (("timeout", "timed out"), "database timed out"),
                             (("connect", "closed", "terminat", "unavailable"),
                              "database unreachable")):
        if any(n in text for n in needles):
            return meaning
    return "database error"


class DatabaseProbe:
    """``store.ping()`` with a timeout; results cached ``cache_for`` seconds; one in flight."""

    def __init__(self, store: Any, clock: IReactorTime, *, timeout: float = 2.0,
                 cache_for: float = 1.0, failure_memory: float = 10.0) -> None:
        self.store = store
        self.clock = clock
        self.timeout = timeout
        self.cache_for = cache_for
        self.failure_memory = failure_memory
        self.last: DatabaseResult | None = None
        self._waiters: list[Deferred[DatabaseResult]] | None = None

    def fresh(self) -> bool:
        return self.last is not None and self.clock.seconds() - self.last.at < self.cache_for

    def check(self) -> Deferred[DatabaseResult]:
        """The cached result when fresh, else the result of a new (shared) ping."""
        if self.fresh():
            assert self.last is not None
            return defer.succeed(self.last)
        waiter: Deferred[DatabaseResult] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        if self.store.state != "connected":
            self._done(DatabaseResult(False, None, f"store is {self.store.state}",
                                      self.clock.seconds(), f"store is {self.store.state}"))
            return waiter
        try:
            ping = self.store.ping()
        except Exception as exc:  # a store may raise instead of failing the Deferred
            ping = defer.fail(exc)
        ping.addTimeout(self.timeout, self.clock)
        ping.addCallbacks(self._pinged, self._ping_failed)
        return waiter

    def refresh(self) -> None:
        """Start a ping in the background when the cache is stale (for cheap probes)."""
        if not self.fresh() and self._waiters is None:
            self.check()

    def _pinged(self, latency: float) -> None:
        self._done(DatabaseResult(True, float(latency), None, self.clock.seconds()))

    def _ping_failed(self, failure: Failure) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            error = reason = f"no answer within {self.timeout:g}s"
        else:
            error = failure.getErrorMessage() or failure.type.__name__
            reason = public_reason(error)
        self._done(DatabaseResult(False, None, error, self.clock.seconds(), reason))

    def _done(self, result: DatabaseResult) -> None:
        self.last = result
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(result)

    def up(self) -> Check:
        """Synchronous view for readiness: connected, and no failed ping lately."""
        state = self.store.state
        if state != "connected":
            return Check(False, (f"database is {state}",))
        last = self.last
        if (last is not None and not last.ok
                and self.clock.seconds() - last.at < self.failure_memory):
            # The public reason: /ready?verbose needs no token (the full text is in
            # the detailed report for token holders).
            return Check(False, (f"database ping failed: {last.public_error}",))
        return Check(True, ("database connected",))


@dataclass(slots=True)
class SystemResources:
    """psutil CPU/memory/disk in percent against warning thresholds, sampled at most
    once per ``cache_for`` seconds (psutil reads /proc; probes must stay cheap)."""

    path: Path
    cpu_warn: float = 80.0
    memory_warn: float = 85.0
    disk_warn: float = 90.0
    cache_for: float = 1.0
    now: Callable[[], float] = time.monotonic
    _sample: dict[str, float] = field(default_factory=dict)
    _at: float = float("-inf")

    def __post_init__(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def sample(self) -> dict[str, float]:
        now = self.now()
        if now - self._at >= self.cache_for:
            self._sample = {
                "cpu_percent": float(psutil.cpu_percent(interval=None)),
                "memory_percent": float(psutil.virtual_memory().percent),
                "disk_percent": float(psutil.disk_usage(str(self._disk_path())).percent),
            }
            self._at = now
        return self._sample

    def _disk_path(self) -> Path:
        path = Path(self.path).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    @property
    def thresholds(self) -> dict[str, float]:
        return {"cpu_percent": self.cpu_warn, "memory_percent": self.memory_warn,
                "disk_percent": self.disk_warn}

    def report(self) -> dict[str, Any]:
        values = self.sample()
        warnings = [f"{name.removesuffix('_percent')} at {values[name]:.1f}% "
                    f"(threshold {limit:g}%)"
                    for name, limit in self.thresholds.items() if values[name] >= limit]
        return {"status": DEGRADED if warnings else HEALTHY, **values,
                "thresholds": self.thresholds, "warnings": warnings}


class HealthMonitor:
    """Computes every health answer of the ops plane from the service's live state."""

    def __init__(self, view: ServiceView, clock: IReactorTime, *, heartbeat: Heartbeat,
                 database: DatabaseProbe, resources: SystemResources,
                 started_at: float | None = None) -> None:
        self.view = view
        self.clock = clock
        self.heartbeat = heartbeat
        self.database = database
        self.resources = resources
        self.started_at = (started_at if started_at is not None
                           else psutil.Process(os.getpid()).create_time())
        self.extra_checks: dict[str, Callable[[], Check]] = {}

    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)

    # -- probes (synchronous, cheap) --------------------------------------------------
    def liveness(self) -> Check:
        return self.heartbeat.check()

    def readiness(self) -> Check:
        """Lifecycle ``ready`` and every required component up; reasons either way."""
        self.database.refresh()
        state = self.view.lifecycle.state
        checks = [Check(state == "ready", (f"lifecycle is {state}",)),
                  self.database.up(), self._sip_check()]
        checks += [check() for check in self.extra_checks.values()]
        ok = all(c.ok for c in checks)
        reasons = tuple(r for c in checks for r in c.reasons if ok or not c.ok)
        return Check(ok, reasons)

    def _sip_check(self) -> Check:
        sockets = self.view.sip_sockets()
        if not sockets:
            return Check(False, ("no SIP socket bound",))
        return Check(True, ("SIP on " + ", ".join(
            f"{s['transport']} {s['host']}:{s['port']}" for s in sockets),))

    def overall(self, live: Check | None = None, ready: Check | None = None) -> str:
        live = live or self.liveness()
        ready = ready or self.readiness()
        if not (live.ok and ready.ok):
            return UNHEALTHY
        return DEGRADED if self.resources.report()["warnings"] else HEALTHY

    # -- the detailed report ----------------------------------------------------------
    def machines(self) -> dict[str, dict[str, int]]:
        """Counts of machines per state: lifecycle, transactions, calls."""
        out: dict[str, dict[str, int]] = {"lifecycle": {self.view.lifecycle.state: 1}}
        counts = getattr(self.view.transactions, "counts", None)
        if isinstance(counts, dict):
            out.update({kind: dict(states) for kind, states in counts.items()})
        states = Counter(str(call.get("state", "unknown")) for call in self.view.calls())
        out["call"] = dict(states)
        return out

    def detailed(self, *, full: bool = False) -> Deferred[dict[str, Any]]:
        """The component report. Without ``full`` (a caller without the token) it says
        what is wrong but carries no host name (``node``) and no driver error text:
        those help an attacker map the network more than they help a load balancer.
        """
        return self.database.check().addCallback(self._detailed, full)

    def _detailed(self, db: DatabaseResult, full: bool = False) -> dict[str, Any]:
        live = self.liveness()
        ready = self.readiness()
        uptime = round(self.uptime(), 3)
        lifecycle = self.view.lifecycle
        store = self.view.store
        db_up = self.database.up()
        sockets = self.view.sip_sockets()
        resources = self.resources.report()
        checks = {
            "pbx_core": {
                "status": HEALTHY if lifecycle.state == "ready" else UNHEALTHY,
                "lifecycle_state": lifecycle.state,
                "state_since": lifecycle.entered_at,
                **({"node": self.view.node} if full else {}),
                "machines": self.machines(),
            },
            "database": {
                "status": HEALTHY if db.ok and db_up.ok else UNHEALTHY,
                "type": store.kind,
                "state": store.state,
                "latency_ms": None if db.latency is None else round(db.latency * 1000, 3),
                "timeout_seconds": self.database.timeout,
                "checked_seconds_ago": round(max(0.0, self.clock.seconds() - db.at), 3),
                "error": db.error if full else db.public_error,
            },
            "sip_server": {
                "status": HEALTHY if sockets else UNHEALTHY,
                "sockets": sockets,
            },
            "system_resources": resources,
        }
        for name, check in self.extra_checks.items():
            result = check()
            checks[name] = {"status": HEALTHY if result.ok else UNHEALTHY,
                            "reasons": list(result.reasons)}
        overall = UNHEALTHY if not (live.ok and ready.ok) else resources["status"]
        return {
            "overall_status": overall,
            "liveness": {"status": "alive" if live.ok else "stalled",
                         "uptime_seconds": uptime,
                         "reactor_lag_ms": round(self.heartbeat.lag() * 1000, 3),
                         "reasons": list(live.reasons)},
            "readiness": {"status": "ready" if ready.ok else "not_ready",
                          "reasons": list(ready.reasons), "checks": checks},
            "metrics": {"uptime_seconds": uptime,
                        "active_calls": self.view.active_calls(),
                        "registered_extensions": self.view.registered_extensions()},
        }
