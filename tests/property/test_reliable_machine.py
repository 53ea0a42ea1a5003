"""Hypothesis stateful tests of RFC 3262 on both sides of a leg.

UAS: random provisionals, PRACKs (right and wrong RAcks), clock advances and a final:
never two reliable provisionals unacknowledged at once before the first PRACK, RSeq is
+1 per new provisional and a retransmission repeats it, a held 2xx goes out only after
the PRACK of the SDP-bearing provisional, nothing is sent after close or give-up.
UAC: any delivery order of a UAS's reliable provisionals (loss, duplication,
reordering): we PRACK each RSeq at most once, only in order, starting anywhere.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock

from pbx.calls.reliable import PrackTracker, ReliableProvisionals, Verdict
from pbx.sip import Request, Response, parse


def _provisional(status: int, sdp: bool) -> Response:
    body = "v=0\r\n" if sdp else ""
    extra = "Content-Type: application/sdp\r\n" if sdp else ""
    msg = parse((
        f"SIP/2.0 {status} Ringing\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-r\r\n"
        "From: <sip:a@t>;tag=a\r\nTo: <sip:b@t>;tag=b\r\nCall-ID: r@t\r\nCSeq: 3 INVITE\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n{body}").encode())
    assert isinstance(msg, Response)
    return msg


def _prack(rseq: int, cseq: int = 3) -> Request:
    msg = parse((
        "PRACK sip:pbx@t SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-p\r\n"
        "From: <sip:a@t>;tag=a\r\nTo: <sip:b@t>;tag=b\r\nCall-ID: r@t\r\nCSeq: 4 PRACK\r\n"
        f"RAck: {rseq} {cseq} INVITE\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


class UASMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.wire: list[tuple[int, bool]] = []      # (rseq, has_sdp) of each send
        self.gave_up = False
        self.released = 0
        self.rp = ReliableProvisionals(self.clock, self._send, t1=0.5,
                                       on_give_up=self._give_up, initial_rseq=77)
        self.acked: set[int] = set()
        self.ended = False
        self.sent_after_end = 0

    def _send(self, resp: Response) -> None:
        if self.ended:
            self.sent_after_end += 1
        self.wire.append((int(resp.headers.get("RSeq") or 0), bool(resp.body)))

    def _give_up(self) -> None:
        self.gave_up = True
        self.ended = True

    @rule(status=st.sampled_from([180, 181, 182, 183]), sdp=st.booleans())
    def provisional(self, status: int, sdp: bool) -> None:
        self.rp.provisional(_provisional(status, sdp))

    @rule(delta=st.sampled_from([0.1, 0.5, 1.0, 4.0, 40.0]))
    def advance(self, delta: float) -> None:
        self.clock.advance(delta)

    @precondition(lambda self: bool(self.wire))
    @rule(right=st.booleans(), off=st.integers(1, 3))
    def prack(self, right: bool, off: int) -> None:
        rseq = self.wire[-1][0] if right else self.wire[-1][0] + off
        # the one in flight, also after a final response (a late PRACK gets 200)
        in_flight = self.rp.state in ("awaiting_prack", "closed")
        ok = self.rp.prack(_prack(rseq))
        assert ok == (right and in_flight and rseq not in self.acked)
        if ok:
            self.acked.add(rseq)

    @precondition(lambda self: not self.ended)
    @rule()
    def final_2xx(self) -> None:
        if self.rp.may_send_final(True):
            self.rp.close()
            self.ended = True
        else:
            self.rp.hold_final(self._release)

    def _release(self) -> None:
        self.released += 1
        self.rp.close()
        self.ended = True

    @invariant()
    def rseq_increments_by_one_per_new_provisional(self) -> None:
        distinct = sorted({r for r, _s in self.wire})
        assert distinct == list(range(77, 77 + len(distinct)))
        # the order on the wire never goes back to an older RSeq
        assert all(a <= b for (a, _), (b, _) in zip(self.wire, self.wire[1:], strict=False))

    @invariant()
    def one_in_flight(self) -> None:
        unacked = {r for r, _s in self.wire} - self.acked
        assert len(unacked) <= 1

    @invariant()
    def nothing_after_the_end(self) -> None:
        assert self.sent_after_end == 0
        assert self.released <= 1


TestUAS = UASMachine.TestCase
TestUAS.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(1, 2**31 - 1), count=st.integers(1, 6),
       order=st.lists(st.integers(0, 5), max_size=30))
def test_uac_pracks_each_rseq_once_in_order(start: int, count: int, order: list[int]) -> None:
    tracker = PrackTracker()
    pracked: list[int] = []
    for index in order:
        if index >= count:
            continue
        rseq = start + index
        resp = _provisional(180, False)
        resp.headers.add("Require", "100rel")
        resp.headers.add("RSeq", str(rseq))
        if tracker.receive(resp) is Verdict.PRACK:
            pracked.append(rseq)
    assert len(set(pracked)) == len(pracked)
    assert pracked == list(range(pracked[0], pracked[0] + len(pracked))) if pracked else True
