"""Media address learning under random schedules (hypothesis stateful testing).

One relayed call on a fake reactor; the caller's side is exercised (the relay sockets of
both sides are the same code).  The real phone signals a private SDP address and its SIP
comes from its NAT's public IP; it sends from its SDP address or from that public IP
(any port, NAT rebindings included), with one SSRC and continuing sequence numbers.
Attackers spray from third IPs with random SSRCs (never the phone's), payload types,
versions and sequence numbers.  Time advances by random gaps; windows open on random
signalling events (our SDP sent: answers and re-offers; the dialog confirmed).

Checked after every step:

* a forwarded packet always comes from the socket's accepted source, and the accepted
  source changes only by a counted latch or rebinding; an attacker never rebinds;
* an attacker is never latched nor forwarded before the dialog is confirmed, nor within
  the grace after a window opened;
* ``prompt`` runs (the phone speaks, from its SDP or SIP address, within the grace after
  each window opening): an attacker is never latched nor forwarded at all.
"""

from __future__ import annotations

import struct

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pbx.media import MediaSession, PortAllocator
from pbx.media.relay import THIRD_PARTY_GRACE
from tests.unit.test_media_session import FakeReactor, sdp

WINDOW = 3.0
GRACE = min(THIRD_PARTY_GRACE, WINDOW / 2)
SDP_A = ("10.0.0.10", 4000)
NAT_IP = "198.51.100.10"
SDP_B = ("10.0.1.20", 6000)
HONEST_SSRC = 0x0BADCAFE
ATTACKERS = ["203.0.113.66", "203.0.113.67", "192.0.2.200"]
NEGOTIATED = [0, 8, 101]


def packet(seq: int, ssrc: int, pt: int = 0, version: int = 2, size: int = 172) -> bytes:
    data = struct.pack("!BBHII", version << 6, pt, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF,
                       ssrc) + b"\xd5" * 160
    return data[:size]


class LearningMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reactor = FakeReactor()
        self.media = MediaSession(self.reactor, PortAllocator(30000, 30099),
                                  host="10.9.9.9", learning_window=WINDOW)
        self.media.expect("a", NAT_IP)
        self.media.start()
        self.sock = self.media.legs["a"].rtp
        self.out_port = self.media.legs["b"].port  # a's packets leave from b's socket
        self.seq = 1000
        self.nat_port = 41000
        self.prompt = False
        self.confirmed_once = False
        self.last_opening = 0.0
        self.attacker_latched = False
        self.attacker_forwarded = 0
        self.media.offer_from_a(sdp(SDP_A[1], SDP_A[0]))

    @initialize(prompt=st.booleans())
    def choose(self, prompt: bool) -> None:
        self.prompt = prompt

    # -- helpers ------------------------------------------------------------------------
    def now(self) -> float:
        return self.reactor.seconds()

    def _deliver(self, data: bytes, addr: tuple[str, int], attacker: bool) -> None:
        sock = self.sock
        before_sent = len(self.reactor.sent)
        before_src, moves = sock.src, sock.latches + sock.rebinds
        rebinds = sock.rebinds
        sock.datagramReceived(data, addr)
        forwarded = len(self.reactor.sent) - before_sent
        assert forwarded in (0, 1)
        if forwarded:
            assert self.reactor.sent[-1][0] == self.out_port
            assert sock.src == addr, "forwarded from a source that is not the accepted one"
        if sock.src != before_src:
            assert sock.latches + sock.rebinds == moves + 1, "source moved uncounted"
        if attacker:
            assert sock.rebinds == rebinds, "an attacker rebound the stream"
            if forwarded:
                self.attacker_forwarded += 1
                assert self.confirmed_once, "attacker forwarded before confirmation"
                assert self.now() >= self.last_opening + GRACE, "inside the grace"
            if sock.src == addr:
                self.attacker_latched = True

    def _honest(self, where: str, pt: int) -> None:
        self.seq += 1
        addr = SDP_A if where == "sdp" else (
            (SDP_A[0], 5000) if where == "sdp_ip" else (NAT_IP, self.nat_port))
        self._deliver(packet(self.seq, HONEST_SSRC, pt), addr, attacker=False)

    def _opened(self) -> None:
        self.last_opening = self.now()

    # -- rules --------------------------------------------------------------------------
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.02, 0.3, 0.6, 1.2, 2.5, 4.0, 10.0]))
    def time_passes(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    @rule(where=st.sampled_from(["sdp", "sdp_ip", "nat"]), pt=st.sampled_from(NEGOTIATED))
    def honest_sends(self, where: str, pt: int) -> None:
        self._honest(where, pt)

    @rule(gap=st.sampled_from([0.6, 1.0, 3.0]), port=st.integers(41001, 41100))
    def nat_rebinds(self, gap: float, port: int) -> None:
        """The phone is silent, then its NAT mapping changes; it keeps sending."""
        self.reactor.advance(gap)
        self.nat_port = port
        for _ in range(40):
            self._honest("nat", 0)
            self.reactor.advance(0.02)

    @rule(ip=st.sampled_from(ATTACKERS), port=st.integers(1024, 65535),
          ssrc=st.integers(0, 2**32 - 1).filter(lambda s: s != HONEST_SSRC),
          pt=st.integers(0, 127), version=st.integers(0, 3), seq=st.integers(0, 65535),
          size=st.sampled_from([4, 12, 172]), count=st.integers(1, 60),
          spacing=st.sampled_from([0.005, 0.02]), near=st.booleans())
    def attacker_sprays(self, ip: str, port: int, ssrc: int, pt: int, version: int,
                        seq: int, size: int, count: int, spacing: float, near: bool) -> None:
        if near:  # guessing the phone's sequence numbers (but not its SSRC)
            seq, pt, version, size = self.seq + 1, 0, 2, 172
        for i in range(count):
            self._deliver(packet(seq + i, ssrc, pt, version, size), (ip, port), attacker=True)
            self.reactor.advance(spacing)

    @rule(event=st.sampled_from(["answer", "confirm", "reoffer"]),
          spray=st.integers(0, 5), delay=st.sampled_from([0.0, 0.02, 0.2, 0.45]),
          where=st.sampled_from(["sdp", "sdp_ip", "nat"]), speaks=st.booleans())
    def window_opens(self, event: str, spray: int, delay: float, where: str,
                     speaks: bool) -> None:
        if event == "answer":
            self.media.answer_from_b(sdp(SDP_B[1], SDP_B[0]))  # our SDP to a
        elif event == "confirm":
            self.media.confirmed("a")
            self.confirmed_once = True
        else:
            self.media.reoffer("a", sdp(SDP_A[1], SDP_A[0]))  # a's re-INVITE, same address
            self.media.reanswer("b", sdp(SDP_B[1], SDP_B[0]))  # our answer to a
        self._opened()
        # Attackers race the phone; a prompt phone speaks within the grace.
        for i in range(spray):
            self._deliver(packet(i, 0x5555, 0), (ATTACKERS[0], 9999), attacker=True)
        self.reactor.advance(delay)
        if self.prompt or speaks:
            self._honest(where, 0)

    @invariant()
    def prompt_phone_always_wins(self) -> None:
        if self.prompt:
            assert not self.attacker_latched and self.attacker_forwarded == 0

    @invariant()
    def accepted_source_is_known(self) -> None:
        src = self.sock.src
        assert src is None or src[0] in (SDP_A[0], NAT_IP, *ATTACKERS)
        if self.prompt and src is not None:
            assert src[0] in (SDP_A[0], NAT_IP)


LearningMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestMediaLearning = LearningMachine.TestCase
