"""A relayed media session: two legs' ports, SDP rewriting and the rtp_session chart.

The B2BUA owns one :class:`MediaSession` per call.  It hands every SDP body that crosses
the PBX to the session, which learns where that side wants media, returns the body to
forward (our address, the other leg's port, the codec filter) and drives the relay.
Behaviour with states lives in ``statecharts/rtp_session.yaml``; this class supplies the
callbacks.  Timers go through the injected reactor, so tests drive them with a Clock.

Offer/answer (RFC 3264) is not a chart state either: the session keeps the pending offer
(as received and as relayed) and the last answered one; :mod:`pbx.media.negotiation`
shapes each answer against its offer (m-lines kept, a codec subset with the offer's
payload numbers, a §6.1 direction, the same RTP profile: SRTP's ``a=crypto`` lines pass
through untouched), a re-offer's address takes effect only with its answer and
:meth:`MediaSession.reject_offer` forgets it (§8).  Which leg may offer when is the call
layer's per-leg ``offer_answer`` chart.

What the chart does not show: media address learning, per relay socket (see
:mod:`pbx.media.relay`).  The session feeds it from signalling: every SDP it rewrites
toward a side opens that side's learning window (the call sends that SDP at once: our
INVITE to the callee, our 18x/200 to the caller), :meth:`MediaSession.confirmed` opens
it again when a side's dialog is confirmed, and :meth:`MediaSession.expect` names the IP
a side's SIP comes from, whose media is preferred.  The payload types of every SDP of
the relayed stream form the table of what may latch (RFC 3551; RFC 3264 §6.1).

Address families: each side has its own bind address and advertised address, chosen
before :meth:`MediaSession.start` with :meth:`MediaSession.place` from that side's SIP
peer (the B2BUA knows it; ``local_for`` maps a peer host to the pair).  An IPv6 phone
thus gets an IPv6 relay socket and ``c=IN IP6`` (RFC 4566 §5.7) while the IPv4 phone
on the other end of the same call keeps IPv4; the relay copies between the two.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, ClassVar, Literal, TypedDict

from twisted.internet import defer

from pbx.media import negotiation
from pbx.media.ports import PortAllocator
from pbx.media.qos import StreamQoS, estimate_mos
from pbx.media.relay import REJECT_REASONS, RelayLeg, bind_leg, link_legs
from pbx.sip import sdp as sdplib
from pbx.statechart_timers import TimedChartModel

__all__ = ["DEFAULT_CODECS", "DirectionStats", "MediaSession", "MediaStats", "Side"]

log = logging.getLogger(__name__)

DEFAULT_CODECS = ("PCMU", "PCMA", "G722", "telephone-event")
Side = Literal["a", "b"]
_OTHER: dict[str, Side] = {"a": "b", "b": "a"}
MAX_SIP_HOSTS = 4  # preferred SIP peer IPs per side (forks of one call): a bounded set


class DirectionStats(TypedDict):
    """QoS of what one side sends (``a_to_b``: packets from a, relayed to b)."""

    packets: int
    bytes: int
    lost: int
    loss_pct: float
    jitter_ms: float
    mos: float | None
    rtcp_packets: int
    dropped: int
    latched: str | None
    latches: int
    rebinds: int
    rejected: dict[str, int]


class MediaStats(TypedDict):
    a_to_b: DirectionStats
    b_to_a: DirectionStats


class MediaSession(TimedChartModel):
    """RTP relay for one call; see the module docstring and the rtp_session chart."""

    chart_name: ClassVar[str] = "rtp_session"

    def __init__(
        self,
        reactor: Any,
        allocator: PortAllocator,
        host: str = "127.0.0.1",
        advertise: str | None = None,
        *,
        codecs: Iterable[str] = DEFAULT_CODECS,
        media_timeout: float = 60.0,
        hold_timeout: float | None = 3600.0,
        learning_window: float = 5.0,
        nat_latch_window: float | None = None,
        on_timeout: Callable[[MediaSession], Any] | None = None,
        reap_delay: float = 32.0,
        bind_attempts: int = 16,
        local_for: Callable[[str], tuple[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self.clock = reactor
        self.reactor = reactor
        self.allocator = allocator
        self.host = host
        self.advertise = advertise or host
        self.local_for = local_for
        # Per side: (bind address, advertised address); place() changes one side.
        self.local: dict[str, tuple[str, str]] = {
            "a": (host, self.advertise), "b": (host, self.advertise)}
        self.codecs = tuple(codecs)
        self.media_timeout = media_timeout
        self.hold_timeout = hold_timeout
        # Sampling four times per timeout bounds detection to [T, 1.25 T] of silence.
        self.media_check_interval = media_timeout / 4.0
        self.hold_check_interval = hold_timeout / 4.0 if hold_timeout else None
        # rtp.learning_window; nat_latch_window is its former name, still accepted.
        self.learning_window = (learning_window if nat_latch_window is None
                                else nat_latch_window)
        # Payload types negotiated in any SDP of the relayed stream: what may latch.
        self.payload_types = bytearray(128)
        self._sip_hosts: dict[str, tuple[str, ...]] = {"a": (), "b": ()}
        self.on_timeout = on_timeout
        self.reap_delay = reap_delay
        self.bind_attempts = bind_attempts
        self.legs: dict[str, RelayLeg] = {}
        self.qos: dict[str, StreamQoS] = {"a": StreamQoS(), "b": StreamQoS()}
        self._index: int | None = None      # the relayed m-line
        self._held = False
        # RFC 3264 offer/answer: the offer awaiting its answer, the last answered one
        # (later answers to it: 183 then 200, forks) and (m-line, negotiated direction).
        self._pending: _Offer | None = None
        self._answered: _Offer | None = None
        self._current: tuple[int, str] | None = None
        self._sess_id = str(random.getrandbits(62))
        self._origins: dict[str, sdplib.Origin] = {}
        self._last_sent: dict[str, bytes] = {}
        self._idle_since = 0.0
        self._last_count = -1
        self._closing: list[Any] = []
        self.started_at: float | None = None
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self._timed_out = False

    # -- public API ---------------------------------------------------------------------
    def place(self, side: Side, peer_host: str | None) -> None:
        """Put ``side``'s relay socket in the address family of its SIP peer (before
        :meth:`start`); without ``local_for`` or a peer host the defaults stay."""
        if self.state != "allocating":
            raise RuntimeError("place() after start()")
        if self.local_for is not None and peer_host:
            self.local[side] = self.local_for(peer_host)

    def expect(self, side: Side, sip_host: str | None) -> None:
        """``side``'s SIP comes from ``sip_host`` (its NAT's public address when it is
        behind one): RTP/RTCP from that IP is preferred when learning.  Callable before
        or after :meth:`start`; a few hosts per side are kept (one per fork target)."""
        literal = _literal(sip_host)
        if literal is None or literal in ("0.0.0.0", "::"):
            return
        hosts = tuple(h for h in self._sip_hosts[side] if h != literal)
        self._sip_hosts[side] = (*hosts, literal)[-MAX_SIP_HOSTS:]
        if side in self.legs:
            self.legs[side].sip_hosts(self._sip_hosts[side])

    def confirmed(self, side: Side, sip_host: str | None = None) -> None:
        """``side``'s dialog is confirmed (the callee's 200; our 200 to the caller, and
        its ACK): learning re-opens for ``learning_window`` s, so a phone that was silent
        while ringing is not locked to its SDP address.  ``sip_host`` (the answering
        fork's) replaces the side's preferred SIP hosts."""
        if sip_host is not None:
            self._sip_hosts[side] = ()
            self.expect(side, sip_host)
        leg = self.legs.get(side)
        if leg is not None and self.state not in ("closed", "timed_out"):
            leg.confirm(self.clock.seconds(), self.learning_window)

    def start(self) -> None:
        """Bind both legs' port pairs (PortsExhausted propagates, leaving nothing held)."""
        if self.state != "allocating":
            raise RuntimeError(f"media session already started (state {self.state})")
        try:
            for side in ("a", "b"):
                self.legs[side] = bind_leg(self.reactor, self.allocator, self.local[side][0],
                                           self.qos[side], attempts=self.bind_attempts,
                                           payload_types=self.payload_types)
                self.legs[side].sip_hosts(self._sip_hosts[side])
        except Exception:
            self.fire("close")
            raise
        link_legs(self.legs["a"], self.legs["b"])
        self.started_at = self.clock.seconds()
        self.fire("allocated")

    def offer_from_a(self, sdp: bytes) -> bytes:
        """The caller's offer (INVITE) rewritten for the callee."""
        return self.offer("a", sdp)

    def answer_from_b(self, sdp: bytes) -> bytes:
        """The callee's answer (183/200) rewritten for the caller; the session goes active."""
        return self.answer("b", sdp)

    def reoffer(self, side: Side, sdp: bytes) -> bytes:
        """A re-INVITE's offer from ``side``; hold (sendonly/inactive/c=0) or resume."""
        return self.offer(side, sdp)

    def reanswer(self, side: Side, sdp: bytes) -> bytes:
        """The answer ``side`` gives to a re-offer, rewritten for the other side."""
        return self.answer(side, sdp)

    def offer(self, side: Side, sdp: bytes) -> bytes:
        """Any offer from ``side`` (also an offerless INVITE's: the 2xx's offer from b).

        RFC 3264 §8: a re-offer changes nothing until it is answered (:meth:`answer`) and
        :meth:`reject_offer` forgets it; only the first offer of the session, for which
        there is nothing to keep, is learned at once (early media may come before any
        answer is relayed).  Raises :class:`~pbx.media.negotiation.NegotiationError`
        (304) when no codec of ours is offered.
        """
        self._require_open()
        parsed = sdplib.parse(sdp)
        index = _pick_stream(parsed)
        negotiation.require_codec(parsed.media[index], self.codecs)
        out = self._rewrite(side, parsed, index)
        self._pending = _Offer(side, parsed, sdplib.parse(out), index)
        if self._current is None:
            self._learn(side, parsed, index)
            self._pending.learned = True
        return out

    def answer(self, side: Side, sdp: bytes) -> bytes:
        """Any answer from ``side`` to the pending offer; the first one makes the session
        active.  The answer relayed is shaped by :func:`negotiation.shape_answer` (the
        offer's m-lines, a subset of its codecs, a §6.1 direction, the same profile);
        the session's hold state is the direction negotiated by offer *and* answer.
        Several answers to one offer (183 then 200, or another fork's) are allowed."""
        self._require_open()
        offer = self._pending or self._answered
        if offer is None or offer.side == side:
            raise sdplib.SDPError("answer without an offer")
        parsed = sdplib.parse(sdp)
        shaped = negotiation.shape_answer(offer.sent, parsed, offer.index)
        if not offer.learned:
            self._learn(offer.side, offer.received, offer.index)
            offer.learned = True
        self._learn(side, shaped, offer.index)
        out = self._rewrite(side, shaped, offer.index)
        offered = offer.received.media[offer.index]
        direction = negotiation.negotiated_direction(
            negotiation.media_direction(offer.received, offered),
            negotiation.media_direction(shaped, shaped.media[offer.index]))
        self._current = (offer.index, direction)
        self._answered, self._pending = offer, None
        self._index = offer.index
        self._held = direction != "sendrecv"
        if self.state == "waiting":
            self.answered_at = self.clock.seconds()
        self.fire("answered")
        self._sync_hold()
        return out

    def reject_offer(self, side: Side | None = None) -> None:
        """The pending offer (from ``side``, if given) failed (a re-INVITE's non-2xx):
        it is forgotten and the session keeps the addresses, codecs and direction of the
        last completed exchange (RFC 3264 §8; RFC 6337 §3.1)."""
        pending = self._pending
        if pending is not None and (side is None or pending.side == side):
            self._pending = None

    @property
    def direction(self) -> str | None:
        """The relayed stream's negotiated direction seen from the last offerer."""
        return self._current[1] if self._current is not None else None

    def close(self) -> defer.Deferred[Any]:
        """Stop relaying and release every port exactly once; idempotent.

        The Deferred fires once the sockets are closed (ports reusable by another process).
        """
        if self.state != "closed":
            self.fire("close")
        return defer.DeferredList(list(self._closing))

    def local_port(self, side: Side) -> int:
        """The RTP port the PBX offers ``side`` (RTCP is the next one)."""
        return self.legs[side].port

    @property
    def ports(self) -> dict[str, int]:
        return {side: leg.port for side, leg in self.legs.items()}

    @property
    def stats(self) -> MediaStats:
        return {"a_to_b": self._direction("a"), "b_to_a": self._direction("b")}

    def summary(self) -> dict[str, Any]:
        """JSON-able QoS summary for the CDR: both directions and the worse MOS."""
        stats = self.stats
        scores = [d["mos"] for d in stats.values() if d["mos"] is not None]
        return {
            "state": self.state,
            "codecs": list(self.codecs),
            "a_to_b": dict(stats["a_to_b"]),
            "b_to_a": dict(stats["b_to_a"]),
            "mos": min(scores) if scores else None,
            "timed_out": self._timed_out,
        }

    # -- chart callbacks ----------------------------------------------------------------
    def reset_idle(self) -> None:
        self._last_count = self._packet_count()
        self._idle_since = self.clock.seconds()

    def media_idle(self) -> bool:
        """Guard of media_check: no packet for the state's timeout (counters sampled)."""
        count = self._packet_count()
        now = self.clock.seconds()
        if count != self._last_count:
            self._last_count = count
            self._idle_since = now
            return False
        limit = self.media_timeout if self.state == "active" else self.hold_timeout
        return limit is not None and now - self._idle_since >= limit

    def notify_timeout(self) -> None:
        self._timed_out = True
        log.info("media timeout on ports %s after %.0f s without packets", self.ports,
                 self.clock.seconds() - self._idle_since)
        if self.on_timeout is not None:
            try:
                self.on_timeout(self)
            except Exception:
                log.exception("media session on_timeout callback failed")

    def release_ports(self) -> None:
        self.cancel_timers()
        # The callback is usually a bound method of the call, which holds this session:
        # a closed session never times out, so letting go of it breaks that cycle.
        self.on_timeout = None
        self.ended_at = self.clock.seconds()
        for leg in self.legs.values():
            if leg.released:
                continue
            leg.released = True
            self._closing.extend(leg.close())
            self.allocator.release(leg.port)

    # -- internals ----------------------------------------------------------------------
    def _require_open(self) -> None:
        if self.state in ("allocating", "closed", "timed_out"):
            raise RuntimeError(f"media session is {self.state}")

    def _packet_count(self) -> int:
        total = 0
        for leg in self.legs.values():
            total += leg.rtp.packets
            if self.state == "on_hold":
                total += leg.rtcp.packets
        return total

    def _sync_hold(self) -> None:
        if self._held and self.state == "active":
            self.fire("hold")
        elif not self._held and self.state == "on_hold":
            self.fire("resume")

    def _learn(self, side: Side, parsed: sdplib.SessionDescription, index: int) -> None:
        """Where ``side`` wants media, from its SDP (an offer or answer in effect)."""
        media = parsed.media[index]
        host = sdplib.connection_address(parsed, media)
        rtcp_host, rtcp_port = host, media.port + 1
        for name, value in media.attributes():
            if name == "rtcp" and value:
                fields = value.split()
                if fields[0].isascii() and fields[0].isdigit() and int(fields[0]) <= 65535:
                    rtcp_port = int(fields[0])
                    if len(fields) == 4:
                        rtcp_host = fields[3]
        leg, bind = self.legs[side], self.local[side][0]
        leg.expect(_reachable(_literal(host), leg.ipv6, bind), media.port,
                   _reachable(_literal(rtcp_host), leg.ipv6, bind), rtcp_port,
                   self.clock.seconds() + self.learning_window)

    def _rewrite(self, side: Side, parsed: sdplib.SessionDescription, index: int) -> bytes:
        """The SDP from ``side`` as the other side gets it (our address and port)."""
        other = _OTHER[side]
        media = parsed.media[index]
        out = sdplib.rewrite_media(parsed, index, address=self.local[other][1],
                                   port=self.legs[other].port,
                                   origin=self._origin(other, 0), codecs=self.codecs)
        table = self.payload_types
        for pt in media.formats:
            if pt.isascii() and pt.isdigit() and int(pt) < 128:
                table[int(pt)] = 1
        # Our SDP toward ``other`` is sent now (INVITE, 18x, 200, re-INVITE and answers):
        # that side can start sending from its real address.
        self.legs[other].open_window(self.clock.seconds(), self.learning_window)
        self._tune_qos(side, out, index)
        key = sdplib.serialize(out)
        if other in self._last_sent and key != self._last_sent[other]:
            self._origins[other] = replace(self._origins[other],
                                           version=self._origins[other].version + 1)
        self._last_sent[other] = key
        out.origin = self._origins[other]
        return sdplib.serialize(out)

    def _origin(self, side: str, version: int) -> sdplib.Origin:
        """Our o= line toward ``side`` (we are the offerer/answerer each leg sees)."""
        if side not in self._origins:
            address = self.local[side][1]
            self._origins[side] = sdplib.Origin("pbx", self._sess_id, 1, "IN",
                                                "IP6" if ":" in address else "IP4", address)
        return replace(self._origins[side], version=version)

    def _tune_qos(self, side: str, sdp: sdplib.SessionDescription, index: int) -> None:
        """Clock rate of the side's preferred codec and its telephone-event PT."""
        media = sdp.media[index]
        table = sdplib.rtpmap(media)
        qos = self.qos[side]
        for pt in media.formats:
            name, rate = table[pt]
            if name == "TELEPHONE-EVENT":
                qos.event_pt = int(pt) if pt.isdigit() else -1
            elif name != "CN" and rate and qos.received == 0:
                qos.clock_rate = rate

    def _direction(self, side: str) -> DirectionStats:
        qos = self.qos[side]
        snap = qos.snapshot()
        leg = self.legs.get(side)
        rtp_packets = leg.rtp.packets if leg else 0
        latched = leg.rtp.src if leg and leg.rtp.latches else None
        return {
            "packets": rtp_packets,
            "bytes": leg.rtp.octets if leg else 0,
            "lost": snap["lost"],
            "loss_pct": snap["loss_pct"],
            "jitter_ms": snap["jitter_ms"],
            "mos": estimate_mos(snap["loss_pct"], snap["jitter_ms"]) if rtp_packets else None,
            "rtcp_packets": leg.rtcp.packets if leg else 0,
            "dropped": (leg.rtp.dropped + leg.rtcp.dropped) if leg else 0,
            "latched": _hostport(latched[0], latched[1]) if latched else None,
            "latches": (leg.rtp.latches + leg.rtcp.latches) if leg else 0,
            "rebinds": (leg.rtp.rebinds + leg.rtcp.rebinds) if leg else 0,
            "rejected": ({r: leg.rtp.rejected[r] + leg.rtcp.rejected[r]
                          for r in REJECT_REASONS} if leg else dict.fromkeys(REJECT_REASONS, 0)),
        }


class _Offer:
    """One offer as received from ``side`` and as sent on; ``learned``: its address is
    in effect."""

    __slots__ = ("index", "learned", "received", "sent", "side")

    def __init__(self, side: Side, received: sdplib.SessionDescription,
                 sent: sdplib.SessionDescription, index: int) -> None:
        self.side = side
        self.received = received
        self.sent = sent
        self.index = index
        self.learned = False


def _pick_stream(sdp: sdplib.SessionDescription) -> int:
    """The relayed stream: the first RTP audio m-line that is not disabled."""
    for i, media in enumerate(sdp.media):
        if media.kind == "audio" and media.port != 0 and media.is_rtp:
            return i
    raise sdplib.SDPError("no audio stream in the offer")


def _hostport(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host bracketed (the RFC 3986 authority form)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _literal(host: str | None) -> str | None:
    """An IP literal the relay can compare source tuples with, else None (latch only).

    RFC 5952 text form; an IPv4-mapped IPv6 address is given as its IPv4 address (the
    relay socket maps it back if it is IPv6).
    """
    if host in ("0.0.0.0", "::"):
        return host
    if host is None or not sdplib.is_ip_address(host):
        return None
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def _reachable(literal: str | None, ipv6: bool, bind: str) -> str | None:
    """``literal`` if the leg's socket can send to it, else None (latching only).

    An IPv4 socket cannot reach an IPv6 address; an IPv6 socket reaches IPv4 addresses
    (IPv4-mapped, RFC 4291 §2.5.5.2) only when bound dual-stack on ``::``.  A mismatch
    means the phone signalled media in another family than it uses for SIP.
    """
    if literal is None or literal in ("0.0.0.0", "::"):
        return literal
    if (":" in literal) == ipv6 or (ipv6 and bind == "::"):
        return literal
    log.info("media address %s is not reachable from a relay socket on %s; "
             "relaying to the latched source only", literal, bind)
    return None
