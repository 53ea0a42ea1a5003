"""The RTP/RTCP relay: per leg one RTP and one RTCP socket, packets copied across legs.

Hot path (:meth:`RtpSocket.datagramReceived`), run for every packet: one tuple compare
against the latched source, two counter increments, the peer socket's ``sendto`` and the
QoS update.  No dict lookups, no logging, no state-machine trigger, no allocation beyond
what the QoS header read needs.  The peer's bound ``socket.sendto`` is called directly
rather than ``transport.write``: Twisted's ``write`` re-validates the address string on
every call (several µs) and raises on ``EAGAIN``, which would log once per dropped packet
under overload; here a failed send is counted and the packet dropped, as UDP would.

Latching policy (symmetric RTP, anti-hijack) — per socket:

* The source signalled in SDP (``c=`` address, ``m=`` port; ``a=rtcp`` or port+1 for
  RTCP) is accepted from the start, and media is sent back to it.
* Until a first packet has been accepted, and only within ``nat_latch_window`` seconds of
  the SDP being learned, a packet from another source latches the socket onto that
  source (the endpoint is behind NAT and sent from its public mapping): it becomes both
  the accepted source and the destination.  Only a source that can be that endpoint
  qualifies: the signalled IP with another port (a port-rewriting NAT or firewall), or
  any IP when the signalled address is not globally routable (private, CGNAT, loopback,
  link-local — the phone does not know its public address) or not an IP literal.  A
  phone that signals a public address gets no latching to a foreign IP at all.
* After the first accepted packet, or once the window has passed, the source is
  **locked**: packets from anywhere else are dropped and counted (``dropped``).  A new
  SDP naming a different address (re-INVITE) re-opens the window; the same address keeps
  the lock.
* A hold with ``c=0.0.0.0`` stops sending toward that side but keeps its lock.

Address families: each leg's sockets are bound in the family of that leg's endpoint (the
session decides, see :class:`~pbx.media.MediaSession`), so a call between an IPv4 and an
IPv6 phone relays between an IPv4 and an IPv6 socket.  An IPv6 socket's ``recvfrom``
gives ``(host, port, flowinfo, scope_id)``; rather than trimming that per packet (what
Twisted's own ``udp.Port`` does), the signalled source is stored in the same four-field
form once, when SDP is learned (:meth:`RelaySocket.address`), so the hot path's tuple
compare stays one compare.  An IPv4 address signalled toward an IPv6 socket becomes its
IPv4-mapped form (RFC 4291 §2.5.5.2), which a dual-stack ``::`` socket can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import ip_address
from time import monotonic
from typing import Any

from twisted.internet import udp
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol

from pbx.media.ports import PortAllocator, PortsExhausted
from pbx.media.qos import StreamQoS

__all__ = ["RelayLeg", "RelaySocket", "RtcpSocket", "RtpSocket", "bind_leg", "link_legs"]

log = logging.getLogger(__name__)

Address = tuple[str, int] | tuple[str, int, int, int]


class RelaySocket(DatagramProtocol):
    """One bound UDP socket of one leg; forwards what its endpoint sends to ``peer``."""

    noisy = False  # one relay socket pair per leg: no start/stop lines per call

    kind = "rtp"

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self.src: Address | None = None        # accepted source (the latch)
        self.dst: Address | None = None        # where the other leg's packets go
        self.signalled: Address | None = None  # what SDP said
        self.peer: RelaySocket | None = None
        self.sendto: Callable[[bytes, Address], Any] | None = None
        self.packets = 0
        self.octets = 0
        self.dropped = 0          # from a source other than the latched one
        self.unroutable = 0       # accepted but the other side has no destination yet
        self.send_errors = 0      # sendto failed (EAGAIN, ICMP unreachable...)
        self.latches = 0          # NAT latches performed
        self.closed = False
        self._mark = 0            # packets count when the current SDP was learned
        self._latch_until = 0.0
        self._latch_any = True    # any source IP may latch (signalled one not public)
        self.ipv6 = False         # the socket is AF_INET6
        self.wide = False         # sources arrive as IPv6 four-field tuples (RelayPort)

    def startProtocol(self) -> None:
        self.sendto = self.transport.socket.sendto  # type: ignore[union-attr]

    def address(self, host: str, port: int) -> Address:
        """``host:port`` in the form this socket's ``recvfrom`` reports and ``sendto``
        takes (set-up time only, never per packet)."""
        if not self.ipv6:
            return (host, port)
        if ":" not in host:
            host = "::ffff:" + host  # IPv4-mapped: reachable from a dual-stack socket
        return (host, port, 0, 0) if self.wide else (host, port)

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if addr == self.src:
            self.packets += 1
            self.octets += len(data)
            peer = self.peer
            dst = peer.dst  # type: ignore[union-attr]
            if dst is not None:
                try:
                    peer.sendto(data, dst)  # type: ignore[union-attr,misc]
                except OSError:
                    self.send_errors += 1
            else:
                self.unroutable += 1
        else:
            self._foreign(data, addr)

    def _foreign(self, data: bytes, addr: Address) -> None:
        """Slow path: a packet from a source other than the latched one."""
        if (not self.closed and self.packets == self._mark
                and (self._latch_any or addr[0] == self.signalled[0])  # type: ignore[index]
                and self._seconds() < self._latch_until):
            hold = self.dst is None and self.src is not None
            self.src = addr
            if not hold:
                self.dst = addr
            self.latches += 1
            log.debug("%s socket latched onto %s:%d (signalled %s)", self.kind, addr[0],
                      addr[1], self.signalled)
            self.datagramReceived(data, addr)
        else:
            self.dropped += 1

    def expect(self, host: str | None, port: int, latch_until: float) -> None:
        """Learn the source SDP signalled (host None: unknown, e.g. a host name)."""
        addr = self.address(host, port) if host is not None else None
        if addr is not None and addr == self.signalled and self.src is not None:
            self.dst = self.src  # same address again (or back from a null hold): keep lock
            return
        self.signalled = addr
        self.src = self.dst = addr
        self._mark = self.packets
        self._latch_until = latch_until
        self._latch_any = host is None or not ip_address(host).is_global

    def hold_null(self) -> None:
        """RFC 2543 hold (c=0.0.0.0): send nothing toward this side, keep the latch."""
        self.dst = None

    def shut(self) -> None:
        self.closed = True
        self.src = self.dst = None


class RtpSocket(RelaySocket):
    """The RTP socket: the relay plus per-packet QoS accounting.

    ``datagramReceived`` repeats the parent's fast path on purpose: calling it through
    ``super()`` would add a frame per packet on the hottest path of the PBX.
    """

    def __init__(self, seconds: Callable[[], float], qos: StreamQoS) -> None:
        super().__init__(seconds)
        self.qos = qos

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if addr == self.src:
            self.packets += 1
            self.octets += len(data)
            peer = self.peer
            dst = peer.dst  # type: ignore[union-attr]
            if dst is not None:
                try:
                    peer.sendto(data, dst)  # type: ignore[union-attr,misc]
                except OSError:
                    self.send_errors += 1
            else:
                self.unroutable += 1
            self.qos.update(data, monotonic())
        else:
            self._foreign(data, addr)


class RtcpSocket(RelaySocket):
    kind = "rtcp"


class RelayLeg:
    """The two sockets the PBX offers one endpoint: RTP on an even port, RTCP on port+1."""

    def __init__(self, port: int, rtp: RtpSocket, rtcp: RtcpSocket,
                 listening: list[Any]) -> None:
        self.port = port
        self.rtp = rtp
        self.rtcp = rtcp
        self._listening = listening
        self.released = False

    def expect(self, host: str | None, rtp_port: int, rtcp_host: str | None,
               rtcp_port: int, latch_until: float) -> None:
        """The endpoint's SDP: where it receives (and, symmetric RTP, sends from)."""
        if host in ("0.0.0.0", "::"):
            self.rtp.hold_null()
            self.rtcp.hold_null()
            return
        self.rtp.expect(host or None, rtp_port, latch_until)
        self.rtcp.expect(rtcp_host or None, rtcp_port, latch_until)

    @property
    def ipv6(self) -> bool:
        """Whether this leg's sockets are IPv6 (the family its endpoint was placed in)."""
        return self.rtp.ipv6

    def close(self) -> list[Any]:
        """Stop both sockets (idempotent); the Deferreds fire once they are closed."""
        self.rtp.shut()
        self.rtcp.shut()
        listening, self._listening = self._listening, []
        return [port.stopListening() for port in listening]


class RelayPort(udp.Port):
    """A UDP port that reads one datagram per readiness event.

    Twisted's ``doRead`` loops until ``recvfrom`` raises ``EAGAIN``; an RTP socket holds one
    packet per wake-up (50 packets/s), so that loop costs a raised and caught exception
    per packet.  Epoll is level-triggered: a second queued datagram simply makes the
    socket ready again on the next reactor turn.  IPv6 sources are handed on untrimmed
    (four fields; the socket's keys have that form, see :meth:`RelaySocket.address`).
    """

    maxPacketSize = 2048  # RTP stays below the MTU; a smaller buffer is cheaper to allocate

    def doRead(self) -> None:
        try:
            data, addr = self.socket.recvfrom(2048)
        except OSError:
            return  # EAGAIN, EINTR, or an ICMP error reported on the socket: nothing read
        try:
            self.protocol.datagramReceived(data, addr)
        except Exception:
            log.exception("RTP relay failed on a datagram")


def _listen(reactor: Any, port: int, protocol: RelaySocket, host: str) -> Any:
    """Bind ``host:port`` (an IPv6 literal gives an IPv6 socket, as Twisted decides)."""
    protocol.ipv6 = ":" in host
    if isinstance(reactor, PosixReactorBase):
        protocol.wide = protocol.ipv6
        listening = RelayPort(port, protocol, host, 2048, reactor)
        listening.startListening()
        return listening
    return reactor.listenUDP(port, protocol, interface=host)  # trims IPv6 sources to 2


def link_legs(a: RelayLeg, b: RelayLeg) -> None:
    """Wire a's sockets to b's: what a's endpoint sends goes out of b's socket to b."""
    a.rtp.peer, b.rtp.peer = b.rtp, a.rtp
    a.rtcp.peer, b.rtcp.peer = b.rtcp, a.rtcp


def bind_leg(reactor: Any, allocator: PortAllocator, host: str, qos: StreamQoS, *,
             attempts: int = 16) -> RelayLeg:
    """Allocate a port pair and bind it on ``host``; a busy pair is returned and skipped.

    Raises :class:`PortsExhausted` when the range is used up or ``attempts`` pairs in a
    row could not be bound (another process holds part of the range).
    """
    seconds = reactor.seconds
    for _ in range(attempts):
        port = allocator.allocate()
        rtp, rtcp = RtpSocket(seconds, qos), RtcpSocket(seconds)
        try:
            rtp_port = _listen(reactor, port, rtp, host)
        except CannotListenError:
            allocator.release(port)
            continue
        try:
            rtcp_port = _listen(reactor, port + 1, rtcp, host)
        except CannotListenError:
            rtp_port.stopListening()
            allocator.release(port)
            continue
        return RelayLeg(port, rtp, rtcp, [rtp_port, rtcp_port])
    raise PortsExhausted(f"could not bind an RTP port pair on {host} after {attempts} tries")
