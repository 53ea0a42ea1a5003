"""Random interleavings against real transactions (hypothesis stateful testing).

Each machine drives one transaction of one type with responses (or TU responses, request
retransmissions and ACKs), clock advances and transport failures, and checks what must
hold whatever happens: a terminated transaction never sends, sends only happen in the
states where RFC 3261/6026 allow them, the state is one of the chart's, the manager
forgets terminated transactions, and every client transaction ends once time passes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pbx.sip.message import Request, Response
from pbx.sip.transactions import Peer, Transaction, TransactionManager
from tests.unit.test_transactions_support import (
    FakeSender,
    RecordingTU,
    ack_for,
    advance_to,
    make_request,
    reply,
)

STATUSES = st.sampled_from([100, 180, 183, 200, 202, 302, 401, 404, 486, 500, 503, 603])
DELAYS = st.one_of(st.sampled_from([0.0, 0.2, 0.5, 1.0, 4.0, 5.0, 31.9, 32.0, 33.0]),
                   st.floats(min_value=0.0, max_value=70.0, allow_nan=False))
TRANSPORTS = st.sampled_from(["udp", "tcp"])
STEP_SETTINGS = settings(stateful_step_count=30)


def allowed(kind: str, state: str, message: Request | Response) -> bool:
    """Which state a transaction may be in when it hands a message to the transport."""
    if isinstance(message, Request):
        if kind == "ict":
            return (message.method, state) in {("INVITE", "calling"), ("ACK", "completed")}
        return kind == "nict" and state in ("trying", "proceeding") and message.method != "ACK"
    status = message.status
    if status < 200:
        return state == "proceeding"
    if kind == "ist":
        return state == ("accepted" if status < 300 else "completed")
    return kind == "nist" and state == "completed"


class TransactionMachine(RuleBasedStateMachine):
    kind: str

    def __init__(self) -> None:
        super().__init__()
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.sender = FakeSender(self.clock)
        self.sender.on_send = self._on_send
        self.tu = RecordingTU()
        self.mgr = TransactionManager(self.sender, self.tu, self.clock)
        self.txn: Any = None
        self.peer = Peer("udp", "10.0.0.2", 5060)
        self.fail_next = False
        self.sends_after_end = 0

    def _on_send(self, message: Request | Response, peer: Peer) -> None:
        txn = self.txn
        state = txn.state if txn is not None else ("calling" if self.kind == "ict" else "trying")
        assert state != "terminated", f"{self.kind} sent {message!r} after terminating"
        if isinstance(message, Response) or message.method != "ACK" or txn is not None:
            assert allowed(self.kind, state, message), (self.kind, state, message)
        if self.fail_next:
            self.fail_next = False
            self.sender.fail = True
        else:
            self.sender.fail = False

    @rule()
    def fail_next_send(self) -> None:
        self.fail_next = True

    @rule(delay=DELAYS)
    def advance(self, delay: float) -> None:
        advance_to(self.clock, self.clock.seconds() + delay)

    @invariant()
    def state_is_a_chart_state(self) -> None:
        if self.txn is not None:
            assert self.txn.state in type(self.txn).chart().state_names

    @invariant()
    def manager_holds_only_live_transactions(self) -> None:
        live = self.mgr.transactions()
        assert all(t.state != "terminated" for t in live)
        if self.txn is not None:
            assert (self.txn in live) == (self.txn.state != "terminated")
            if self.txn.state == "terminated":
                assert self.txn.active_timers() == {}
        assert sum(sum(c.values()) for c in self.mgr.counts.values()) == len(live)

    @invariant()
    def nothing_after_the_end(self) -> None:
        if self.txn is not None and self.txn.state == "terminated":
            if not hasattr(self, "_sent_at_end"):
                self._sent_at_end = len(self.sender.sent)
            assert len(self.sender.sent) == self._sent_at_end

    @invariant()
    def failures_are_reported_once(self) -> None:
        kinds = self.tu.kinds()
        ends = kinds.count("timeout") + kinds.count("transport_error")
        assert ends <= 1
        if ends and self.txn is not None:
            assert self.txn.state == "terminated"
            assert self.txn.outcome == ("timeout" if "timeout" in kinds else "transport_error")


class ClientMachine(TransactionMachine):
    method: str

    @initialize(transport=TRANSPORTS)
    def start(self, transport: str) -> None:
        self.peer = Peer(transport, "10.0.0.2", 5060)
        self.request = make_request(self.method, transport=transport.upper())
        txn: Transaction = self.mgr.send_request(self.request, self.peer, self.tu)
        self.txn = txn
        assert txn.state in ("calling", "trying", "terminated")

    @rule(status=STATUSES)
    def response(self, status: int) -> None:
        before = self.txn.state
        passed = len(self.tu.statuses())
        self.mgr.handle_response(reply(self.request, status), self.peer)
        went_up = len(self.tu.statuses()) - passed
        if before == "terminated":
            assert self.tu.kinds()[-1] == "stray"
        elif self.kind == "ict" and before in ("calling", "proceeding"):
            assert went_up == 1
        elif self.kind == "ict" and before == "accepted":
            assert went_up == (1 if 200 <= status < 300 else 0)
        elif self.kind == "ict" and before == "completed":
            assert went_up == 0
        elif self.kind == "nict":
            assert went_up == (1 if before in ("trying", "proceeding") else 0)

    @invariant()
    def finals_go_up_once(self) -> None:
        statuses = self.tu.statuses()
        failures = [s for s in statuses if s >= 300]
        assert len(failures) <= 1
        if self.kind == "nict":
            assert len([s for s in statuses if s >= 200]) <= 1
        finals = [i for i, s in enumerate(statuses) if s >= 200]
        if finals:
            assert all(s >= 200 for s in statuses[finals[0]:])  # no 1xx after a final

    def teardown(self) -> None:
        if self.txn is not None:
            advance_to(self.clock, self.clock.seconds() + 10_000)
            assert self.txn.state == "terminated"
            assert self.mgr.transactions() == []
            assert not self.clock.calls


class ServerMachine(TransactionMachine):
    method: str

    @initialize(transport=TRANSPORTS)
    def start(self, transport: str) -> None:
        self.peer = Peer(transport, "10.0.0.2", 5060)
        self.request = make_request(self.method, transport=transport.upper())
        self.mgr.handle_request(self.request, self.peer)
        assert len(self.tu.requests) == 1
        self.txn = self.tu.requests[0][1]
        self.acks_expected = 0

    @rule(status=STATUSES)
    def tu_responds(self, status: int) -> None:
        self.txn.respond(reply(self.request, status))

    @precondition(lambda self: self.txn.state != "terminated")
    @rule()
    def retransmission(self) -> None:
        # (After the end a retransmission would start a new transaction: unit-tested.)
        before = len(self.tu.requests)
        self.mgr.handle_request(self.request, self.peer)
        assert len(self.tu.requests) == before  # absorbed

    @invariant()
    def tu_saw_the_request_once(self) -> None:
        assert [t for _, t, _ in self.tu.requests if t is not None][:1] == [self.txn]
        assert len([t for _, t, _ in self.tu.requests if t is not None]) == 1

    def teardown(self) -> None:
        if self.txn is None:
            return
        final = [m for _, m, _ in self.sender.sent
                 if isinstance(m, Response) and m.status >= 200]
        advance_to(self.clock, self.clock.seconds() + 10_000)
        if final or self.tu.kinds().count("transport_error"):
            assert self.txn.state == "terminated"
        else:  # the TU never answered: the server transaction waits for it (§17.2)
            assert self.txn.state in ("proceeding", "trying", "terminated")


class ICTMachine(ClientMachine):
    kind = "ict"
    method = "INVITE"


class NICTMachine(ClientMachine):
    kind = "nict"
    method = "OPTIONS"


class NISTMachine(ServerMachine):
    kind = "nist"
    method = "REGISTER"


class ISTMachine(ServerMachine):
    kind = "ist"
    method = "INVITE"

    @rule(same_branch=st.booleans())
    def ack(self, same_branch: bool) -> None:
        before_state = self.txn.state
        before = len(self.tu.requests)
        last = self.txn.last_response or reply(self.request, 486)
        ack = ack_for(self.request, last, branch=None if same_branch else "z9hG4bKack")
        self.mgr.handle_request(ack, self.peer)
        passed_up = len(self.tu.requests) - before
        if not same_branch or before_state in ("accepted", "terminated"):
            assert passed_up == 1
            assert self.tu.requests[-1][1] is None
        else:  # absorbed: Completed -> Confirmed, Confirmed stays, Proceeding ignores
            assert passed_up == 0
            if before_state == "completed":
                assert self.txn.state in ("confirmed", "terminated")


TestICT = ICTMachine.TestCase
TestNICT = NICTMachine.TestCase
TestIST = ISTMachine.TestCase
TestNIST = NISTMachine.TestCase
for _case in (TestICT, TestNICT, TestIST, TestNIST):
    _case.settings = STEP_SETTINGS
del _case
