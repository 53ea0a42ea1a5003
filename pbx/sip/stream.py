"""SIP over stream transports (TCP, TLS): framing, per-connection limits, the table.

RFC 3261 §18.3 frames messages by Content-Length; RFC 5626 §3.5.1 adds CRLF keep-alives.
A listener that faces the internet must also bound what one peer can hold, so every
connection here has, by construction:

- a read buffer no larger than ``max_message_size`` (the framer refuses more and the
  connection is closed, since a stream cannot be re-synchronised);
- a *message deadline*: a message (header and body) must be complete ``header_timeout``
  seconds after its first byte (slow-header attacks);
- an *idle deadline*: a connection silent for ``idle_timeout`` seconds is closed; any
  bytes, including CRLF keep-alives, count as traffic;
- a write-buffer cap: once Twisted pauses us (its buffer is full because the peer does
  not read) more than ``max_write_buffer`` further bytes drop the connection.

Both deadlines share one ``DelayedCall`` per connection that is re-armed only when it
fires, so the receive path costs a clock read, not a timer reset.  The
:class:`ConnectionTable` caps connections in total and per source (an IPv6 /64 is one
source), refusing at accept, before a protocol object exists.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from pbx.sip.abuse import source_key
from pbx.sip.errors import SIPParseError
from pbx.sip.message import StreamFramer
from pbx.sip.transactions import Peer

if TYPE_CHECKING:
    from pbx.sip.transport import SIPTransport

__all__ = [
    "ConnectionTable",
    "SIPStreamFactory",
    "SIPStreamProtocol",
    "StreamLimits",
    "normalize_host",
]

log = logging.getLogger(__name__)

ConnectionKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Mirror of ``pbx.config.SipTcpSettings`` plus the message size cap."""

    max_connections: int = 1024
    max_per_source: int = 32
    header_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_write_buffer: int = 262_144
    max_message_size: int = 65535

    @classmethod
    def from_settings(cls, sip: Any) -> StreamLimits:
        tcp = sip.tcp
        return cls(int(tcp.max_connections), int(tcp.max_per_source),
                   float(tcp.header_timeout), float(tcp.idle_timeout),
                   int(tcp.max_write_buffer), int(sip.max_message_size))


def normalize_host(host: str) -> str:
    """The address a socket reports, in the form the rest of the PBX compares.

    A dual-stack (``::``) socket reports IPv4 peers as IPv4-mapped IPv6
    (``::ffff:192.0.2.1``, RFC 4291 §2.5.5.2); they are IPv4 peers.  IPv6 is kept in its
    RFC 5952 text form, without brackets.
    """
    if ":" not in host:
        return host
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    try:
        return ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0]).compressed
    except ValueError:
        return host


class ConnectionTable:
    """Open stream connections by ``(transport, host, port)``, counted per source."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._by_key: dict[ConnectionKey, SIPStreamProtocol] = {}
        self._per_source: Counter[str] = Counter()

    def refusal(self, host: str) -> str | None:
        """Why a new inbound connection from ``host`` must be refused, or None."""
        if len(self._by_key) >= self.limits.max_connections:
            return "max_connections"
        if self._per_source[source_key(host)] >= self.limits.max_per_source:
            return "max_per_source"
        return None

    def add(self, conn: SIPStreamProtocol) -> None:
        self._per_source[source_key(conn.peer.host)] += 1
        old = self._by_key.get(conn.key)
        self._by_key[conn.key] = conn
        if old is not None and old is not conn:
            old.counted = False  # replaced: its loss must not uncount the new one
            self._release_source(old.peer.host)
        conn.counted = True

    def remove(self, conn: SIPStreamProtocol) -> None:
        if not conn.counted:
            return
        conn.counted = False
        self._release_source(conn.peer.host)
        if self._by_key.get(conn.key) is conn:
            del self._by_key[conn.key]

    def _release_source(self, host: str) -> None:
        key = source_key(host)
        left = self._per_source[key] - 1
        if left > 0:
            self._per_source[key] = left
        else:
            del self._per_source[key]

    def get(self, key: ConnectionKey) -> SIPStreamProtocol | None:
        return self._by_key.get(key)

    def values(self) -> list[SIPStreamProtocol]:
        return list(self._by_key.values())

    def per_source(self, host: str) -> int:
        return self._per_source.get(source_key(host), 0)

    def __len__(self) -> int:
        return len(self._by_key)

    def clear(self) -> None:
        for conn in self.values():
            conn.counted = False
        self._by_key.clear()
        self._per_source.clear()


@implementer(IPushProducer)
class SIPStreamProtocol(protocol.Protocol):
    """One TCP or TLS connection: framed messages in, bounded writes out."""

    def __init__(self, owner: SIPTransport, kind: str, pending: list[bytes] | None = None
                 ) -> None:
        self.owner = owner
        self.kind = kind  # 'tcp' | 'tls'
        self.limits: StreamLimits = owner.limits
        self.framer = StreamFramer(max_size=self.limits.max_message_size)
        self.pending = pending
        self.key: ConnectionKey = (kind, "", 0)
        self.peer = Peer(kind, "", 0)
        self.counted = False
        self.closing: str | None = None
        self.last_activity = 0.0
        self.message_started: float | None = None
        self.paused_bytes: int | None = None  # bytes written since Twisted paused us
        self._timer: IDelayedCall | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = Peer(self.kind, normalize_host(address.host), address.port)
        self.key = (self.kind, self.peer.host, self.peer.port)
        self.last_activity = self.owner.clock.seconds()
        self.transport.registerProducer(self, True)
        self.owner.connection_made(self)
        self._arm(self.last_activity + self.limits.idle_timeout)
        pending, self.pending = self.pending, None
        for data in pending or ():
            self.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.owner.connection_lost(self)

    def drop(self, why: str, *, graceful: bool = False) -> None:
        """Close for a limit or a framing error, counted once under ``why``.

        Limits abort (a peer that does not read would hold a graceful close open for
        ever); a framing error closes gracefully, flushing what was already written.
        """
        if self.closing is not None or self.transport is None:
            return
        self.closing = why
        self.owner.stats.dropped[why] += 1
        log.debug("closing %s connection from %s: %s", self.kind.upper(), self.peer, why)
        if graceful and self.paused_bytes is None:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    # -- receiving ----------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.closing is not None:
            return
        now = self.owner.clock.seconds()
        self.last_activity = now
        framer = self.framer
        try:
            frames = framer.feed(data)
        except SIPParseError as err:
            log.debug("%s framing error from %s: %s", self.kind, self.peer, err.reason)
            self.drop("stream_framing", graceful=True)
            return
        if framer.take_pings():
            self.write(b"\r\n")  # RFC 5626 §3.5.1 pong
        if framer.message_pending:
            if self.message_started is None or frames:
                self.message_started = now
                self._arm(now + self.limits.header_timeout)
        else:
            self.message_started = None
        for frame in frames:
            self.owner.message_received(frame, self.peer, datagram=False)
            if self.closing is not None:
                return

    # -- deadlines ----------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return  # fires earlier; it re-arms for what is due then
            timer.cancel()
        clock = self.owner.clock
        self._timer = clock.callLater(max(0.0, when - clock.seconds()), self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        if self.closing is not None or self.transport is None:
            return
        now = self.owner.clock.seconds()
        limits = self.limits
        if (self.message_started is not None
                and now >= self.message_started + limits.header_timeout):
            self.drop("header_timeout")
            return
        idle_at = self.last_activity + limits.idle_timeout
        if now >= idle_at:
            self.drop("idle_timeout")
            return
        due = idle_at
        if self.message_started is not None:
            due = min(due, self.message_started + limits.header_timeout)
        self._arm(due)

    # -- sending --------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Write, unless the peer has stopped reading for longer than the cap allows."""
        if self.closing is not None or self.transport is None:
            return
        if self.paused_bytes is not None:
            self.paused_bytes += len(data)
            if self.paused_bytes > self.limits.max_write_buffer:
                self.drop("write_buffer_full")
                return
        self.transport.write(data)

    # IPushProducer: Twisted pauses us when its write buffer is full.
    def pauseProducing(self) -> None:
        if self.paused_bytes is None:
            self.paused_bytes = 0

    def resumeProducing(self) -> None:
        self.paused_bytes = None

    def stopProducing(self) -> None:
        self.paused_bytes = None


class SIPStreamFactory(protocol.ClientFactory):
    """Builds stream protocols: accepted ones (``destination`` None) after the
    connection caps and the block list, and outgoing ones for one destination."""

    noisy = False

    def __init__(self, owner: SIPTransport, kind: str, *, destination: Peer | None = None,
                 on_failed: Callable[[Peer, str], None] | None = None) -> None:
        self.owner = owner
        self.kind = kind
        self.destination = destination
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.on_failed = on_failed

    def buildProtocol(self, addr: IAddress) -> SIPStreamProtocol | None:
        if self.destination is None and not self.owner.accept_connection(self.kind, addr):
            return None  # Twisted closes the socket at once
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        proto = SIPStreamProtocol(self.owner, self.kind, pending)
        proto.factory = self
        if self.destination is not None:
            self.owner.connect_finished(self.destination, self)
        return proto

    def queue(self, data: bytes) -> bool:
        """Hold ``data`` until the connection is up; False when the cap is reached."""
        if self.pending_bytes + len(data) > self.owner.limits.max_write_buffer:
            return False
        self.pending.append(data)
        self.pending_bytes += len(data)
        return True

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        log.info("%s connection to %s failed: %s", self.kind.upper(), self.destination,
                 reason.getErrorMessage())
        self.owner.stats.dropped["connect_failed"] += 1
        self.pending = []
        if self.destination is not None:
            self.owner.connect_finished(self.destination, self)
            if self.on_failed is not None:
                self.on_failed(self.destination, reason.getErrorMessage())
