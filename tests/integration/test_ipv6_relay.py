"""The RTP relay between an IPv4 phone (127.0.0.1) and an IPv6 phone (::1) on real sockets.

Each side's relay socket is in its phone's family (``MediaSession.place``); the IPv6
socket compares the four-field sources ``recvfrom`` gives with what SDP said, so the
signalled source is accepted at once, a foreign one is dropped once locked, and a phone
that sends from another port than it signalled is latched within the window.
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


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


if not _has_ipv6_loopback():  # pragma: no cover - depends on the machine
    pytest.skip("no IPv6 loopback on this machine", allow_module_level=True)


def loopback_of(peer_host: str) -> tuple[str, str]:
    """``local_for`` on loopback only: bind and advertise the peer family's loopback."""
    return ("::1", "::1") if ":" in peer_host else ("127.0.0.1", "127.0.0.1")


class Endpoint(DatagramProtocol):
    """A phone's media socket on the loopback of its family."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.received: list[tuple[bytes, tuple[Any, ...]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        self.received.append((data, tuple(addr)))

    @property
    def port(self) -> int:
        return self.transport.getHost().port  # type: ignore[union-attr]

    def send(self, data: bytes, port: int) -> None:
        self.transport.write(data, (self.host, port))  # type: ignore[union-attr]


@pytest.fixture
def allocator() -> PortAllocator:
    low = random.randrange(33000, 60000, 2)
    return PortAllocator(low, low + 199)


@pytest.fixture
def listen() -> Any:
    ports: list[Any] = []

    def _listen(host: str) -> Endpoint:
        ep = Endpoint(host)
        ports.append(reactor.listenUDP(0, ep, interface=host))
        return ep

    yield _listen
    for port in ports:
        port.stopListening()


def sdp(host: str, port: int) -> bytes:
    ip = "IP6" if ":" in host else "IP4"
    return (f"v=0\r\no=ep 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=sendrecv\r\n").encode()


def rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0xABCD) + b"\xff" * 160


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


def session(allocator: PortAllocator, a_host: str, b_host: str, **kw: Any) -> MediaSession:
    media = MediaSession(reactor, allocator, host="127.0.0.1", local_for=loopback_of, **kw)
    media.place("a", a_host)
    media.place("b", b_host)
    media.start()
    return media


@pytest_twisted.ensureDeferred
async def test_rtp_between_an_ipv4_and_an_ipv6_phone(allocator: PortAllocator,
                                                     listen: Any) -> None:
    a, b = listen("127.0.0.1"), listen("::1")
    media = session(allocator, "127.0.0.1", "::1")
    to_b = media.offer_from_a(sdp("127.0.0.1", a.port))
    to_a = media.answer_from_b(sdp("::1", b.port))
    assert b"c=IN IP6 ::1\r\n" in to_b and b"c=IN IP4 127.0.0.1\r\n" in to_a
    pa, pb = media.local_port("a"), media.local_port("b")
    for seq in range(20):
        a.send(rtp(seq), pa)
        b.send(rtp(1000 + seq), pb)
    await until(lambda: len(a.received) == 20 and len(b.received) == 20)
    assert [d for d, _ in b.received] == [rtp(s) for s in range(20)]
    assert {addr[:2] for _, addr in b.received} == {("::1", pb)}  # B hears the PBX (IPv6)
    assert {addr for _, addr in a.received} == {("127.0.0.1", pa)}
    stats = media.stats
    assert stats["a_to_b"]["packets"] == stats["b_to_a"]["packets"] == 20
    assert stats["a_to_b"]["dropped"] == stats["b_to_a"]["dropped"] == 0
    assert stats["b_to_a"]["latched"] is None  # the signalled IPv6 source matched as is
    await media.close()


@pytest_twisted.ensureDeferred
async def test_ipv6_sources_lock_and_latch_like_ipv4_ones(allocator: PortAllocator,
                                                          listen: Any) -> None:
    signalled, behind_nat, b, attacker = (listen("::1"), listen("::1"), listen("::1"),
                                          listen("::1"))
    media = session(allocator, "::1", "::1", nat_latch_window=1.0)
    media.offer_from_a(sdp("::1", signalled.port))
    media.answer_from_b(sdp("::1", b.port))
    pa = media.local_port("a")
    # The phone sends from another port than it signalled (a port-rewriting NAT): latched.
    behind_nat.send(rtp(1), pa)
    await until(lambda: len(b.received) == 1)
    assert media.stats["a_to_b"]["latched"] == f"[::1]:{behind_nat.port}"
    # Locked now: another source is dropped and nothing of it reaches b.
    attacker.send(rtp(2), pa)
    behind_nat.send(rtp(3), pa)
    await until(lambda: len(b.received) == 2)
    assert [d for d, _ in b.received] == [rtp(1), rtp(3)]
    await until(lambda: media.stats["a_to_b"]["dropped"] == 1)
    await media.close()
