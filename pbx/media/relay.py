"""The RTP/RTCP relay: per leg one RTP and one RTCP socket, packets copied across legs.

Hot path (:meth:`RtpSocket.datagramReceived`), run for every packet: one tuple compare
against the latched source, two counter increments, the peer socket's ``sendto`` and the
QoS update.  No dict lookups, no logging, no state-machine trigger, no allocation beyond
what the QoS header read needs.  The peer's bound ``socket.sendto`` is called directly
rather than ``transport.write``: Twisted's ``write`` re-validates the address string on
every call (several µs) and raises on ``EAGAIN``, which would log once per dropped packet
under overload; here a failed send is counted and the packet dropped, as UDP would.

Learning policy (symmetric RTP, RFC 4961; anti-hijack) — per socket.  This is the state
the rtp_session chart does not show: it changes on packet arrival, per socket, and the
hot path never fires a trigger.

* **Accepted from the start**: the source signalled in SDP (``c=`` address, ``m=`` port;
  ``a=rtcp`` or port+1 for RTCP); media is sent back to it.  It takes the fast path.
* **Learning window**: opened (``learning_window`` seconds) when the side's SDP is
  learnt, when *our* SDP is sent to the side (the caller in our 18x/200, the callee in
  our INVITE) and again when the side's dialog is confirmed (its 200; our 200 to the
  caller).  A caller cannot send before it has our answer and a ringing phone may stay
  silent, so each of those moments gives the phone a fresh window.  The window closes
  when it runs out; a packet from the accepted source locks the socket at once.
* **Who may latch** while the window is open, from another source than the accepted
  one, and only with a packet that looks like what was negotiated (RTP version 2 with a
  payload type from the session's SDP, RFC 3550 §5.1 / RFC 3551; RTCP version 2 with a
  packet type of 200-207, RFC 5761 §4):

  - a **preferred** source — the IP signalled in SDP (any port: a port-rewriting NAT)
    or an IP the side's SIP comes from (its NAT's public address, given by the call
    through :meth:`MediaSession.expect`) — latches at once;
  - a **third** IP only when the signalled address is not globally routable (the phone
    does not know its public address), only once the side's dialog is confirmed, and
    ``THIRD_PARTY_GRACE`` s after the latest opening of the window (the real phone,
    which has our SDP by then, speaks first if it can), and only
    tentatively: a preferred source still takes the latch while the window is open.
    RTCP never latches a third IP on its own: it follows the IP its RTP socket took.
    So while the real phone sends from its SDP or SIP address, a third IP never wins,
    and nobody latches while the call rings.

* **Locked** once the accepted source has spoken since the window opened: packets from
  anywhere else are dropped and counted by reason (``rejected``).  The one exception is
  a **NAT rebinding** (RTP): the latched stream's SSRC with continuing sequence numbers
  from a new address, after the latched source has been silent for ``REBIND_SILENCE``
  seconds while the new one kept sending.  RTCP follows the IP its RTP socket latched
  or rebound onto.  A re-INVITE naming a new address re-learns; the same address keeps
  the lock.  A hold with ``c=0.0.0.0`` stops sending toward that side, keeps its lock.

None of this runs on the fast path: an accepted packet costs one tuple compare as
before; the rules run only for a packet from another source than the accepted one.

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
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from struct import Struct
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

# Why a packet was not relayed: the bounded label set of pbx_rtp_rejected_packets_total.
REJECT_REASONS = ("malformed", "payload_type", "window_closed", "unverified", "locked")
THIRD_PARTY_GRACE = 1.0   # s after confirmation before a third IP may latch
REBIND_SILENCE = 0.5      # s the latched source must be silent before a rebinding
REBIND_SEQ_WINDOW = 100   # sequence numbers a rebinding may skip (lost packets)
_unpack_header = Struct("!BBHII").unpack_from  # RFC 3550 §5.1 fixed header, no CSRCs


class _Learning:
    """A socket's address-learning state, read only off the hot path.

    A separate slotted object, not socket attributes: CPython 3.11 keeps an instance's
    attributes inline (and its attribute loads specialised) only while the class's
    shared key table stays small (30 keys); the hot path's ``self.src``/``self.packets``
    must not pay for the learning rules.
    """

    __slots__ = ("cand", "cand_at", "cand_count", "cand_seq", "confirmed", "follow",
                 "mark", "preferred", "sip_hosts", "tentative", "third_after", "third_ok",
                 "window_until")

    def __init__(self) -> None:
        self.preferred: frozenset[str] = frozenset()  # SDP c= and SIP peer IPs
        self.sip_hosts: frozenset[str] = frozenset()
        self.mark = 0              # the socket's packet count when the window last opened
        self.window_until = 0.0
        self.third_ok = True       # a third IP may latch (the signalled one is not public)
        self.confirmed = False     # the side's dialog is confirmed (third IPs considered)
        self.third_after: float | None = None  # last opening + grace, once confirmed
        self.tentative = False     # latched onto a third IP: a preferred one may still win
        self.follow: str | None = None  # RTCP: the IP its RTP socket latched onto
        self.cand: Address | None = None  # rebinding candidate (RTP)
        self.cand_at = 0.0
        self.cand_count = 0
        self.cand_seq = 0


class RelaySocket(DatagramProtocol):
    """One bound UDP socket of one leg; forwards what its endpoint sends to ``peer``.

    The learning rules (module docstring) live in :meth:`_foreign`, reached only when a
    packet's source is not the accepted one; :meth:`datagramReceived` is the hot path.
    """

    noisy = False  # one relay socket pair per leg: no start/stop lines per call

    kind = "rtp"
    # Whether a third IP may latch this socket on its own (after the grace).  RTCP may
    # not: its first report comes 2.5-5 s in (RFC 3550 §6.2), long after any grace, so a
    # third IP is trusted for RTCP only once its RTP socket latched onto that IP.
    third_party = True

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self.src: Address | None = None        # accepted source (the latch)
        self.dst: Address | None = None        # where the other leg's packets go
        self.signalled: Address | None = None  # what SDP said
        self.peer: RelaySocket | None = None
        self.partner: RelaySocket | None = None  # the same leg's RTCP socket (from RTP)
        self.sendto: Callable[[bytes, Address], Any] | None = None
        self.packets = 0
        self.octets = 0
        self.dropped = 0          # not relayed: from a source other than the accepted one
        self.unroutable = 0       # accepted but the other side has no destination yet
        self.send_errors = 0      # sendto failed (EAGAIN, ICMP unreachable...)
        self.latches = 0          # learnt sources other than the signalled one
        self.rebinds = 0          # NAT rebindings followed (same SSRC, new address)
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.closed = False
        self._l = _Learning()     # slow-path state, kept off the instance dict (see _Learning)
        self.ipv6 = False         # the socket is AF_INET6
        self.wide = False         # sources arrive as IPv6 four-field tuples (RelayPort)

    def startProtocol(self) -> None:
        self.sendto = self.transport.socket.sendto  # type: ignore[union-attr]

    @property
    def preferred(self) -> frozenset[str]:
        """The IPs whose sources latch at once: the SDP ``c=`` IP and the SIP peers'."""
        return self._l.preferred

    def address(self, host: str, port: int) -> Address:
        """``host:port`` in the form this socket's ``recvfrom`` reports and ``sendto``
        takes (set-up time only, never per packet)."""
        if not self.ipv6:
            return (host, port)
        return (self.host_form(host), port, 0, 0) if self.wide else (self.host_form(host), port)

    def host_form(self, host: str) -> str:
        """The IP as this socket's sources name it (IPv4-mapped on an IPv6 socket)."""
        if self.ipv6 and ":" not in host:
            return "::ffff:" + host  # IPv4-mapped: reachable from a dual-stack socket
        return host

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

    # -- learning (slow path: a source other than the accepted one) ----------------------
    def check(self, data: bytes) -> str | None:
        """Why ``data`` may not latch, or None: an RTCP packet is version 2 with a packet
        type of 200-207 (RFC 3550 §6.4, RFC 5761 §4 ranges)."""
        if len(data) < 8 or data[0] >> 6 != 2:
            return "malformed"
        if not 200 <= data[1] <= 207:
            return "payload_type"
        return None

    def _foreign(self, data: bytes, addr: Address) -> None:
        """A packet from a source other than the accepted one: learn, rebind or drop."""
        if self.closed:
            self._reject("locked")
            return
        now = self._seconds()
        if self.packets != self._l.mark:  # the accepted source spoke since the window opened
            if (self._l.tentative and now < self._l.window_until
                    and (addr[0] in self.preferred or addr[0] == self._l.follow)):
                reason = self.check(data)
                if reason is None:
                    self._latch(data, addr, False)
                    return
            elif self._rebind(data, addr, now):
                return
            self._reject("locked")
            return
        if now >= self._l.window_until:
            if not self._rebind(data, addr, now):
                self._reject("window_closed")
            return
        reason = self.check(data)
        if reason is not None:
            self._reject(reason)
        elif addr[0] in self.preferred or addr[0] == self._l.follow:
            self._latch(data, addr, False)
        elif (self.third_party and self._l.third_ok and self._l.third_after is not None
              and now >= self._l.third_after):
            self._latch(data, addr, True)
        else:
            self._reject("unverified")

    def _reject(self, reason: str) -> None:
        self.dropped += 1
        self.rejected[reason] += 1

    def _latch(self, data: bytes, addr: Address, tentative: bool) -> None:
        self._move(addr)
        self.latches += 1
        self._l.tentative = tentative
        log.debug("%s socket latched onto %s:%d (signalled %s)", self.kind, addr[0],
                  addr[1], self.signalled)
        self.datagramReceived(data, addr)

    def _move(self, addr: Address) -> None:
        """Accept ``addr`` as the source and, symmetric RTP (RFC 4961), as destination."""
        hold = self.dst is None and self.src is not None
        self.src = addr
        if not hold:
            self.dst = addr
        self._l.cand = None
        if self.partner is not None:
            self.partner._l.follow = addr[0]

    def _rebind(self, data: bytes, addr: Address, now: float) -> bool:
        """RTCP follows its RTP socket: once RTP latched or rebound onto another IP, the
        first valid RTCP packet from that IP takes the RTCP latch."""
        follow = self._l.follow
        if (follow is None or addr[0] != follow or self.src is None
                or self.src[0] == follow or self.check(data) is not None):
            return False
        self._move(addr)
        self._l.follow = None
        self.rebinds += 1
        self.datagramReceived(data, addr)
        return True

    # -- signalling input ---------------------------------------------------------------
    def open_window(self, now: float, window: float) -> None:
        """(Re)open learning for ``window`` s: the source last accepted must speak again
        to stay locked, so silence during ringing never locks onto a dead address.

        Once the dialog is confirmed, each opening also restarts the grace before a third
        IP may latch: the real phone, which now has our SDP, gets to speak first."""
        self._l.window_until = max(self._l.window_until, now + window)
        self._l.mark = self.packets
        self._l.cand = None
        if self._l.confirmed:
            self._l.third_after = now + min(THIRD_PARTY_GRACE, window / 2.0)

    def confirm(self, now: float, window: float) -> None:
        """The side's dialog is confirmed: re-open the window; from now on a third IP may
        latch (tentatively) after the grace, if the phone is still silent then."""
        self._l.confirmed = True
        self.open_window(now, window)

    def sip_hosts(self, hosts: Iterable[str]) -> None:
        """The IPs the side's SIP comes from (its NAT's public address): preferred."""
        self._l.sip_hosts = frozenset(self.host_form(h) for h in hosts)
        self._prefer()

    def _prefer(self) -> None:
        signalled = self.signalled
        hosts = self._l.sip_hosts
        self._l.preferred = hosts | {signalled[0]} if signalled is not None else hosts

    def expect(self, host: str | None, port: int, latch_until: float) -> None:
        """Learn the source SDP signalled (host None: unknown, e.g. a host name)."""
        addr = self.address(host, port) if host is not None else None
        if addr is not None and addr == self.signalled and self.src is not None:
            self.dst = self.src  # same address again (or back from a null hold): keep lock
            return
        self.signalled = addr
        self.src = self.dst = addr
        self._l.tentative = False
        self._l.third_ok = host is None or not ip_address(host).is_global
        self._prefer()
        now = self._seconds()
        self.open_window(now, latch_until - now)

    def hold_null(self) -> None:
        """RFC 2543 hold (c=0.0.0.0): send nothing toward this side, keep the latch."""
        self.dst = None

    def shut(self) -> None:
        """Stop relaying for good.  The links to the other leg's socket and to the RTCP
        partner go too: the legs point at each other, and a cycle would outlive the call
        until a full collection.  A late packet has no source to match (``src`` is None)
        and ``_foreign`` drops it before anything else, so neither link is needed."""
        self.closed = True
        self.src = self.dst = None
        self.peer = self.partner = None


class RtpSocket(RelaySocket):
    """The RTP socket: the relay plus per-packet QoS accounting.

    ``datagramReceived`` repeats the parent's fast path on purpose: calling it through
    ``super()`` would add a frame per packet on the hottest path of the PBX.
    ``payload_types`` is the session's table of negotiated payload types (shared by both
    RTP sockets, updated in place as SDP is learnt).
    """

    kind = "rtp"

    def __init__(self, seconds: Callable[[], float], qos: StreamQoS,
                 payload_types: bytearray | None = None) -> None:
        super().__init__(seconds)
        self.qos = qos
        self.payload_types = payload_types if payload_types is not None else bytearray(128)

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

    def check(self, data: bytes) -> str | None:
        """RTP version 2 (RFC 3550 §5.1) with a payload type from the negotiated SDP
        (RFC 3551 static or an rtpmap'd dynamic one); RTCP on the RTP port, PT 72-76
        (RFC 5761 §4), is only accepted if negotiated, which it never is."""
        if len(data) < 12 or data[0] >> 6 != 2:
            return "malformed"
        if not self.payload_types[data[1] & 0x7F]:
            return "payload_type"
        return None

    def _rebind(self, data: bytes, addr: Address, now: float) -> bool:
        """NAT rebinding: the latched stream's SSRC, its sequence numbers continuing
        (within ``REBIND_SEQ_WINDOW``), from a new address, after the latched source has
        been silent for ``REBIND_SILENCE`` while the new one kept sending.

        The SSRC is 32 random bits (RFC 3550 §8) that an off-path attacker does not see;
        two sources sending the same SSRC at once are a collision or a loop (§8.2), never
        a reason to switch, hence the silence condition.
        """
        if self.check(data) is not None:
            return False
        qos = self.qos
        _first, _second, seq, _ts, ssrc = _unpack_header(data)
        if ssrc != qos.ssrc:
            return False
        if self._l.cand != addr:
            if not 0 < (seq - qos.max_seq) & 0xFFFF <= REBIND_SEQ_WINDOW:
                return False
            self._l.cand, self._l.cand_at, self._l.cand_seq = addr, now, seq
            self._l.cand_count = self.packets
            return False
        if not 0 < (seq - self._l.cand_seq) & 0xFFFF <= REBIND_SEQ_WINDOW:
            return False
        self._l.cand_seq = seq
        if self.packets != self._l.cand_count:  # the latched source still speaks
            self._l.cand_at, self._l.cand_count = now, self.packets
            return False
        if now - self._l.cand_at < REBIND_SILENCE:
            return False
        log.info("rtp socket follows a NAT rebinding of SSRC %08x: %s -> %s", ssrc,
                 self.src, addr)
        self._move(addr)
        self.rebinds += 1
        self._l.tentative = False
        self.datagramReceived(data, addr)
        return True


class RtcpSocket(RelaySocket):
    """The RTCP socket: relayed as is; learns preferred IPs and the one RTP latched."""

    kind = "rtcp"
    third_party = False


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

    def open_window(self, now: float, window: float) -> None:
        """Our SDP went to this endpoint: it may start sending now (learn ``window`` s)."""
        self.rtp.open_window(now, window)
        self.rtcp.open_window(now, window)

    def confirm(self, now: float, window: float) -> None:
        """The endpoint's dialog is confirmed (RFC 3261 §13.2.2.4 / §13.3.1.4)."""
        self.rtp.confirm(now, window)
        self.rtcp.confirm(now, window)

    def sip_hosts(self, hosts: Iterable[str]) -> None:
        """Where the endpoint's SIP comes from: sources at these IPs are preferred."""
        hosts = tuple(hosts)
        self.rtp.sip_hosts(hosts)
        self.rtcp.sip_hosts(hosts)

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
             attempts: int = 16, payload_types: bytearray | None = None) -> RelayLeg:
    """Allocate a port pair and bind it on ``host``; a busy pair is returned and skipped.

    Raises :class:`PortsExhausted` when the range is used up or ``attempts`` pairs in a
    row could not be bound (another process holds part of the range).
    """
    seconds = reactor.seconds
    for _ in range(attempts):
        port = allocator.allocate()
        rtp, rtcp = RtpSocket(seconds, qos, payload_types), RtcpSocket(seconds)
        rtp.partner = rtcp
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
