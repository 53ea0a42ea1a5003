"""The B2BUA, sans-IO: real transactions on a Clock, fake phones, media and CDR store."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from pbx.sip import Request
from tests.unit.test_calls_support import (
    CALLER,
    PBX_HOST,
    SDP_A,
    SDP_B,
    CalleePhone,
    CallerPhone,
    Harness,
    callee_peer,
)

B = callee_peer(0)
B2 = callee_peer(1)


def connected_call(h: Harness) -> tuple[CallerPhone, CalleePhone]:
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()
    a.ack()
    (call,) = h.b2bua.calls.values()
    assert call.state == "connected"
    return a, b


def only_call(h: Harness):
    (call,) = h.b2bua.calls.values()
    return call


# -- the answered call ---------------------------------------------------------------------


def test_answered_call_end_to_end_with_own_identifiers_on_the_callee_leg() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    invite = a.dial()
    assert a.statuses() == [100]
    fork = b.invite
    # The callee leg has its own Call-ID, tags and CSeq; nothing of the caller's leaks.
    assert fork.call_id != invite.call_id
    assert fork.from_.tag != invite.from_.tag
    assert fork.cseq.seq == 1
    assert a.call_id not in fork.to_bytes().decode()
    assert fork.max_forwards == 69
    assert "Proxy-Authorization" not in fork.headers
    assert fork.from_.uri is not None and fork.from_.uri.user == "1001"
    assert fork.body == SDP_A.replace(b"192.0.2.10", PBX_HOST.encode())
    b.ringing()
    assert a.statuses() == [100, 180]
    b.answer()
    final = a.final()
    assert final is not None and final.status == 200
    assert final.body == SDP_B.replace(b"192.0.2.20", PBX_HOST.encode())
    assert final.headers.get("Content-Type") == "application/sdp"
    # The B2BUA ACKs the callee's 2xx itself, in the callee's dialog.
    (ack,) = b.acks()
    assert ack.call_id == fork.call_id and ack.cseq.seq == 1 and ack.to.tag == b.tag
    # The CDR row is written "open" at answer: a crash now leaves a trace.
    assert h.cdr.rows[a.call_id]["state"] == "open"
    assert h.cdr.rows[a.call_id]["disposition"] == "ANSWERED"
    a.ack()
    assert only_call(h).state == "connected"
    h.advance(42)
    a.send("BYE")
    assert h.statuses_to(CALLER, "BYE") == [200]
    (bye,) = b.byes()
    assert bye.call_id == fork.call_id and bye.cseq.seq == 2
    b.reply_to_last("BYE")
    assert h.b2bua.active_calls == 0
    row = h.cdr.rows[a.call_id]
    assert row["state"] == "closed" and row["hangup_side"] == "caller"
    assert row["billsec"] == 42 and row["qos"]["mos"] == 4.3
    assert len(h.cdr.adds) == 1 and len(h.cdr.updates) == 1
    assert h.media.balanced() and len(h.media.allocated) == 2


def test_bye_from_the_callee_is_answered_and_relayed_to_the_caller() -> None:
    h = Harness()
    a, b = connected_call(h)
    b.send("BYE")
    assert [r.status for r in h.responses_to(B, "BYE")] == [200]
    (bye,) = h.requests_to(CALLER, "BYE")
    assert bye.call_id == a.call_id and bye.to.tag == a.tag
    assert only_call(h).state == "terminating"
    a.answer_request(bye)
    assert h.b2bua.active_calls == 0
    assert h.cdr.rows[a.call_id]["hangup_side"] == "callee"
    assert h.media.balanced()


def test_bye_crossing_bye_ends_the_call_once() -> None:
    h = Harness()
    a, b = connected_call(h)
    b.send("BYE")
    a.send("BYE")  # the caller hung up too before our BYE arrived
    assert h.statuses_to(CALLER, "BYE") == [200]
    assert h.b2bua.active_calls == 0
    assert len(h.cdr.updates) == 1


# -- failures towards the caller ---------------------------------------------------------


def test_no_call_without_authentication_and_no_user_enumeration() -> None:
    h = Harness()
    a = CallerPhone(h)
    a.dial(password="wrong")
    assert a.statuses()[-1] == 407
    stranger = CallerPhone(h, user="9999")
    stranger.dial()
    assert stranger.statuses()[-1] == 407
    assert h.failures == ["192.0.2.10", "192.0.2.10"]
    assert not h.requests_to(B)
    assert h.b2bua.total_calls == 0 and not h.cdr.adds
    challenge = h.responses_to(CALLER, "INVITE")[-1]
    assert challenge.headers.getall("Proxy-Authenticate")[0].startswith("Digest realm=")


def test_caller_must_call_as_the_authenticated_extension() -> None:
    h = Harness()
    a = CallerPhone(h, user="1003")
    first = a.build_invite()
    h.request(first, CALLER)
    challenge = h.responses_to(CALLER)[-1]
    invite = a.build_invite(authorization=a.authorization(
        challenge, "sip:1002@pbx.test", user="1001", password="secret-1001"))
    h.request(invite, CALLER)
    assert h.responses_to(CALLER)[-1].status == 403


def test_busy_callee_gives_486_and_a_busy_cdr() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.respond(486)
    assert a.statuses() == [100, 180, 486]
    assert len(b.acks()) == 1  # the ICT ACKs the 486
    a.ack_failure()
    row = h.cdr.rows[a.call_id]
    assert row["disposition"] == "BUSY" and row["hangup_side"] == "callee"
    assert row["state"] == "closed" and row["answer_time"] is None
    assert h.media.balanced() and h.b2bua.active_calls == 0


def test_unknown_numbers_get_404_and_unregistered_extensions_480() -> None:
    h = Harness(registered={})
    for number, status in (("1002", 480), ("4711", 404), ("abc", 404), ("1", 404)):
        a = CallerPhone(h)
        a.dial(number)
        assert a.statuses() == [100, status], number
        assert h.cdr.rows[a.call_id]["disposition"] == "FAILED"
    h.directory.disabled.add("1003")
    a = CallerPhone(h)
    a.dial("1003")
    assert a.statuses()[-1] == 480
    assert h.media.sessions == []  # no ports taken for calls that go nowhere


def test_ring_timeout_gives_480_and_cancels_the_forks() -> None:
    h = Harness(ring_timeout=20)
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    h.advance(19.9)
    assert a.statuses() == [100, 180]
    h.advance(0.2)
    assert a.statuses() == [100, 180, 480]
    (cancel,) = b.cancels()
    assert cancel.call_id == b.invite.call_id and cancel.cseq.method == "CANCEL"
    assert cancel.top_via.branch == b.invite.top_via.branch
    b.reply_to_last("CANCEL")
    b.respond(487)
    assert h.cdr.rows[a.call_id]["disposition"] == "NO ANSWER"
    assert h.media.balanced()


def test_caller_cancel_gives_487_and_cancels_downstream() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    a.cancel()
    assert [r.status for r in h.responses_to(CALLER, "CANCEL")] == [200]
    assert a.statuses()[-1] == 487
    assert len(b.cancels()) == 1
    row = h.cdr.rows[a.call_id]
    assert row["disposition"] == "CANCELLED" and row["hangup_side"] == "caller"
    assert h.media.balanced()


def test_cancel_waits_for_a_provisional_and_a_crossing_2xx_gets_ack_and_bye() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    a.cancel()
    assert b.cancels() == []  # §9.1: no CANCEL before a provisional response
    b.ringing()
    assert len(b.cancels()) == 1
    b.answer()  # the phone answered before it saw our CANCEL
    assert len(b.acks()) == 1 and len(b.byes()) == 1  # never a BYE before the 2xx
    assert a.statuses()[-1] == 487


def test_forking_first_2xx_wins_others_get_cancel_and_late_2xx_ack_bye() -> None:
    h = Harness(registered={"1002": [B, B2]})
    a = CallerPhone(h)
    b1, b2 = CalleePhone(h, B), CalleePhone(h, B2)
    a.dial()
    assert b1.invite.call_id != b2.invite.call_id
    b1.ringing()
    b2.ringing()
    b2.answer()
    assert a.final() is not None and a.final().status == 200  # type: ignore[union-attr]
    assert len(b1.cancels()) == 1 and b2.cancels() == []
    b1.answer()  # crossing our CANCEL
    assert len(b1.acks()) == 1 and len(b1.byes()) == 1
    assert b2.byes() == []
    a.ack()
    assert only_call(h).winner.peer == B2


def test_all_forks_failing_gives_the_best_response() -> None:
    h = Harness(registered={"1002": [B, B2]})
    a = CallerPhone(h)
    a.dial()
    CalleePhone(h, B).respond(404)
    assert a.statuses() == [100]
    CalleePhone(h, B2).respond(486)
    assert a.statuses() == [100, 486]


def test_unreachable_fork_fails_fast() -> None:
    h = Harness(registered={"1002": [B]})
    h.sender.unreachable.add(B)
    a = CallerPhone(h)
    a.dial()
    assert a.statuses()[-1] == 503
    assert h.media.balanced()


def test_early_media_183_is_relayed_with_rewritten_sdp() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.respond(183, SDP_B)
    early = h.responses_to(CALLER, "INVITE")[-1]
    assert early.status == 183
    assert early.body == SDP_B.replace(b"192.0.2.20", PBX_HOST.encode())


def test_bad_offer_gets_488_and_exhausted_ports_503() -> None:
    h = Harness()
    a = CallerPhone(h)
    a.dial(body=b"v=0\r\n")
    assert a.statuses()[-1] == 488
    h.media.exhausted = True
    a2 = CallerPhone(h)
    a2.dial()
    assert a2.statuses()[-1] == 503
    assert h.cdr.rows[a2.call_id]["disposition"] == "CONGESTION"
    assert h.media.balanced()


# -- protection --------------------------------------------------------------------------


def test_draining_refuses_new_invites_but_not_in_dialog_requests() -> None:
    h = Harness()
    a, b = connected_call(h)
    h.ready = False
    c = CallerPhone(h, user="1003")
    c.h.request(c.build_invite(), CALLER)
    refused = h.responses_to(CALLER, "INVITE")[-1]
    assert refused.status == 503 and refused.headers.get("Retry-After") == "17"
    a.send("BYE")
    assert h.statuses_to(CALLER, "BYE") == [200] and len(b.byes()) == 1


def test_max_calls_gives_503_with_a_congestion_cdr() -> None:
    h = Harness(max_calls=1)
    a = CallerPhone(h)
    a.dial()
    c = CallerPhone(h, user="1003")
    c.dial()
    assert c.statuses()[-1] == 503
    assert h.cdr.rows[c.call_id]["disposition"] == "CONGESTION"
    assert h.b2bua.active_calls == 1


def test_max_forwards_and_loops() -> None:
    h = Harness()
    a = CallerPhone(h)
    h.request(a.build_invite(max_forwards=0), CALLER)
    assert h.responses_to(CALLER)[-1].status == 483
    looped = a.build_invite()
    looped.headers.add("Via", f"SIP/2.0/UDP {PBX_HOST};branch={h.b2bua.branch_prefix}abc")
    h.request(looped, CALLER)
    assert h.responses_to(CALLER)[-1].status == 482
    hop = a.build_invite()
    hop.headers.add("X-Pbx-Hop", "node-a")
    h.request(hop, CALLER)
    assert h.responses_to(CALLER)[-1].status == 482


def test_unknown_dialogs_get_481_and_old_cseq_500() -> None:
    h = Harness()
    a, _b = connected_call(h)
    stray = CallerPhone(h)
    stray.invite = stray.build_invite()
    stray.remote_tag, stray.remote_target = "nope", a.remote_target
    stray.send("BYE")
    assert h.responses_to(CALLER, "BYE")[-1].status == 481
    a.send("INFO", seq=1)
    assert h.responses_to(CALLER, "INFO")[-1].status == 500
    # A CANCEL for nothing: 481.
    stray.invite = stray.build_invite()
    stray.cancel()
    assert h.responses_to(CALLER, "CANCEL")[-1].status == 481


# -- in-dialog traffic ----------------------------------------------------------------------


def test_info_and_options_are_relayed_in_dialog() -> None:
    h = Harness()
    a, b = connected_call(h)
    a.send("INFO", body=b"Signal=5\r\nDuration=160\r\n")
    (info,) = h.requests_to(B, "INFO")
    assert info.body.startswith(b"Signal=5") and info.call_id == b.invite.call_id
    b.reply_to_last("INFO", 200)
    assert h.responses_to(CALLER, "INFO")[-1].status == 200
    b.send("OPTIONS")
    (options,) = h.requests_to(CALLER, "OPTIONS")
    a.answer_request(options, 200)
    assert h.responses_to(B, "OPTIONS")[-1].status == 200
    # Outside a dialog OPTIONS is still the endpoint's capability answer.
    plain = Request("OPTIONS", a.invite.uri.copy(), a.invite.headers.copy())  # type: ignore
    plain.headers.set("CSeq", "99 OPTIONS")
    plain.headers.remove("Proxy-Authorization")
    h.request(plain, CALLER)
    assert "INVITE" in h.responses_to(CALLER, "OPTIONS")[-1].headers.getall("Allow")


def test_reinvite_hold_is_relayed_with_rewritten_sdp_and_glare_gets_491() -> None:
    h = Harness()
    a, b = connected_call(h)
    hold = SDP_A + b"a=sendonly\r\n"
    a.send("INVITE", body=hold)
    (reinvite,) = [r for r in h.requests_to(B, "INVITE") if r.to.tag]
    assert reinvite.body == b"RE:" + hold and reinvite.call_id == b.invite.call_id
    b.send("INVITE", body=SDP_B)  # glare: the callee re-INVITEs at the same time
    assert h.responses_to(B, "INVITE")[-1].status == 491
    b.reply_to_last("INVITE", 200, SDP_B + b"a=recvonly\r\n")
    assert len(b.acks()) == 2
    ok = h.responses_to(CALLER, "INVITE")[-1]
    assert ok.status == 200 and ok.body == b"REA:" + SDP_B + b"a=recvonly\r\n"
    assert ok.cseq.seq == a.cseq
    h.request(a._in_dialog("ACK", seq=a.cseq), CALLER)
    h.advance(5)
    assert h.responses_to(CALLER, "INVITE")[-1] is not None
    assert len([r for r in h.responses_to(CALLER, "INVITE") if r.cseq.seq == a.cseq]) == 1


def test_caller_2xx_is_retransmitted_until_ack_then_both_legs_get_bye() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.answer()
    h.advance(3.6)  # T1 doubling: 0.5, 1, 2 -> three retransmissions
    assert a.statuses().count(200) == 4
    h.advance(32)
    assert h.requests_to(CALLER, "BYE") and b.byes()
    h.advance(40)  # nobody answers the BYEs: their transactions time out
    assert h.b2bua.active_calls == 0
    assert h.cdr.rows[a.call_id]["hangup_cause"] == "ACK Timeout"


def test_bye_to_the_caller_waits_for_its_ack() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.answer()
    b.send("BYE")  # the callee hangs up before the caller's ACK arrived
    assert h.requests_to(CALLER, "BYE") == []  # §15: not before the ACK
    a.ack()
    assert len(h.requests_to(CALLER, "BYE")) == 1


def test_media_timeout_and_hangup_all_send_bye_with_reason() -> None:
    h = Harness()
    _a, b = connected_call(h)
    h.media.sessions[-1].time_out()
    h.advance(0)
    (bye,) = b.byes()
    assert "Media Timeout" in (bye.headers.get("Reason") or "")
    assert h.requests_to(CALLER, "BYE")
    h2 = Harness()
    connected_call(h2)
    assert [c["state"] for c in h2.b2bua.list_calls()] == ["connected"]
    assert h2.b2bua.hangup_all("maintenance") == 1
    (bye,) = h2.requests_to(B, "BYE")
    assert bye.headers.get("Reason") == 'SIP;cause=503;text="maintenance"'
    assert h2.b2bua.hangup("nope") is False


def test_cancel_during_credential_lookup_answers_487_and_starts_nothing() -> None:
    h = Harness()
    pending: list[Deferred] = []
    real = h.directory.credentials

    def slow(username: str) -> Deferred:
        d: Deferred = Deferred()
        pending.append(d)
        return d

    h.directory.credentials = slow  # type: ignore[method-assign]
    a = CallerPhone(h)
    a.dial()
    a.cancel()
    assert a.statuses()[-1] == 487
    pending[0].callback(real.__call__("1001").result)
    assert h.b2bua.total_calls == 0 and h.requests_to(B) == []
