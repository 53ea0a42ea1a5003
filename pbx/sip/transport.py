"""SIP over UDP, TCP and TLS on Twisted (RFC 3261 §18, RFC 3581, RFC 5626 keep-alives).

The transport is the only part of ``pbx.sip`` that touches sockets.  Bytes come in, the
sans-IO codec turns them into messages, the top Via is stamped with the *real* source
(``received``/``rport``), and the message goes to the transaction layer.

What a sender writes about itself is never used to route (RFC 3261 §18.2.2 read with
§26.1.5's reflection concerns, as Kamailio's ``force_rport`` does):

- a UDP request is answered over UDP to the address and port it came from;
- a TCP/TLS request is answered on the connection it came on; when that is gone, over
  a new connection of the *same* transport to the request's source IP (at the sent-by
  port, the only part of the Via that cannot point elsewhere).

Stream connections and their limits live in :mod:`pbx.sip.stream`; TLS contexts in
:mod:`pbx.sip.tls`.  A listener on ``::`` is dual-stack: IPv4 peers are seen as plain
IPv4 addresses and reached through IPv4-mapped addresses on the same socket.

Nothing a peer sends may stop the server: every failure is answered with a 400 where the
request can be answered, otherwise dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime

from pbx.sip.abuse import SourceGuard, Verdict
from pbx.sip.errors import SIPParseError
from pbx.sip.headers import Via
from pbx.sip.message import Request, Response, make_response, parse
from pbx.sip.methods import method_label, status_label
from pbx.sip.stream import (
    ConnectionTable,
    SIPStreamFactory,
    SIPStreamProtocol,
    StreamLimits,
    normalize_host,
)
from pbx.sip.tls import client_context
from pbx.sip.transactions import Peer, SentResponse, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
STREAM_TRANSPORTS = ("tcp", "tls")


class MessageHandler(TypingProtocol):
    """Where parsed messages go: the transaction layer."""

    def handle_request(self, request: Request, peer: Peer) -> None: ...

    def handle_response(self, response: Response, peer: Peer) -> None: ...


@dataclass
class TransportStats:
    """Counters the ops plane turns into metrics (every key set is bounded)."""

    received: Counter[str]
    sent: Counter[str]
    dropped: Counter[str]
    bad_requests_answered: int = 0
    connections_refused: Counter[str] = field(default_factory=Counter)

    @classmethod
    def new(cls) -> TransportStats:
        return cls(Counter(), Counter(), Counter())


def stamp_via(request: Request, peer: Peer) -> None:
    """RFC 3261 §18.2.1 and RFC 3581 §4: record where the request really came from.

    ``received`` is set whenever the sent-by host differs from the source, and a
    ``received`` the sender wrote itself is overwritten; ``rport`` (when present, with
    or without a value) is set to the real source port.  The top Via is parsed once
    (and stays cached for the transaction layer); the header line is rewritten only
    when something has to change.
    """
    top = request.top_via
    params = top.params
    host = peer.host
    has_rport = "rport" in params
    claimed = params.get("received")
    rport_ok = not has_rport or params["rport"] == str(peer.port)
    if rport_ok and ((claimed is None and _same_host(top.host, host)) or claimed == host):
        return
    stamped = dict(params)
    if claimed is not None or not _same_host(top.host, host) or has_rport:
        stamped["received"] = host
    if has_rport:
        stamped["rport"] = str(peer.port)
    request.replace_top_via(Via(top.protocol, top.transport, top.host, top.port, stamped))


def _same_host(sent_by: str, source: str) -> bool:
    if sent_by == source:
        return True
    return ":" in sent_by and normalize_host(sent_by) == source


def _in_dialog(request: Request, dialog_exists: Callable[[str, str, str], bool] | None
               ) -> bool:
    """Does ``request`` belong to a dialog that exists (RFC 3261 §12.2.2)?

    A To tag alone proves nothing: anyone can invent one, and a request for an unknown
    dialog only earns a 481.  So a request is exempt from the source guard only when
    ``dialog_exists(call_id, to_tag, from_tag)`` (the B2BUA's dialog table) knows its
    dialog; without that lookup nothing is exempt.  REGISTER never belongs to a dialog.
    The tag is read from the parsed To header (a ``tag=`` in a display name is not one).
    """
    if dialog_exists is None or request.method == "REGISTER":
        return False
    try:
        to_tag = request.to.tag
        if to_tag is None:
            return False
        return dialog_exists(request.call_id, to_tag, request.from_.tag or "")
    except SIPParseError:
        return False


def response_destination(response: Response, peer: Peer) -> Peer:
    """Where a response goes when it cannot use the request's connection.

    UDP: the request's source, always.  TCP/TLS: the same transport to the request's
    source IP, at the Via's sent-by port (RFC 3261 §18.2.2) or the transport's default;
    never to a ``received``/``maddr`` host or another transport the sender names.
    """
    if peer.transport == "udp":
        return peer
    port = DEFAULT_PORTS.get(peer.transport, 5060)
    with contextlib.suppress(SIPParseError):
        port = response.top_via.port or port
    return Peer(peer.transport, peer.host, port)


class SIPTransport:
    """Owns the sockets of one SIP listener and routes messages in and out."""

    def __init__(self, reactor: Any, *, max_message_size: int = 65535,
                 guard: SourceGuard | None = None, udp_receive_buffer: int = 4 << 20,
                 limits: StreamLimits | None = None, clock: IReactorTime | None = None
                 ) -> None:
        """``udp_receive_buffer``: SO_RCVBUF asked for the UDP socket (the kernel caps
        it at net.core.rmem_max): requests queue there while the reactor is busy.
        ``limits``: stream connection caps and deadlines (``max_message_size`` wins for
        the read buffer).  ``clock``: for the connection deadlines (default: reactor)."""
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.udp_receive_buffer = udp_receive_buffer
        self.max_message_size = max_message_size
        base = limits or StreamLimits()
        self.limits = StreamLimits(base.max_connections, base.max_per_source,
                                   base.header_timeout, base.idle_timeout,
                                   base.max_write_buffer, max_message_size)
        self.guard = guard
        self.handler: MessageHandler | None = None
        self.stats = TransportStats.new()
        self.listening: list[tuple[str, str, int]] = []
        self.tls_context: Any = None
        self._udp: SIPDatagramProtocol | None = None
        self._udp_v6 = False
        self._ports: list[IListeningPort] = []
        #: each ``listening`` entry with the port object that serves it (for sockets_up)
        self._bound: list[tuple[tuple[str, str, int], IListeningPort]] = []
        self._connections = ConnectionTable(self.limits)
        self._connecting: dict[tuple[str, str, int], SIPStreamFactory] = {}

    # -- sockets --------------------------------------------------------------------
    def listen(self, host: str, port: int) -> list[tuple[str, str, int]]:
        """Bind UDP and TCP on the same port; port 0 picks one free for both.

        ``::`` is dual-stack (IPv4 peers arrive IPv4-mapped).  Raises
        ``CannotListenError`` when the port is taken.
        """
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp = SIPDatagramProtocol(self)
            udp_port = self.reactor.listenUDP(port, udp, interface=host,
                                              maxPacketSize=self.max_message_size + 1)
            _enlarge_receive_buffer(udp_port, self.udp_receive_buffer)
            bound = udp_port.getHost().port
            try:
                tcp_port = self.reactor.listenTCP(bound, SIPStreamFactory(self, "tcp"),
                                                  interface=host)
            except CannotListenError:
                udp_port.stopListening()
                if attempt + 1 == attempts:
                    raise
                continue
            break
        self._udp = udp
        self._udp_v6 = ":" in host
        self._ports += [udp_port, tcp_port]
        self.listening = [("udp", host, bound), ("tcp", host, tcp_port.getHost().port)]
        self._bound = [(self.listening[0], udp_port), (self.listening[1], tcp_port)]
        return list(self.listening)

    def listen_tls(self, host: str, port: int, context: Any) -> tuple[str, str, int]:
        """Serve SIP over TLS (RFC 3261 §26.2.1) with ``context`` (see
        :class:`pbx.sip.tls.ReloadableServerContext`); port 0 picks a free one."""
        tls_port = self.reactor.listenSSL(port, SIPStreamFactory(self, "tls"), context,
                                          interface=host)
        self.tls_context = context
        self._ports.append(tls_port)
        entry = ("tls", host, tls_port.getHost().port)
        self.listening.append(entry)
        self._bound.append((entry, tls_port))
        return entry

    def stop_listening(self) -> None:
        """Close every listening socket and stream; ``listening`` empties with them, so
        readiness (which reads :meth:`sockets_up`) fails from this moment on."""
        for port in self._ports:
            port.stopListening()
        self._ports.clear()
        self._bound.clear()
        self.listening = []
        for conn in self._connections.values():
            if conn.transport is not None:
                conn.transport.loseConnection()
        self._connections.clear()
        self._udp = None

    def sockets_up(self) -> list[tuple[str, str, int]]:
        """The ``listening`` entries whose port object still holds an open socket.

        ``listening`` is what was bound; this asks the ports themselves (``connected``,
        not ``disconnecting``, a valid file descriptor), so a socket closed by any path,
        not only :meth:`stop_listening`, drops out of readiness.
        """
        return [entry for entry, port in self._bound if _port_open(port)]

    # -- inbound --------------------------------------------------------------------
    def message_received(self, data: bytes, peer: Peer, *, datagram: bool) -> None:
        """Entry point for one framed message; never raises."""
        try:
            message = parse(data, datagram=datagram, max_size=self.max_message_size)
        except SIPParseError as err:
            self._reject(err, peer)
            return
        except Exception:  # the codec promises SIPParseError only; stay up regardless
            log.exception("codec failure on a message from %s", peer)
            self.stats.dropped["codec_failure"] += 1
            return
        try:
            if isinstance(message, Request):
                self.stats.received[method_label(message.method)] += 1
                stamp_via(message, peer)
                if self.guard is not None and not self._admit(message, peer):
                    return
                if self.handler is not None:
                    self.handler.handle_request(message, peer)
            else:
                self.stats.received[status_label(message.status)] += 1
                if self.handler is not None:
                    self.handler.handle_response(message, peer)
        except Exception:
            log.exception("error handling a message from %s", peer)
            self.stats.dropped["handler_error"] += 1

    def _admit(self, request: Request, peer: Peer) -> bool:
        """Abuse defence before any transaction exists (so a refused request costs no
        state): out-of-dialog requests pass the per-source rate limit and block list.

        Rate-limited requests are dropped (answering a flood only amplifies it); a blocked
        source gets 403 or silence, as configured.  Only requests of dialogs that exist
        skip the guard (see :func:`_in_dialog`): a To tag is not a pass.  ACK is never
        answered, so it is not limited; a CANCEL is (each one may earn a 481).
        """
        guard = self.guard
        assert guard is not None
        if request.method == "ACK" or _in_dialog(request, guard.dialog_exists):
            return True
        verdict = guard.check(peer.host)
        if verdict is Verdict.ALLOW:
            return True
        if verdict is Verdict.REJECT:
            with contextlib.suppress(TransportError):
                self.send_response(make_response(request, 403, "Forbidden",
                                                 to_tag=secrets.token_hex(6)), peer)
            self.stats.dropped["blocked_rejected"] += 1
        elif verdict is Verdict.DROP:
            self.stats.dropped["blocked_dropped"] += 1
        else:
            self.stats.dropped["rate_limited"] += 1
        return False

    def _reject(self, err: SIPParseError, peer: Peer) -> None:
        """Answer a bad request with 400 (or 505/416/513) to its real source, when it has
        a readable top Via (the response must carry it, §8.2.6)."""
        request = err.partial if isinstance(err.partial, Request) else None
        try:
            if request is None or request.method == "ACK":
                raise SIPParseError("not an answerable request")
            if self.guard is not None and self.guard.check(peer.host) is not Verdict.ALLOW:
                # Garbage from a flooding or blocked source is not worth a 400 each.
                self.stats.dropped["unparseable_limited"] += 1
                return
            stamp_via(request, peer)  # needs a readable top Via, else unanswerable
            response = make_response(request, err.status, err.reason,
                                     to_tag=secrets.token_hex(6))
            self.send_response(response, peer)
        except (SIPParseError, TransportError) as exc:
            log.debug("dropped a bad message from %s: %s (%s)", peer, err.reason, exc)
            self.stats.dropped["unparseable"] += 1
            return
        self.stats.bad_requests_answered += 1

    # -- outbound (MessageSender) ---------------------------------------------------
    def send_request(self, request: Request, peer: Peer) -> None:
        self._send(request.to_bytes(), peer)
        self.stats.sent[method_label(request.method)] += 1

    def send_response(self, response: Response, peer: Peer) -> SentResponse:
        """Send on the request's connection, else per :func:`response_destination`;
        returns what was sent so a transaction can repeat it (:meth:`resend_response`)."""
        data = response.to_bytes()
        status = response.status
        destination = peer
        if not (peer.reliable and self._write_connection(data, peer)):
            destination = response_destination(response, peer)
            self._send(data, destination)
        self.stats.sent[status_label(status)] += 1
        return SentResponse(data, peer, destination, status)

    def resend_response(self, sent: SentResponse) -> None:
        """Send a response's bytes again (a server transaction absorbing a request
        retransmission)."""
        if not (sent.peer.reliable and self._write_connection(sent.data, sent.peer)):
            self._send(sent.data, sent.destination)
        self.stats.sent[status_label(sent.status)] += 1

    def _write_connection(self, data: bytes, peer: Peer) -> bool:
        conn = self._connections.get((peer.transport, peer.host, peer.port))
        if conn is not None and conn.transport is not None and conn.closing is None:
            conn.write(data)
            return True
        return False

    def _send(self, data: bytes, peer: Peer) -> None:
        transport = peer.transport
        if transport == "udp":
            udp = self._udp
            if udp is None or udp.transport is None:
                raise TransportError("UDP socket is closed")
            host = peer.host
            if ":" in host:
                if not self._udp_v6:
                    raise TransportError(f"no IPv6 SIP socket for {host}")
            elif self._udp_v6:
                host = "::ffff:" + host  # dual-stack socket (RFC 4291 §2.5.5.2)
            try:
                udp.transport.write(data, (host, peer.port))
            except OSError as exc:
                raise TransportError(str(exc)) from exc
            return
        if transport in STREAM_TRANSPORTS:
            if self._write_connection(data, peer):
                return
            self._connect_and_send(data, peer)
            return
        raise TransportError(f"unsupported transport {transport}")

    def _connect_and_send(self, data: bytes, peer: Peer) -> None:
        """Open a connection of ``peer``'s transport (one per destination at a time; what
        is sent meanwhile is queued, up to the write-buffer cap)."""
        key = (peer.transport, peer.host, peer.port)
        factory = self._connecting.get(key)
        if factory is not None:
            if not factory.queue(data):
                raise TransportError(f"{peer.transport} connection to {peer} backlogged")
            return
        if peer.transport == "tls" and self.tls_context is None:
            raise TransportError("SIP over TLS is not enabled")
        if len(self._connections) + len(self._connecting) >= self.limits.max_connections:
            self._refused("max_connections_outbound")
            raise TransportError("connection table full")
        factory = SIPStreamFactory(self, peer.transport, destination=peer,
                                   on_failed=self._connect_failed)
        factory.queue(data)
        self._connecting[key] = factory
        if peer.transport == "tls":
            self.reactor.connectSSL(peer.host, peer.port, factory, client_context(),
                                    timeout=10)
        else:
            self.reactor.connectTCP(peer.host, peer.port, factory, timeout=10)

    def connect_finished(self, destination: Peer, factory: SIPStreamFactory) -> None:
        key = (destination.transport, destination.host, destination.port)
        if self._connecting.get(key) is factory:
            del self._connecting[key]

    def _connect_failed(self, destination: Peer, why: str) -> None:
        """§17.1.4: tell the transactions at once, not when Timer B runs out."""
        callback: Callable[[Peer], None] | None = getattr(self.handler, "connection_failed",
                                                          None)
        if callback is not None:
            try:
                callback(destination)
            except Exception:
                log.exception("connection_failed handler")

    # -- connection table -----------------------------------------------------------
    def accept_connection(self, kind: str, address: IAddress) -> bool:
        """Caps and the block list, checked before a protocol exists."""
        host = normalize_host(address.host)  # type: ignore[attr-defined]
        refusal = self._connections.refusal(host)
        if refusal is None and self.guard is not None and self.guard.is_blocked(host):
            refusal = "blocked_source"
        if refusal is not None:
            self._refused(refusal)
            log.debug("refused a %s connection from %s: %s", kind.upper(), host, refusal)
            return False
        return True

    def _refused(self, why: str) -> None:
        self.stats.connections_refused[why] += 1

    def connection_made(self, conn: SIPStreamProtocol) -> None:
        self._connections.add(conn)

    def connection_lost(self, conn: SIPStreamProtocol) -> None:
        self._connections.remove(conn)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def connection_counts(self) -> dict[str, int]:
        """Open stream connections per transport (both always listed, for metrics)."""
        counts = dict.fromkeys(STREAM_TRANSPORTS, 0)
        for conn in self._connections.values():
            counts[conn.kind] = counts.get(conn.kind, 0) + 1
        return counts

    def connections_from(self, host: str) -> int:
        return self._connections.per_source(host)

    def reload_tls(self) -> bool:
        """Reload the TLS certificate (SIGHUP); False when TLS is off or the reload failed."""
        context = self.tls_context
        return bool(context is not None and context.reload())


def _enlarge_receive_buffer(port: IListeningPort, size: int) -> None:
    """Best effort: a few thousand datagrams of room instead of the default ~200 KB, so
    a burst (or a pause of the reactor) is queued rather than dropped, and answered
    before the peer retransmits."""
    sock = getattr(port, "socket", None)
    if sock is None or size <= 0:
        return
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class SIPDatagramProtocol(protocol.DatagramProtocol):
    """UDP: one datagram is one message (RFC 3261 §18.3); up to ``max_message_size``
    bytes are read (a larger datagram is cut there and refused as too large)."""

    noisy = False  # we log our own one line per socket

    def __init__(self, owner: SIPTransport) -> None:
        self.owner = owner

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if not datagram.strip(b"\r\n"):
            return  # RFC 5626 keep-alive
        host = addr[0]
        if ":" in host:
            host = normalize_host(host)
        self.owner.message_received(datagram, Peer("udp", host, addr[1]), datagram=True)


def _port_open(port: IListeningPort) -> bool:
    """Whether a Twisted listening port still holds its socket (and is not closing)."""
    if not getattr(port, "connected", True) or getattr(port, "disconnecting", False):
        return False
    fileno = getattr(port, "fileno", None)
    try:
        return fileno is None or fileno() >= 0
    except Exception:  # a closed socket object may raise instead of returning -1
        return False
