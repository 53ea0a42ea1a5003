"""The call machine under random interleavings (hypothesis RuleBasedStateMachine).

One authenticated call forks to several registered phones; hypothesis then interleaves
provisional and final responses from each fork, 2xx crossing CANCEL, the caller's
CANCEL/ACK/BYE, the callee's BYE, BYE answers, media timeouts, transport errors and the
passing of time.  Whatever happens:

* no leg ever gets BYE before its dialog is confirmed (a fork: before we had its 2xx;
  the caller: before its 2xx, and before its ACK unless 64*T1 passed);
* once everything is allowed to finish, the call is in a final state, every RTP port
  allocated was released exactly once, and there is exactly one CDR for the call.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pbx.sip import Request, Response
from tests.unit.test_calls_support import (
    CALLER,
    SDP_B,
    CalleePhone,
    CallerPhone,
    Harness,
    callee_peer,
)

FORKS = 3


class CallMachine(RuleBasedStateMachine):
    @initialize(forks=st.integers(1, FORKS), ring_timeout=st.sampled_from([5.0, 30.0]))
    def dial(self, forks: int, ring_timeout: float) -> None:
        self.peers = [callee_peer(i) for i in range(forks)]
        self.h = Harness(ring_timeout=ring_timeout, registered={"1002": self.peers})
        self.caller = CallerPhone(self.h)
        self.caller.dial()
        self.phones = [CalleePhone(self.h, p) for p in self.peers]
        self.answered = [False] * forks       # we delivered a 2xx from this fork
        self.finals = [False] * forks         # this fork sent a final response
        self.caller_2xx_at: float | None = None
        self.caller_acked = False

    # -- the callee phones -------------------------------------------------------------
    def _fork(self, i: int) -> int:
        return i % len(self.peers)

    @rule(i=st.integers(0, FORKS - 1), early=st.booleans())
    def fork_rings(self, i: int, early: bool) -> None:
        i = self._fork(i)
        if self.finals[i] or not self.phones[i].has_invite():
            return
        self.phones[i].respond(183, SDP_B) if early else self.phones[i].ringing()

    @rule(i=st.integers(0, FORKS - 1))
    def fork_answers(self, i: int) -> None:
        i = self._fork(i)
        if not self.phones[i].has_invite():
            return
        # Allowed even after a CANCEL reached it (the 2xx crossing the CANCEL), and
        # retransmitted 2xx are allowed too.
        if self.finals[i] and not self.answered[i]:
            return
        self.phones[i].answer()
        self.answered[i] = True
        self.finals[i] = True

    @rule(i=st.integers(0, FORKS - 1), status=st.sampled_from([404, 480, 486, 603, 500]))
    def fork_fails(self, i: int, status: int) -> None:
        i = self._fork(i)
        if self.finals[i] or not self.phones[i].has_invite():
            return
        self.phones[i].respond(status)
        self.finals[i] = True

    @rule(i=st.integers(0, FORKS - 1))
    def fork_accepts_cancel(self, i: int) -> None:
        i = self._fork(i)
        phone = self.phones[i]
        if not phone.cancels() or self.finals[i]:
            return
        phone.reply_to_last("CANCEL", 200)
        phone.respond(487)
        self.finals[i] = True

    @rule(i=st.integers(0, FORKS - 1))
    def callee_hangs_up(self, i: int) -> None:
        i = self._fork(i)
        if not self.answered[i]:
            return
        self.phones[i].send("BYE")

    @rule(i=st.integers(0, FORKS - 1))
    def fork_becomes_unreachable(self, i: int) -> None:
        self.h.sender.unreachable.add(self.peers[self._fork(i)])

    # -- the caller --------------------------------------------------------------------
    def _caller_final(self) -> Response | None:
        final = self.caller.final()
        if final is not None and final.status < 300 and self.caller_2xx_at is None:
            self.caller_2xx_at = self.h.clock.seconds()
        return final

    @rule()
    def caller_cancels(self) -> None:
        self.caller.cancel()

    @rule()
    def caller_acks(self) -> None:
        final = self._caller_final()
        if final is None:
            return
        if final.status < 300:
            self.caller.ack()
            self.caller_acked = True
        else:
            self.caller.ack_failure()

    @precondition(lambda self: self.caller_2xx_at is not None)
    @rule()
    def caller_hangs_up(self) -> None:
        self.caller.send("BYE")

    @rule()
    def caller_becomes_unreachable(self) -> None:
        self.h.sender.unreachable.add(CALLER)

    # -- the network, media and time -----------------------------------------------------
    @rule()
    def byes_are_answered(self) -> None:
        for message, peer in list(self.h.sender.sent):
            if isinstance(message, Request) and message.method == "BYE":
                answered = any(isinstance(m, Response) and m.cseq.method == "BYE"
                               and m.call_id == message.call_id
                               for m, _ in self.h.sender.sent)
                if not answered:
                    if peer == CALLER:
                        self.caller.answer_request(message, 200)
                    else:
                        self.h.response(_ok(message), peer)

    @rule()
    def media_times_out(self) -> None:
        for session in self.h.media.sessions:
            if session.state != "closed":
                session.time_out()

    @rule(seconds=st.sampled_from([0.0, 0.6, 4.0, 20.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self._caller_final()
        self.h.advance(seconds)
        self._caller_final()

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def no_bye_before_a_confirmed_dialog(self) -> None:
        if not hasattr(self, "h"):
            return
        self._caller_final()
        for message, peer in self.h.sender.sent:
            if not (isinstance(message, Request) and message.method == "BYE"):
                continue
            if peer == CALLER:
                assert self.caller_2xx_at is not None, "BYE to the caller before its 2xx"
                assert self.caller_acked or CALLER in self.h.sender.unreachable or \
                    self.h.clock.seconds() >= self.caller_2xx_at + 32 - 1e-6, \
                    "BYE to the caller before its ACK"
            else:
                assert self.answered[self.peers.index(peer)], "BYE to a fork before its 2xx"

    @invariant()
    def ports_never_released_twice(self) -> None:
        if hasattr(self, "h"):
            assert all(n <= 1 for n in self.h.media.released.values())
            assert set(self.h.media.released) <= set(self.h.media.allocated)

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        h = self.h
        for _ in range(4):
            self.byes_are_answered()
            h.advance(100)
        assert h.b2bua.active_calls == 0, h.b2bua.list_calls()
        assert h.media.balanced(), (h.media.allocated, h.media.released)
        call_id = self.caller.call_id
        assert [r["call_id"] for r in h.cdr.adds] == [call_id]
        row = h.cdr.rows[call_id]
        assert row["state"] == "closed"
        assert len(h.cdr.updates) == (1 if h.cdr.adds[0]["state"] == "open" else 0)
        assert (row["disposition"] == "ANSWERED") == (row["answer_time"] is not None)
        assert len(h.b2bua.dialogs) == 0


def _ok(request: Request) -> Response:
    from pbx.sip import make_response

    return make_response(request, 200)


TestCallMachine = CallMachine.TestCase
