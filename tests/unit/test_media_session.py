"""MediaSession on a fake reactor: chart states, SDP rewriting, latching, timeouts, close.

``FakeReactor`` is a ``task.Clock`` that also "binds" UDP ports: it records which
ports are bound, can refuse some (busy), and captures what each socket sends.  The
property test of the session machine reuses it.  Real sockets are in
tests/integration/test_media_relay.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from pbx.media import MediaSession, PortAllocator, PortsExhausted, SDPError
from pbx.sip.sdp import direction, parse


class FakeSocket:
    def __init__(self, reactor: FakeReactor, port: int) -> None:
        self.reactor, self.port = reactor, port

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.reactor.sent.append((self.port, data, addr))
        return len(data)


class FakePort:
    def __init__(self, reactor: FakeReactor, port: int, protocol: Any) -> None:
        self.reactor, self.port, self.protocol = reactor, port, protocol
        self.socket = FakeSocket(reactor, port)

    def stopListening(self) -> defer.Deferred[None]:
        self.reactor.bound.pop(self.port)
        self.reactor.unbound.append(self.port)
        return defer.succeed(None)


class FakeReactor(Clock):
    """A Clock with listenUDP: bound ports, busy ports and sent datagrams recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: dict[int, FakePort] = {}
        self.busy: set[int] = set()
        self.unbound: list[int] = []
        self.sent: list[tuple[int, bytes, tuple[str, int]]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> FakePort:
        if port in self.busy or port in self.bound:
            raise CannotListenError(interface, port, OSError("in use"))
        fake = FakePort(self, port, protocol)
        self.bound[port] = fake
        protocol.makeConnection(fake)
        return fake


def sdp(port: int, host: str = "192.0.2.1", attrs: str = "a=sendrecv",
        formats: str = "0 8 101", conn: str | None = None) -> bytes:
    return (f"v=0\r\no=ep 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {conn or host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {formats}\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"{attrs}\r\n").encode()


def rtp(seq: int, pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq, seq * 160, 77) + b"\xff" * 160


def run_for(reactor: Clock, seconds: float, step: float = 0.5) -> None:
    """Advance in small steps, as a real clock would (one big advance fires a repeating
    timer only once)."""
    for _ in range(round(seconds / step)):
        reactor.advance(step)


A = ("192.0.2.1", 4000)
B = ("192.0.2.2", 6000)


@pytest.fixture
def reactor() -> FakeReactor:
    return FakeReactor()


def make(reactor: FakeReactor, alloc: PortAllocator | None = None, **kw: Any) -> MediaSession:
    kw.setdefault("media_timeout", 20.0)
    return MediaSession(reactor, alloc or PortAllocator(30000, 30099), host="10.0.0.5",
                        advertise="203.0.113.7", **kw)


def connected(reactor: FakeReactor, **kw: Any) -> MediaSession:
    session = make(reactor, **kw)
    session.start()
    session.offer_from_a(sdp(A[1], A[0]))
    session.answer_from_b(sdp(B[1], B[0]))
    return session


def test_start_binds_rtp_and_rtcp_for_both_legs(reactor: FakeReactor) -> None:
    session = make(reactor)
    assert session.state == "allocating"
    session.start()
    assert session.state == "waiting"
    a, b = session.local_port("a"), session.local_port("b")
    assert sorted(reactor.bound) == sorted([a, a + 1, b, b + 1])
    assert a % 2 == 0 and b % 2 == 0 and a != b


class FirstFree:
    """An allocator rng that always picks the first free pair (deterministic order)."""

    def randrange(self, _n: int) -> int:
        return 0


def test_a_busy_pair_is_skipped_and_handed_back(reactor: FakeReactor) -> None:
    alloc = PortAllocator(30000, 30099, rng=FirstFree())  # type: ignore[arg-type]
    reactor.busy = {30001}  # RTCP of the first pair
    session = make(reactor, alloc)
    session.start()
    assert 30000 not in session.ports.values()
    assert alloc.in_use == 2 and not alloc.is_allocated(30000)
    assert 30000 in reactor.unbound  # the RTP half was bound, then closed again


def test_exhaustion_propagates_and_leaves_nothing_held(reactor: FakeReactor) -> None:
    alloc = PortAllocator(30000, 30001)  # one pair: leg b cannot get one
    session = make(reactor, alloc)
    with pytest.raises(PortsExhausted):
        session.start()
    assert session.state == "closed"
    assert alloc.in_use == 0 and alloc.released_total == 1 and not reactor.bound


def test_offer_and_answer_are_rewritten_toward_the_relay(reactor: FakeReactor) -> None:
    session = make(reactor, codecs=("PCMA", "telephone-event"))
    session.start()
    for_b = parse(session.offer_from_a(sdp(A[1], A[0])))
    assert for_b.media[0].port == session.local_port("b")
    assert for_b.connection is not None and for_b.connection.host == "203.0.113.7"
    assert for_b.media[0].formats == ["8", "101"]
    assert for_b.origin.address == "203.0.113.7"
    assert session.state == "waiting"
    for_a = parse(session.answer_from_b(sdp(B[1], B[0], formats="8 101")))
    assert for_a.media[0].port == session.local_port("a")
    assert session.state == "active"


def test_unusable_offer_raises_and_keeps_waiting(reactor: FakeReactor) -> None:
    session = make(reactor, codecs=("G722",))
    session.start()
    with pytest.raises(SDPError):
        session.offer_from_a(sdp(A[1], A[0]))
    assert session.state == "waiting"
    with pytest.raises(SDPError):
        session.answer_from_b(sdp(B[1], B[0]))  # no offer yet
    with pytest.raises(SDPError):
        session.offer_from_a(b"v=0\r\nnonsense")


def test_origin_version_bumps_only_when_the_body_changes(reactor: FakeReactor) -> None:
    session = connected(reactor)
    first = parse(session.reoffer("b", sdp(B[1], B[0]))).origin
    same = parse(session.reoffer("b", sdp(B[1], B[0]))).origin
    changed = parse(session.reoffer("b", sdp(B[1], B[0], attrs="a=sendonly"))).origin
    assert first.version == same.version
    assert changed.version == same.version + 1
    assert changed.sess_id == first.sess_id


def test_packets_flow_both_ways_only_from_the_signalled_sources(reactor: FakeReactor) -> None:
    session = connected(reactor)
    a_leg, b_leg = session.legs["a"], session.legs["b"]
    a_leg.rtp.datagramReceived(rtp(1), A)
    b_leg.rtp.datagramReceived(rtp(1), B)
    assert reactor.sent == [(b_leg.port, rtp(1), B), (a_leg.port, rtp(1), A)]
    a_leg.rtcp.datagramReceived(b"\x81\xc8rtcp", (A[0], A[1] + 1))
    assert reactor.sent[-1] == (b_leg.port + 1, b"\x81\xc8rtcp", (B[0], B[1] + 1))
    reactor.sent.clear()
    a_leg.rtp.datagramReceived(rtp(2), ("198.51.100.66", 4000))  # a hijack attempt
    assert reactor.sent == [] and session.stats["a_to_b"]["dropped"] == 1
    stats = session.stats
    assert stats["a_to_b"]["packets"] == 1 and stats["b_to_a"]["bytes"] == 172


def test_nat_latch_within_window_then_lock(reactor: FakeReactor) -> None:
    session = connected(reactor, nat_latch_window=2.0)
    public = ("198.51.100.9", 31337)
    session.legs["a"].rtp.datagramReceived(rtp(1), public)  # ringing: a third IP waits
    assert reactor.sent == []
    session.confirmed("a")  # our 200 to the caller; the grace passes in silence
    reactor.advance(1.0)
    session.legs["a"].rtp.datagramReceived(rtp(1), public)
    assert reactor.sent[-1][2] == B
    session.legs["b"].rtp.datagramReceived(rtp(1), B)
    assert reactor.sent[-1][2] == public  # symmetric RTP: back to where a sends from
    session.legs["a"].rtp.datagramReceived(rtp(2), A)  # the signalled one is preferred
    assert session.stats["a_to_b"]["latched"] == "192.0.2.1:4000"
    reactor.advance(2.0)  # the window has closed: locked now
    session.legs["a"].rtp.datagramReceived(rtp(3), public)
    assert session.stats["a_to_b"]["dropped"] == 2
    assert session.stats["a_to_b"]["rejected"]["locked"] == 1


def test_a_public_signalled_address_only_latches_a_new_port_of_the_same_ip(
        reactor: FakeReactor) -> None:
    session = make(reactor, nat_latch_window=2.0)
    session.start()
    public_a = ("81.2.69.160", 4000)
    session.offer_from_a(sdp(public_a[1], public_a[0]))
    session.answer_from_b(sdp(B[1], B[0]))
    session.legs["a"].rtp.datagramReceived(rtp(1), ("198.51.100.66", 4000))  # another IP
    assert reactor.sent == [] and session.stats["a_to_b"]["dropped"] == 1
    session.legs["a"].rtp.datagramReceived(rtp(2), ("81.2.69.160", 5555))  # port remapped
    assert reactor.sent[-1][2] == B
    assert session.stats["a_to_b"]["latched"] == "81.2.69.160:5555"


def test_no_latch_after_the_window(reactor: FakeReactor) -> None:
    session = connected(reactor, nat_latch_window=2.0)
    reactor.advance(2.5)
    session.legs["b"].rtp.datagramReceived(rtp(1), ("198.51.100.9", 1))
    assert reactor.sent == []
    session.legs["b"].rtp.datagramReceived(rtp(1), B)
    assert len(reactor.sent) == 1


def test_hold_and_resume_follow_reoffers(reactor: FakeReactor) -> None:
    session = connected(reactor)
    for_b = parse(session.reoffer("a", sdp(A[1], A[0], attrs="a=sendonly")))
    assert direction(for_b, for_b.media[0]) == "sendonly"
    assert session.state == "active"  # RFC 3264 §8: a re-offer counts once answered
    session.reanswer("b", sdp(B[1], B[0], attrs="a=recvonly"))
    assert session.state == "on_hold"
    session.reoffer("a", sdp(A[1], A[0]))
    assert session.state == "on_hold"
    session.reanswer("b", sdp(B[1], B[0]))
    assert session.state == "active"


def test_null_hold_stops_sending_toward_the_holding_side(reactor: FakeReactor) -> None:
    session = connected(reactor)
    session.reoffer("a", sdp(A[1], A[0], conn="0.0.0.0"))
    session.reanswer("b", sdp(B[1], B[0]))
    assert session.state == "on_hold"
    session.legs["b"].rtp.datagramReceived(rtp(1), B)
    assert reactor.sent == []
    session.reoffer("a", sdp(A[1], A[0]))  # resume, same address: latch kept
    session.reanswer("b", sdp(B[1], B[0]))
    session.legs["b"].rtp.datagramReceived(rtp(2), B)
    assert reactor.sent[-1][2] == A


def test_media_timeout_fires_once_and_reaps(reactor: FakeReactor) -> None:
    calls: list[MediaSession] = []
    session = connected(reactor, media_timeout=20.0, on_timeout=calls.append, reap_delay=30.0)
    alloc = session.allocator
    for i in range(10):  # media flows for 10 s
        run_for(reactor, 1.0)
        session.legs["a"].rtp.datagramReceived(rtp(i), A)
    run_for(reactor, 19.5)
    assert session.state == "active"
    run_for(reactor, 5.5)  # 25 s since the last packet: T <= detection < 1.25 T
    assert session.state == "timed_out" and calls == [session]
    run_for(reactor, 30.0)
    assert session.state == "closed" and alloc.in_use == 0
    session.close()
    assert alloc.released_total == 2 and alloc.release_errors == 0


def test_hold_uses_the_longer_timeout(reactor: FakeReactor) -> None:
    session = connected(reactor, media_timeout=20.0, hold_timeout=200.0)
    session.reoffer("a", sdp(A[1], A[0], attrs="a=inactive"))
    session.reanswer("b", sdp(B[1], B[0], attrs="a=inactive"))
    run_for(reactor, 150.0, step=5.0)
    assert session.state == "on_hold"
    session.legs["a"].rtcp.datagramReceived(b"\x81\xc9rr", (A[0], A[1] + 1))  # RTCP: alive
    run_for(reactor, 150.0, step=5.0)
    assert session.state == "on_hold"
    run_for(reactor, 110.0, step=5.0)
    assert session.state == "timed_out"


def test_close_is_idempotent_releases_once_and_stops_forwarding(reactor: FakeReactor) -> None:
    session = connected(reactor)
    alloc = session.allocator
    rtp_a = session.legs["a"].rtp
    session.close()
    session.close()
    assert session.state == "closed" and not reactor.bound
    assert alloc.in_use == 0 and alloc.released_total == 2 and alloc.release_errors == 0
    rtp_a.datagramReceived(rtp(1), A)
    assert reactor.sent == []
    assert session.summary()["state"] == "closed"
    with pytest.raises(RuntimeError):
        session.offer_from_a(sdp(A[1], A[0]))
    assert reactor.getDelayedCalls() == []


def test_close_before_start_holds_nothing(reactor: FakeReactor) -> None:
    session = make(reactor)
    session.close()
    assert session.state == "closed" and session.allocator.allocated_total == 0
