"""IPv6 media: each side's relay socket in the family of its SIP peer, ``c=IN IP6`` in
what we send an IPv6 side (RFC 4566 §5.7), ``IN IP6`` offers and answers understood.

The sockets are fakes (the session's FakeReactor, recording the bind interface); real
sockets over ``127.0.0.1`` and ``::1`` are in tests/integration/test_ipv6_relay.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from pbx.calls.wiring import LocalAddresses
from pbx.media import MediaSession, PortAllocator
from pbx.sip.sdp import parse
from tests.unit.test_media_session import FakePort, FakeReactor, rtp

DUAL = LocalAddresses.from_bind("::", "203.0.113.7")
V6_PBX = DUAL.media_for("2001:db8::1")[1]


class BindRecorder(FakeReactor):
    """The session tests' fake reactor, also recording each port's bind interface."""

    def __init__(self) -> None:
        super().__init__()
        self.interfaces: dict[int, str] = {}

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> FakePort:
        bound = super().listenUDP(port, protocol, interface, maxPacketSize)
        self.interfaces[port] = interface
        return bound


def sdp6(host: str, port: int, ip: str = "IP6") -> bytes:
    return (f"v=0\r\no=ep 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=sendrecv\r\n").encode()


@pytest.fixture
def reactor() -> BindRecorder:
    return BindRecorder()


def session(reactor: BindRecorder, a_peer: str, b_peer: str) -> MediaSession:
    media = MediaSession(reactor, PortAllocator(30000, 30099), host="0.0.0.0",
                         advertise="203.0.113.7", local_for=DUAL.media_for)
    media.place("a", a_peer)
    media.place("b", b_peer)
    media.start()
    return media


def test_ipv4_caller_and_ipv6_callee_get_a_socket_and_sdp_each_of_their_family(
        reactor: BindRecorder) -> None:
    media = session(reactor, "198.51.100.10", "2001:db8::20")
    pa, pb = media.local_port("a"), media.local_port("b")
    assert reactor.interfaces[pa] == reactor.interfaces[pa + 1] == "0.0.0.0"
    assert reactor.interfaces[pb] == reactor.interfaces[pb + 1] == "::"
    to_b = parse(media.offer_from_a(sdp6("198.51.100.10", 4000, "IP4")))
    assert str(to_b.connection) == f"IN IP6 {V6_PBX}"
    assert (to_b.origin.addrtype, to_b.origin.address) == ("IP6", V6_PBX)
    assert to_b.media[0].port == pb
    to_a = parse(media.answer_from_b(sdp6("2001:db8::20", 6000)))
    assert str(to_a.connection) == "IN IP4 203.0.113.7"
    assert (to_a.origin.addrtype, to_a.origin.address) == ("IP4", "203.0.113.7")
    assert to_a.media[0].port == pa


def test_packets_cross_from_the_ipv4_socket_to_the_ipv6_one(reactor: BindRecorder) -> None:
    media = session(reactor, "198.51.100.10", "2001:db8::20")
    media.offer_from_a(sdp6("198.51.100.10", 4000, "IP4"))
    media.answer_from_b(sdp6("2001:db8::20", 6000))
    pa, pb = media.local_port("a"), media.local_port("b")
    # listenUDP (not RelayPort) trims IPv6 sources to (host, port), as Twisted does.
    media.legs["a"].rtp.datagramReceived(rtp(1), ("198.51.100.10", 4000))
    media.legs["b"].rtp.datagramReceived(rtp(2), ("2001:db8::20", 6000))
    assert [(port, addr) for port, _, addr in reactor.sent] == [
        (pb, ("2001:db8::20", 6000)), (pa, ("198.51.100.10", 4000))]
    assert media.stats["a_to_b"]["packets"] == media.stats["b_to_a"]["packets"] == 1
    assert media.stats["b_to_a"]["latched"] is None  # signalled source: no latch needed


def test_an_ipv6_source_is_compared_in_the_four_field_form_of_recvfrom(
        reactor: BindRecorder) -> None:
    media = session(reactor, "2001:db8::10", "2001:db8::20")
    sock = media.legs["a"].rtp
    sock.wide = True  # what RelayPort sets: recvfrom's tuples are handed on untrimmed
    media.offer_from_a(sdp6("2001:0db8:0:0::10", 4000))  # RFC 5952 text form is learned
    assert sock.src == ("2001:db8::10", 4000, 0, 0)
    assert sock.address("192.0.2.1", 9) == ("::ffff:192.0.2.1", 9, 0, 0)


def test_ipv4_media_from_an_ipv6_sip_peer_is_mapped_on_a_dual_stack_socket(
        reactor: BindRecorder) -> None:
    media = session(reactor, "2001:db8::10", "2001:db8::20")
    media.offer_from_a(sdp6("198.51.100.10", 4000, "IP4"))
    assert media.legs["a"].rtp.dst == ("::ffff:198.51.100.10", 4000)
    media.offer_from_a(sdp6("::ffff:198.51.100.11", 4000))  # mapped text: the same rule
    assert media.legs["a"].rtp.dst == ("::ffff:198.51.100.11", 4000)


def test_ipv6_media_toward_an_ipv4_socket_falls_back_to_latching(
        reactor: BindRecorder) -> None:
    media = session(reactor, "198.51.100.10", "198.51.100.20")
    media.offer_from_a(sdp6("2001:db8::10", 4000))
    assert media.legs["a"].rtp.signalled is None  # unreachable: latch the first source


def test_an_ipv6_hold_with_the_null_address_is_kept(reactor: BindRecorder) -> None:
    media = session(reactor, "2001:db8::10", "2001:db8::20")
    media.offer_from_a(sdp6("2001:db8::10", 4000))
    media.answer_from_b(sdp6("2001:db8::20", 6000))
    held = parse(media.reoffer("a", sdp6("::", 4000)))
    assert str(held.connection) == "IN IP6 ::"
    media.reanswer("b", sdp6("2001:db8::20", 6000))  # RFC 3264 §8: once answered
    assert media.state == "on_hold"


def test_ipv6_only_pbx_binds_and_advertises_its_address(reactor: BindRecorder) -> None:
    local = LocalAddresses.from_bind("::1", None)
    bind, advertise = local.media_for("::1")
    media = MediaSession(reactor, PortAllocator(30000, 30099), host=bind, advertise=advertise,
                         local_for=local.media_for)
    media.place("a", "::1")
    media.place("b", "::1")
    media.start()
    assert set(reactor.interfaces.values()) == {"::1"}
    out = media.offer_from_a(sdp6("::1", 4000))
    assert b"c=IN IP6 ::1\r\n" in out and b"o=pbx " in out and b" IN IP6 ::1\r\n" in out


def test_place_after_start_is_refused(reactor: BindRecorder) -> None:
    media = session(reactor, "198.51.100.10", "2001:db8::20")
    with pytest.raises(RuntimeError):
        media.place("a", "2001:db8::1")
