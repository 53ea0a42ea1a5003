"""Install the B2BUA into a running ``PBXService`` (one call from its ``__init__``).

Why a function here and not in ``pbx.service``: the call layer owns what it needs from
the service (the endpoint handlers, the drain hook, the bound port, CDR recovery), and
the service adds one line: ``self.b2bua = install_calls(self)``.

It takes the service duck-typed (``settings``, ``reactor``, ``transactions``,
``endpoint``, ``location``, ``credentials``, ``registrar``, ``guard``, ``store``,
``transport``, ``lifecycle``, ``node``), so ``pbx.calls`` never imports ``pbx.service``
or ``pbx.config``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pbx.calls.b2bua import B2BUA

__all__ = ["advertised_host", "install_calls"]

log = logging.getLogger(__name__)


def advertised_host(bind_host: str, external: str | None) -> str:
    """The address put in Via, Contact and SDP: the configured external address, the
    bind address when it is specific, else the address of the default route."""
    if external:
        return external
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def install_calls(service: Any) -> B2BUA:
    """Build the B2BUA from the service's components and settings and hook it in."""
    from pbx.media import MediaSession, PortAllocator

    settings = service.settings
    sip = settings.sip
    calls = settings.calls
    rtp = settings.rtp
    reactor = service.reactor
    host = advertised_host(sip.host, sip.external_ip)
    allocator = PortAllocator(rtp.port_min, rtp.port_max)
    media_bind = sip.host if sip.host not in ("", "::") else "0.0.0.0"
    codecs = tuple(str(getattr(c, "value", c)) for c in rtp.codecs)

    def media_factory(on_timeout: Any) -> MediaSession:
        return MediaSession(reactor, allocator, host=media_bind, advertise=host,
                            codecs=codecs, media_timeout=float(calls.media_timeout),
                            on_timeout=on_timeout)

    b2bua = B2BUA(
        reactor, service.transactions, service.endpoint, service.location,
        service.registrar.authenticator, service.credentials, media_factory, service.store,
        dialplan=calls.dialplan_pattern, ring_timeout=float(calls.ring_timeout),
        max_calls=int(calls.max_calls), local_host=host, local_port=sip.port or 5060,
        user_agent=sip.user_agent, node=service.node, domain=sip.domain,
        guard=getattr(service, "guard", None),
        retry_after=int(settings.lifecycle.retry_after))
    b2bua.install()
    b2bua.allocator = allocator  # type: ignore[attr-defined]  # for metrics/health

    lifecycle = service.lifecycle
    lifecycle.active_work = lambda: b2bua.active_calls
    b2bua.call_ended_hooks.append(lambda _call: lifecycle.work_finished())

    def changed(old: str, new: str) -> None:
        if new == "ready" and old == "starting":
            for kind, _host, port in getattr(service.transport, "listening", []) or []:
                if kind == "udp":
                    b2bua.local_port = int(port)
            b2bua.cdr.recover().addCallback(_recovered)

    lifecycle.subscribe(changed)
    return b2bua


def _recovered(count: Any) -> None:
    if count:
        log.warning("CDR: %s calls left open by a previous run marked interrupted", count)
