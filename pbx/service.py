"""Assemble the PBX as Twisted services, driven by the lifecycle machine.

``make_service`` is what both runners use (``twistd -n pbx`` through the plugin and the
``pbx run`` command), so they cannot drift apart.

Start-up order: bind the SIP sockets (a taken port fails at once; until `ready` every
OPTIONS gets 503), open the store (migrating when configured), seed extensions from the
config, restore the location bindings, then fire `started`. A clean stop flushes the
location service before the store closes.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall

from pbx.admin import seed_extensions
from pbx.calls import install_calls
from pbx.config import Settings
from pbx.lifecycle import Lifecycle
from pbx.ops import OpsOptions, install_ops
from pbx.sip import (
    CredentialDirectory,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    LocationService,
    Registrar,
    RegistrarPolicy,
    ReloadableServerContext,
    SecurityPolicy,
    SIPEndpoint,
    SIPTransport,
    SourceGuard,
    StreamLimits,
    TLSConfigError,
    TransactionManager,
)
from pbx.store import SchemaOutdated, SchemaTooNew, Store, StoreError, open_store

log = logging.getLogger("pbx")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


class StoreCredentials:
    """The registrar's credential source: extension HA1 hashes from the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        return self.store.get_extension(username).addCallback(self._convert)

    def all(self) -> Deferred[list[Credentials]]:
        """Every extension (the credential directory's periodic reload)."""
        return self.store.list_extensions().addCallback(
            lambda records: [c for c in map(self._convert, records) if c is not None])

    @staticmethod
    def _convert(record: Any) -> Credentials | None:
        if record is None:
            return None
        ha1 = {name: value for name, value in (("MD5", record.ha1_md5),
                                               ("SHA-256", record.ha1_sha256)) if value}
        return Credentials(record.number, record.realm, ha1, bool(record.enabled))


class GCPauses:
    """How long the collector stops the process, from ``gc.callbacks``.

    Every collection stops the reactor, and with it the RTP relay of every call; the
    longest pause is what decides whether a jitter buffer underruns.  Per generation:
    collections, total and largest pause (seconds) and the unreachable objects found
    (what reference counting could not free: cycles).  Two callbacks per collection,
    one per second with :class:`ScheduledGC`: nothing on the hot path.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self._timer = timer
        self._started = 0.0
        self.collections = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.max_pause = [0.0, 0.0, 0.0]
        self.last_pause = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._timer()
            return
        pause = self._timer() - self._started
        generation = min(2, max(0, int(info.get("generation", 2))))
        self.collections[generation] += 1
        self.pause_total[generation] += pause
        self.last_pause[generation] = pause
        if pause > self.max_pause[generation]:
            self.max_pause[generation] = pause
        self.collected[generation] += int(info.get("collected", 0))

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        while self in gc.callbacks:
            gc.callbacks.remove(self)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; elsewhere its peak, which only
    ever grows and so still tells growth)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ScheduledGC:
    """Garbage collection on a clock instead of on allocation counts.

    Why: at a few thousand requests per second about a hundred thousand completed
    transactions wait out Timer J (32 s).  CPython starts a collection when
    allocations minus deallocations pass a threshold, and every transaction that ends
    in an old generation counts as a deallocation, so under a steady load the young
    generation grows for a long time and is then collected in one pause of hundreds
    of milliseconds (measured), long enough to overflow the UDP socket buffer.  With
    automatic collection off, the young generations are collected every ``interval``
    seconds: what survived since the last tick, mostly transactions waiting out their
    timers, so the pause is proportional to the interval (measured at 100 call set-ups
    per second: 15-22 ms of CPU per 1 s tick, hence 0.5 s; 7-8 ms at 500 relayed calls
    up).  What exists after start-up is frozen (``gc.freeze``) and never walked again.

    The full collection is the expensive one: it walks every live object, so its pause
    grows with the calls that are up (measured at 500 relayed calls: 40-75 ms, a gap in
    every call's audio) however little it finds.  And it finds little: calls free
    themselves by reference counting (tests/unit/test_call_cycles.py), so what reaches
    the old generation is live data, not garbage.  The policy is therefore:

    * a full collection when resident memory has grown by half since the last one,
      and by ``full_growth`` bytes at least (something does make reference cycles:
      their garbage shows as growth, and is bounded by it), at most once per
      ``min_full_interval`` seconds, and only while the PBX is ``quiet()``.  Growth
      mostly *is* load (at 3,000 registrations/s the transactions waiting out Timer J
      take ~60 MB; at 100 calls/s ~90 MB), and a full collection in the middle of a
      load peak pauses long enough (measured: 3,000 REGISTER/s collapsing to 1,400/s
      with thousands of retransmissions) to make the peak worse; once it is over the
      heap is small and walking it is cheap;
    * otherwise one every ``full_interval`` seconds, quiet or not: a backstop for
      slow leaks on a PBX that is never idle.

    :attr:`pauses` records every collection's pause (the ``pbx_gc_*`` metrics).
    :meth:`stop` restores the interpreter's settings.
    """

    def __init__(self, clock: Any, interval: float = 0.5, *,
                 full_interval: float = 3600.0, min_full_interval: float = 60.0,
                 full_growth: int = 64 << 20,
                 memory: Callable[[], int] = resident_bytes,
                 quiet: Callable[[], bool] | None = None) -> None:
        """``quiet``: whether the process is lightly loaded enough for a full collection
        brought forward by growth (default: always)."""
        self.clock = clock
        self.quiet = quiet
        self.interval = interval
        self.full_interval = full_interval
        self.min_full_interval = min_full_interval
        self.full_growth = full_growth
        self.memory = memory
        self.pauses = GCPauses()
        self.full_collections = 0
        self._loop: LoopingCall | None = None
        self._last_full = 0.0
        self._baseline = 0
        self._was_enabled = True

    def start(self) -> None:
        if self._loop is not None:
            return
        gc.collect()
        gc.freeze()
        self._was_enabled = gc.isenabled()
        gc.disable()
        self.pauses.install()
        self._last_full = self.clock.seconds()
        self._baseline = self.memory()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def full_due(self) -> bool:
        """Whether this tick collects everything (see the class docstring)."""
        since = self.clock.seconds() - self._last_full
        if since >= self.full_interval:
            return True
        return (since >= self.min_full_interval and self.memory() - self._baseline
                >= max(self.full_growth, self._baseline // 2)
                and (self.quiet is None or self.quiet()))

    def _tick(self) -> None:
        if self.full_due():
            gc.collect(2)
            self.full_collections += 1
            self._last_full = self.clock.seconds()
            self._baseline = self.memory()
        else:
            gc.collect(1)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._loop.running:
            self._loop.stop()
        self._loop = None
        self.pauses.uninstall()
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()


class PBXService(service.Service):
    """The whole PBX process: SIP stack, registrar, store, lifecycle, signals."""

    name = "pbx"

    def __init__(self, settings: Settings, reactor: Any | None = None, *,
                 manage_gc: bool = False) -> None:
        """``manage_gc``: this service owns the process (``make_service``, used by the
        runners), so it may take over garbage collection (:class:`ScheduledGC`)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.exit_code = EXIT_OK
        self.node = socket.gethostname()
        self.lifecycle = Lifecycle(reactor, drain_timeout=settings.lifecycle.drain_timeout,
                                   active_work=self.active_work)
        self.lifecycle.subscribe(self._lifecycle_changed)
        sip = settings.sip
        db = settings.database
        self.store: Store = open_store(settings.database_url, pool_min=db.pool_min,
                                       pool_max=db.pool_max, reactor=reactor)
        self.guard = SourceGuard(SecurityPolicy.from_settings(settings.security),
                                 now=reactor.seconds)
        self.transport = SIPTransport(reactor, max_message_size=sip.max_message_size,
                                      guard=self.guard,
                                      limits=StreamLimits.from_settings(sip))
        self.endpoint = SIPEndpoint(is_ready=lambda: self.lifecycle.ready,
                                    retry_after=settings.lifecycle.retry_after,
                                    user_agent=sip.user_agent)
        self.transactions = TransactionManager(
            self.transport, self.endpoint, reactor,
            t1=sip.timers.t1, t2=sip.timers.t2, t4=sip.timers.t4,
            timer_c=sip.timers.timer_c, max_transactions=sip.max_transactions,
        )
        self.transport.handler = self.transactions
        self.location = LocationService(reactor, self.store,
                                        sweep_interval=settings.registrar.sweep_interval)
        self.gc = ScheduledGC(reactor, quiet=self._quiet) if manage_gc else None
        store_credentials = StoreCredentials(self.store)
        self.credentials = CredentialDirectory(store_credentials.all, store_credentials,
                                               reactor)
        realm = sip.realm or sip.domain
        self.registrar = Registrar(
            location=self.location,
            authenticator=DigestAuthenticator(realm, DigestPolicy.from_settings(settings.auth)),
            credentials=self.credentials,
            policy=RegistrarPolicy.from_settings(settings.registrar),
            domains=[sip.domain, realm], guard=self.guard, check_guard=False,
            node=self.node, user_agent=sip.user_agent,
        )
        self.endpoint.handlers["REGISTER"] = self.registrar.handle_register
        self.b2bua = install_calls(self)
        self.ops = install_ops(self, options=OpsOptions.from_settings(settings))
        self._signals_seen = 0
        self._stopping_reactor = False

    # A full collection walks the live heap: with this little up it takes a few ms.
    QUIET_TRANSACTIONS = 2_000
    QUIET_CALLS = 20

    def _quiet(self) -> bool:
        """Few transactions and calls alive: a full collection costs little now (see
        :class:`ScheduledGC`)."""
        return (self.transactions.live_count() < self.QUIET_TRANSACTIONS
                and self.active_work() < self.QUIET_CALLS)

    def active_work(self) -> int:
        """In-flight work that a drain waits for: the calls that are up."""
        return self.b2bua.active_calls if hasattr(self, "b2bua") else 0

    # -- Twisted service ------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        sip = self.settings.sip
        api = self.settings.api
        try:
            self.ops.start()  # logs "listening: API HTTP on HOST:PORT"
        except CannotListenError as exc:
            log.error("cannot listen for the API on %s:%s: %s", api.host, api.port,
                      exc.socketError)
            self.lifecycle.fire("start_failed")
            return
        try:
            for transport, host, port in self.transport.listen(sip.host, sip.port):
                log.info("listening: SIP %s on %s:%d", transport.upper(), host, port)
        except CannotListenError as exc:
            log.error("cannot listen for SIP on %s:%s: %s", sip.host, sip.port,
                      exc.socketError)
            self.lifecycle.fire("start_failed")
            return
        if sip.tls_enabled and not self._listen_tls():
            return
        self.reactor.addSystemEventTrigger("after", "startup", self._install_signal_handlers)
        self._start_components().addErrback(self._start_failed)

    def _listen_tls(self) -> bool:
        """SIP over TLS on ``sip.tls_port`` with the configured certificate; a certificate
        that cannot be used is a configuration error (exit 78), a taken port a failure."""
        sip = self.settings.sip
        assert sip.tls_cert is not None and sip.tls_key is not None  # the model checks
        try:
            context = ReloadableServerContext(sip.tls_cert, sip.tls_key)
        except TLSConfigError as exc:
            log.error("configuration error: %s", exc)
            self.lifecycle.fire("start_failed")
            self.exit_code = EXIT_CONFIG
            return False
        try:
            kind, host, port = self.transport.listen_tls(sip.host, sip.tls_port, context)
        except CannotListenError as exc:
            log.error("cannot listen for SIP over TLS on %s:%s: %s", sip.host,
                      sip.tls_port, exc.socketError)
            self.lifecycle.fire("start_failed")
            return False
        log.info("listening: SIP %s on %s:%d", kind.upper(), host, port)
        return True

    def reload(self) -> None:
        """SIGHUP: reload what can change without a restart (today: the TLS certificate)."""
        if self.transport.tls_context is not None:
            self.transport.reload_tls()

    @inlineCallbacks
    def _start_components(self) -> Generator[Deferred[Any], Any, None]:
        if self.settings.database.migrate_on_start:
            version = yield self.store.migrate()
            log.info("database: %s schema at version %d", self.store.kind, version)
        yield self.store.open()
        seeded = yield seed_extensions(self.store, self.settings)
        for number in seeded.created:
            log.info("extension %s created from the configuration", number)
        for number, why in seeded.skipped.items():
            log.warning("extension %s not created: %s", number, why)
        loaded = yield self.credentials.start()
        log.info("credentials: %d extensions loaded", loaded)
        restored = yield self.location.load()
        log.info("location: %d bindings restored", restored)
        self.location.start()
        if self.gc is not None:
            self.gc.start()
        if self.lifecycle.state == "starting":
            self.lifecycle.fire("started")

    def _start_failed(self, failure: Any) -> None:
        if failure.check(SchemaOutdated, SchemaTooNew, StoreError):
            log.error("database: %s", failure.getErrorMessage())
        else:
            log.error("start-up failed: %s", failure.getErrorMessage())
            log.debug("%s", failure.getTraceback())
        self.lifecycle.fail(failure.getErrorMessage())

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        if not self.lifecycle.finished:
            self.lifecycle.fire("stop")
        self.transport.stop_listening()
        if self.b2bua.active_calls:
            self.b2bua.hangup_all("Service shutting down")
        self.transactions.close()
        self.credentials.stop()
        if self.gc is not None:
            self.gc.stop()
        yield self.ops.stop()
        try:
            yield self.location.stop()
        except Exception as exc:  # a store that went away must not block the exit
            log.error("location: final flush failed: %s", exc)
        yield self.store.close()
        super().stopService()

    # -- signals --------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a drain; a second one stops at once."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.handle_stop_signal, signal.Signals(signum).name)

    def handle_stop_signal(self, name: str) -> None:
        self._signals_seen += 1
        if self._signals_seen == 1 and self.lifecycle.may_fire("drain"):
            log.info("%s received: draining (a second signal stops at once)", name)
            self.lifecycle.begin_drain()
        elif not self.lifecycle.finished:
            log.info("%s received again: stopping now", name)
            self.lifecycle.fire("stop")

    # -- lifecycle --------------------------------------------------------------------
    def _lifecycle_changed(self, old: str, new: str) -> None:
        if new == "failed":
            self.exit_code = EXIT_FAILURE
        if new == "stopped" and self.b2bua.active_calls:
            # Drain timeout (or an operator's stop) with calls up: BYE them while the
            # sockets are still open, then give the BYEs up to stop_timeout to complete.
            log.info("hanging up %d calls", self.b2bua.active_calls)
            self.b2bua.hangup_all("Service shutting down")
            self._stop_after_calls(self.reactor.seconds()
                                   + self.settings.lifecycle.stop_timeout)
        elif new in ("stopped", "failed"):
            self._stop_reactor()

    def _stop_after_calls(self, deadline: float) -> None:
        if self.b2bua.active_calls and self.reactor.seconds() < deadline:
            self.reactor.callLater(0.05, self._stop_after_calls, deadline)
        else:
            self._stop_reactor()

    def _stop_reactor(self) -> None:
        if self._stopping_reactor:
            return
        self._stopping_reactor = True
        self.transport.stop_listening()
        if self.reactor.running:
            self.reactor.callLater(0, self.reactor.stop)
        else:
            self.reactor.callWhenRunning(self.reactor.stop)


def make_service(settings: Settings, reactor: Any | None = None) -> PBXService:
    return PBXService(settings, reactor, manage_gc=True)
