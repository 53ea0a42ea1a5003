"""Server transactions (RFC 3261 §17.2, RFC 6026): absorption, timers, matching, errors."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from pbx.sip.message import make_response
from pbx.sip.transactions import (
    InviteServerTransaction,
    NonInviteServerTransaction,
    Peer,
    SentResponse,
    ServerTransaction,
    TransportError,
)
from tests.unit.test_transactions_support import (
    TCP,
    UDP,
    ack_for,
    advance_to,
    make_request,
    reply,
    setup,
)

G_SCHEDULE = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]


def server_txn(tu: Any) -> ServerTransaction:
    txn = tu.requests[-1][1]
    assert txn is not None
    return txn


# -- NIST ------------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "transport", "j"), [(UDP, "UDP", 32.0), (TCP, "TCP", 0.0)])
def test_nist_final_then_timer_j(peer: Peer, transport: str, j: float) -> None:
    clock, sender, tu, mgr = setup()
    request = make_request("OPTIONS", transport=transport)
    mgr.handle_request(request, peer)
    txn = server_txn(tu)
    assert isinstance(txn, NonInviteServerTransaction)
    assert txn.state == "trying"
    advance_to(clock, 1.0)
    txn.respond(reply(request, 200))
    assert sender.sent[-1][2] == peer
    if j == 0:
        assert txn.state == "terminated"
    else:
        assert txn.state == "completed"
        assert txn.active_timers() == {"J": 32.0}
        advance_to(clock, 1.0 + j - 0.01)
        assert txn.state == "completed"
        mgr.handle_request(request, peer)  # retransmission: the 200 again
        assert sender.labels() == [200, 200]
        advance_to(clock, 1.0 + j)
        assert txn.state == "terminated"
    assert mgr.transactions() == []
    assert [e[0] for e in tu.events] == ["request"]  # retransmissions never reach the TU
    txn.respond(reply(request, 500))  # after the end: nothing is sent
    advance_to(clock, 1000)
    assert sender.labels() == ([200, 200] if j else [200])


def test_nist_absorbs_retransmissions_per_state() -> None:
    _, sender, tu, mgr = setup()
    request = make_request("REGISTER")
    mgr.handle_request(request, UDP)
    txn = server_txn(tu)
    mgr.handle_request(request, UDP)  # Trying: discarded
    assert sender.sent == []
    txn.respond(reply(request, 100))
    assert txn.state == "proceeding"
    mgr.handle_request(request, UDP)  # Proceeding: last provisional again
    txn.respond(reply(request, 183))
    mgr.handle_request(request, UDP)
    assert sender.labels() == [100, 100, 183, 183]
    txn.respond(reply(request, 401))
    txn.respond(reply(request, 200))  # a second final is discarded
    mgr.handle_request(request, UDP)
    assert sender.labels() == [100, 100, 183, 183, 401, 401]
    assert len(tu.requests) == 1
    assert mgr.stats.created["nist"] == 1
    assert mgr.stats.retransmissions_received["nist"] == 4


def test_nist_transport_error_terminates_and_tells_the_tu() -> None:
    clock, sender, tu, mgr = setup()
    request = make_request("OPTIONS")
    mgr.handle_request(request, UDP)
    txn = server_txn(tu)
    sender.fail = True
    txn.respond(reply(request, 200))
    assert txn.state == "terminated"
    assert tu.kinds() == ["request", "transport_error"]
    assert mgr.transactions() == []
    assert mgr.stats.terminated["nist"] == {"transport_error": 1}
    assert not clock.calls


def test_tu_without_optional_callbacks_is_fine() -> None:
    from twisted.internet.task import Clock

    from pbx.sip.transactions import TransactionManager
    from tests.unit.test_transactions_support import FakeSender

    class MinimalTU:
        def __init__(self) -> None:
            self.txns: list[Any] = []

        def request_received(self, request: Any, transaction: Any, peer: Any) -> None:
            self.txns.append(transaction)

    clock = Clock()
    sender = FakeSender(clock)
    tu = MinimalTU()
    mgr = TransactionManager(sender, tu, clock)
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    tu.txns[0].respond(reply(invite, 486))
    advance_to(clock, 100)  # Timer H: nobody to tell, no crash
    assert tu.txns[0].state == "terminated"
    mgr.handle_response(reply(invite, 200), UDP)  # stray, nobody to tell


# -- IST -------------------------------------------------------------------------------


def test_ist_sends_100_trying_after_200_ms_when_tu_is_silent() -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    txn = server_txn(tu)
    assert isinstance(txn, InviteServerTransaction)
    assert txn.state == "proceeding"
    advance_to(clock, 0.19)
    assert sender.sent == []
    advance_to(clock, 0.2)
    assert sender.labels() == [100]
    trying = sender.sent[0][1]
    assert trying.to.tag is None
    assert trying.headers.getall("Via") == invite.headers.getall("Via")
    mgr.handle_request(invite, UDP)  # retransmission gets the 100 again
    assert sender.labels() == [100, 100]
    advance_to(clock, 10)
    assert sender.labels() == [100, 100]


def test_ist_no_automatic_100_when_tu_answers_or_when_disabled() -> None:
    clock, sender, tu, mgr = setup()
    tu.on_request = lambda request, txn, peer: txn.respond(reply(request, 180))
    mgr.handle_request(make_request("INVITE"), UDP)
    advance_to(clock, 1.0)
    assert sender.labels() == [180]

    clock, sender, tu, mgr = setup(trying_delay=None)
    mgr.handle_request(make_request("INVITE"), UDP)
    advance_to(clock, 10.0)
    assert sender.sent == []
    assert server_txn(tu).state == "proceeding"

    clock, sender, tu, mgr = setup(trying_delay=0)
    mgr.handle_request(make_request("INVITE"), UDP)
    assert sender.labels() == [100]  # at once


def test_ist_retransmitted_invite_before_any_response_is_discarded() -> None:
    _, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    mgr.handle_request(invite, UDP)
    assert sender.sent == []
    assert len(tu.requests) == 1


def test_ist_timer_g_schedule_until_h_over_udp() -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    txn = server_txn(tu)
    txn.respond(reply(invite, 486))
    assert txn.state == "completed"
    advance_to(clock, 31.99)
    assert sender.times(486) == G_SCHEDULE
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert tu.kinds() == ["request", "timeout"]
    assert mgr.stats.terminated["ist"] == {"timeout": 1}
    advance_to(clock, 1000)
    assert sender.times(486) == G_SCHEDULE


def test_ist_timer_g_absent_over_tcp_but_h_applies() -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", transport="TCP")
    mgr.handle_request(invite, TCP)
    txn = server_txn(tu)
    txn.respond(reply(invite, 603))
    advance_to(clock, 31.99)
    assert sender.labels() == [603]
    assert txn.state == "completed"
    mgr.handle_request(invite, TCP)  # retransmitted INVITE still gets the final again
    assert sender.labels() == [603, 603]
    advance_to(clock, 32.0)
    assert txn.state == "terminated"


@pytest.mark.parametrize(("peer", "transport", "i"), [(UDP, "UDP", 5.0), (TCP, "TCP", 0.0)])
def test_ist_ack_for_failure_is_absorbed_then_timer_i(peer: Peer, transport: str,
                                                      i: float) -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", transport=transport)
    mgr.handle_request(invite, peer)
    txn = server_txn(tu)
    final = reply(invite, 486)
    txn.respond(final)
    advance_to(clock, 2.0)
    ack = ack_for(invite, final)
    mgr.handle_request(ack, peer)
    assert len(tu.requests) == 1  # the ACK was absorbed
    sent = len(sender.sent)
    if i == 0:
        assert txn.state == "terminated"
    else:
        assert txn.state == "confirmed"
        mgr.handle_request(ack, peer)  # ACK retransmission absorbed
        mgr.handle_request(invite, peer)  # INVITE retransmission absorbed
        advance_to(clock, 2.0 + i - 0.01)
        assert txn.state == "confirmed"
        advance_to(clock, 2.0 + i)
        assert txn.state == "terminated"
    assert len(sender.sent) == sent  # nothing after the ACK: G stopped
    assert len(tu.requests) == 1
    assert mgr.stats.terminated["ist"] == {"completed": 1}


@pytest.mark.parametrize("peer", [UDP, TCP])
def test_ist_accepted_absorbs_invites_passes_2xx_and_acks_then_timer_l(peer: Peer) -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", transport=peer.transport.upper())
    mgr.handle_request(invite, peer)
    txn = server_txn(tu)
    ok = reply(invite, 200)
    txn.respond(reply(invite, 180))
    txn.respond(ok)
    assert txn.state == "accepted"
    assert txn.active_timers() == {"L": 32.0}
    advance_to(clock, 0.5)
    mgr.handle_request(invite, peer)  # INVITE retransmission: absorbed, nothing sent
    assert sender.labels() == [180, 200]
    txn.respond(ok)  # the TU (the UAS core) retransmits its 2xx itself
    txn.respond(reply(invite, 500))  # non-2xx after a 2xx: discarded
    assert sender.labels() == [180, 200, 200]
    # ACK for the 2xx with a new branch: no transaction, straight to the TU.
    mgr.handle_request(ack_for(invite, ok, branch="z9hG4bKack2xx"), peer)
    # A peer reusing the INVITE's branch for the 2xx ACK: matched, passed up too.
    mgr.handle_request(ack_for(invite, ok), peer)
    assert [(r.method, t) for r, t, _ in tu.requests[1:]] == [("ACK", None), ("ACK", None)]
    assert txn.state == "accepted"
    advance_to(clock, 31.99)
    assert txn.state == "accepted"
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert mgr.transactions() == []
    mgr.handle_request(invite, peer)  # after L a retransmission is a new transaction
    assert len(mgr.transactions()) == 1


def test_ist_transport_error_terminates_and_tells_the_tu() -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    txn = server_txn(tu)
    txn.respond(reply(invite, 486))
    sender.fail = True
    advance_to(clock, 0.5)  # Timer G retransmission fails
    assert txn.state == "terminated"
    assert tu.kinds() == ["request", "transport_error"]
    assert not clock.calls


# -- matching --------------------------------------------------------------------------


def test_matching_uses_branch_sent_by_and_method() -> None:
    _, _, tu, mgr = setup()
    request = make_request("OPTIONS", branch="z9hG4bKsame")
    mgr.handle_request(request, UDP)
    # Same branch from another sent-by or with another method: new transactions.
    mgr.handle_request(make_request("OPTIONS", branch="z9hG4bKsame", via_host="10.0.0.3"), UDP)
    mgr.handle_request(make_request("INFO", branch="z9hG4bKsame"), UDP)
    mgr.handle_request(make_request("OPTIONS", branch="z9hG4bKsame", via_port=5070), UDP)
    # A default port equals 5060.
    mgr.handle_request(make_request("OPTIONS", branch="z9hG4bKsame", via_host="10.0.0.2",
                                    via_port=5060), UDP)
    assert len(tu.requests) == 4
    assert mgr.stats.created["nist"] == 4


def test_cancel_is_its_own_transaction_and_finds_its_invite() -> None:
    _, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    ist = server_txn(tu)
    cancel = make_request("CANCEL", branch=invite.top_via.branch)
    mgr.handle_request(cancel, UDP)
    cancel_txn = server_txn(tu)
    assert isinstance(cancel_txn, NonInviteServerTransaction)
    assert cancel_txn is not ist
    assert mgr.find_invite_server_transaction(cancel) is ist
    cancel_txn.respond(reply(cancel, 200))
    ist.respond(reply(invite, 487))
    assert sender.labels() == [200, 487]
    other = make_request("CANCEL")
    assert mgr.find_invite_server_transaction(other) is None
    broken = make_request("CANCEL")
    broken.headers.remove("Via")
    assert mgr.find_invite_server_transaction(broken) is None


def test_rfc2543_matching_without_magic_cookie() -> None:
    _clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", branch="")
    mgr.handle_request(invite, UDP)
    ist = server_txn(tu)
    mgr.handle_request(make_request("INVITE", branch=""), UDP)  # identical: retransmission
    assert len(tu.requests) == 1
    mgr.handle_request(make_request("INVITE", branch="", seq=2), UDP)  # new CSeq: new txn
    mgr.handle_request(make_request("INVITE", branch="", from_tag="x"), UDP)
    mgr.handle_request(make_request("INVITE", branch="", call_id="other"), UDP)
    mgr.handle_request(make_request("INVITE", branch="", uri="sip:carol@10.0.0.1"), UDP)
    mgr.handle_request(make_request("INVITE", branch="", via_host="10.0.0.9"), UDP)
    assert len(tu.requests) == 6
    # CANCEL matches by everything but the method.
    cancel = make_request("CANCEL", branch="")
    assert mgr.find_invite_server_transaction(cancel) is ist
    mgr.handle_request(cancel, UDP)
    assert isinstance(server_txn(tu), NonInviteServerTransaction)
    # ACK carries the response's To tag, which the INVITE did not have.
    final = make_response(invite, 486, to_tag="srv")
    ist.respond(final)
    mgr.handle_request(ack_for(invite, make_response(invite, 486, to_tag="wrong")), UDP)
    assert ist.state == "completed"  # wrong To tag: not this transaction
    assert tu.requests[-1][0].method == "ACK"
    mgr.handle_request(ack_for(invite, final), UDP)
    assert ist.state == "confirmed"
    # Non-INVITE retransmission without a cookie.
    options = make_request("OPTIONS", branch="")
    mgr.handle_request(options, UDP)
    nist = server_txn(tu)
    nist.respond(reply(options, 200))
    mgr.handle_request(make_request("OPTIONS", branch=""), UDP)
    assert server_txn(tu) is nist
    assert sender.labels()[-2:] == [200, 200]


def test_rfc2543_reinvite_ack_with_to_tag_matches() -> None:
    _, _, tu, mgr = setup()
    reinvite = make_request("INVITE", branch="", to_tag="dlg", seq=7)
    mgr.handle_request(reinvite, UDP)
    ist = server_txn(tu)
    final = reply(reinvite, 488, to_tag="ignored")  # To already carries the tag
    ist.respond(final)
    mgr.handle_request(ack_for(reinvite, final), UDP)
    assert ist.state == "confirmed"


def test_unmatchable_requests_are_dropped_and_counted() -> None:
    _, sender, tu, mgr = setup()
    request = make_request("OPTIONS")
    request.headers.remove("Via")
    mgr.handle_request(request, UDP)
    request = make_request("OPTIONS")
    request.headers.set("CSeq", "x OPTIONS")
    request.headers.set("Via", "SIP/2.0/UDP 10.0.0.2")  # no branch: RFC 2543 path
    mgr.handle_request(request, UDP)
    assert tu.requests == []
    assert sender.sent == []
    assert mgr.stats.dropped == 2


def test_stray_ack_goes_to_the_tu_without_transaction() -> None:
    _, _, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(make_request("ACK"), UDP)
    assert tu.requests[0][1] is None
    assert mgr.transactions() == []
    assert mgr.stats.stray_acks == 1
    # An ACK reaching an IST still in Proceeding is neither absorbed nor passed up.
    mgr.handle_request(invite, UDP)
    mgr.handle_request(ack_for(invite, reply(invite, 200)), UDP)
    assert [r.method for r, _, _ in tu.requests] == ["ACK", "INVITE"]


def test_counts_track_server_states() -> None:
    _, _, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    mgr.handle_request(make_request("OPTIONS"), UDP)
    server_txn(tu).respond(reply(tu.requests[-1][0], 100))
    counts = mgr.counts
    assert counts["ist"]["proceeding"] == 1
    assert counts["nist"]["proceeding"] == 1
    assert mgr.stats.created == {"ist": 1, "nist": 1}


# -- what a completed NIST keeps -------------------------------------------------------


class WireSender:
    """A transport that, like SIPTransport, returns what it sent and can repeat it."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes, Peer]] = []
        self.fail = False

    def send_request(self, request: Any, peer: Peer) -> None:
        self.sent.append((self.clock.seconds(), request.to_bytes(), peer))

    def send_response(self, response: Any, peer: Peer) -> SentResponse:
        data = response.to_bytes()
        self.resend_response(SentResponse(data, peer, peer, response.status))
        return SentResponse(data, peer, peer, response.status)

    def resend_response(self, sent: SentResponse) -> None:
        if self.fail:
            raise TransportError("unreachable")
        self.sent.append((self.clock.seconds(), sent.data, sent.destination))


def test_completed_nist_keeps_only_the_final_response_bytes() -> None:
    clock, _, tu, mgr = setup()
    sender = WireSender(clock)
    mgr.sender = sender
    request = make_request("REGISTER")
    mgr.handle_request(request, UDP)
    txn = server_txn(tu)
    final = reply(request, 200)
    txn.respond(final)
    assert txn.state == "completed"
    assert txn.request is None
    assert txn._last_response is None  # type: ignore[attr-defined]
    assert txn.last_response == final  # rebuilt from the bytes on demand
    mgr.handle_request(request, UDP)  # a retransmission gets the same bytes
    assert [data for _, data, _ in sender.sent] == [final.to_bytes()] * 2
    assert mgr.stats.retransmissions_sent["nist"] == 1
    sender.fail = True
    mgr.handle_request(request, UDP)
    assert txn.state == "terminated"
    assert tu.kinds() == ["request", "transport_error"]
    assert not clock.calls


def test_completed_nist_with_a_plain_sender_keeps_the_response_object() -> None:
    _, sender, tu, mgr = setup()
    request = make_request("REGISTER")
    mgr.handle_request(request, UDP)
    txn = server_txn(tu)
    final = reply(request, 401)
    txn.respond(final)
    assert txn.request is None
    assert txn.last_response is final
    mgr.handle_request(request, UDP)
    assert sender.labels() == [401, 401]


def test_ended_transactions_are_freed_by_reference_counting() -> None:
    """No reference cycle may keep an ended transaction (with its messages) for the
    cyclic garbage collector: the timers' bookkeeping once did."""
    clock, _, tu, mgr = setup()
    mgr.sender = WireSender(clock)
    refs = []
    gc.disable()
    try:
        for i in range(3):
            request = make_request("REGISTER", call_id=f"c{i}")
            mgr.handle_request(request, UDP)
            server_txn(tu).respond(reply(request, 200))
            refs.append(weakref.ref(server_txn(tu)))
        invite = make_request("INVITE")
        mgr.handle_request(invite, UDP)
        server_txn(tu).respond(reply(invite, 486))
        refs.append(weakref.ref(server_txn(tu)))
        mgr.handle_request(ack_for(invite, reply(invite, 486)), UDP)
        tu.requests.clear()
        tu.events.clear()
        advance_to(clock, 100.0)
        assert mgr.transactions() == []
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()
    assert not clock.calls


def test_timers_of_one_delay_share_one_reactor_call_and_fire_in_order() -> None:
    clock, _, tu, mgr = setup()
    txns = []
    for i in range(5):
        request = make_request("OPTIONS", call_id=f"c{i}")
        mgr.handle_request(request, UDP)
        server_txn(tu).respond(reply(request, 200))
        txns.append(server_txn(tu))
        advance_to(clock, clock.seconds() + 1.0)
    assert len(clock.calls) == 1  # five Timer Js, one reactor call
    advance_to(clock, 32.0)  # the first was armed at t=0
    assert [t.state for t in txns] == ["terminated"] + ["completed"] * 4
    advance_to(clock, 34.99)
    assert [t.state for t in txns] == ["terminated"] * 3 + ["completed"] * 2
    advance_to(clock, 36.0)
    assert all(t.state == "terminated" for t in txns)
    assert not clock.calls
