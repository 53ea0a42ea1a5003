"""RFC 3311 §5 UPDATE in early dialogs through the B2BUA, sans-IO on a Clock: the
caller's UPDATE goes to the fork whose early dialog its own mirrors, an early fork's
UPDATE to the caller, an offer before the initial answer is refused (§5.1/§5.2), and
a fork that ends leaves the dialog table."""

from __future__ import annotations

from pbx.sip import Request, Response, make_response
from tests.unit.test_calls_features import B, Caller, harness, only_call
from tests.unit.test_calls_support import SDP_B, CalleePhone, Harness, callee_peer

B2 = callee_peer(1)
ALLOW = "INVITE, ACK, CANCEL, BYE, PRACK, UPDATE"
NEW_SDP_A = b"v=0\r\nm=audio 4002 RTP/AVP 0\r\n"
NEW_SDP_B = b"v=0\r\nm=audio 5002 RTP/AVP 0\r\n"


def early_183(b: CalleePhone, rseq: int | None = 1, body: bytes = SDP_B) -> Response:
    """A 183 with SDP from ``b`` (reliable when ``rseq``), allowing UPDATE."""
    response = make_response(b.invite, 183, to_tag=b.tag)
    response.headers.add("Contact", f"<sip:{b.user}@{b.peer.host}:{b.peer.port}>")
    response.headers.add("Allow", ALLOW)
    if rseq is not None:
        response.headers.add("Require", "100rel")
        response.headers.add("RSeq", str(rseq))
    if body:
        response.headers.add("Content-Type", "application/sdp")
        response.body = body
    b.h.response(response, b.peer)
    return response


def caller_early(h: Harness, b: CalleePhone, *, reliable: bool = True) -> Caller:
    """A caller (100rel, UPDATE) rung by ``b``'s 183 with SDP, PRACKed both ways."""
    a = Caller(h, [("Supported", "100rel"), ("Allow", ALLOW)])
    a.dial()
    early_183(b, 1 if reliable else None)
    if reliable:
        b.reply_to_last("PRACK")
    provisional = a.provisionals()[-1]
    a.remote_tag = provisional.to.tag
    a.remote_target = provisional.contacts[0].uri
    if reliable:
        a.prack(f"{provisional.headers.get('RSeq')} {a.invite.cseq.seq} INVITE")
    return a


def update_from_caller(h: Harness, a: Caller, body: bytes = b"") -> Request:
    request = a._in_dialog("UPDATE", body=body)
    h.request(request, a.peer)
    return request


def answers(a: Caller, request: Request) -> list[Response]:
    return [r for r in a.responses("UPDATE") if r.cseq.seq == request.cseq.seq]


def callee_answers(h: Harness, peer: object, request: Request) -> list[int]:
    return [r.status for r in h.responses_to(peer, "UPDATE")  # type: ignore[arg-type]
            if r.cseq.seq == request.cseq.seq]


def test_caller_update_with_sdp_reaches_the_early_fork_and_its_answer_comes_back() -> None:
    h = harness()
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    update = update_from_caller(h, a, NEW_SDP_A)
    (relayed,) = h.requests_to(B, "UPDATE")
    assert relayed.body == b"RE:" + NEW_SDP_A
    assert relayed.to.tag == b.tag and relayed.call_id == b.invite.call_id
    b.reply_to_last("UPDATE", 200, NEW_SDP_B)
    (answer,) = answers(a, update)
    assert answer.status == 200 and answer.body == b"REA:" + NEW_SDP_B
    call = only_call(h)
    assert call.caller.oa.stable and call.forks[0].oa.stable
    b.answer(NEW_SDP_B)  # the 200 repeats the last answer: the call goes on
    a.ack()
    assert call.state == "connected"


def test_caller_update_without_sdp_goes_to_an_early_fork_that_allows_it() -> None:
    h = harness()
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    update = update_from_caller(h, a)
    (relayed,) = h.requests_to(B, "UPDATE")
    assert not relayed.body
    b.reply_to_last("UPDATE", 200)
    assert [r.status for r in answers(a, update)] == [200]


def test_callee_update_in_its_early_dialog_is_relayed_to_the_caller() -> None:
    h = harness()
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    update = b.send("UPDATE", NEW_SDP_B)
    assert callee_answers(h, B, update) == []          # no 481: the dialog is known
    (relayed,) = [r for r in h.requests_to(a.peer, "UPDATE")]
    assert relayed.body == b"RE:" + NEW_SDP_B
    assert relayed.from_.tag == a.remote_tag and relayed.call_id == a.invite.call_id
    response = make_response(relayed, 200)
    response.headers.add("Content-Type", "application/sdp")
    response.body = NEW_SDP_A
    h.response(response, a.peer)
    (answer,) = [r for r in h.responses_to(B, "UPDATE") if r.cseq.seq == update.cseq.seq]
    assert answer.status == 200 and answer.body == b"REA:" + NEW_SDP_A
    call = only_call(h)
    assert call.early_fork is call.forks[0]

    def no_offer_from_a(_sdp: bytes) -> bytes:
        raise ValueError("answer without an offer")  # what the real session says

    call.media.answer_from_b = no_offer_from_a
    b.answer(NEW_SDP_B)  # repeats the early session: our 200 repeats the caller's
    final = a.final()
    assert final is not None and final.status == 200
    assert final.body == b"RE:" + NEW_SDP_B
    a.ack()
    assert call.state == "connected"


def test_caller_offer_after_an_unreliable_early_answer_gets_500() -> None:
    """§5.1: an answer only in an unreliable 18x does not complete the exchange."""
    h = harness()
    b = CalleePhone(h, B)
    a = Caller(h, [("Allow", ALLOW)])               # no 100rel: the 183 goes unreliably
    a.dial()
    early_183(b, None)
    provisional = a.provisionals()[-1]
    assert provisional.status == 183 and not provisional.headers.get("RSeq")
    a.remote_tag = provisional.to.tag
    a.remote_target = provisional.contacts[0].uri
    update = update_from_caller(h, a, NEW_SDP_A)
    (refused,) = answers(a, update)
    assert refused.status == 500 and refused.headers.get("Retry-After") is not None
    assert not h.requests_to(B, "UPDATE")


def test_fork_offer_before_answering_our_invite_gets_491() -> None:
    """§5.2: our INVITE's offer to the fork is unanswered (it sent only a 180)."""
    h = harness()
    b = CalleePhone(h, B)
    a = Caller(h, [("Supported", "100rel"), ("Allow", ALLOW)])
    a.dial()
    b.ringing()
    update = b.send("UPDATE", NEW_SDP_B)
    assert callee_answers(h, B, update) == [491]
    assert not h.requests_to(a.peer, "UPDATE")


def test_fork_offer_while_the_callers_is_relayed_gets_491() -> None:
    h = harness()
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    update_from_caller(h, a, NEW_SDP_A)
    crossing = b.send("UPDATE", NEW_SDP_B)
    assert callee_answers(h, B, crossing) == [491]


def test_losing_fork_leaves_the_dialog_table() -> None:
    h = harness()
    h.register("1002", B2)
    a = Caller(h, [("Supported", "100rel"), ("Allow", ALLOW)])
    a.dial()
    b, b2 = CalleePhone(h, B), CalleePhone(h, B2)
    b.ringing()
    b2.ringing()
    call = only_call(h)
    assert all(f.dialog in h.b2bua.dialogs for f in call.forks)
    loser = next(f for f in call.forks if f.peer == B2)
    b.answer()
    assert len(b2.cancels()) == 1
    b2.reply_to_last("CANCEL", 200)
    b2.respond(487)
    assert loser.closed and loser.dialog not in h.b2bua.dialogs
    assert callee_answers(h, B2, b2.send("UPDATE")) == [481]
    a.ack()
    a.send("BYE")
    b.reply_to_last("BYE")
    assert call.finished and len(h.b2bua.dialogs) == 0


def test_failed_fork_leaves_the_dialog_table_and_the_caller_no_early_peer() -> None:
    h = harness()
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    call = only_call(h)
    fork = call.forks[0]
    assert call.early_fork is fork and fork.dialog in h.b2bua.dialogs
    b.respond(486)
    assert fork.dialog not in h.b2bua.dialogs and call.early_fork is None
    assert a.final() is not None and len(h.b2bua.dialogs) == 0
