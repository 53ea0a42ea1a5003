"""SIP over UDP and TCP on Twisted (RFC 3261 §18, RFC 3581).

The transport is the only part of ``pbx.sip`` that touches sockets.  Bytes come in, the
sans-IO codec turns them into messages, Via is stamped with ``received``/``rport``, and
the message goes to the transaction layer.  Outgoing responses are routed by the top
Via (§18.2.2), reusing the TCP connection the request came on.

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
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from twisted.internet import protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP, IReactorUDP
from twisted.python.failure import Failure

from pbx.sip.abuse import SourceGuard, Verdict
from pbx.sip.errors import SIPParseError
from pbx.sip.headers import Via
from pbx.sip.message import Request, Response, StreamFramer, make_response, parse
from pbx.sip.transactions import Peer, SentResponse, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
_STATUS_KEYS = {status: str(status) for status in range(100, 700)}


class MessageHandler(TypingProtocol):
    """Where parsed messages go: the transaction layer."""

    def handle_request(self, request: Request, peer: Peer) -> None: ...

    def handle_response(self, response: Response, peer: Peer) -> None: ...


@dataclass
class TransportStats:
    """Counters the ops plane turns into metrics."""

    received: Counter[str]
    sent: Counter[str]
    dropped: Counter[str]
    bad_requests_answered: int = 0

    @classmethod
    def new(cls) -> TransportStats:
        return cls(Counter(), Counter(), Counter())


def stamp_via(request: Request, peer: Peer) -> None:
    """RFC 3261 §18.2.1 and RFC 3581: record where the request really came from.

    The top Via is parsed once (and stays cached for the transaction layer); the header
    line is rewritten only when a parameter has to be added or filled in.
    """
    top = request.top_via
    params = top.params
    host = peer.host
    fill_rport = "rport" in params and not params["rport"]
    if not fill_rport and (top.host == host or params.get("received") == host):
        return
    stamped = dict(params)
    stamped["received"] = host  # the host differs, or rport asks for it regardless
    if fill_rport:
        stamped["rport"] = str(peer.port)
    request.replace_top_via(Via(top.protocol, top.transport, top.host, top.port, stamped))


def _in_dialog(request: Request) -> bool:
    """A To tag marks an in-dialog request; REGISTER never belongs to a dialog.

    The tag is read from the parsed To header: a ``tag=`` in a display name must not
    exempt a request from the source guard.
    """
    if request.method == "REGISTER":
        return False
    try:
        return request.to.tag is not None
    except SIPParseError:
        return False


def response_destination(response: Response, fallback: Peer) -> Peer:
    """RFC 3261 §18.2.2 (with RFC 3581 rport): where a response goes without a connection."""
    try:
        via = response.top_via
    except SIPParseError:
        return fallback
    transport = via.transport.lower()
    host = via.params.get("received") or via.host
    if transport == "udp" and via.rport is not None:
        port = via.rport
        if fallback.port == port and fallback.host == host and fallback.transport == "udp":
            return fallback  # the usual case: answer where the request came from
        return Peer("udp", host, port)
    port = via.port or DEFAULT_PORTS.get(transport, 5060)
    return Peer(transport if transport in DEFAULT_PORTS else fallback.transport, host, port)


class SIPTransport:
    """Owns the sockets of one SIP listener and routes messages in and out."""

    def __init__(self, reactor: IReactorTCP | IReactorUDP, *,
                 max_message_size: int = 65535, guard: SourceGuard | None = None,
                 udp_receive_buffer: int = 4 << 20) -> None:
        """``udp_receive_buffer``: SO_RCVBUF asked for the UDP socket (the kernel caps
        it at net.core.rmem_max): requests queue there while the reactor is busy."""
        self.reactor = reactor
        self.udp_receive_buffer = udp_receive_buffer
        self.max_message_size = max_message_size
        self.guard = guard
        self.handler: MessageHandler | None = None
        self.stats = TransportStats.new()
        self.listening: list[tuple[str, str, int]] = []
        self._udp: SIPDatagramProtocol | None = None
        self._ports: list[IListeningPort] = []
        self._connections: dict[tuple[str, str, int], SIPStreamProtocol] = {}

    # -- sockets --------------------------------------------------------------------
    def listen(self, host: str, port: int) -> list[tuple[str, str, int]]:
        """Bind UDP and TCP on the same port; port 0 picks one free for both.

        Raises ``CannotListenError`` when the port is taken.
        """
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp = SIPDatagramProtocol(self)
            udp_port = self.reactor.listenUDP(port, udp, interface=host)
            _enlarge_receive_buffer(udp_port, self.udp_receive_buffer)
            bound = udp_port.getHost().port
            try:
                tcp_port = self.reactor.listenTCP(bound, SIPStreamFactory(self),
                                                  interface=host)
            except CannotListenError:
                udp_port.stopListening()
                if attempt + 1 == attempts:
                    raise
                continue
            break
        self._udp = udp
        self._ports += [udp_port, tcp_port]
        self.listening = [("udp", host, bound), ("tcp", host, tcp_port.getHost().port)]
        return self.listening

    def stop_listening(self) -> None:
        for port in self._ports:
            port.stopListening()
        self._ports.clear()
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.loseConnection()
        self._connections.clear()
        self._udp = None

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
                self.stats.received[message.method] += 1
                stamp_via(message, peer)
                if self.guard is not None and not self._admit(message, peer):
                    return
                if self.handler is not None:
                    self.handler.handle_request(message, peer)
            else:
                self.stats.received[str(message.status)] += 1
                if self.handler is not None:
                    self.handler.handle_response(message, peer)
        except Exception:
            log.exception("error handling a message from %s", peer)
            self.stats.dropped["handler_error"] += 1

    def _admit(self, request: Request, peer: Peer) -> bool:
        """Abuse defence before any transaction exists (so a refused request costs no
        state): out-of-dialog requests pass the per-source rate limit and block list.

        Rate-limited requests are dropped (answering a flood only amplifies it); a blocked
        source gets 403 or silence, as configured.
        """
        if request.method in ("ACK", "CANCEL") or _in_dialog(request):
            return True
        assert self.guard is not None
        verdict = self.guard.check(peer.host)
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
        """Answer a bad request with 400 (or 505/416/513) when its Via lets us route it."""
        request = err.partial if isinstance(err.partial, Request) else None
        try:
            if request is None or request.method == "ACK":
                raise SIPParseError("not an answerable request")
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
        self.stats.sent[request.method] += 1

    def send_response(self, response: Response, peer: Peer) -> SentResponse:
        """Send over the request's connection, else per §18.2.2; returns what was sent
        so that a transaction can repeat it with :meth:`resend_response`."""
        data = response.to_bytes()
        status = response.status
        destination = peer
        if not (peer.reliable and self._write_connection(data, peer)):
            destination = response_destination(response, peer)
            self._send(data, destination)
        self.stats.sent[_STATUS_KEYS.get(status) or str(status)] += 1
        return SentResponse(data, peer, destination, status)

    def resend_response(self, sent: SentResponse) -> None:
        """Send a response's bytes again (a server transaction absorbing a request
        retransmission)."""
        if not (sent.peer.reliable and self._write_connection(sent.data, sent.peer)):
            self._send(sent.data, sent.destination)
        self.stats.sent[_STATUS_KEYS.get(sent.status) or str(sent.status)] += 1

    def _write_connection(self, data: bytes, peer: Peer) -> bool:
        conn = self._connections.get((peer.transport, peer.host, peer.port))
        if conn is not None and conn.transport is not None:
            conn.transport.write(data)
            return True
        return False

    def _send(self, data: bytes, peer: Peer) -> None:
        if peer.transport == "udp":
            if self._udp is None or self._udp.transport is None:
                raise TransportError("UDP socket is closed")
            try:
                self._udp.transport.write(data, (peer.host, peer.port))
            except OSError as exc:
                raise TransportError(str(exc)) from exc
            return
        if peer.transport == "tcp":
            conn = self._connections.get(("tcp", peer.host, peer.port))
            if conn is not None and conn.transport is not None:
                conn.transport.write(data)
                return
            self._connect_and_send(data, peer)
            return
        raise TransportError(f"unsupported transport {peer.transport}")

    def _connect_and_send(self, data: bytes, peer: Peer) -> None:
        factory = SIPStreamFactory(self, pending=data)
        self.reactor.connectTCP(peer.host, peer.port, factory, timeout=10)

    # -- connection table -----------------------------------------------------------
    def connection_made(self, conn: SIPStreamProtocol) -> None:
        self._connections[conn.key] = conn

    def connection_lost(self, conn: SIPStreamProtocol) -> None:
        if self._connections.get(conn.key) is conn:
            del self._connections[conn.key]

    @property
    def open_connections(self) -> int:
        return len(self._connections)


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


def _peer_of(transport: str, address: IAddress) -> Peer:
    return Peer(transport, address.host, address.port)  # type: ignore[attr-defined]


class SIPDatagramProtocol(protocol.DatagramProtocol):
    """UDP: one datagram is one message (RFC 3261 §18.3)."""

    noisy = False  # we log our own one line per socket

    def __init__(self, owner: SIPTransport) -> None:
        self.owner = owner

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if not datagram.strip(b"\r\n"):
            return  # RFC 5626 keep-alive
        self.owner.message_received(datagram, Peer("udp", addr[0], addr[1]), datagram=True)


class SIPStreamProtocol(protocol.Protocol):
    """TCP: messages framed by Content-Length; the connection is reused for responses."""

    def __init__(self, owner: SIPTransport, pending: bytes | None = None) -> None:
        self.owner = owner
        self.framer = StreamFramer(max_size=owner.max_message_size)
        self.pending = pending
        self.key: tuple[str, str, int] = ("tcp", "", 0)
        self.peer = Peer("tcp", "", 0)

    def connectionMade(self) -> None:
        self.peer = _peer_of("tcp", self.transport.getPeer())
        self.key = ("tcp", self.peer.host, self.peer.port)
        self.owner.connection_made(self)
        if self.pending:
            self.transport.write(self.pending)
            self.pending = None

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except SIPParseError as err:
            # The stream cannot be re-synchronised: report and close the connection.
            log.debug("closing TCP connection from %s: %s", self.peer, err.reason)
            self.owner.stats.dropped["stream_framing"] += 1
            self.transport.loseConnection()
            return
        if self.framer.take_pings():
            self.transport.write(b"\r\n")  # RFC 5626 §3.5.1 pong
        for frame in frames:
            self.owner.message_received(frame, self.peer, datagram=False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.owner.connection_lost(self)


class SIPStreamFactory(protocol.ClientFactory):
    """Builds stream protocols for accepted and for outgoing connections."""

    noisy = False

    def __init__(self, owner: SIPTransport, pending: bytes | None = None) -> None:
        self.owner = owner
        self.pending = pending
        self.on_failure: Callable[[Failure], None] | None = None

    def buildProtocol(self, addr: IAddress) -> SIPStreamProtocol:
        proto = SIPStreamProtocol(self.owner, self.pending)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        log.info("TCP connection failed: %s", reason.getErrorMessage())
        self.owner.stats.dropped["connect_failed"] += 1
