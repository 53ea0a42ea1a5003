"""100rel, UPDATE and session timers leave no reference cycle behind (issue 11.6 rules):
a call that used them is freed by reference counting alone, with its CallFeatures, its
reliable-provisional and session-timer models (``test_call_cycles`` harness)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from pbx.calls.session_timer import TimerPolicy
from pbx.sip import make_response
from tests.unit.test_call_cycles import _harness, _parts, no_automatic_gc  # noqa: F401
from tests.unit.test_calls_early_update import caller_early, update_from_caller
from tests.unit.test_calls_features import Caller, reliable
from tests.unit.test_calls_support import (
    CALLER,
    SDP_A,
    SDP_B,
    CalleePhone,
    Harness,
    callee_peer,
)

B = callee_peer(0)
CALLS = 3


def _answer(h: Harness, b: CalleePhone, extra: list[tuple[str, str]]) -> None:
    response = make_response(b.invite, 200, to_tag=b.tag)
    response.headers.add("Contact", f"<sip:{b.user}@{b.peer.host}:{b.peer.port}>")
    response.headers.add("Allow", "INVITE, ACK, BYE, UPDATE")
    for name, value in extra:
        response.headers.add(name, value)
    response.headers.add("Content-Type", "application/sdp")
    response.body = SDP_B
    h.response(response, B)


def reliable_update_bye(h: Harness) -> None:
    h.b2bua.session_timer = TimerPolicy(expires=1800, min_se=90)
    a = Caller(h, [("Require", "100rel"), ("Supported", "100rel, timer"),
                   ("Allow", "INVITE, ACK, BYE, UPDATE")])
    b = CalleePhone(h, B)
    a.dial()
    reliable(b, 180, 5)
    b.reply_to_last("PRACK")
    rseq = a.provisionals()[-1].headers.get("RSeq")
    a.prack(f"{rseq} {a.invite.cseq.seq} INVITE")
    _answer(h, b, [("Session-Expires", "90;refresher=uac")])
    a.ack()
    a.send("UPDATE", body=SDP_A + b"a=sendonly\r\n")       # hold, by UPDATE
    b.reply_to_last("UPDATE", 200, SDP_B + b"a=recvonly\r\n")
    h.advance(45)                      # our refresh UPDATE to the callee
    assert len({r.cseq.seq for r in h.requests_to(B, "UPDATE")}) == 2
    b.reply_to_last("UPDATE")
    a.send("BYE")
    b.reply_to_last("BYE")


def session_expires(h: Harness) -> None:
    h.b2bua.session_timer = TimerPolicy(expires=90, min_se=90)
    a = Caller(h, [("Supported", "timer"), ("Session-Expires", "90;refresher=uac")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    _answer(h, b, [])
    a.ack()
    h.advance(61)                      # the caller never refreshes: BYE both legs
    a.answer_request(h.requests_to(CALLER, "BYE")[-1])
    b.reply_to_last("BYE")


def prack_never_comes(h: Harness) -> None:
    a = Caller(h, [("Require", "100rel")])
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    h.advance(33)                      # 500 to the caller, CANCEL to the callee
    b.reply_to_last("CANCEL")
    b.respond(487)
    a.ack_failure()


def early_updates_then_cancel(h: Harness) -> None:
    """UPDATE both ways in the early dialogs (RFC 3311 §5.1), then the caller cancels:
    the fork's early dialog leaves the table with it."""
    b = CalleePhone(h, B)
    a = caller_early(h, b)
    update_from_caller(h, a, SDP_A + b"a=sendonly\r\n")
    b.reply_to_last("UPDATE", 200, SDP_B + b"a=recvonly\r\n")
    b.send("UPDATE", SDP_B)
    a.answer_request(h.requests_to(CALLER, "UPDATE")[-1], 200, SDP_A)
    a.cancel()
    b.reply_to_last("CANCEL")
    b.respond(487)
    a.ack_failure()


SCENARIOS = [reliable_update_bye, session_expires, prack_never_comes,
             early_updates_then_cancel]


def _run(scenario: Callable[[Harness], None]) -> tuple[Harness, list[weakref.ref[Any]]]:
    h, refs = _harness(scenario)
    h.ring_timeout = 120
    h.b2bua.ring_timeout = 120

    def features(call: Any) -> None:
        f = call.features
        objects = [f, f.caller_rel, *f.timers.values()]
        refs.extend(weakref.ref(o) for o in objects if o is not None)

    h.b2bua.call_ended_hooks.append(features)
    for _ in range(CALLS):
        scenario(h)
    h.advance(100)
    assert h.b2bua.active_calls == 0 and not h.b2bua.dialogs
    assert not h.transactions.transactions()
    return h, refs


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_calls_with_extensions_are_freed_by_reference_counting(
        scenario: Callable[[Harness], None], no_automatic_gc: None) -> None:  # noqa: F811
    _run(scenario)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    _h, refs = _run(scenario)
    assert len(refs) >= CALLS * 3
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f"still referenced without a collection: {alive[:5]}"
    assert _parts  # (the harness's own parts are collected by _harness's hook)
