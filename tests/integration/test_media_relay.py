"""The RTP relay on real UDP sockets (127.0.0.1): two fake endpoints talk through it.

Relay ports come from a random window of the kernel's ephemeral range; a port another
process holds is skipped by the relay's bind retry, so parallel runs do not collide.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.protocol import DatagramProtocol

from pbx.media import MediaSession, PortAllocator

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class Endpoint(DatagramProtocol):
    """A phone's media socket: records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.received.append((data, addr))

    @property
    def port(self) -> int:
        return self.transport.getHost().port  # type: ignore[union-attr]

    def send(self, data: bytes, port: int) -> None:
        self.transport.write(data, (HOST, port))  # type: ignore[union-attr]


@pytest.fixture
def allocator() -> PortAllocator:
    low = random.randrange(33000, 60000, 2)
    return PortAllocator(low, low + 199)


@pytest.fixture
def listen() -> Any:
    ports: list[Any] = []

    def _listen(port: int = 0) -> Endpoint:
        ep = Endpoint()
        ports.append(reactor.listenUDP(port, ep, interface=HOST))
        return ep

    yield _listen
    for port in ports:
        port.stopListening()


def sdp(port: int, attrs: str = "a=sendrecv") -> bytes:
    return (f"v=0\r\no=ep 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"{attrs}\r\n").encode()


def rtp(seq: int, pt: int = 0, payload: bytes = b"\xff" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq, seq * 160, 0xABCD) + payload


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def session_between(allocator: PortAllocator, a: Endpoint, b: Endpoint, *,
                    a_sdp_port: int | None = None, **kw: Any) -> MediaSession:
    session = MediaSession(reactor, allocator, host=HOST, advertise=HOST, **kw)
    session.start()
    session.offer_from_a(sdp(a_sdp_port or a.port))
    session.answer_from_b(sdp(b.port))
    return session


@pytest_twisted.ensureDeferred
async def test_two_way_rtp_through_the_relay(allocator: PortAllocator, listen: Any) -> None:
    a, b = listen(), listen()
    session = session_between(allocator, a, b)
    pa, pb = session.local_port("a"), session.local_port("b")
    for seq in range(50):
        a.send(rtp(seq), pa)
        b.send(rtp(1000 + seq), pb)
        await pause(0.002)
    await until(lambda: len(a.received) == 50 and len(b.received) == 50)
    assert [d for d, _ in b.received] == [rtp(s) for s in range(50)]
    assert {addr for _, addr in b.received} == {(HOST, pb)}  # B hears the PBX, not A
    assert {addr for _, addr in a.received} == {(HOST, pa)}
    stats = session.stats
    assert stats["a_to_b"]["packets"] == 50 and stats["a_to_b"]["bytes"] == 50 * 172
    assert stats["a_to_b"]["lost"] == 0 and stats["b_to_a"]["mos"] is not None
    await session.close()


@pytest_twisted.ensureDeferred
async def test_rtcp_is_relayed_on_port_plus_one(allocator: PortAllocator, listen: Any) -> None:
    a, b, a_rtcp, b_rtcp = listen(), listen(), listen(), listen()
    session = MediaSession(reactor, allocator, host=HOST, nat_latch_window=0.0)
    session.start()
    # The endpoints' RTCP sockets are not at port+1, so their SDP says where (a=rtcp).
    session.offer_from_a(sdp(a.port, f"a=rtcp:{a_rtcp.port}"))
    session.answer_from_b(sdp(b.port, f"a=rtcp:{b_rtcp.port} IN IP4 {HOST}"))
    report = b"\x81\xc9\x00\x07" + b"\x00" * 28
    a_rtcp.send(report, session.local_port("a") + 1)
    b_rtcp.send(report + b"b", session.local_port("b") + 1)
    await until(lambda: bool(a_rtcp.received and b_rtcp.received))
    assert b_rtcp.received == [(report, (HOST, session.local_port("b") + 1))]
    assert a_rtcp.received[0][0] == report + b"b"
    assert a.received == [] and b.received == []
    await session.close()


@pytest_twisted.ensureDeferred
async def test_telephone_events_pass_through_unchanged(allocator: PortAllocator,
                                                       listen: Any) -> None:
    a, b = listen(), listen()
    session = session_between(allocator, a, b)
    digits = [rtp(seq, pt=101 | (0x80 if seq == 0 else 0),
                  payload=struct.pack("!BBH", 5, 0x0A | (0x80 if seq == 2 else 0), 160 * seq))
              for seq in range(3)]
    for packet in digits:
        a.send(packet, session.local_port("a"))
    await until(lambda: len(b.received) == 3)
    assert [d for d, _ in b.received] == digits
    await session.close()


@pytest_twisted.ensureDeferred
async def test_a_third_party_cannot_hijack_the_stream(allocator: PortAllocator,
                                                      listen: Any) -> None:
    a, b, attacker = listen(), listen(), listen()
    session = session_between(allocator, a, b, nat_latch_window=2.0)
    a.send(rtp(1), session.local_port("a"))  # the signalled sources speak first: locked
    b.send(rtp(1), session.local_port("b"))
    await until(lambda: len(b.received) == 1 and len(a.received) == 1)
    for seq in range(20):  # inside the latch window, but too late
        attacker.send(rtp(seq, payload=b"evil"), session.local_port("a"))
        attacker.send(rtp(seq, payload=b"evil"), session.local_port("b"))
    b.send(rtp(2), session.local_port("b"))
    await until(lambda: len(a.received) == 2)
    await pause(0.05)
    assert len(b.received) == 1 and len(a.received) == 2
    assert attacker.received == []
    assert session.stats["a_to_b"]["dropped"] == 20 and session.stats["b_to_a"]["dropped"] == 20
    await session.close()


@pytest_twisted.ensureDeferred
async def test_nat_latching_follows_the_real_source_then_locks(allocator: PortAllocator,
                                                               listen: Any) -> None:
    a_signalled, a_behind_nat, b, attacker = listen(), listen(), listen(), listen()
    session = session_between(allocator, a_signalled, b, nat_latch_window=1.0)
    a_behind_nat.send(rtp(1), session.local_port("a"))
    await until(lambda: len(b.received) == 1)
    b.send(rtp(2), session.local_port("b"))
    await until(lambda: len(a_behind_nat.received) == 1)  # symmetric RTP: to the real source
    assert a_signalled.received == []
    attacker.send(rtp(3), session.local_port("a"))
    a_signalled.send(rtp(4), session.local_port("a"))
    await pause(0.05)
    assert len(b.received) == 1
    assert session.stats["a_to_b"]["latched"] == f"{HOST}:{a_behind_nat.port}"
    await session.close()


@pytest_twisted.ensureDeferred
async def test_no_latching_once_the_window_has_passed(allocator: PortAllocator,
                                                      listen: Any) -> None:
    a, b, other = listen(), listen(), listen()
    session = session_between(allocator, a, b, nat_latch_window=0.1)
    await pause(0.2)
    other.send(rtp(1), session.local_port("a"))
    a.send(rtp(2), session.local_port("a"))
    await until(lambda: len(b.received) == 1)
    assert b.received[0][0] == rtp(2)
    assert session.stats["a_to_b"]["dropped"] == 1
    await session.close()


@pytest_twisted.ensureDeferred
async def test_media_timeout_calls_back_and_close_frees_the_ports(allocator: PortAllocator,
                                                                  listen: Any) -> None:
    a, b = listen(), listen()
    timed_out: list[MediaSession] = []
    session = session_between(allocator, a, b, media_timeout=0.4, on_timeout=timed_out.append)
    for seq in range(5):
        a.send(rtp(seq), session.local_port("a"))
        await pause(0.05)
    assert session.state == "active"
    await until(lambda: bool(timed_out), timeout=3.0)
    assert session.state == "timed_out" and timed_out == [session]
    ports = [session.local_port("a"), session.local_port("b")]
    await session.close()
    assert allocator.in_use == 0 and allocator.released_total == 2
    for port in ports:  # really closed: we can bind them ourselves
        for p in (port, port + 1):
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind((HOST, p))
            probe.close()


@pytest_twisted.ensureDeferred
async def test_closed_session_forwards_nothing(allocator: PortAllocator, listen: Any) -> None:
    a, b = listen(), listen()
    session = session_between(allocator, a, b)
    port_a = session.local_port("a")
    await session.close()
    session.close()  # idempotent
    a.send(rtp(1), port_a)
    await pause(0.1)
    assert b.received == []
    assert allocator.released_total == 2 and allocator.release_errors == 0
    assert session.state == "closed"


@pytest_twisted.ensureDeferred
async def test_hold_and_resume_on_real_sockets(allocator: PortAllocator, listen: Any) -> None:
    a, b = listen(), listen()
    session = session_between(allocator, a, b)
    held = session.reoffer("a", sdp(a.port, "a=sendonly"))
    assert b"a=sendonly" in held
    assert session.state == "active"  # RFC 3264 §8: nothing changes until answered
    session.reanswer("b", sdp(b.port, "a=recvonly"))
    assert session.state == "on_hold"
    a.send(rtp(1), session.local_port("a"))  # music on hold still flows a -> b
    await until(lambda: len(b.received) == 1)
    session.reoffer("a", sdp(a.port))
    session.reanswer("b", sdp(b.port))
    assert session.state == "active"
    await session.close()
