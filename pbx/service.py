"""Assemble the PBX as Twisted services, driven by the lifecycle machine.

``make_service`` is what both runners use (``twistd -n pbx`` through the plugin and the
``pbx run`` command), so they cannot drift apart.

Start-up order: bind the SIP sockets (a taken port fails at once; until `ready` every
OPTIONS gets 503), open the store (migrating when configured), seed extensions from the
config, restore the location bindings, then fire `started`. A clean stop flushes the
location service before the store closes.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Generator
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError

from pbx.admin import seed_extensions
from pbx.config import Settings
from pbx.lifecycle import Lifecycle
from pbx.sip import (
    CachedCredentialLookup,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    LocationService,
    Registrar,
    RegistrarPolicy,
    SecurityPolicy,
    SIPEndpoint,
    SIPTransport,
    SourceGuard,
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

    @staticmethod
    def _convert(record: Any) -> Credentials | None:
        if record is None:
            return None
        ha1 = {name: value for name, value in (("MD5", record.ha1_md5),
                                               ("SHA-256", record.ha1_sha256)) if value}
        return Credentials(record.number, record.realm, ha1, bool(record.enabled))


class PBXService(service.Service):
    """The whole PBX process: SIP stack, registrar, store, lifecycle, signals."""

    name = "pbx"

    def __init__(self, settings: Settings, reactor: Any | None = None) -> None:
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
                                      guard=self.guard)
        self.endpoint = SIPEndpoint(is_ready=lambda: self.lifecycle.ready,
                                    retry_after=settings.lifecycle.retry_after,
                                    user_agent=sip.user_agent)
        self.transactions = TransactionManager(
            self.transport, self.endpoint, reactor,
            t1=sip.timers.t1, t2=sip.timers.t2, t4=sip.timers.t4,
        )
        self.transport.handler = self.transactions
        self.location = LocationService(reactor, self.store,
                                        sweep_interval=settings.registrar.sweep_interval)
        self.credentials = CachedCredentialLookup(StoreCredentials(self.store), reactor)
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
        self._signals_seen = 0
        self._stopping_reactor = False

    def active_work(self) -> int:
        """In-flight work that a drain waits for (calls arrive with the calls issue)."""
        return 0

    # -- Twisted service ------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        sip = self.settings.sip
        try:
            for transport, host, port in self.transport.listen(sip.host, sip.port):
                log.info("listening: SIP %s on %s:%d", transport.upper(), host, port)
        except CannotListenError as exc:
            log.error("cannot listen for SIP on %s:%s: %s", sip.host, sip.port,
                      exc.socketError)
            self.lifecycle.fire("start_failed")
            return
        self.reactor.addSystemEventTrigger("after", "startup", self._install_signal_handlers)
        self._start_components().addErrback(self._start_failed)

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
        restored = yield self.location.load()
        log.info("location: %d bindings restored", restored)
        self.location.start()
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
        self.transactions.close()
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
        if new in ("stopped", "failed"):
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
    return PBXService(settings, reactor)
