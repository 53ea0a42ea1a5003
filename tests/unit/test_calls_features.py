"""100rel, UPDATE and session timers through the B2BUA (issue 11.4), sans-IO on a Clock:
PRACK on both legs, the held 2xx, the PRACK give-up, 422 both ways, refreshes and the
teardown of a call whose refreshes stop, UPDATE relayed with SDP and its glare."""

from __future__ import annotations

from typing import Any

from pbx.calls.session_timer import TimerPolicy
from pbx.sip import Request, Response, make_response
from tests.unit.test_calls_support import (
    SDP_B,
    CalleePhone,
    CallerPhone,
    Harness,
    callee_peer,
)

B = callee_peer(0)


class Caller(CallerPhone):
    """A caller whose INVITE carries extra headers (Require/Supported/Session-Expires)."""

    def __init__(self, h: Harness, extra: list[tuple[str, str]] | None = None) -> None:
        super().__init__(h)
        self.extra = extra or []

    def build_invite(self, *args: Any, **kwargs: Any) -> Request:
        invite = super().build_invite(*args, **kwargs)
        for name, value in self.extra:
            invite.headers.add(name, value)
        return invite

    def provisionals(self) -> list[Response]:
        return [r for r in self.h.responses_to(self.peer, "INVITE") if 100 < r.status < 200]

    def prack(self, rack: str) -> Request:
        self.final()
        provisional = self.provisionals()[-1]
        self.remote_tag = provisional.to.tag
        self.remote_target = provisional.contacts[0].uri
        request = self._in_dialog("PRACK")
        request.headers.add("RAck", rack)
        self.h.request(request, self.peer)
        return request

    def responses(self, method: str) -> list[Response]:
        return self.h.responses_to(self.peer, method)


def harness(policy: TimerPolicy | None = None, ring_timeout: float = 30.0) -> Harness:
    h = Harness(ring_timeout=ring_timeout)
    h.b2bua.session_timer = policy if policy is not None else TimerPolicy(enabled=False)
    return h


def reliable(b: CalleePhone, status: int, rseq: int, body: bytes = b"") -> Response:
    request = b.invite
    response = make_response(request, status, to_tag=b.tag)
    response.headers.add("Contact", f"<sip:{b.user}@{b.peer.host}:{b.peer.port}>")
    response.headers.add("Require", "100rel")
    response.headers.add("RSeq", str(rseq))
    if body:
        response.headers.add("Content-Type", "application/sdp")
        response.body = body
    b.h.response(response, b.peer)
    return response


def reinvites(h: Harness, peer: Any) -> list[Request]:
    """Distinct in-dialog INVITEs to ``peer`` (not their retransmissions)."""
    seen: dict[int, Request] = {}
    for r in h.requests_to(peer, "INVITE"):
        if r.to.tag:
            seen.setdefault(r.cseq.seq, r)
    return list(seen.values())


def only_call(h: Harness) -> Any:
    (call,) = h.b2bua.calls.values()
    return call


# -- capabilities ---------------------------------------------------------------------------

def test_options_advertise_100rel_and_timer_and_require_is_accepted() -> None:
    h = harness()
    a = Caller(h, [("Require", "100rel, timer"), ("Supported", "100rel, timer")])
    a.dial()
    assert 420 not in a.statuses()
    b = CalleePhone(h, B)
    invite = b.invite
    assert {"100rel", "timer"} <= {t.lower() for t in invite.headers.getall("Supported")}
    assert {"PRACK", "UPDATE"} <= set(invite.headers.getall("Allow"))
    options = h.b2bua.endpoint.capability_headers()
    assert options["Supported"] == "100rel, timer"


# -- 100rel toward the callee (we are UAC, RFC 3262 §4) ------------------------------------

def test_callee_reliable_180_is_pracked_once_and_relayed_once() -> None:
    h = harness()
    a = Caller(h)
    b = CalleePhone(h, B)
    a.dial()
    reliable(b, 180, 77)
    reliable(b, 180, 77)            # a retransmission: not PRACKed, not relayed again
    pracks = h.requests_to(B, "PRACK")
    assert len(pracks) == 1
    assert pracks[0].headers.get("RAck") == f"77 {b.invite.cseq.seq} INVITE"
    assert pracks[0].to.tag == b.tag
    assert [s for s in a.statuses() if s == 180] == [180]
    reliable(b, 183, 78, SDP_B)
    assert len(h.requests_to(B, "PRACK")) == 2
    b.reply_to_last("PRACK")
    b.answer()
    a.ack()
    assert only_call(h).state == "connected"


# -- 100rel toward the caller (we are UAS, RFC 3262 §3) -------------------------------------

def test_caller_requiring_100rel_gets_reliable_180_retransmitted_until_prack() -> None:
    h = harness()
    a = Caller(h, [("Require", "100rel"), ("Supported", "100rel")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    first = a.provisionals()
    assert len(first) == 1 and first[0].headers.get("Require") == "100rel"
    rseq = int(first[0].headers.get("RSeq") or 0)
    assert 1 <= rseq < 2**31
    h.advance(0.5)
    h.advance(1.0)
    assert len(a.provisionals()) == 3          # T1, then 2*T1
    a.prack(f"{rseq + 5} {a.invite.cseq.seq} INVITE")   # no such provisional
    assert a.responses("PRACK")[-1].status == 481
    a.prack(f"{rseq} {a.invite.cseq.seq} INVITE")
    assert a.responses("PRACK")[-1].status == 200
    h.advance(10)
    assert len(a.provisionals()) == 3          # retransmissions stopped
    b.answer()
    a.ack()
    assert only_call(h).state == "connected"


def test_caller_2xx_waits_for_the_prack_of_an_sdp_provisional() -> None:
    h = harness()
    a = Caller(h, [("Supported", "100rel")])     # supported only: SDP 18x go reliably
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    assert "RSeq" not in a.provisionals()[-1].headers   # a bare 180 stays unreliable
    b.respond(183, SDP_B)
    early = a.provisionals()[-1]
    assert early.status == 183 and early.headers.get("RSeq")
    b.answer()
    assert a.final() is None                    # held until the PRACK (§3)
    a.prack(f"{early.headers.get('RSeq')} {a.invite.cseq.seq} INVITE")
    final = a.final()
    assert final is not None and final.status == 200
    a.ack()
    assert only_call(h).state == "connected"


def test_no_prack_gives_500_and_cancels_the_callee() -> None:
    h = harness(ring_timeout=120)
    a = Caller(h, [("Require", "100rel")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    h.advance(33)
    final = a.final()
    assert final is not None and final.status == 500
    assert b.cancels()


# -- session timers (RFC 4028) -----------------------------------------------------------------

def test_too_small_session_interval_gets_422_before_any_call() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h, [("Supported", "timer"), ("Session-Expires", "30")])
    a.dial()
    final = a.final()
    assert final is not None and final.status == 422
    assert final.headers.get("Min-SE") == "90"
    assert not h.b2bua.calls and not h.cdr.adds


def test_callee_422_is_retried_with_its_min_se() -> None:
    h = harness(TimerPolicy(enabled=True, expires=300, min_se=90))
    a = Caller(h)
    b = CalleePhone(h, B)
    a.dial()
    first = b.invite
    assert first.headers.get("Session-Expires") == "300"
    response = make_response(first, 422, to_tag=b.tag)
    response.headers.add("Min-SE", "600")
    h.response(response, B)
    second = b.invite
    assert second.cseq.seq == first.cseq.seq + 1 and second.call_id == first.call_id
    assert second.headers.get("Session-Expires") == "600"
    assert second.headers.get("Min-SE") == "600"
    assert 422 not in a.statuses()


def connected(h: Harness, a: Caller, b: CalleePhone,
              answer_headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
    a.dial()
    b.ringing()
    response = make_response(b.invite, 200, to_tag=b.tag)
    response.headers.add("Contact", f"<sip:{b.user}@{b.peer.host}:{b.peer.port}>")
    response.headers.add("Allow", "INVITE, ACK, BYE, UPDATE")
    for name, value in answer_headers:
        response.headers.add(name, value)
    response.headers.add("Content-Type", "application/sdp")
    response.body = SDP_B
    h.response(response, B)
    a.ack()
    assert only_call(h).state == "connected"


def test_caller_refresher_that_stops_refreshing_is_hung_up() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h, [("Supported", "timer"), ("Session-Expires", "90;refresher=uac")])
    b = CalleePhone(h, B)
    connected(h, a, b)
    final = a.final()
    assert final is not None and final.headers.get("Session-Expires") == "90;refresher=uac"
    assert "timer" in final.headers.getall("Require")
    h.advance(59)
    assert not b.byes()
    h.advance(2)                                # 90 - min(32, 30) = 60 s
    assert b.byes() and h.requests_to(a.peer, "BYE")
    assert "Session Timer Expired" in (b.byes()[0].headers.get("Reason") or "")
    assert only_call(h).record.hangup_cause == "Session Timer Expired"


def test_caller_refreshes_keep_the_call_up() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h, [("Supported", "timer"), ("Session-Expires", "90;refresher=uac"),
                   ("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    connected(h, a, b)
    for _ in range(4):
        h.advance(40)
        update = a.send("UPDATE")
        update_2xx = [r for r in a.responses("UPDATE") if r.cseq.seq == update.cseq.seq]
        if not update_2xx:                      # relayed: the callee answers
            b.reply_to_last("UPDATE")
            update_2xx = [r for r in a.responses("UPDATE") if r.cseq.seq == update.cseq.seq]
        assert update_2xx[-1].status == 200
        assert update_2xx[-1].headers.get("Session-Expires") == "90;refresher=uac"
    assert not b.byes()
    assert only_call(h).state == "connected"


def test_pbx_refreshes_the_callee_with_update_and_hangs_up_on_481() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h)
    b = CalleePhone(h, B)
    connected(h, a, b, [("Session-Expires", "120;refresher=uac"), ("Require", "timer")])
    h.advance(60)
    updates = h.requests_to(B, "UPDATE")
    assert len(updates) == 1 and not updates[0].body
    assert updates[0].headers.get("Session-Expires") == "120;refresher=uac"
    response = make_response(updates[0], 200)
    response.headers.add("Session-Expires", "120;refresher=uac")
    h.response(response, B)
    h.advance(60)
    updates = h.requests_to(B, "UPDATE")
    assert len(updates) == 2
    h.response(make_response(updates[-1], 481), B)
    assert h.requests_to(a.peer, "BYE")
    assert only_call(h).record.hangup_cause == "Session Timer Expired"


# -- UPDATE (RFC 3311) ---------------------------------------------------------------------------

def test_update_with_sdp_is_relayed_and_its_answer_comes_back() -> None:
    h = harness()
    a = Caller(h, [("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    connected(h, a, b)
    update = a.send("UPDATE", body=b"v=0\r\nm=audio 4002 RTP/AVP 0\r\n")
    relayed = h.requests_to(B, "UPDATE")
    assert relayed and relayed[-1].body.startswith(b"RE:")
    b.reply_to_last("UPDATE", 200, SDP_B)
    answers = [r for r in a.responses("UPDATE") if r.cseq.seq == update.cseq.seq]
    assert answers[-1].status == 200 and answers[-1].body.startswith(b"REA:")
    assert answers[-1].headers.get("Contact")


def test_update_during_a_pending_offer_gets_491() -> None:
    h = harness()
    a = Caller(h, [("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    connected(h, a, b)
    a.send("UPDATE", body=b"v=0\r\nm=audio 4002 RTP/AVP 0\r\n")
    second = b.send("UPDATE", body=b"v=0\r\nm=audio 5002 RTP/AVP 0\r\n")
    statuses = [r.status for r in h.responses_to(B, "UPDATE") if r.cseq.seq == second.cseq.seq]
    assert statuses == [491]


def test_update_without_sdp_to_a_leg_without_update_is_answered_here() -> None:
    h = harness()
    a = Caller(h, [("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()                      # no Allow: the callee never said it takes UPDATE
    a.ack()
    update = a.send("UPDATE")
    assert not h.requests_to(B, "UPDATE")
    answers = [r for r in a.responses("UPDATE") if r.cseq.seq == update.cseq.seq]
    assert answers[-1].status == 200


def test_prack_200_goes_out_before_the_released_2xx() -> None:
    h = harness()
    a = Caller(h, [("Require", "100rel")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    rseq = a.provisionals()[-1].headers.get("RSeq")
    b.answer()
    assert a.final() is None
    a.prack(f"{rseq} {a.invite.cseq.seq} INVITE")
    order = [(m.cseq.method, m.status) for m in h.to(a.peer)
             if isinstance(m, Response) and m.status == 200]
    assert order == [("PRACK", 200), ("INVITE", 200)]


def test_refresh_by_reinvite_when_the_peer_has_no_update() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    response = make_response(b.invite, 200, to_tag=b.tag)
    response.headers.add("Contact", f"<sip:{b.user}@{b.peer.host}:{b.peer.port}>")
    response.headers.add("Session-Expires", "100;refresher=uac")   # no Allow: UPDATE
    response.headers.add("Content-Type", "application/sdp")
    response.body = SDP_B
    h.response(response, B)
    a.ack()
    h.advance(50)
    sent = reinvites(h, B)
    assert len(sent) == 1
    assert sent[0].body == b.invite.body            # the SDP we last sent (§10)
    assert sent[0].headers.get("Session-Expires") == "100;refresher=uac"
    acks_before = len(b.acks())
    b.reply_to_last("INVITE", 200, SDP_B)
    assert len(b.acks()) == acks_before + 1
    h.advance(49)
    assert len(reinvites(h, B)) == 1
    h.advance(2)
    assert len(reinvites(h, B)) == 2
    assert not b.byes()


def test_update_501_switches_refreshes_to_reinvite_and_488_keeps_the_call() -> None:
    h = harness(TimerPolicy(enabled=True, expires=1800, min_se=90))
    a = Caller(h)
    b = CalleePhone(h, B)
    connected(h, a, b, [("Session-Expires", "120;refresher=uac")])
    h.advance(60)
    (update,) = h.requests_to(B, "UPDATE")
    h.response(make_response(update, 501), B)
    h.advance(5)
    assert len(reinvites(h, B)) == 1
    b.reply_to_last("INVITE", 488)
    h.advance(30)
    assert not b.byes() and only_call(h).state == "connected"


def test_early_update_without_sdp_is_answered_and_with_sdp_refused() -> None:
    h = harness()
    a = Caller(h, [("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    provisional = a.provisionals()[-1]
    a.remote_tag = provisional.to.tag
    a.remote_target = provisional.contacts[0].uri
    plain = a._in_dialog("UPDATE")
    h.request(plain, a.peer)
    offer = a._in_dialog("UPDATE", body=b"v=0\r\nm=audio 4002 RTP/AVP 0\r\n")
    h.request(offer, a.peer)
    by_seq = {r.cseq.seq: r for r in a.responses("UPDATE")}
    assert by_seq[plain.cseq.seq].status == 200
    refused = by_seq[offer.cseq.seq]
    assert refused.status == 500 and refused.headers.get("Retry-After") is not None
    assert not h.requests_to(B, "UPDATE")


def test_late_offer_invite_does_not_offer_100rel_to_the_callee() -> None:
    h = harness()
    a = Caller(h)
    b = CalleePhone(h, B)
    a.dial(body=b"")
    supported = {t.lower() for t in b.invite.headers.getall("Supported")}
    assert "timer" in supported and "100rel" not in supported
