"""Client transactions (RFC 3261 §17.1, RFC 6026): schedules, absorption, ACK, errors."""

from __future__ import annotations

import pytest

from pbx.sip.message import Request
from pbx.sip.transactions import (
    InviteClientTransaction,
    NonInviteClientTransaction,
    Peer,
    TransportError,
    new_branch,
)
from tests.unit.test_transactions_support import (
    TCP,
    UDP,
    advance_to,
    make_request,
    reply,
    setup,
)

NICT_UDP_SCHEDULE = [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
ICT_UDP_SCHEDULE = [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


def test_new_branch_has_magic_cookie_and_is_unique() -> None:
    branches = {new_branch() for _ in range(1000)}
    assert len(branches) == 1000
    assert all(b.startswith("z9hG4bK") and len(b) > 7 + 8 for b in branches)


def test_peer_reliability() -> None:
    assert not Peer("udp", "h", 1).reliable
    assert Peer("tcp", "h", 1).reliable
    assert Peer("tls", "h", 1).reliable


# -- NICT ------------------------------------------------------------------------------


def test_nict_udp_retransmits_e_doubling_to_t2_until_f() -> None:
    clock, sender, tu, mgr = setup()
    txn = mgr.send_request(make_request("OPTIONS"), UDP, tu)
    assert isinstance(txn, NonInviteClientTransaction)
    assert txn.state == "trying"
    advance_to(clock, 31.99)
    assert sender.times("OPTIONS") == NICT_UDP_SCHEDULE
    assert tu.kinds() == []
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert tu.kinds() == ["timeout"]
    assert tu.events[0][2] is txn
    advance_to(clock, 200)
    assert sender.times() == NICT_UDP_SCHEDULE
    assert mgr.transactions() == []
    assert mgr.stats.terminated["nict"] == {"timeout": 1}
    assert mgr.stats.retransmissions_sent["nict"] == len(NICT_UDP_SCHEDULE) - 1


def test_nict_tcp_never_retransmits_and_times_out_at_f() -> None:
    clock, sender, tu, mgr = setup()
    txn = mgr.send_request(make_request("OPTIONS", transport="TCP"), TCP, tu)
    advance_to(clock, 31.99)
    assert sender.times() == [0.0]
    assert txn.state == "trying"
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert tu.kinds() == ["timeout"]


def test_nict_timers_follow_configured_t1_t2() -> None:
    clock, sender, tu, mgr = setup(t1=0.1, t2=0.4)
    mgr.send_request(make_request("OPTIONS"), UDP, tu)
    advance_to(clock, 10)
    assert sender.times() == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.1, 1.5, 1.9, 2.3, 2.7, 3.1,
                                            3.5, 3.9, 4.3, 4.7, 5.1, 5.5, 5.9, 6.3])
    assert tu.kinds() == ["timeout"]  # F = 64*T1 = 6.4


def test_nict_after_provisional_e_keeps_countdown_then_fires_every_t2() -> None:
    clock, sender, tu, mgr = setup()
    request = make_request("REGISTER")
    txn = mgr.send_request(request, UDP, tu)
    advance_to(clock, 2.0)
    mgr.handle_response(reply(request, 100), UDP)
    assert txn.state == "proceeding"
    assert tu.statuses() == [100]
    advance_to(clock, 31.99)
    # 0, 0.5, 1.5 in Trying; E then still fires at 3.5 and is reset to T2 each time.
    assert sender.times() == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    advance_to(clock, 32.0)  # F was not restarted by the provisional
    assert txn.state == "terminated"
    assert tu.kinds() == ["response", "timeout"]


def test_nict_early_provisional_switches_to_t2() -> None:
    clock, sender, tu, mgr = setup()
    request = make_request("OPTIONS")
    mgr.send_request(request, UDP, tu)
    advance_to(clock, 0.2)
    mgr.handle_response(reply(request, 180), UDP)
    mgr.handle_response(reply(request, 183), UDP)
    advance_to(clock, 31.99)
    assert sender.times() == [0.0, 0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
    assert tu.statuses() == [180, 183]


@pytest.mark.parametrize(("peer", "transport", "k"), [(UDP, "UDP", 5.0), (TCP, "TCP", 0.0)])
def test_nict_completed_absorbs_retransmitted_finals_for_timer_k(
        peer: Peer, transport: str, k: float) -> None:
    clock, sender, tu, mgr = setup()
    request = make_request("BYE", transport=transport)
    txn = mgr.send_request(request, peer, tu)
    advance_to(clock, 1.0)
    mgr.handle_response(reply(request, 200), peer)
    assert tu.statuses() == [200]
    if k == 0:
        assert txn.state == "terminated"
        assert mgr.transactions() == []
    else:
        assert txn.state == "completed"
        assert txn.active_timers() == {"K": 5.0}
        advance_to(clock, 3.0)
        mgr.handle_response(reply(request, 200), peer)  # retransmission: absorbed
        assert tu.statuses() == [200]
        advance_to(clock, 1.0 + k - 0.01)
        assert txn.state == "completed"
        advance_to(clock, 1.0 + k)
        assert txn.state == "terminated"
    assert sender.times() == ([0.0, 0.5] if k else [0.0])
    mgr.handle_response(reply(request, 200), peer)  # after the end: stray
    assert tu.kinds()[-1] == "stray"
    assert mgr.stats.terminated["nict"] == {"completed": 1}


# -- ICT -------------------------------------------------------------------------------


def test_ict_udp_timer_a_doubles_until_b() -> None:
    clock, sender, tu, mgr = setup()
    txn = mgr.send_request(make_request("INVITE"), UDP, tu)
    assert isinstance(txn, InviteClientTransaction)
    assert txn.state == "calling"
    advance_to(clock, 31.99)
    assert sender.times("INVITE") == ICT_UDP_SCHEDULE
    assert txn.state == "calling"
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert tu.kinds() == ["timeout"]
    advance_to(clock, 500)
    assert sender.times() == ICT_UDP_SCHEDULE
    assert mgr.stats.terminated["ict"] == {"timeout": 1}


def test_ict_tcp_sends_once_and_times_out_at_b() -> None:
    clock, sender, tu, mgr = setup()
    txn = mgr.send_request(make_request("INVITE", transport="TCP"), TCP, tu)
    advance_to(clock, 32.0)
    assert sender.times() == [0.0]
    assert txn.state == "terminated"
    assert tu.kinds() == ["timeout"]


def test_ict_provisional_stops_retransmissions_and_b() -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, tu)
    advance_to(clock, 0.7)
    mgr.handle_response(reply(invite, 100), UDP)
    mgr.handle_response(reply(invite, 180), UDP)
    assert txn.state == "proceeding"
    advance_to(clock, 179.9)
    assert sender.times() == [0.0, 0.5]
    assert txn.state == "proceeding"
    assert tu.statuses() == [100, 180]


def test_ict_timer_c_guards_proceeding_and_can_be_disabled() -> None:
    clock, _, tu, mgr = setup()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, tu)
    mgr.handle_response(reply(invite, 180), UDP)
    advance_to(clock, 180.0)
    # A user without timer_c_fired hears a timeout; the transaction waits (64*T1) for
    # the final response to the CANCEL that §16.8 asks for, then ends.
    assert txn.state == "cancelling"
    assert tu.kinds() == ["response", "timeout"]
    advance_to(clock, 212.0)
    assert txn.state == "terminated"
    assert tu.kinds() == ["response", "timeout"]

    clock, _, tu, mgr = setup(timer_c=None)
    txn = mgr.send_request(invite, UDP, tu)
    mgr.handle_response(reply(invite, 180), UDP)
    advance_to(clock, 10_000)
    assert txn.state == "proceeding"
    assert not clock.calls


@pytest.mark.parametrize(("peer", "transport", "d"), [(UDP, "UDP", 32.0), (TCP, "TCP", 0.0)])
def test_ict_failure_is_acked_passed_up_once_and_absorbed_for_timer_d(
        peer: Peer, transport: str, d: float) -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", transport=transport)
    txn = mgr.send_request(invite, peer, tu)
    advance_to(clock, 1.0)
    mgr.handle_response(reply(invite, 486), peer)
    assert tu.statuses() == [486]
    assert sender.labels()[-1] == "ACK"
    if d == 0:
        assert txn.state == "terminated"
        assert sender.labels() == ["INVITE", "ACK"]
        return
    assert txn.state == "completed"
    advance_to(clock, 5.0)
    mgr.handle_response(reply(invite, 486), peer)  # retransmission: re-ACKed, not passed up
    assert tu.statuses() == [486]
    assert sender.times("ACK") == [1.0, 5.0]
    advance_to(clock, 1.0 + d - 0.01)
    assert txn.state == "completed"
    advance_to(clock, 1.0 + d)
    assert txn.state == "terminated"
    assert sender.labels() == ["INVITE", "INVITE", "ACK", "ACK"]


def test_ict_builds_the_ack_for_a_failure_header_by_header() -> None:
    _clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", seq=314, routes=("<sip:p1.example.com;lr>",
                                                     "<sip:p2.example.com;lr>"))
    invite.headers.add("Subject", "not copied")
    mgr.send_request(invite, UDP, tu)
    response = reply(invite, 404, to_tag="resp-tag")
    mgr.handle_response(response, UDP)
    _, ack, peer = sender.sent[-1]
    assert isinstance(ack, Request)
    assert peer == UDP
    assert ack.method == "ACK"
    assert str(ack.uri) == str(invite.uri)
    assert ack.headers.getall("Via") == [invite.headers.getall("Via")[0]]
    assert ack.top_via.branch == invite.top_via.branch
    assert ack.call_id == invite.call_id
    assert ack.headers.get("From") == invite.headers.get("From")
    assert ack.to.tag == "resp-tag"
    assert ack.headers.get("To") == response.headers.get("To")
    assert (ack.cseq.seq, ack.cseq.method) == (314, "ACK")
    assert ack.headers.getall("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert ack.max_forwards == 69
    assert ack.headers.get("Subject") is None
    assert ack.headers.get("Contact") is None
    assert ack.body == b""
    assert b"Content-Length: 0" in ack.to_bytes()


@pytest.mark.parametrize("peer", [UDP, TCP])
def test_ict_success_enters_accepted_passes_every_2xx_for_timer_m(peer: Peer) -> None:
    clock, sender, tu, mgr = setup()
    invite = make_request("INVITE", transport=peer.transport.upper())
    txn = mgr.send_request(invite, peer, tu)
    advance_to(clock, 2.0)
    mgr.handle_response(reply(invite, 180), peer)
    mgr.handle_response(reply(invite, 200, to_tag="fork1"), peer)
    assert txn.state == "accepted"
    advance_to(clock, 10.0)
    mgr.handle_response(reply(invite, 200, to_tag="fork1"), peer)  # retransmission
    mgr.handle_response(reply(invite, 200, to_tag="fork2"), peer)  # another fork
    mgr.handle_response(reply(invite, 486), peer)  # non-2xx in Accepted: discarded
    mgr.handle_response(reply(invite, 183), peer)
    assert tu.statuses() == [180, 200, 200, 200]
    assert "ACK" not in sender.labels()  # ACK for 2xx is the TU's job
    advance_to(clock, 2.0 + 32.0 - 0.01)
    assert txn.state == "accepted"
    advance_to(clock, 2.0 + 32.0)
    assert txn.state == "terminated"
    mgr.handle_response(reply(invite, 200, to_tag="fork1"), peer)
    assert tu.kinds()[-1] == "stray"
    assert mgr.stats.stray_responses == 1


def test_ict_transport_error_on_first_send_terminates_and_tells_the_user() -> None:
    clock, sender, tu, mgr = setup()
    sender.fail = True
    txn = mgr.send_request(make_request("INVITE"), UDP, tu)
    assert txn.state == "terminated"
    assert tu.kinds() == ["transport_error"]
    assert mgr.transactions() == []
    sender.fail = False
    advance_to(clock, 100)
    assert sender.sent == []
    assert mgr.stats.terminated["ict"] == {"transport_error": 1}


def test_nict_transport_error_on_retransmission() -> None:
    clock, sender, tu, mgr = setup()
    txn = mgr.send_request(make_request("MESSAGE"), UDP, tu)
    sender.fail = True
    advance_to(clock, 0.5)
    assert txn.state == "terminated"
    assert tu.kinds() == ["transport_error"]
    sender.fail = False
    advance_to(clock, 100)
    assert sender.times() == [0.0]
    assert not clock.calls


def test_ict_transport_error_while_acking_is_reported_after_the_response() -> None:
    _, sender, tu, mgr = setup()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, tu)
    sender.fail = True
    mgr.handle_response(reply(invite, 503), UDP)
    assert txn.state == "terminated"
    assert tu.kinds() == ["response", "transport_error"]


def test_send_request_refuses_ack_missing_cookie_and_duplicates() -> None:
    _, _sender, tu, mgr = setup()
    with pytest.raises(ValueError, match="ACK"):
        mgr.send_request(make_request("ACK"), UDP, tu)
    with pytest.raises(ValueError, match="z9hG4bK"):
        mgr.send_request(make_request("OPTIONS", branch="old-style"), UDP, tu)
    request = make_request("OPTIONS")
    mgr.send_request(request, UDP, tu)
    with pytest.raises(ValueError, match="already used"):
        mgr.send_request(request, UDP, tu)
    # The same branch with another method is another transaction (CANCEL vs INVITE).
    invite = make_request("INVITE")
    cancel = make_request("CANCEL", branch=invite.top_via.branch)
    ict = mgr.send_request(invite, UDP, tu)
    nict = mgr.send_request(cancel, UDP, tu)
    mgr.handle_response(reply(cancel, 200), UDP)
    assert (ict.state, nict.state) == ("calling", "completed")
    mgr.handle_response(reply(invite, 487), UDP)
    assert ict.state == "completed"


def test_send_ack_and_stateless_bypass_transactions() -> None:
    _, sender, _tu, mgr = setup()
    invite = make_request("INVITE")
    ok = reply(invite, 200)
    ack = make_request("ACK")
    mgr.send_ack(ack, UDP)
    mgr.send_stateless(ok, UDP)
    assert sender.labels() == ["ACK", 200]
    assert mgr.transactions() == []
    with pytest.raises(ValueError, match="ACK"):
        mgr.send_ack(invite, UDP)
    sender.fail = True
    with pytest.raises(TransportError):
        mgr.send_ack(ack, UDP)


def test_response_matching_uses_branch_and_cseq_method() -> None:
    _, _, tu, mgr = setup()
    request = make_request("OPTIONS")
    txn = mgr.send_request(request, UDP, tu)
    other = make_request("OPTIONS")  # different branch
    mgr.handle_response(reply(other, 200), UDP)
    assert txn.state == "trying"
    assert tu.kinds() == ["stray"]
    wrong_method = reply(request, 200)
    wrong_method.headers.set("CSeq", "1 INFO")
    mgr.handle_response(wrong_method, UDP)
    assert txn.state == "trying"
    broken = reply(request, 200)
    broken.headers.remove("Via")
    mgr.handle_response(broken, UDP)
    assert mgr.stats.dropped == 1
    mgr.handle_response(reply(request, 200), UDP)
    assert txn.state == "completed"


def test_counts_and_cancel_timers() -> None:
    clock, _, tu, mgr = setup()
    invite = make_request("INVITE")
    mgr.send_request(invite, UDP, tu)
    mgr.send_request(make_request("OPTIONS"), UDP, tu)
    mgr.handle_response(reply(invite, 180), UDP)
    counts = mgr.counts
    assert counts["ict"]["proceeding"] == 1
    assert counts["nict"]["trying"] == 1
    assert sum(sum(c.values()) for c in counts.values()) == 2
    assert set(counts) == {"ict", "nict", "ist", "nist"}
    mgr.close()
    assert not clock.calls
    assert mgr.transactions() == []


def test_a_failing_user_callback_does_not_strand_the_transaction() -> None:
    clock, sender, tu, mgr = setup()

    def boom(transaction: object, response: object) -> None:
        raise RuntimeError("TU bug")

    tu.response_received = boom  # type: ignore[method-assign]
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, tu)
    with pytest.raises(RuntimeError, match="TU bug"):
        mgr.handle_response(reply(invite, 486), UDP)
    assert txn.state == "completed"
    assert txn.active_timers() == {"D": 32.0}  # A and B cancelled, D armed
    advance_to(clock, 32.0)
    assert txn.state == "terminated"
    assert sender.labels() == ["INVITE", "ACK"]
