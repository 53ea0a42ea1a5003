"""Bounds of the transaction layer: table caps, server deadlines, Timer C (RFC 3261
§16.6-16.8), connection failures (§17.1.4) and the timer driver's restart/stop hooks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pbx.sip.message import Request, Response
from pbx.sip.transactions import (
    ClientTransaction,
    Peer,
    SentResponse,
    TransactionManager,
)
from pbx.statechart_timers import TimedChartModel, compile_timer_hooks, compile_timers
from pbx.statecharts import ChartError, _parse_chart
from tests.unit.test_transactions_support import (
    TCP,
    UDP,
    FakeSender,
    RecordingTU,
    ack_for,
    advance_to,
    make_request,
    reply,
    setup,
)

OTHER_TCP = Peer("tcp", "10.0.0.3", 5060)


# -- table caps -------------------------------------------------------------------------


def test_server_requests_beyond_the_cap_get_a_stateless_503_with_retry_after() -> None:
    _clock, sender, tu, mgr = setup(max_transactions=2, overload_retry_after=7)
    for seq in (1, 2, 3):
        mgr.handle_request(make_request("OPTIONS", seq=seq), UDP)
    assert len(mgr._server) == 2
    assert [e[1] for e in tu.events] == ["OPTIONS", "OPTIONS"]  # the third never went up
    (_, rejected, peer), = sender.sent
    assert isinstance(rejected, Response) and rejected.status == 503
    assert rejected.headers.get("Retry-After") == "7" and rejected.to.tag
    assert peer == UDP
    assert mgr.stats.overloaded["nist"] == 1
    assert mgr.stats.created["nist"] == 2
    assert mgr.stats.as_dict()["overloaded"] == {"nist": 1}


def test_ack_beyond_the_cap_is_never_answered_and_cancel_of_a_live_invite_is_admitted(
) -> None:
    _clock, sender, tu, mgr = setup(max_transactions=1, trying_delay=None)
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    ist = tu.requests[-1][1]
    mgr.handle_request(ack_for(invite, reply(invite, 200), branch="z9hG4bKother"), UDP)
    assert sender.sent == []  # an ACK is passed up, never refused
    cancel = make_request("CANCEL", branch=invite.top_via.branch)
    mgr.handle_request(cancel, UDP)
    assert tu.requests[-1][0].method == "CANCEL"
    assert mgr.find_invite_server_transaction(cancel) is ist
    assert len(mgr._server) == 2  # one CANCEL per INVITE: bounded by twice the cap
    stray_cancel = make_request("CANCEL", call_id="elsewhere")
    mgr.handle_request(stray_cancel, UDP)
    assert [m.status for _, m, _ in sender.sent] == [481]  # its TU's answer, stateless
    assert len(mgr._server) == 2


def test_client_requests_beyond_the_cap_are_reported_as_transport_errors() -> None:
    _clock, sender, tu, mgr = setup(max_transactions=1)
    first = mgr.send_request(make_request("OPTIONS"), UDP, tu)
    refused = mgr.send_request(make_request("INVITE"), UDP, tu)
    assert refused.state == "terminated" and refused.outcome == "transport_error"
    assert tu.kinds() == ["transport_error"]  # before send_request returned
    assert [m.method for _, m, _ in sender.sent] == ["OPTIONS"]
    assert mgr.transactions() == [first]
    assert mgr.stats.overloaded["ict"] == 1
    assert mgr.stats.terminated["ict"] == {}  # never created, never counted as ended


def test_max_transactions_must_be_positive() -> None:
    with pytest.raises(ValueError):
        setup(max_transactions=0)


@settings(max_examples=60, deadline=None)
@given(cap=st.integers(min_value=1, max_value=6),
       stream=st.lists(st.tuples(st.sampled_from(["OPTIONS", "INVITE", "ACK", "CANCEL",
                                                  "REGISTER", "advance"]),
                                 st.integers(min_value=0, max_value=7)),
                       max_size=60))
def test_the_server_table_never_exceeds_its_cap(cap: int,
                                                 stream: list[tuple[str, int]]) -> None:
    """Random request streams (new requests, retransmissions, CANCELs, time passing):
    only CANCELs of live INVITE transactions may go past the cap, at most one each."""
    clock, _sender, _tu, mgr = setup(max_transactions=cap)
    branches = [f"z9hG4bK{i}" for i in range(8)]
    for what, n in stream:
        if what == "advance":
            advance_to(clock, clock.seconds() + n * 5.0)
            continue
        method = "INVITE" if what in ("ACK", "CANCEL") and n % 2 else what
        request = make_request(what, branch=branches[n], seq=n, call_id=f"c{n}")
        if what == "ACK":
            request = ack_for(make_request(method, branch=branches[n], seq=n,
                                           call_id=f"c{n}"), reply(request, 486))
        mgr.handle_request(request, UDP)
        non_cancel = [k for k in mgr._server if k[-1] != "CANCEL"]
        assert len(non_cancel) <= cap
        assert len(mgr._server) <= 2 * cap
        assert len(mgr._merge_index) <= len(mgr._server)


# -- server deadlines -------------------------------------------------------------------


@pytest.mark.parametrize("peer", [UDP, TCP])
def test_a_nist_whose_tu_never_answers_answers_500_after_64_t1(peer: Peer) -> None:
    clock, sender, tu, mgr = setup()
    mgr.handle_request(make_request("OPTIONS"), peer)
    txn = tu.requests[-1][1]
    advance_to(clock, 31.9)
    assert sender.sent == [] and txn.state == "trying"
    advance_to(clock, 32.0)
    assert [m.status for _, m, _ in sender.sent] == [500]
    assert txn.outcome == "tu_timeout"
    advance_to(clock, 70.0)
    assert txn.state == "terminated" and mgr.transactions() == []
    assert mgr.stats.terminated["nist"]["tu_timeout"] == 1


def test_a_nist_deadline_spans_proceeding_and_a_final_response_cancels_it() -> None:
    clock, sender, tu, mgr = setup()
    mgr.handle_request(make_request("OPTIONS"), UDP)
    txn = tu.requests[-1][1]
    advance_to(clock, 10.0)
    txn.respond(reply(txn.request, 183))
    advance_to(clock, 32.0)  # a provisional does not buy a non-INVITE more time
    assert [m.status for _, m, _ in sender.sent] == [183, 500]

    clock, sender, tu, mgr = setup()
    mgr.handle_request(make_request("OPTIONS"), UDP)
    txn = tu.requests[-1][1]
    txn.respond(reply(txn.request, 200))
    assert "deadline" not in txn.active_timers()
    advance_to(clock, 100.0)
    assert [m.status for _, m, _ in sender.sent] == [200]
    assert mgr.stats.terminated["nist"] == {"completed": 1}


def test_an_ist_whose_tu_sends_nothing_answers_500_but_the_automatic_100_does_not_count(
) -> None:
    clock, sender, tu, mgr = setup()  # trying_delay 0.2: the automatic 100
    invite = make_request("INVITE")
    mgr.handle_request(invite, UDP)
    txn = tu.requests[-1][1]
    advance_to(clock, 32.0)
    assert [m.status for _, m, _ in sender.sent] == [100, 500]
    assert txn.state == "completed" and txn.outcome == "tu_timeout"
    mgr.handle_request(ack_for(invite, txn.last_response), UDP)
    assert txn.state == "confirmed"


@pytest.mark.parametrize("first", [100, 180])
def test_a_ringing_call_is_not_cut_by_the_ist_deadline(first: int) -> None:
    clock, sender, tu, mgr = setup(trying_delay=None)
    mgr.handle_request(make_request("INVITE"), UDP)
    txn = tu.requests[-1][1]
    txn.respond(reply(txn.request, first))
    advance_to(clock, 600.0)
    assert txn.state == "proceeding"
    assert [m.status for _, m, _ in sender.sent] == [first]


# -- Timer C (RFC 3261 §16.6-16.8) --------------------------------------------------------


class TimerCUser(RecordingTU):
    def timer_c_fired(self, transaction: ClientTransaction) -> None:
        self.events.append(("timer_c", None, transaction))


def test_timer_c_is_reset_by_provisionals_other_than_100() -> None:
    clock, _sender, _, mgr = setup(timer_c=100.0)
    user = TimerCUser()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, user)
    mgr.handle_response(reply(invite, 100), UDP)   # enters proceeding at 0: C armed
    advance_to(clock, 60.0)
    mgr.handle_response(reply(invite, 100), UDP)   # hop by hop: no reset
    advance_to(clock, 99.0)
    mgr.handle_response(reply(invite, 180), UDP)   # reset: now due at 199
    advance_to(clock, 150.0)
    mgr.handle_response(reply(invite, 183), UDP)   # reset: now due at 250
    advance_to(clock, 249.9)
    assert txn.state == "proceeding" and "timer_c" not in user.kinds()
    advance_to(clock, 250.0)
    assert txn.state == "cancelling" and user.kinds()[-1] == "timer_c"
    assert txn.outcome == "timeout"


def test_timer_c_without_any_provisional_beyond_100_fires_from_the_first_100() -> None:
    clock, _sender, _, mgr = setup(timer_c=100.0)
    user = TimerCUser()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, user)
    mgr.handle_response(reply(invite, 100), UDP)
    advance_to(clock, 100.0)
    assert txn.state == "cancelling"
    assert user.kinds() == ["response", "timer_c"]


def test_after_timer_c_the_487_is_acked_and_not_passed_up() -> None:
    clock, sender, _, mgr = setup(timer_c=10.0)
    user = TimerCUser()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, user)
    mgr.handle_response(reply(invite, 180), UDP)
    advance_to(clock, 10.0)
    mgr.handle_response(reply(invite, 180), UDP)  # late provisionals are dropped
    mgr.handle_response(reply(invite, 487), UDP)
    assert txn.state == "completed"
    assert [m.method for _, m, _ in sender.sent if isinstance(m, Request)][-1] == "ACK"
    assert user.kinds() == ["response", "timer_c"]
    advance_to(clock, 100.0)
    assert txn.state == "terminated"
    assert mgr.stats.terminated["ict"] == {"timeout": 1}


def test_after_timer_c_a_2xx_is_passed_up_and_silence_ends_it_after_64_t1() -> None:
    clock, _, _, mgr = setup(timer_c=10.0)
    user = TimerCUser()
    invite = make_request("INVITE")
    txn = mgr.send_request(invite, UDP, user)
    mgr.handle_response(reply(invite, 180), UDP)
    advance_to(clock, 10.0)
    mgr.handle_response(reply(invite, 200), UDP)
    assert txn.state == "accepted" and user.statuses() == [180, 200]

    clock, _, _, mgr = setup(timer_c=10.0)
    user = TimerCUser()
    txn = mgr.send_request(invite, UDP, user)
    mgr.handle_response(reply(invite, 180), UDP)
    advance_to(clock, 41.9)
    assert txn.state == "cancelling"
    advance_to(clock, 42.0)
    assert txn.state == "terminated" and mgr.transactions() == []


# -- connection failures (§17.1.4) ----------------------------------------------------------


def test_a_connection_failure_fails_the_client_transactions_to_that_peer_at_once() -> None:
    clock, _sender, tu, mgr = setup()
    to_peer = [mgr.send_request(make_request(m), TCP, tu) for m in ("INVITE", "OPTIONS")]
    elsewhere = mgr.send_request(make_request("OPTIONS"), OTHER_TCP, tu)
    mgr.connection_failed(TCP)
    assert [t.state for t in to_peer] == ["terminated", "terminated"]
    assert [t.outcome for t in to_peer] == ["transport_error", "transport_error"]
    assert tu.kinds() == ["transport_error", "transport_error"]
    assert clock.seconds() == 0.0  # not Timer B or F
    assert elsewhere.state == "trying"
    assert mgr.transactions() == [elsewhere]
    mgr.connection_failed(TCP)  # nothing left to fail
    assert tu.kinds() == ["transport_error", "transport_error"]


class DestinationSender(FakeSender):
    """Returns SentResponse with the §18.2.2 destination, like the real transport."""

    def __init__(self, clock: Clock, destination: Peer) -> None:
        super().__init__(clock)
        self.destination = destination

    def send_response(self, response: Response, peer: Peer) -> SentResponse:  # type: ignore[override]
        super().send_response(response, peer)
        return SentResponse(response.to_bytes(), peer, self.destination, response.status)

    def resend_response(self, sent: SentResponse) -> None:
        pass


def test_a_connection_failure_fails_server_transactions_with_a_response_out_to_it() -> None:
    clock = Clock()
    via_peer = Peer("tcp", "10.0.0.2", 5060)
    conn_peer = Peer("tcp", "10.0.0.2", 40123)  # the inbound connection, since closed
    sender = DestinationSender(clock, via_peer)
    tu = RecordingTU()
    mgr = TransactionManager(sender, tu, clock, trying_delay=None)
    mgr.handle_request(make_request("INVITE", transport="TCP"), conn_peer)
    answered = tu.requests[-1][1]
    answered.respond(reply(answered.request, 486))  # completed: waits for the ACK
    mgr.handle_request(make_request("INVITE", transport="TCP", seq=2), conn_peer)
    silent = tu.requests[-1][1]  # nothing sent yet: nothing to fail
    mgr.connection_failed(via_peer)
    assert answered.state == "terminated" and answered.outcome == "transport_error"
    assert silent.state == "proceeding"
    assert tu.kinds() == ["request", "request", "transport_error"]


def test_connection_failed_on_a_fake_transport_boundary_only_touches_matching_peers(
) -> None:
    _clock, _sender, tu, mgr = setup()
    mgr.handle_request(make_request("OPTIONS"), UDP)
    nist = tu.requests[-1][1]
    nist.respond(reply(nist.request, 100))
    mgr.connection_failed(TCP)
    assert nist.state == "proceeding"


# -- the timer driver's restart_on / stop_on -------------------------------------------------

_HOOK_CHART = {
    "name": "hooks", "initial": "a", "ignore_invalid_triggers": True,
    "states": [
        {"name": "a", "timers": [
            {"name": "x", "after": 10, "trigger": "x_fired", "restart_on": ["poke"]},
            {"name": "y", "after": 10, "trigger": "y_fired", "stop_on": ["hush"]}]},
        {"name": "done", "final": True},
    ],
    "transitions": [
        {"trigger": "poke", "source": "a", "dest": None},
        {"trigger": "hush", "source": "a", "dest": None, "conditions": ["allowed"]},
        {"trigger": "x_fired", "source": "a", "dest": "done"},
        {"trigger": "y_fired", "source": "a", "dest": "done"},
    ],
}


def _hook_model(clock: Clock) -> Any:
    chart = _parse_chart(_HOOK_CHART, None)
    table = compile_timers(chart)

    class Model(TimedChartModel):
        chart_name = "hooks"
        _chart = chart
        _machine = chart.build_machine()
        _events = dict(_machine.events)
        _timer_table = table
        _timer_hooks = compile_timer_hooks(table)
        allow = True

        def __init__(self) -> None:
            super().__init__()
            self.clock = clock

        def allowed(self, *_: Any) -> bool:
            return self.allow

    model = Model()
    model.start_timers()
    return model


def test_restart_on_rearms_and_stop_on_cancels_for_the_rest_of_the_state() -> None:
    clock = Clock()
    model = _hook_model(clock)
    clock.advance(6)
    model.fire("poke")
    model.allow = False
    model.fire("hush")  # the guard refused: y keeps running
    assert set(model.active_timers()) == {"x", "y"}
    model.allow = True
    model.fire("hush")
    assert set(model.active_timers()) == {"x"}
    clock.advance(9.9)
    assert model.state == "a"
    clock.advance(0.1)
    assert model.state == "done"


def test_hooks_must_name_triggers_of_their_state() -> None:
    bad = {**_HOOK_CHART, "states": [
        {"name": "a", "timers": [{"name": "x", "after": 1, "trigger": "x_fired",
                                  "restart_on": ["nope"]}]},
        {"name": "done", "final": True}]}
    with pytest.raises(ChartError, match="restart_on"):
        compile_timers(_parse_chart(bad, None))
    both = {**_HOOK_CHART, "states": [
        {"name": "a", "timers": [{"name": "x", "after": 1, "trigger": "x_fired",
                                  "restart_on": ["poke"], "stop_on": ["poke"]}]},
        {"name": "done", "final": True}]}
    with pytest.raises(ChartError, match="both"):
        compile_timers(_parse_chart(both, None))


def test_a_provisional_sent_from_inside_request_received_stops_the_ist_deadline() -> None:
    clock, sender, tu, mgr = setup(trying_delay=None)
    tu.on_request = lambda request, txn, peer: txn.respond(reply(request, 180))
    mgr.handle_request(make_request("INVITE"), UDP)
    txn = tu.requests[-1][1]
    assert "deadline" not in txn.active_timers()
    advance_to(clock, 600.0)
    assert txn.state == "proceeding" and [m.status for _, m, _ in sender.sent] == [180]


def test_a_tu_that_raises_still_leaves_a_transaction_that_ends() -> None:
    clock, sender, tu, mgr = setup()

    def broken(request: Request, txn: object, peer: Peer) -> None:
        raise RuntimeError("TU bug")

    tu.on_request = broken
    with pytest.raises(RuntimeError):
        mgr.handle_request(make_request("OPTIONS"), UDP)
    advance_to(clock, 100.0)
    assert [m.status for _, m, _ in sender.sent] == [500]
    assert mgr.transactions() == []
