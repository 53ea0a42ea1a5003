"""100rel, UPDATE and session timers on the legs of one call: the glue between the sans-IO
rules (:mod:`pbx.calls.reliable`, :mod:`pbx.calls.session_timer`, :mod:`pbx.calls.update`)
and the legs of :mod:`pbx.calls.call`.

The B2BUA terminates each extension per leg, nothing is relayed end to end:

* caller leg (we are UAS): its INVITE decides whether our 18x go reliably (RFC 3262 §3)
  and which session timer it gets (RFC 4028 §9, 422 before any call exists); our 2xx
  waits for the PRACK of an SDP-bearing reliable 18x; PRACK is answered here (200 or
  481); a PRACK give-up (64*T1) ends the call with 500;
* callee legs (we are UAC): our INVITE says ``Supported: 100rel, timer`` with our
  Session-Expires/Min-SE (RFC 4028 §7.1); each reliable 18x is PRACKed once, in order
  (RFC 3262 §4); a 422 is retried once with the callee's Min-SE (§7.4); its 2xx fixes
  that leg's timer (§7.2);
* both legs: a :class:`~pbx.calls.session_timer.SessionTimer` each. When we are the
  refresher we send UPDATE (no SDP) if the peer allows it, else a re-INVITE with the SDP
  we last sent it (§10); an expiry or a refresh answered 408/481 (or not at all) hangs
  the call up with the CDR cause "Session Timer Expired"; 491/500 are retried after a
  few seconds, UPDATE 405/501 switches to re-INVITE, and any other answer proves the peer
  alive and keeps the session;
* UPDATE (RFC 3311) received on a leg: decided by :func:`~pbx.calls.update.decide_update`,
  relayed as a new UPDATE on the other leg (SDP rewritten by the media session), its
  answer relayed back; a 2xx to an UPDATE or re-INVITE refreshes the session of that
  leg (RFC 4028 §10).  While ringing (RFC 3311 §5.1) the other leg is
  :meth:`Call.update_peer`'s: the caller's UPDATE goes to ``call.early_fork`` (the fork
  whose 18x it mirrors), an early fork's to the caller; an offer needs the initial
  answer in a reliable 18x, and what the fork allows comes from its 18x.

:meth:`CallFeatures.stop` runs when the call ends and drops every reference (timers,
callbacks, the call), so no reference cycle outlives the call.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pbx.calls.reliable import PrackTracker, RAck, ReliableProvisionals, Verdict, wants_reliable
from pbx.calls.session_timer import (
    EXPIRED_CAUSE,
    EXPIRED_REASON,
    Negotiated,
    SessionExpires,
    SessionTimer,
    TimerPolicy,
    negotiate_uac,
    negotiate_uas,
    retry_after_422,
    uac_request_headers,
)
from pbx.calls.update import allows_update, decide_update
from pbx.sip import (
    ClientTransaction,
    Dialog,
    Request,
    Response,
    ServerTransaction,
    SIPParseError,
    TransportError,
)

if TYPE_CHECKING:
    from pbx.calls.b2bua import B2BUA
    from pbx.calls.call import Call, CalleeLeg, Leg

__all__ = ["SUPPORTED_HEADER", "CallFeatures", "check_session_interval"]

log = logging.getLogger(__name__)

SUPPORTED_HEADER = "100rel, timer"
PRACK_TIMEOUT = (500, "Reliable Provisional Not Acknowledged")
MAX_EARLY_DIALOGS = 16


def check_session_interval(b2bua: B2BUA, request: Request,
                           transaction: ServerTransaction) -> bool:
    """RFC 4028 §9/§6: an INVITE whose Session-Expires is below our Min-SE gets 422 with
    our Min-SE, before a call (or a CDR) exists; True when it was answered."""
    policy: TimerPolicy | None = getattr(b2bua, "session_timer", None)
    if policy is None:
        return False
    decision = negotiate_uas(request, policy)
    if not decision.reject:
        return False
    b2bua._reply(transaction, request, 422, "Session Interval Too Small",
                 [("Min-SE", str(decision.reject_min_se))])
    return True


class _Client:
    """ClientTransactionUser from two callables (final responses and failures)."""

    __slots__ = ("done", "failed")

    def __init__(self, done: Any, failed: Any) -> None:
        self.done = done
        self.failed = failed

    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        self.done(transaction, response)

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        self.failed(transaction)

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        self.failed(transaction)


class _Fork:
    """What a callee leg needs for 100rel and 422 (kept here, not on the leg)."""

    __slots__ = ("allows_update", "answered", "early", "interval", "tracker")

    def __init__(self) -> None:
        self.tracker = PrackTracker()
        self.early: dict[str, Dialog] = {}   # To tag -> early dialog PRACKs go in
        self.interval: int | None = None      # Session-Expires after a 422 retry
        self.answered = False        # our offer answered in a reliable 18x (RFC 3311 §5.1)
        self.allows_update = False   # its 18x listed UPDATE in Allow (RFC 3311 §4)


class CallFeatures:
    """Per-call state of 100rel, UPDATE and session timers (see the module doc)."""

    def __init__(self, call: Call, policy: TimerPolicy | None) -> None:
        self.call: Call | None = call
        self.policy = policy
        self.caller_rel: ReliableProvisionals | None = None
        self.caller_terms: Negotiated | None = None
        if policy is not None:
            self.caller_terms = negotiate_uas(call.caller.request, policy).negotiated
        self.forks: dict[int, _Fork] = {}
        self.timers: dict[str, SessionTimer] = {}
        self.last_sdp: dict[str, bytes] = {}
        self.peer_allows_update: dict[str, bool] = {
            "a": allows_update(call.caller.request)}
        self.update_pending = False
        self.caller_answered_early = False  # our answer went in a reliable 18x (§5.1)

    # -- life ------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """The call ended: stop timers and retransmissions, drop every reference."""
        rel, self.caller_rel = self.caller_rel, None
        if rel is not None:
            rel.close()
        timers, self.timers = self.timers, {}
        for timer in timers.values():
            timer.stop()
        self.forks.clear()
        self.call = None

    def _leg(self, side: str) -> Leg | None:
        call = self.call
        if call is None:
            return None
        return call.caller if side == "a" else call.winner

    # -- the legs' extension_headers hook ----------------------------------------------
    def extension_headers(self, leg: Leg, kind: str) -> list[tuple[str, str]]:
        """Headers for ``kind`` ("invite": our INVITE or re-INVITE on ``leg``; "2xx": our
        2xx to an INVITE on it): option tags and the session timer (RFC 4028 §7-§9)."""
        call = self.call
        if call is None:
            return []
        if kind == "invite":
            if leg is not call.caller and leg.dialog is None:
                return self.invite_headers(leg)  # type: ignore[arg-type]
            return [("Supported", SUPPORTED_HEADER), *self.refresh_request_headers(leg)]
        if kind == "2xx":
            if leg is call.caller and not leg.confirmed:
                return self.answer_headers()    # our 200 to the caller's INVITE
            # A 2xx to a re-INVITE from the phone: the session is refreshed (§10).
            headers = [("Supported", SUPPORTED_HEADER)]
            timer = self.timers.get(leg.side)
            if timer is not None and timer.current is not None and not timer.is_final:
                terms = timer.current.for_role("uas")
                timer.refreshed(terms)
                headers += terms.response_headers()
            return headers
        return []

    # -- caller leg: reliable provisionals (RFC 3262 §3) ---------------------------------
    def caller_provisional(self, response: Response) -> bool:
        """Send a 18x to the caller reliably when its INVITE asks for it; False: the leg
        sends it the ordinary way."""
        call = self.call
        if call is None or response.status == 100:
            return False
        caller = call.caller
        if not wants_reliable(caller.request, bool(response.body)):
            return False
        rel = self.caller_rel
        if rel is None:
            b2bua = call.b2bua
            rel = self.caller_rel = ReliableProvisionals(
                b2bua.clock, caller.transaction.respond, t1=b2bua.transactions.t1,
                reliable_transport=caller.peer.reliable, on_give_up=self._prack_timeout)
        response.headers.add("Supported", SUPPORTED_HEADER)
        rel.provisional(response)
        if response.body:  # RFC 3311 §5.1: the initial offer/answer is complete
            self.caller_answered_early = True
        return True

    def hold_answer(self, release: Any) -> bool:
        """§3: a 2xx to the caller waits while a reliable 18x is not PRACKed; True when
        it was held (``release`` sends it later)."""
        rel = self.caller_rel
        if rel is None or rel.may_send_final(True):
            return False
        rel.hold_final(release)
        return True

    def caller_final(self) -> None:
        """A final response went to the caller: no more reliable provisionals."""
        rel = self.caller_rel
        if rel is not None:
            rel.close()

    def _prack_timeout(self) -> None:
        call = self.call
        if call is None:
            return
        status, reason = PRACK_TIMEOUT
        log.info("call %s: reliable provisional never PRACKed, giving up", call.id)
        if call.state in ("routing", "ringing"):
            call.fire("reject", status, reason)
            return
        call.caller.reject(status, reason)  # the held 2xx never went out
        call.fire("leg_lost", "pbx", f"{status} {reason}")

    def handle_prack(self, leg: Leg, request: Request, transaction: ServerTransaction) -> None:
        """§3: 200 for the PRACK of the provisional in flight, 481 for any other."""
        call = self.call
        rel = self.caller_rel if call is not None and leg is call.caller else None
        if rel is None or not rel.matches(request):
            leg.respond(transaction, request, 481, "No Matching Reliable Provisional")
            return
        leg.respond(transaction, request, 200)
        rel.prack(request)  # after our 200: it may release the held 2xx

    # -- caller leg: session timer (RFC 4028 §9) -------------------------------------------
    def answer_headers(self) -> list[tuple[str, str]]:
        """Headers of our 2xx to the caller: Supported, and the negotiated timer."""
        headers = [("Supported", SUPPORTED_HEADER)]
        if self.caller_terms is not None:
            headers += self.caller_terms.response_headers()
        return headers

    def caller_answered(self, body: bytes) -> None:
        """Our 2xx went to the caller: reliability is over, its session timer starts."""
        self.caller_final()
        self.last_sdp["a"] = body
        if self.caller_terms is not None:
            self._timer("a").refreshed(self.caller_terms)

    # -- callee legs (we are UAC) ---------------------------------------------------------
    def invite_headers(self, fork: CalleeLeg | None = None) -> list[tuple[str, str]]:
        """§7.1 and RFC 3262 §4: what our INVITE to a callee says we support.  An
        offerless INVITE (late offer) does not offer 100rel: a reliable 18x would then
        carry the callee's offer, whose answer our PRACK must carry (RFC 3262 §5), and
        the caller's answer only comes in its ACK."""
        call = self.call
        late = call is not None and not call.caller.request.body
        headers = [("Supported", "timer" if late else SUPPORTED_HEADER)]
        if self.policy is not None:
            state = self.forks.get(id(fork)) if fork is not None else None
            interval = state.interval if state is not None else None
            headers += [h for h in uac_request_headers(self.policy, interval, interval)
                        if h[0] != "Supported"]
        return headers

    def _fork(self, fork: CalleeLeg) -> _Fork:
        state = self.forks.get(id(fork))
        if state is None:
            state = self.forks[id(fork)] = _Fork()
        return state

    def callee_provisional(self, fork: CalleeLeg, response: Response) -> bool:
        """RFC 3262 §4: PRACK a new in-order reliable 18x; False drops the response (a
        retransmission or out of order: not relayed either)."""
        state = self._fork(fork)
        verdict = state.tracker.receive(response)
        if verdict is Verdict.DISCARD:
            return False
        if response.headers.getall("Allow"):
            state.allows_update = allows_update(response)
        if verdict is Verdict.PRACK:
            if response.body and fork.invite.body:  # RFC 3311 §5.1: answered reliably
                state.answered = True
            self._send_prack(fork, state, response)
        return True

    def _send_prack(self, fork: CalleeLeg, state: _Fork, response: Response) -> None:
        try:
            tag = response.to.tag or ""
            rack = RAck.of(response)
            dialog = fork.dialog
            if dialog is None or dialog.remote_tag != tag:
                dialog = state.early.get(tag)
                if dialog is None:
                    if len(state.early) >= MAX_EARLY_DIALOGS:
                        return
                    dialog = state.early[tag] = Dialog.from_uac(fork.invite, response)
        except SIPParseError as exc:
            log.info("reliable %d from %s not PRACKed: %s", response.status, fork.peer, exc)
            return
        b2bua = fork.b2bua
        prack = dialog.create_request("PRACK", via=b2bua.make_via(fork.peer),
                                      extra=[("RAck", str(rack)),
                                             ("User-Agent", b2bua.user_agent)])
        try:
            b2bua.transactions.send_request(prack, fork.peer, _Client(_ignore, _ignore))
        except TransportError:
            log.debug("PRACK to %s failed", fork.peer)

    def callee_final(self, fork: CalleeLeg, response: Response) -> bool:
        """A final response to our INVITE.  True when it was a 422 we retry (§7.4): the
        leg must then forget it (a new INVITE is on its way)."""
        state = self._fork(fork)
        state.tracker.final_received()
        if response.status != 422 or self.policy is None:
            return False
        wanted = retry_after_422(response, self.policy, state.interval)
        if wanted is None:
            return False
        state.interval = wanted
        state.tracker = PrackTracker()
        return _retry_invite(fork, self.invite_headers(fork))

    def callee_answered(self, fork: CalleeLeg, response: Response) -> None:
        """The winning fork's 2xx: that leg's timer (§7.2) and what it allows."""
        self._fork(fork).tracker.final_received()
        self.last_sdp["b"] = fork.invite.body
        self.peer_allows_update["b"] = allows_update(response)
        if self.policy is None and SessionExpires.of(response) is None:
            return
        terms = negotiate_uac(response, self.policy or TimerPolicy(enabled=False))
        if terms is not None:
            self._timer("b").refreshed(terms)

    # -- session timers on both legs (RFC 4028 §10) -----------------------------------------
    def _timer(self, side: str) -> SessionTimer:
        timer = self.timers.get(side)
        if timer is None:
            assert self.call is not None
            timer = self.timers[side] = SessionTimer(
                self.call.clock, send_refresh=lambda terms, s=side: self._refresh(s, terms),
                on_expired=self._expired)
        return timer

    def _expired(self, cause: str) -> None:
        call = self.call
        if call is None:
            return
        log.info("call %s: %s", call.id, cause)
        call.fire("hangup", "pbx", EXPIRED_CAUSE, EXPIRED_REASON)

    def refreshed_by_request(self, leg: Leg, request: Request) -> list[tuple[str, str]]:
        """A re-INVITE or UPDATE from ``leg`` is being answered 2xx: it refreshed that
        leg's session (§10); the headers our 2xx carries (§9)."""
        timer = self.timers.get(leg.side)
        policy = self.policy
        if SessionExpires.of(request) is None or policy is None:
            if timer is None or timer.current is None:
                return []
            terms = timer.current.for_role("uas")
        else:
            decision = negotiate_uas(request, policy)
            terms = decision.negotiated or (timer.current if timer is not None else None)
            if terms is None:
                return []
            if decision.reject:  # too small mid-call: we keep our minimum and refresh
                terms = Negotiated(policy.min_se, "uas", "uas", terms.peer_supports,
                                   policy.min_se)
        self._timer(leg.side).refreshed(terms)
        return terms.response_headers()

    def refreshed_by_response(self, leg: Leg, response: Response) -> None:
        """Our re-INVITE or UPDATE on ``leg`` got a 2xx: that refreshes its session."""
        timer = self.timers.get(leg.side)
        if timer is None or timer.current is None:
            return
        terms: Negotiated | None = timer.current.for_role("uac")
        if SessionExpires.of(response) is not None and self.policy is not None:
            terms = negotiate_uac(response, self.policy)
        if terms is not None:
            timer.refreshed(terms)

    def refresh_request_headers(self, leg: Leg) -> list[tuple[str, str]]:
        """Headers for a re-INVITE/UPDATE we send on ``leg`` (it refreshes, §7.4)."""
        timer = self.timers.get(leg.side)
        if timer is None or timer.current is None:
            return []
        return timer.current.refresh_headers()

    def _refresh(self, side: str, terms: Negotiated) -> None:
        call = self.call
        leg = self._leg(side)
        timer = self.timers.get(side)
        if (call is None or leg is None or timer is None or leg.closed or not leg.confirmed
                or call.state not in ("answered", "connected")):
            return  # a call being torn down is not refreshed
        other = call.other(leg)
        if (call.reinvite is not None or self.update_pending or leg.awaiting_ack
                or not leg.oa.stable or (other is not None and not other.oa.stable)):
            timer.refresh_failed(491)   # an exchange is in progress: try again shortly
            return
        extra = terms.refresh_headers()
        if self.peer_allows_update.get(side):
            sent = leg.send_in_dialog("UPDATE", _Client(
                lambda _t, r: self._refresh_answered(side, r),
                lambda _t: self._refresh_answered(side, None)), extra=extra)
        else:  # the INVITE gets the same headers through extension_headers("invite")
            sent = self._refresh_reinvite(side, leg, [])
        if sent is None:
            timer.refresh_failed(None)

    def _refresh_reinvite(self, side: str, leg: Leg,
                          extra: list[tuple[str, str]]) -> ClientTransaction | None:
        call = self.call
        assert call is not None
        state: dict[str, Any] = {"ack": None, "done": False}
        body = self._sdp_sent(side, leg)

        def answered(txn: ClientTransaction, response: Response) -> None:
            if response.status < 200:
                return
            if response.status < 300 and leg.dialog is not None:
                if state["ack"] is None:
                    leg.dialog.update_from_response(response)
                    state["ack"] = leg.dialog.create_request(
                        "ACK", via=leg.b2bua.make_via(leg.peer), cseq=txn.request.cseq.seq)
                try:  # every 2xx, retransmissions too, gets the ACK (RFC 3261 §13.2.2.4)
                    leg.b2bua.transactions.send_ack(state["ack"], leg.peer)
                except TransportError:
                    log.debug("ACK for a refresh 2xx could not be sent")
            if state["done"]:
                return
            state["done"] = True
            leg.oa.fire("receive_answer" if response.status < 300 else "rollback")
            self._refresh_answered(side, response)

        def failed(_txn: ClientTransaction) -> None:
            if state["done"]:
                return
            state["done"] = True
            leg.oa.fire("rollback")
            self._refresh_answered(side, None)

        # §10: a refresh re-INVITE repeats the SDP we last sent (same version: no change).
        leg.oa.fire("send_offer")
        sent = leg.send_in_dialog("INVITE", _Client(answered, failed), body=body,
                                  extra=extra)
        if sent is None:
            leg.oa.fire("rollback")
        return sent

    def _sdp_sent(self, side: str, leg: Leg) -> bytes:
        """The SDP we last sent ``leg`` (the leg records it; else what we saw)."""
        return getattr(leg, "sdp_sent", b"") or self.last_sdp.get(side, b"")

    def _refresh_answered(self, side: str, response: Response | None) -> None:
        timer = self.timers.get(side)
        leg = self._leg(side)
        if timer is None or leg is None or timer.is_final:
            return
        if response is None:
            timer.refresh_failed(None)
            return
        status = response.status
        if status < 200:
            return
        if status < 300:
            self.refreshed_by_response(leg, response)
            return
        if status in (405, 501) and response.cseq.method == "UPDATE":
            self.peer_allows_update[side] = False  # retried shortly as a re-INVITE
        elif status == 422 and self.policy is not None and timer.current is not None:
            wanted = retry_after_422(response, self.policy, timer.current.interval)
            if wanted is not None:
                timer.current = replace(timer.current, interval=wanted)
        elif status not in (408, 481, 491, 500):  # 491, 500: an exchange pending
            # Any other answer (488, 403...) still proves the peer and its dialog alive,
            # which is what the refresh is for: the session goes on (§10 ends it only on
            # 408/481 or no answer).
            log.info("session refresh on %s answered %d: kept", leg.peer, status)
            if timer.current is not None:
                timer.refreshed(timer.current)
            return
        timer.refresh_failed(status)

    # -- UPDATE received on a leg (RFC 3311 §5.2) --------------------------------------------
    def handle_update(self, leg: Leg, request: Request, transaction: ServerTransaction) -> None:
        call = self.call
        if call is None:
            leg.respond(transaction, request, 481)
            return
        policy = self.policy
        if policy is not None and SessionExpires.of(request) is not None:
            decision = negotiate_uas(request, policy)
            if decision.reject:
                leg.respond(transaction, request, 422, "Session Interval Too Small",
                            headers=[("Min-SE", str(decision.reject_min_se))])
                return
        other = call.update_peer(leg)
        has_offer = bool(request.body)
        early = not leg.confirmed
        other_ok = (other is not None and other.dialog is not None and not other.closed
                    and not other.dialog.terminated)
        verdict = decide_update(
            has_offer=has_offer, early=early,
            other_allows=other is not None and self._allows_update(call, other),
            other_established=other_ok and other is not None and (other.confirmed or early),
            # §5.2: our own offer to this leg unanswered, or an exchange on the other leg
            # (a relayed re-INVITE/UPDATE) in progress: glare.
            local_offer_pending=(leg.oa.offer_outstanding or call.reinvite is not None
                                 or self.update_pending
                                 or (other is not None and not other.oa.stable)),
            # ...this leg's own offer (INVITE, re-INVITE) still waiting for our answer.
            remote_offer_pending=leg.oa.state in ("remote_offer", "offer_due"),
            initial_answered=not early or self._initial_answered(call, leg))
        if verdict.status is not None:
            headers = ([("Retry-After", str(verdict.retry_after))]
                       if verdict.retry_after is not None else [])
            leg.respond(transaction, request, verdict.status, verdict.reason, headers=headers)
            return
        if verdict.local:
            headers = [("Contact", leg.b2bua.contact(leg.peer)),
                       *self.refreshed_by_request(leg, request)]
            leg.respond(transaction, request, 200, headers=headers)
            return
        assert other is not None
        self._relay_update(call, leg, other, request, transaction)

    def _allows_update(self, call: Call, other: Leg) -> bool:
        """RFC 3311 §4: ``other`` said it takes UPDATE (a ringing fork in its 18x)."""
        if other is not call.caller and other is not call.winner:
            state = self.forks.get(id(other))
            return state is not None and state.allows_update
        return self.peer_allows_update.get(other.side, False)

    def _initial_answered(self, call: Call, leg: Leg) -> bool:
        """RFC 3311 §5.1: in ``leg``'s early dialog the initial offer/answer completed,
        its answer in a reliable 18x (ours to the caller, or the fork's to us)."""
        if leg is call.caller:
            return self.caller_answered_early and leg.oa.stable
        state = self.forks.get(id(leg))
        return state is not None and state.answered and leg.oa.stable

    def early_sdp_for_caller(self, fork: CalleeLeg) -> bytes | None:
        """The SDP our 200 repeats to the caller when ``fork``'s 2xx only repeats an early
        session (RFC 3311 §5.1: completed in a reliable 18x, then changed by an UPDATE
        from the callee, so the 2xx's SDP answers no offer); None if there is none."""
        call = self.call
        if call is None or call.early_fork is not fork or not call.caller.oa.stable:
            return None
        if not self._initial_answered(call, fork):
            return None
        return self.last_sdp.get("a") or None

    def _relay_update(self, call: Call, leg: Leg, other: Leg, request: Request,
                      transaction: ServerTransaction) -> None:
        media = call.media
        body = b""
        if request.body:
            if media is None:
                leg.respond(transaction, request, 488)
                return
            try:
                body = media.reoffer(leg.side, request.body)
            except Exception as exc:
                log.info("call %s: UPDATE offer refused: %s", call.id, exc)
                leg.respond(transaction, request, 488)
                return
        self.update_pending = bool(body)
        if body:
            leg.oa.fire("receive_offer")
            other.oa.fire("send_offer")
        done: list[bool] = []

        def rollback() -> None:
            self.update_pending = False
            if not body:
                return
            reject = getattr(media, "reject_offer", None)
            if reject is not None:
                reject()
            leg.oa.fire("rollback")
            other.oa.fire("rollback")

        def answered(_txn: ClientTransaction, response: Response) -> None:
            status = response.status
            if status < 200 or done:
                return
            done.append(True)
            if status >= 300:
                rollback()
                leg.respond(transaction, request, status, response.reason)
                if status in (408, 481) and self.call is not None:
                    call.fire("leg_lost", "pbx", f"{status} {response.reason}")
                return
            self.update_pending = False
            self.refreshed_by_response(other, response)
            answer = b""
            if body and response.body and media is not None:
                try:
                    answer = media.reanswer(other.side, response.body)
                except Exception as exc:
                    log.info("call %s: UPDATE answer refused: %s", call.id, exc)
            if body and not answer:  # RFC 3311 §5.2: an offer needs its answer in the 2xx
                rollback()
                leg.respond(transaction, request, 488)
                return
            if body:
                other.oa.fire("receive_answer")
                leg.oa.fire("send_answer")
                self.last_sdp[leg.side] = answer
                if call.winner is None and leg is not call.caller:
                    # The caller's early session now mirrors this fork's (§5.1).
                    call.early_fork = leg  # type: ignore[assignment]  # a CalleeLeg
            headers = [("Contact", leg.b2bua.contact(leg.peer)),
                       *self.refreshed_by_request(leg, request)]
            leg.respond(transaction, request, 200, body=answer, headers=headers)

        def failed(_txn: ClientTransaction) -> None:
            if done:
                return
            done.append(True)
            rollback()
            leg.respond(transaction, request, 408)
            if self.call is not None:
                call.fire("leg_lost", "pbx", "408 Request Timeout")

        sent = other.send_in_dialog("UPDATE", _Client(answered, failed), body=body,
                                    extra=self.refresh_request_headers(other))
        if sent is None:
            rollback()
            leg.respond(transaction, request, 481)
        elif body:
            self.last_sdp[other.side] = body


def _ignore(*_: Any) -> None:
    return None


def _retry_invite(fork: CalleeLeg, extension_headers: list[tuple[str, str]]) -> bool:
    """RFC 4028 §7.4: the INVITE again (same Call-ID and From tag, next CSeq, a new
    branch) with the larger Session-Expires/Min-SE; the fork keeps ringing."""
    old = fork.invite
    b2bua = fork.b2bua
    headers = old.headers.copy()
    headers.set("Via", b2bua.make_via(fork.peer))
    headers.set("CSeq", f"{old.cseq.seq + 1} INVITE")
    for name in ("Supported", "Session-Expires", "Min-SE"):
        headers.remove(name)
    for name, value in extension_headers:
        headers.add(name, value)
    invite = Request("INVITE", old.uri.copy(), headers, old.body)
    fork.invite = invite
    if fork.dialog is not None:  # the first INVITE's early dialog is over
        b2bua.dialogs.remove(fork.dialog)
    fork.dialog = None
    try:
        fork.transaction = b2bua.transactions.send_request(invite, fork.peer, fork)
    except TransportError:
        return False
    return True
