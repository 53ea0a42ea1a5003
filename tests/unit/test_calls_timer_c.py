"""Timer C through the B2BUA (RFC 3261 §16.6-16.8): a callee that keeps ringing with no
final response is CANCELled when Timer C fires and the caller gets 408; each
provisional response resets Timer C."""

from __future__ import annotations

from tests.unit.test_calls_support import CalleePhone, CallerPhone, Harness, callee_peer

B = callee_peer(0)


def test_timer_c_cancels_the_callee_and_fails_the_caller_with_408() -> None:
    h = Harness(ring_timeout=10_000)  # the ring timer must not be what ends the call
    h.transactions.timer_c = 60.0
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    h.advance(59.0)
    b.respond(183)  # a provisional resets Timer C
    h.advance(59.9)
    assert b.cancels() == [] and a.statuses()[-1] != 408
    h.advance(0.2)
    (cancel,) = b.cancels()
    assert cancel.top_via.branch == b.invite.top_via.branch
    assert a.statuses()[-1] == 408
    b.reply_to_last("CANCEL")
    b.respond(487)
    assert len(b.acks()) == 1  # the INVITE transaction stayed to ACK the 487
    a.ack_failure()
    assert h.b2bua.active_calls == 0 and h.media.balanced()
    assert h.cdr.rows[a.call_id]["hangup_side"] == "callee"


def test_a_2xx_after_timer_c_is_acked_and_hung_up() -> None:
    h = Harness(ring_timeout=10_000)
    h.transactions.timer_c = 30.0
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    h.advance(30.1)
    assert a.statuses()[-1] == 408
    b.answer()  # crossed our CANCEL
    assert len(b.acks()) == 1 and len(b.byes()) == 1
