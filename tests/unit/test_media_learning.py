"""Media address learning on a fake reactor (issue 11.1): windows that follow signalling,
what may latch, preferred sources, NAT rebinding, and the metrics it feeds.

Addresses are documentation ranges; the phone "behind NAT" signals a private address
(10.0.0.x) and sends from its NAT's public address, which is also where its SIP comes
from.  Real sockets and a real PBX are in tests/integration/test_nat_media.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pbx.media import REJECT_REASONS, MediaSession, PortAllocator
from pbx.ops.metrics import CallMetrics
from tests.unit.test_media_session import FakeReactor, sdp

A_SDP = ("10.0.0.10", 4000)        # the caller's SDP: a private address
A_NAT = ("198.51.100.10", 41000)   # where its NAT sends from (its SIP host too)
B_SDP = ("10.0.1.20", 6000)
B_NAT = ("198.51.100.20", 42000)
ATTACKER = ("203.0.113.66", 5000)


def rtp(seq: int, pt: int = 0, ssrc: int = 0x1234, version: int = 2) -> bytes:
    return struct.pack("!BBHII", version << 6, pt, seq & 0xFFFF, seq * 160, ssrc) + b"\xd5" * 160


def rtcp(pt: int = 200) -> bytes:
    return struct.pack("!BBHI", 0x80, pt, 6, 0x1234) + b"\x00" * 20


@pytest.fixture
def reactor() -> FakeReactor:
    return FakeReactor()


def session(reactor: FakeReactor, **kw: Any) -> MediaSession:
    kw.setdefault("learning_window", 5.0)
    media = MediaSession(reactor, PortAllocator(30000, 30099), host="10.9.9.9",
                         advertise="203.0.113.7", **kw)
    media.expect("a", A_NAT[0])
    media.expect("b", B_NAT[0])
    media.start()
    return media


def sent_to(reactor: FakeReactor, addr: tuple[str, int]) -> int:
    return sum(1 for _port, _data, dst in reactor.sent if dst == addr)


def test_nat_caller_after_long_ringing_is_learnt_at_answer(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    reactor.advance(8.0)                       # rings 8 s: the caller cannot send yet
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))  # our 200 to the caller
    media.confirmed("a")
    media.confirmed("b", B_NAT[0])
    reactor.advance(0.5)
    a, b = media.legs["a"].rtp, media.legs["b"].rtp
    for seq in range(10):
        a.datagramReceived(rtp(seq), A_NAT)
        b.datagramReceived(rtp(seq, ssrc=9), B_NAT)
    # a's first packet went to b's SDP address: b had not spoken yet.
    assert sent_to(reactor, B_NAT) == 9 and sent_to(reactor, A_NAT) == 10
    stats = media.stats
    assert stats["a_to_b"]["latched"] == "198.51.100.10:41000"
    assert stats["b_to_a"]["latched"] == "198.51.100.20:42000"
    assert stats["a_to_b"]["latches"] == 1


def test_callee_with_early_sdp_then_long_ringing(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))  # 183 with SDP
    reactor.advance(8.0)                            # the window has run out in silence
    b = media.legs["b"].rtp
    b.datagramReceived(rtp(1), B_NAT)
    assert media.stats["b_to_a"]["rejected"]["window_closed"] == 1
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))  # the 200
    media.confirmed("b", B_NAT[0])
    b.datagramReceived(rtp(2), B_NAT)
    assert media.stats["b_to_a"]["latched"] == "198.51.100.20:42000"


def test_the_window_lasts_learning_window_seconds_of_silence(reactor: FakeReactor) -> None:
    media = session(reactor, learning_window=3.0)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    reactor.advance(3.1)
    media.legs["a"].rtp.datagramReceived(rtp(1), A_NAT)
    assert media.stats["a_to_b"]["rejected"]["window_closed"] == 1
    media.legs["a"].rtp.datagramReceived(rtp(2), A_SDP)  # the signalled one always works
    assert media.stats["a_to_b"]["packets"] == 1


@pytest.mark.parametrize(("packet", "reason"), [
    (rtp(1, version=1), "malformed"),
    (rtp(1)[:11], "malformed"),
    (rtp(1, pt=18), "payload_type"),    # G.729: not in any SDP of the call
    (rtp(1, pt=72 | 0x80), "payload_type"),  # RTCP SR multiplexed onto the RTP port
])
def test_only_negotiated_rtp_latches(reactor: FakeReactor, packet: bytes, reason: str) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.legs["a"].rtp.datagramReceived(packet, A_NAT)
    assert media.stats["a_to_b"]["rejected"][reason] == 1
    assert media.stats["a_to_b"]["latched"] is None and reactor.sent == []
    media.legs["a"].rtp.datagramReceived(rtp(2, pt=101), A_NAT)  # telephone-event: ok
    assert media.stats["a_to_b"]["latched"] == "198.51.100.10:41000"


def test_rtcp_latches_only_with_an_rtcp_packet_type(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    rtcp_a = media.legs["a"].rtcp
    rtcp_a.datagramReceived(rtp(1), (A_NAT[0], 41001))     # RTP on the RTCP port
    rtcp_a.datagramReceived(rtcp(pt=199), (A_NAT[0], 41001))
    assert rtcp_a.rejected["payload_type"] == 2 and rtcp_a.src == (A_SDP[0], A_SDP[1] + 1)
    rtcp_a.datagramReceived(rtcp(), (A_NAT[0], 41001))
    assert rtcp_a.src == (A_NAT[0], 41001)


def test_nobody_third_latches_while_ringing_and_the_real_phone_wins(
        reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    a = media.legs["a"].rtp
    for seq in range(50):  # sprayed while ringing (window open since our INVITE/18x)
        a.datagramReceived(rtp(seq, ssrc=666), ATTACKER)
        reactor.advance(0.1)
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    a.datagramReceived(rtp(1, ssrc=666), ATTACKER)  # inside the grace: unverified
    a.datagramReceived(rtp(1), A_NAT)               # the phone speaks: latched, locked
    reactor.advance(2.0)
    for seq in range(50):
        a.datagramReceived(rtp(seq, ssrc=666), ATTACKER)
    assert sent_to(reactor, media.legs["b"].rtp.dst) == 1  # type: ignore[arg-type]
    rejected = media.stats["a_to_b"]["rejected"]
    assert rejected["unverified"] == 51 and rejected["locked"] == 50


def test_a_third_ip_latches_only_tentatively_after_the_grace(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    reactor.advance(1.5)  # the phone stays silent past the grace
    a = media.legs["a"].rtp
    elsewhere = ("192.0.2.77", 7000)  # e.g. a carrier NAT with another media IP
    a.datagramReceived(rtp(1, ssrc=5), elsewhere)
    assert a.src == elsewhere
    a.datagramReceived(rtp(1), A_NAT)  # a preferred source still wins in the window
    assert a.src == A_NAT
    a.datagramReceived(rtp(2, ssrc=5), elsewhere)
    assert a.src == A_NAT and a.rejected["locked"] == 1


def test_a_public_signalled_address_never_lets_a_third_ip_latch(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(4000, "81.2.69.160"))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    reactor.advance(2.0)
    a = media.legs["a"].rtp
    a.datagramReceived(rtp(1), ATTACKER)
    assert a.rejected["unverified"] == 1
    a.datagramReceived(rtp(2), ("81.2.69.160", 5555))  # the same IP, another port
    assert a.src == ("81.2.69.160", 5555)


def _latched_caller(reactor: FakeReactor) -> MediaSession:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    a = media.legs["a"].rtp
    for seq in range(100, 110):
        a.datagramReceived(rtp(seq), A_NAT)
        reactor.advance(0.02)
    reactor.advance(10.0)  # the window has long closed
    return media


def test_nat_rebinding_same_ssrc_continuing_sequence_after_silence(
        reactor: FakeReactor) -> None:
    media = _latched_caller(reactor)
    a = media.legs["a"].rtp
    rebound = (A_NAT[0], 43000)
    for seq in range(110, 150):  # the NAT mapping changed: the old one is silent
        a.datagramReceived(rtp(seq), rebound)
        reactor.advance(0.02)
    assert a.src == rebound and media.stats["a_to_b"]["rebinds"] == 1
    assert a.dst == rebound
    rtcp_a = media.legs["a"].rtcp  # RTCP follows the IP the RTP socket moved to
    rtcp_a.datagramReceived(rtcp(), (A_NAT[0], 43001))
    assert rtcp_a.src == (A_NAT[0], 43001)


@pytest.mark.parametrize("case", ["other_ssrc", "sequence_jump", "old_source_alive"])
def test_no_rebinding_without_the_evidence(reactor: FakeReactor, case: str) -> None:
    media = _latched_caller(reactor)
    a = media.legs["a"].rtp
    for i in range(60):
        seq = 110 + i
        if case == "other_ssrc":
            a.datagramReceived(rtp(seq, ssrc=0x4321), ATTACKER)
        elif case == "sequence_jump":
            a.datagramReceived(rtp(seq + 5000), ATTACKER)
        else:  # both send the stream: a loop or an SSRC collision (RFC 3550 §8.2)
            a.datagramReceived(rtp(seq), ATTACKER)
            a.datagramReceived(rtp(seq), A_NAT)
        reactor.advance(0.02)
    assert a.src == A_NAT and a.rebinds == 0
    assert a.rejected["locked"] == 60


def test_expect_keeps_a_bounded_set_and_confirmed_narrows_it(reactor: FakeReactor) -> None:
    media = MediaSession(reactor, PortAllocator(30000, 30099), host="10.9.9.9")
    for i in range(10):
        media.expect("b", f"198.51.100.{i}")
    media.expect("b", "not-an-ip")
    media.start()
    assert len(media.legs["b"].rtp.preferred) == 4
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("b", "198.51.100.3")
    assert media.legs["b"].rtp.preferred == {"198.51.100.3", B_SDP[0]}


def test_learning_totals_reach_the_metrics(reactor: FakeReactor) -> None:
    media = _latched_caller(reactor)
    media.legs["a"].rtp.datagramReceived(rtp(1, ssrc=9), ATTACKER)
    registry = CollectorRegistry()
    metrics = CallMetrics(registry)
    for direction in media.stats.values():
        metrics.rtp_learning(latches=direction["latches"], rebinds=direction["rebinds"],
                             rejected={**direction["rejected"], "bogus": 5})
    text = generate_latest(registry).decode()
    assert "pbx_rtp_latched_total 1.0" in text
    assert "pbx_rtp_rebinds_total 0.0" in text
    assert 'pbx_rtp_rejected_packets_total{reason="locked"} 1.0' in text
    assert "bogus" not in text
    assert all(f'reason="{r}"' in text for r in REJECT_REASONS)


def test_rtcp_never_latches_a_third_ip_on_its_own(reactor: FakeReactor) -> None:
    media = session(reactor)
    media.offer_from_a(sdp(A_SDP[1], A_SDP[0]))
    media.answer_from_b(sdp(B_SDP[1], B_SDP[0]))
    media.confirmed("a")
    reactor.advance(2.0)  # past the grace: RTP would take a third IP now, RTCP does not
    rtcp_a = media.legs["a"].rtcp
    rtcp_a.datagramReceived(rtcp(), ATTACKER)
    assert rtcp_a.rejected["unverified"] == 1 and reactor.sent == []
    elsewhere = ("192.0.2.77", 7000)
    media.legs["a"].rtp.datagramReceived(rtp(1), elsewhere)  # RTP takes that IP...
    rtcp_a.datagramReceived(rtcp(), ("192.0.2.77", 7001))   # ...so RTCP may follow
    assert rtcp_a.src == ("192.0.2.77", 7001)
