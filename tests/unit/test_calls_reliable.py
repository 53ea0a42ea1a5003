"""RFC 3262 reliable provisionals: RSeq/RAck codecs, the UAC's PRACK bookkeeping and the
UAS chart (retransmission T1 doubling, PRACK matching, 64*T1 give-up, held 2xx)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from pbx.calls.reliable import (
    PrackTracker,
    RAck,
    ReliableProvisionals,
    Verdict,
    is_reliable,
    parse_rseq,
    wants_reliable,
)
from pbx.sip import Request, Response, parse

INVITE = (
    "INVITE sip:1002@pbx.test SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-a\r\n"
    "From: <sip:1001@pbx.test>;tag=caller\r\nTo: <sip:1002@pbx.test>\r\n"
    "Call-ID: c1@test\r\nCSeq: 7 INVITE\r\nContact: <sip:1001@192.0.2.10>\r\n"
    "{extra}Content-Length: 0\r\n\r\n")


def invite(extra: str = "") -> Request:
    msg = parse(INVITE.format(extra=extra).encode())
    assert isinstance(msg, Request)
    return msg


def response(status: int = 180, *, tag: str = "b1", rseq: int | None = None,
             require: bool = True, cseq: str = "1 INVITE", body: str = "") -> Response:
    lines = [f"SIP/2.0 {status} Ringing",
             "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-x",
             "From: <sip:1001@pbx.test>;tag=us", f"To: <sip:1002@pbx.test>;tag={tag}",
             "Call-ID: c2@test", f"CSeq: {cseq}", "Contact: <sip:1002@192.0.2.20>"]
    if require:
        lines.append("Require: 100rel")
    if rseq is not None:
        lines.append(f"RSeq: {rseq}")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    msg = parse(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
    assert isinstance(msg, Response)
    return msg


# -- codecs ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), (" 4294967295 ", 2**32 - 1), ("0", None), ("4294967296", None),
    ("-1", None), ("1a", None), ("", None), (None, None), ("12345678901", None)])
def test_parse_rseq(text: str | None, value: int | None) -> None:
    assert parse_rseq(text) == value


@pytest.mark.parametrize(("text", "value"), [
    ("776656 1 INVITE", RAck(776656, 1, "INVITE")),
    ("  5   3   invite ", RAck(5, 3, "INVITE")),
    ("5 3", None), ("x 3 INVITE", None), ("5 y INVITE", None), ("0 1 INVITE", None),
    ("5 3 INVITE extra", None), ("5 3 IN-VITE", None), (None, None)])
def test_parse_rack(text: str | None, value: RAck | None) -> None:
    assert RAck.parse(text) == value


def test_rack_round_trip_and_of() -> None:
    rack = RAck.of(response(rseq=42, cseq="3 INVITE"))
    assert str(rack) == "42 3 INVITE"
    assert RAck.parse(str(rack)) == rack


def test_is_reliable_needs_require_and_never_100() -> None:
    assert is_reliable(response(183, rseq=1))
    assert not is_reliable(response(183, rseq=1, require=False))
    assert not is_reliable(response(100, rseq=1))
    assert not is_reliable(response(200, rseq=1))


def test_wants_reliable() -> None:
    assert wants_reliable(invite("Require: 100rel\r\n"), has_sdp=False)
    assert wants_reliable(invite("Supported: timer, 100REL\r\n"), has_sdp=True)
    assert not wants_reliable(invite("Supported: 100rel\r\n"), has_sdp=False)
    assert not wants_reliable(invite(), has_sdp=True)
    assert wants_reliable(invite("k: 100rel\r\n"), has_sdp=True)  # compact Supported


# -- UAC -------------------------------------------------------------------------------------

def test_tracker_pracks_in_order_and_discards_retransmissions() -> None:
    tracker = PrackTracker()
    assert tracker.receive(response(180, require=False)) is Verdict.UNRELIABLE
    assert tracker.receive(response(180, rseq=10)) is Verdict.PRACK
    assert tracker.receive(response(180, rseq=10)) is Verdict.DISCARD  # retransmission
    assert tracker.receive(response(183, rseq=12)) is Verdict.DISCARD  # gap: not PRACKed
    assert tracker.receive(response(183, rseq=11)) is Verdict.PRACK
    assert tracker.last_rseq("b1") == 11


def test_tracker_keeps_one_counter_per_early_dialog() -> None:
    tracker = PrackTracker()
    assert tracker.receive(response(180, tag="x", rseq=100)) is Verdict.PRACK
    assert tracker.receive(response(180, tag="y", rseq=5)) is Verdict.PRACK
    assert tracker.receive(response(183, tag="x", rseq=101)) is Verdict.PRACK


def test_tracker_drops_malformed_and_everything_after_the_final() -> None:
    tracker = PrackTracker()
    assert tracker.receive(response(180)) is Verdict.DISCARD  # no RSeq
    assert tracker.receive(response(180, tag="", rseq=1)) is Verdict.DISCARD
    tracker.final_received()
    assert tracker.receive(response(180, rseq=1)) is Verdict.DISCARD


# -- UAS -------------------------------------------------------------------------------------

class Harness:
    def __init__(self, *, reliable_transport: bool = False) -> None:
        self.clock = Clock()
        self.sent: list[tuple[float, int, str]] = []
        self.gave_up = 0
        self.rp = ReliableProvisionals(self.clock, self.send, t1=0.5,
                                       reliable_transport=reliable_transport,
                                       on_give_up=self.give_up, initial_rseq=1000)

    def send(self, resp: Response) -> None:
        self.sent.append((self.clock.seconds(), resp.status, resp.headers.get("RSeq") or ""))

    def give_up(self) -> None:
        self.gave_up += 1


def provisional(status: int = 180, body: str = "") -> Response:
    resp = response(status, require=False, cseq="7 INVITE", body=body)
    return resp


def prack(rseq: int, cseq: int = 7, method: str = "INVITE") -> Request:
    msg = parse((
        "PRACK sip:pbx@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-p\r\n"
        "From: <sip:1001@pbx.test>;tag=caller\r\nTo: <sip:1002@pbx.test>;tag=us\r\n"
        f"Call-ID: c1@test\r\nCSeq: 8 PRACK\r\nRAck: {rseq} {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def test_uas_sends_with_require_and_rseq_and_retransmits_doubling() -> None:
    h = Harness()
    resp = provisional()
    h.rp.provisional(resp)
    assert resp.headers.get("Require") == "100rel" and resp.headers.get("RSeq") == "1000"
    for _ in range(5):
        h.clock.advance(h.clock.getDelayedCalls()[0].getTime() - h.clock.seconds())
    times = [t for t, _s, _r in h.sent]
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5]  # T1, 2T1, 4T1...: no T2 cap (§3)
    assert {r for _t, _s, r in h.sent} == {"1000"}


def test_uas_prack_matches_only_the_one_in_flight() -> None:
    h = Harness()
    h.rp.provisional(provisional())
    assert not h.rp.prack(prack(999))
    assert not h.rp.matches(prack(999)) and h.rp.matches(prack(1000))
    assert not h.rp.prack(prack(1000, cseq=6))
    assert not h.rp.prack(prack(1000, method="BYE"))
    assert h.rp.prack(prack(1000))
    assert h.rp.state == "idle"
    assert not h.rp.prack(prack(1000))  # already acknowledged: 481
    h.clock.advance(60)
    assert len(h.sent) == 1  # no retransmission after the PRACK


def test_uas_second_provisional_waits_for_the_first_prack() -> None:
    h = Harness()
    h.rp.provisional(provisional(180))
    h.rp.provisional(provisional(183, body="v=0\r\n"))
    assert [s for _t, s, _r in h.sent] == [180]
    assert h.rp.outstanding == 2
    assert h.rp.prack(prack(1000))
    assert [(s, r) for _t, s, r in h.sent] == [(180, "1000"), (183, "1001")]


def test_uas_gives_up_after_64_t1() -> None:
    h = Harness()
    h.rp.provisional(provisional())
    h.clock.advance(31.9)
    assert h.gave_up == 0
    h.clock.advance(0.2)
    assert h.gave_up == 1 and h.rp.state == "gave_up"
    count = len(h.sent)
    h.clock.advance(100)
    assert len(h.sent) == count


def test_uas_reliable_transport_no_retransmission_but_give_up() -> None:
    h = Harness(reliable_transport=True)
    h.rp.provisional(provisional())
    h.clock.advance(20)
    assert len(h.sent) == 1
    h.clock.advance(20)
    assert h.gave_up == 1


def test_uas_2xx_held_while_sdp_provisional_unacknowledged() -> None:
    h = Harness()
    h.rp.provisional(provisional(183, body="v=0\r\n"))
    assert not h.rp.may_send_final(True)
    assert h.rp.may_send_final(False)  # a failure may go at once (§3)
    released: list[str] = []
    h.rp.hold_final(lambda: released.append("200"))
    h.rp.provisional(provisional(180))  # queued, superseded by the 2xx
    assert h.rp.prack(prack(1000))
    assert released == ["200"]
    assert len(h.sent) == 1


def test_uas_2xx_held_for_a_provisional_without_sdp_too() -> None:
    h = Harness()
    h.rp.provisional(provisional(180))
    assert not h.rp.may_send_final(True)   # our choice: PRACK's 200 precedes the 2xx
    assert h.rp.prack(prack(1000))
    assert h.rp.may_send_final(True)


def test_uas_close_stops_everything_but_a_late_prack_still_gets_200() -> None:
    h = Harness()
    h.rp.provisional(provisional(180))
    h.rp.close()
    h.clock.advance(100)
    assert len(h.sent) == 1 and h.gave_up == 0 and h.rp.state == "closed"
    h.rp.provisional(provisional(183))
    assert len(h.sent) == 1
    assert not h.rp.prack(prack(999))
    assert h.rp.prack(prack(1000))          # the one that was in flight: once
    assert not h.rp.prack(prack(1000))


def test_uas_random_initial_rseq_in_range() -> None:
    clock = Clock()
    values = {ReliableProvisionals(clock, lambda r: None)._next_rseq for _ in range(50)}
    assert all(1 <= v <= 2**31 - 1 for v in values)
    assert len(values) > 1
