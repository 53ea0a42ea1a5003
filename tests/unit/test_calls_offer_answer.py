"""The B2BUA's offer/answer relaying, sans-IO: late offer, offerless re-INVITE, glare,
rollback of a failed re-INVITE, broken inputs that must get an answer (issue 11.2/3/7)."""

from __future__ import annotations

from typing import Any

from pbx.sip import Request
from tests.unit.test_calls_support import (
    CALLER,
    SDP_A,
    SDP_B,
    CalleePhone,
    CallerPhone,
    Harness,
    callee_peer,
)

B = callee_peer(0)


def only_call(h: Harness) -> Any:
    (call,) = h.b2bua.calls.values()
    return call


def connected_call(h: Harness) -> tuple[CallerPhone, CalleePhone]:
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()
    a.ack()
    assert only_call(h).state == "connected"
    return a, b


def ack_with(a: CallerPhone, h: Harness, body: bytes, seq: int | None = None) -> None:
    assert a.invite is not None
    request = a._in_dialog("ACK", seq=seq if seq is not None else a.invite.cseq.seq,
                           body=body)
    h.request(request, CALLER)


def test_late_offer_the_callees_offer_goes_in_our_200_and_the_answer_in_the_acks() -> None:
    h = Harness()
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial(body=b"")
    assert b.invite.body == b""  # passed through: the callee is asked to offer
    b.ringing()
    b.answer(SDP_B)  # the callee's 2xx carries its offer
    assert b.acks() == []  # our ACK must carry the answer: it waits for the caller's
    final = a.final()
    assert final is not None and final.status == 200 and final.body == b"RE:" + SDP_B
    ack_with(a, h, SDP_A)
    (ack,) = b.acks()
    assert ack.body == b"REA:" + SDP_A
    assert ack.headers.get("Content-Type") == "application/sdp"
    assert only_call(h).state == "connected"
    b.answer(SDP_B)  # a retransmitted 2xx gets the same ACK
    assert [x.body for x in b.acks()] == [b"REA:" + SDP_A] * 2


def test_late_offer_ack_without_an_answer_ends_both_legs_with_a_reason() -> None:
    h = Harness()
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial(body=b"")
    b.answer(SDP_B)
    a.ack()  # no SDP: our offer went unanswered
    (ack,) = b.acks()  # the callee's 2xx is still ACKed, then ended
    assert ack.body == b""
    (bye_b,) = b.byes()
    (bye_a,) = h.requests_to(CALLER, "BYE")
    assert "No SDP answer" in (bye_b.headers.get("Reason") or "")
    assert "No SDP answer" in (bye_a.headers.get("Reason") or "")


def test_offerless_reinvite_our_200_offers_and_the_ack_answers() -> None:
    h = Harness()
    a, b = connected_call(h)
    a.send("INVITE")
    (reinvite,) = [r for r in h.requests_to(B, "INVITE") if r.to.tag]
    assert reinvite.body == b""
    b.send("INVITE", body=SDP_B)  # glare while ours is pending
    assert h.responses_to(B, "INVITE")[-1].status == 491
    b.reply_to_last("INVITE", 200, SDP_B)
    assert len(b.acks()) == 1  # only the first call's ACK so far
    ok = h.responses_to(CALLER, "INVITE")[-1]
    assert ok.status == 200 and ok.body == b"RE:" + SDP_B
    ack_with(a, h, SDP_A, seq=a.cseq)
    assert b.acks()[-1].body == b"REA:" + SDP_A
    call = only_call(h)
    assert call.caller.oa.state == "stable" and call.winner.oa.state == "stable"
    assert call.reinvite is None


def test_a_rejected_reinvite_rolls_the_media_back_and_passes_the_status() -> None:
    h = Harness()
    a, b = connected_call(h)
    rolled: list[Any] = []
    h.media.sessions[-1].reject_offer = lambda *args: rolled.append(args)
    a.send("INVITE", body=SDP_A + b"a=sendonly\r\n")
    b.reply_to_last("INVITE", 488)
    assert h.responses_to(CALLER, "INVITE")[-1].status == 488
    assert rolled == [()]
    call = only_call(h)
    assert call.state == "connected"
    assert call.caller.oa.state == "stable" and call.winner.oa.state == "stable"
    a.send("INVITE", body=SDP_A)  # the next re-INVITE is not glare
    assert len([r for r in h.requests_to(B, "INVITE") if r.to.tag]) == 2


class NoContactCaller(CallerPhone):
    def build_invite(self, *args: Any, **kw: Any) -> Request:
        invite = super().build_invite(*args, **kw)
        invite.headers.remove("Contact")
        return invite


def test_caller_without_contact_gets_bye_on_its_flow_and_the_callee_gets_bye() -> None:
    h = Harness()
    a, b = NoContactCaller(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    h.advance(40)  # no ACK ever comes (64*T1): both legs get BYE, nothing raises
    byes_a = h.requests_to(CALLER, "BYE")  # (retransmitted: nobody answers)
    assert byes_a and {r.headers.get("Via") for r in byes_a} == {byes_a[0].headers.get("Via")}
    assert byes_a[0].uri.host == CALLER.host and byes_a[0].uri.port == CALLER.port
    assert b.byes()
    h.advance(40)
    assert h.b2bua.active_calls == 0


def test_caller_without_contact_can_still_ack_and_hang_up() -> None:
    h = Harness()
    a, b = NoContactCaller(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    a.ack()
    assert only_call(h).state == "connected"
    b.send("BYE")
    assert len(h.requests_to(CALLER, "BYE")) == 1


def test_an_offer_without_a_usable_codec_gets_488_with_a_warning() -> None:
    h = Harness()
    a = CallerPhone(h)
    video_only = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\n"
                  b"t=0 0\r\nm=video 4000 RTP/AVP 96\r\n")
    a.dial(body=video_only)
    final = a.final()
    assert final is not None and final.status == 488
    warning = final.headers.get("Warning") or ""
    assert warning.startswith("304 ") and '"Media type not available"' in warning
    assert h.requests_to(B) == []


def test_a_callee_2xx_without_sdp_to_our_offer_fails_the_fork_not_the_pbx() -> None:
    h = Harness()
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.answer(b"")
    assert len(b.acks()) == 1 and len(b.byes()) == 1
    final = a.final()
    assert final is not None and final.status == 488


class OddContactCaller(CallerPhone):
    def build_invite(self, *args: Any, **kw: Any) -> Request:
        invite = super().build_invite(*args, **kw)
        invite.headers.set("Contact", "<sip:@@@;;>garbage")  # present but unusable
        return invite


def test_caller_with_an_unparsable_contact_still_gets_its_bye() -> None:
    h = Harness()
    a, b = OddContactCaller(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    final = a.final()
    assert final is not None and final.status == 200
    a.ack()
    b.send("BYE")
    byes = h.requests_to(CALLER, "BYE")
    assert byes and byes[0].uri.host == CALLER.host
