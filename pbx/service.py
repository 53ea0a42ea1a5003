"""Assemble the PBX as Twisted services, driven by the lifecycle machine.

``make_service`` is what both runners use (``twistd -n pbx`` through the plugin and the
``pbx run`` command), so they cannot drift apart.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from twisted.application import service
from twisted.internet.error import CannotListenError

from pbx.config import Settings
from pbx.lifecycle import Lifecycle
from pbx.sip import SIPEndpoint, SIPTransport, TransactionManager

log = logging.getLogger("pbx")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


class PBXService(service.Service):
    """The whole PBX process: SIP listener, transaction layer, lifecycle, signals."""

    name = "pbx"

    def __init__(self, settings: Settings, reactor: Any | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.exit_code = EXIT_OK
        self.lifecycle = Lifecycle(reactor, drain_timeout=settings.lifecycle.drain_timeout,
                                   active_work=self.active_work)
        self.lifecycle.subscribe(self._lifecycle_changed)
        sip = settings.sip
        self.transport = SIPTransport(reactor, max_message_size=sip.max_message_size)
        self.endpoint = SIPEndpoint(is_ready=lambda: self.lifecycle.ready,
                                    retry_after=settings.lifecycle.retry_after,
                                    user_agent=sip.user_agent)
        self.transactions = TransactionManager(
            self.transport, self.endpoint, reactor,
            t1=sip.timers.t1, t2=sip.timers.t2, t4=sip.timers.t4,
        )
        self.transport.handler = self.transactions
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
        self.lifecycle.fire("started")

    def stopService(self) -> None:
        if not self.lifecycle.finished:
            self.lifecycle.fire("stop")
        self.transport.stop_listening()
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
