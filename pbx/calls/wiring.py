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

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pbx.calls.b2bua import B2BUA
from pbx.calls.session_timer import TimerPolicy

__all__ = ["LocalAddresses", "advertised_host", "install_calls"]

log = logging.getLogger(__name__)

_WILDCARDS = ("0.0.0.0", "::", "")


def _probe(family: socket.AddressFamily) -> str | None:
    """The source address of the default route of ``family`` (no packet is sent for a
    UDP connect); None when the family has no route."""
    target = ("2001:db8::1", 9) if family == socket.AF_INET6 else ("192.0.2.1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])
    except OSError:
        return None


def _is_ipv6(host: str) -> bool:
    return ":" in host


def advertised_host(bind_host: str, external: str | None) -> str:
    """The address put in Via, Contact and SDP: the configured external address, the
    bind address when it is specific, else the address of the default route (of the
    bind address's family: ``::`` probes IPv6)."""
    if external:
        return external
    if bind_host not in _WILDCARDS:
        return bind_host
    if bind_host == "::":
        return _probe(socket.AF_INET6) or "::1"
    return _probe(socket.AF_INET) or "127.0.0.1"


@dataclass(frozen=True, slots=True)
class LocalAddresses:
    """What the PBX calls itself toward a peer of each address family, and where media
    for that family binds.

    With ``sip.host: "::"`` the transport listens dual stack, so one PBX has two faces: an
    IPv4 phone must see an IPv4 address in our Via sent-by, Contact and SDP ``c=``
    (RFC 3261 §18.2.1: responses go to the sent-by; RFC 3264: media goes to ``c=``),
    an IPv6 phone an IPv6 one.  :meth:`host_for` and :meth:`media_for` pick by the
    peer's family; a family the PBX does not listen on falls back to the other one.
    ``None`` marks a family the PBX has no address in.

    On a wildcard bind the address of a family is a guess (the default route's source)
    unless ``sip.external_ip`` gives it; toward a loopback peer — on this host, talking
    to us over ``lo`` — a guessed address is replaced by the loopback one of its family.
    """

    ipv4: str | None
    ipv6: str | None
    media_ipv4: str | None
    media_ipv6: str | None
    guessed4: bool = False
    guessed6: bool = False

    @classmethod
    def from_bind(cls, bind_host: str, external: str | None) -> LocalAddresses:
        """From ``sip.host`` and ``sip.external_ip`` (an address of either family or a
        host name, which then names the PBX toward every peer)."""
        bind_host = _canonical(bind_host.strip("[]"))
        ext4 = ext6 = external or None
        if external and _is_ip(external):
            external = _canonical(external)
            ext4, ext6 = (None, external) if _is_ipv6(external) else (external, None)
        if bind_host in ("0.0.0.0", "", "::"):
            ipv4 = ext4 or _probe(socket.AF_INET) or "127.0.0.1"
            if bind_host != "::":
                return cls(ipv4, None, "0.0.0.0", None, guessed4=ext4 is None)
            ipv6 = ext6 or _probe(socket.AF_INET6) or "::1"  # dual stack: both families
            return cls(ipv4, ipv6, "0.0.0.0", "::", guessed4=ext4 is None,
                       guessed6=ext6 is None)
        if _is_ipv6(bind_host):
            return cls(None, ext6 or bind_host, None, bind_host)
        return cls(ext4 or bind_host, None, bind_host, None)

    @property
    def primary(self) -> str:
        """One address for where a single one is wanted (Call-ID, default domain)."""
        return self.ipv4 or self.ipv6 or "127.0.0.1"

    def host_for(self, peer_host: str) -> str:
        """The host we put in Via/Contact/SDP toward ``peer_host`` (no brackets).

        Called per request sent: string tests only (peer hosts arrive normalised by the
        transport, RFC 5952 form, IPv4-mapped addresses as IPv4)."""
        if _is_ipv6(peer_host):
            if self.ipv6 is None:
                return self.primary
            return "::1" if self.guessed6 and peer_host == "::1" else self.ipv6
        if self.ipv4 is None:
            return self.primary
        return "127.0.0.1" if self.guessed4 and peer_host.startswith("127.") else self.ipv4

    def media_for(self, peer_host: str) -> tuple[str, str]:
        """``(bind address, advertised address)`` of a relay leg toward ``peer_host``:
        the socket in the peer's family, so media goes the way its signalling does."""
        six = _is_ipv6(peer_host) and self.media_ipv6 is not None
        if six or self.media_ipv4 is None:
            return self.media_ipv6 or "::", self.host_for(peer_host)
        return self.media_ipv4, self.host_for(peer_host)


def _canonical(host: str) -> str:
    """An IP literal in RFC 5952 text form (what the transport reports); else as given."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def install_calls(service: Any) -> B2BUA:
    """Build the B2BUA from the service's components and settings and hook it in."""
    from pbx.media import MediaSession, PortAllocator

    settings = service.settings
    sip = settings.sip
    calls = settings.calls
    rtp = settings.rtp
    reactor = service.reactor
    local = LocalAddresses.from_bind(sip.host, sip.external_ip)
    host = local.primary
    allocator = PortAllocator(rtp.port_min, rtp.port_max)
    media_bind, media_host = local.media_for(host)
    codecs = tuple(str(getattr(c, "value", c)) for c in rtp.codecs)

    def media_factory(on_timeout: Any) -> MediaSession:
        return MediaSession(reactor, allocator, host=media_bind, advertise=media_host,
                            codecs=codecs, media_timeout=float(calls.media_timeout),
                            on_timeout=on_timeout, local_for=local.media_for,
                            learning_window=float(rtp.learning_window))

    b2bua = B2BUA(
        reactor, service.transactions, service.endpoint, service.location,
        service.registrar.authenticator, service.credentials, media_factory, service.store,
        dialplan=calls.dialplan_pattern, ring_timeout=float(calls.ring_timeout),
        max_calls=int(calls.max_calls), local_host=host, local_port=sip.port or 5060,
        user_agent=sip.user_agent, node=service.node, domain=sip.domain,
        guard=getattr(service, "guard", None),
        retry_after=int(settings.lifecycle.retry_after), local_host_for=local.host_for)
    timer = getattr(calls, "session_timer", None)  # RFC 4028 on both legs
    if timer is not None:  # (a duck-typed service without it keeps RFC 4028's defaults)
        b2bua.session_timer = TimerPolicy(enabled=bool(timer.enabled),
                                          expires=int(timer.expires),
                                          min_se=int(timer.min_se))
    b2bua.install()
    b2bua.allocator = allocator  # type: ignore[attr-defined]  # for metrics/health

    lifecycle = service.lifecycle
    lifecycle.active_work = lambda: b2bua.active_calls
    b2bua.call_ended_hooks.append(lambda _call: lifecycle.work_finished())

    def changed(old: str, new: str) -> None:
        if new == "ready" and old == "starting":
            for kind, _host, port in getattr(service.transport, "listening", []) or []:
                b2bua.transport_ports[kind] = int(port)
                if kind == "udp":
                    b2bua.local_port = int(port)
            b2bua.cdr.recover().addCallback(_recovered)

    lifecycle.subscribe(changed)
    return b2bua


def _recovered(count: Any) -> None:
    if count:
        log.warning("CDR: %s calls left open by a previous run marked interrupted", count)
