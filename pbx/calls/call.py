"""One call through the B2BUA: the call machine and its two kinds of legs.

The call's life is the chart ``statecharts/call.yaml``; this module supplies the
callbacks.  A :class:`CallerLeg` is the UAS side towards the phone that dialled (its
INVITE, server transaction and dialog); a :class:`CalleeLeg` is one fork of our own
INVITE to one registered contact of the dialled extension, with its *own* Call-ID, From
tag and CSeq (nothing of the caller's identifiers crosses to the callee).

Rules the legs enforce whatever the call's state:

* a callee leg gets BYE only after its 2xx (confirmed dialog); before that it gets
  CANCEL, and CANCEL waits for a provisional response (RFC 3261 §9.1);
* every 2xx a callee leg receives is ACKed (retransmissions too), and one that arrives
  when the call no longer wants it (another fork won, the caller cancelled) is then
  ended with BYE;
* the caller leg retransmits its 2xx until the ACK (§13.3.1.4) and sends BYE only after
  that ACK or after giving up on it (64*T1), as §15 requires of a UAS.

Transitions fired from inside callbacks are queued (run to completion), so a callback
can fire follow-up events freely.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from pbx.calls.cdr import (
    CANCELLED,
    FAILED,
    NO_ANSWER,
    CallRecord,
    disposition_for_status,
)
from pbx.sip import (
    URI,
    Binding,
    ClientTransaction,
    Dialog,
    Headers,
    Peer,
    Request,
    Response,
    ServerTransaction,
    SIPParseError,
    TransportError,
    make_response,
)
from pbx.statechart_timers import TimedChartModel

if TYPE_CHECKING:
    from pbx.calls.b2bua import B2BUA
    from pbx.calls.routing import Route

__all__ = ["Call", "CalleeLeg", "CallerLeg", "Leg", "best_final"]

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"ended", "failed", "cancelled"})


class _Client:
    """Adapts callbacks to :class:`~pbx.sip.ClientTransactionUser`."""

    __slots__ = ("on_error", "on_response", "on_timeout")

    def __init__(self, on_response: Callable[[ClientTransaction, Response], None],
                 on_timeout: Callable[[ClientTransaction], None] | None = None,
                 on_error: Callable[[ClientTransaction], None] | None = None) -> None:
        self.on_response = on_response
        self.on_timeout = on_timeout
        self.on_error = on_error or on_timeout

    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        self.on_response(transaction, response)

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        if self.on_timeout is not None:
            self.on_timeout(transaction)

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        if self.on_error is not None:
            self.on_error(transaction)


def _ignore(*_: Any) -> None:
    return None


def best_final(finals: Iterable[tuple[int, str | None]]) -> tuple[int, str | None]:
    """The response a forking B2BUA gives the caller when every fork failed.

    After RFC 3261 §16.7 step 6: a 6xx wins; then busy (486) because it tells the caller
    the most; then the lowest class, preferring a real answer over our own 408/487.
    401/407 from a phone are not the caller's business: they become 480.
    """
    items = [(s, r) for s, r in finals]
    if not items:
        return (480, "Temporarily Unavailable")
    for s, r in items:
        if s >= 600:
            return (s, r)
    for s, r in items:
        if s == 486:
            return (s, r)
    best = min(items, key=lambda sr: (sr[0] // 100, sr[0] in (408, 487), sr[0]))
    if best[0] in (401, 407):
        return (480, "Temporarily Unavailable")
    return best


class Leg:
    """What both legs share: a dialog, the flow to the phone, in-dialog requests, and
    the UAS duty of retransmitting a 2xx until its ACK."""

    side = ""           # "a" (caller) or "b" (callee): the MediaSession's names
    hangup_side = ""    # "caller" or "callee" for the CDR

    def __init__(self, b2bua: B2BUA, peer: Peer) -> None:
        self.b2bua = b2bua
        self.peer = peer
        self.call: Call | None = None
        self.dialog: Dialog | None = None
        self.closed = False
        self.bye_sent = False
        self._awaiting: tuple[Response, int] | None = None   # (2xx, CSeq) awaiting ACK
        self._retransmit: IDelayedCall | None = None
        self._give_up: IDelayedCall | None = None
        self._interval = 0.0
        self._bye_after_ack: str | None = None
        self._on_ack_timeout: Callable[[], None] | None = None

    @property
    def confirmed(self) -> bool:
        return self.dialog is not None and self.dialog.confirmed

    @property
    def awaiting_ack(self) -> bool:
        return self._awaiting is not None

    # -- in-dialog requests -----------------------------------------------------------
    def send_in_dialog(self, method: str, user: Any, *, body: bytes = b"",
                       content_type: str | None = None,
                       extra: Iterable[tuple[str, str]] = ()) -> ClientTransaction | None:
        """Send ``method`` in this leg's dialog; ``None`` when it could not be sent."""
        dialog = self.dialog
        if dialog is None or dialog.terminated:
            return None
        b2bua = self.b2bua
        request = dialog.create_request(
            method, via=b2bua.make_via(self.peer),
            contact=b2bua.contact(self.peer) if method in ("INVITE", "UPDATE") else None,
            body=body, content_type=content_type,
            extra=[*extra, ("User-Agent", b2bua.user_agent)])
        return b2bua.transactions.send_request(request, self.peer, user)

    def send_bye(self, reason: str | None = None) -> None:
        """End this leg's confirmed dialog; waits for the ACK of our own 2xx first."""
        if self.closed or self.bye_sent:
            return
        if not self.confirmed:
            raise AssertionError("BYE on a dialog that is not confirmed")
        if self._awaiting is not None:
            self._bye_after_ack = reason or ""
            return
        self.bye_sent = True
        extra = [("Reason", reason)] if reason else []
        txn = self.send_in_dialog("BYE", _Client(self._bye_done, self._bye_failed),
                                  extra=extra)
        if txn is None:
            self._closed()

    def _bye_done(self, _txn: ClientTransaction, response: Response) -> None:
        if response.status >= 200:
            self._closed()

    def _bye_failed(self, _txn: ClientTransaction) -> None:
        self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_retransmitting()
        if self.dialog is not None:
            self.dialog.terminate()
        if self.call is not None:
            self.call.fire("leg_closed")

    def remote_bye(self) -> None:
        """The phone sent BYE (answered 200 by the B2BUA): this leg is gone."""
        self._bye_after_ack = None
        self.stop_retransmitting()
        self.closed = True
        if self.dialog is not None:
            self.dialog.terminate()

    # -- 2xx retransmission (we are the UAS of an INVITE on this leg) ------------------
    def await_ack(self, response: Response, cseq: int,
                  on_timeout: Callable[[], None] | None = None) -> None:
        """Retransmit ``response`` (T1 doubling to T2, UDP only) until its ACK; give up
        after 64*T1 (then ``on_timeout`` and any deferred BYE)."""
        self.stop_retransmitting()
        self._awaiting = (response, cseq)
        self._on_ack_timeout = on_timeout
        txns = self.b2bua.transactions
        clock = self.b2bua.clock
        if not self.peer.reliable:
            self._interval = txns.t1
            self._retransmit = clock.callLater(self._interval, self._resend)
        self._give_up = clock.callLater(64 * txns.t1, self._ack_timed_out)

    def _resend(self) -> None:
        self._retransmit = None
        if self._awaiting is None:
            return
        try:
            self.b2bua.transactions.send_stateless(self._awaiting[0], self.peer)
        except TransportError:
            log.debug("2xx retransmission to %s failed", self.peer)
        self._interval = min(self._interval * 2, self.b2bua.transactions.t2)
        self._retransmit = self.b2bua.clock.callLater(self._interval, self._resend)

    def _ack_timed_out(self) -> None:
        self._give_up = None
        callback = self._on_ack_timeout
        self.stop_retransmitting()
        if callback is not None:
            callback()
        self._after_ack()

    def ack_received(self, ack: Request) -> bool:
        """An ACK for a 2xx of ours arrived; True when it was the one awaited."""
        awaiting = self._awaiting
        if awaiting is None:
            return False
        try:
            if ack.cseq.seq != awaiting[1]:
                return False
        except SIPParseError:
            return False
        self.stop_retransmitting()
        self._after_ack()
        return True

    def _after_ack(self) -> None:
        reason = self._bye_after_ack
        if reason is not None and not self.closed:
            self._bye_after_ack = None
            self.send_bye(reason or None)

    def stop_retransmitting(self) -> None:
        self._awaiting = None
        self._on_ack_timeout = None
        for call in (self._retransmit, self._give_up):
            if call is not None and call.active():
                call.cancel()
        self._retransmit = self._give_up = None

    def respond(self, transaction: ServerTransaction, request: Request, status: int,
                reason: str | None = None, *, body: bytes = b"",
                content_type: str | None = None,
                headers: Iterable[tuple[str, str]] = ()) -> Response:
        """Answer an in-dialog request received on this leg."""
        response = make_response(request, status, reason)
        for name, value in headers:
            response.headers.add(name, value)
        if status < 300 and request.method == "INVITE":
            response.headers.add("Contact", self.b2bua.contact(self.peer))
        response.headers.add("Server", self.b2bua.user_agent)
        if body:
            response.headers.add("Content-Type", content_type or "application/sdp")
            response.body = body
        transaction.respond(response)
        return response


class CallerLeg(Leg):
    """The phone that dialled: we are the UAS of its INVITE."""

    side = "a"
    hangup_side = "caller"

    def __init__(self, b2bua: B2BUA, request: Request, transaction: ServerTransaction,
                 peer: Peer, local_tag: str) -> None:
        super().__init__(b2bua, peer)
        self.request = request
        self.transaction = transaction
        self.local_tag = local_tag
        self.answered = False
        self.final_sent: int | None = None

    def _response(self, status: int, reason: str | None, body: bytes = b"") -> Response:
        response = make_response(self.request, status, reason, to_tag=self.local_tag)
        add = response.headers.add
        if 100 < status < 300:
            # RFC 3261 §12.1.1: the dialog-forming responses carry the Record-Route set,
            # so ACK and BYE from the caller come back through the proxies in front.
            for route in self.request.headers.getall("Record-Route"):
                add("Record-Route", route)
        if status < 300:
            add("Contact", self.b2bua.contact(self.peer))
            add("Allow", self.b2bua.allow)
        add("Server", self.b2bua.user_agent)
        if body:
            add("Content-Type", "application/sdp")
            response.body = body
        return response

    def _ensure_dialog(self) -> Dialog | None:
        if self.dialog is None:
            try:
                self.dialog = Dialog.from_uas(self.request, self.local_tag)
            except SIPParseError:
                return None
            self.b2bua.dialogs.add(self.dialog, self)
        return self.dialog

    def trying(self) -> None:
        self.transaction.respond(make_response(self.request, 100))

    def send_provisional(self, status: int, reason: str | None, body: bytes = b"") -> None:
        if self.final_sent is not None:
            return
        self._ensure_dialog()
        self.transaction.respond(self._response(status, reason, body))

    def send_answer(self, body: bytes, on_ack_timeout: Callable[[], None]) -> None:
        """200 OK with our SDP; the dialog is confirmed; retransmitted until the ACK."""
        dialog = self._ensure_dialog()
        response = self._response(200, None, body)
        self.final_sent = 200
        self.answered = True
        if dialog is not None:
            dialog.confirm()
        self.transaction.respond(response)
        self.await_ack(response, self.request.cseq.seq, on_ack_timeout)

    def reject(self, status: int, reason: str | None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        if self.final_sent is not None:
            return
        self.final_sent = status
        response = self._response(status, reason)
        for name, value in headers:
            response.headers.add(name, value)
        self.transaction.respond(response)
        self.closed = True
        if self.dialog is not None:
            self.dialog.terminate()


class CalleeLeg(Leg):
    """One fork: our INVITE to one registered contact of the dialled extension."""

    side = "b"
    hangup_side = "callee"

    def __init__(self, b2bua: B2BUA, call: Call, binding: Binding, invite_body: bytes,
                 max_forwards: int) -> None:
        super().__init__(b2bua, Peer(binding.transport or "udp", binding.source_host,
                                     binding.source_port))
        self.call = call
        self.binding = binding
        self.invite = self._build_invite(call, binding, invite_body, max_forwards)
        self.transaction: ClientTransaction | None = None
        self.provisional_seen = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.answered = False      # a 2xx arrived on this fork
        self.done = False          # finished without an answer (final >= 300, timeout)
        self.final: tuple[int, str | None] | None = None
        self._ack: Request | None = None

    def _build_invite(self, call: Call, binding: Binding, body: bytes,
                      max_forwards: int) -> Request:
        b2bua = self.b2bua
        caller = call.caller
        display = None
        with contextlib.suppress(SIPParseError):
            display = caller.request.from_.display_name
        domain = b2bua.domain
        from_uri = f"<sip:{call.caller_user}@{domain}>"
        if display:
            from_uri = f'"{display.replace(chr(34), "")}" {from_uri}'
        headers = Headers()
        add = headers.add
        add("Via", b2bua.make_via(self.peer))
        add("Max-Forwards", str(max_forwards))
        add("From", f"{from_uri};tag={secrets.token_hex(6)}")
        add("To", f"<sip:{call.number}@{domain}>")
        add("Call-ID", f"{secrets.token_hex(12)}@{b2bua.local_host}")
        add("CSeq", "1 INVITE")
        add("Contact", b2bua.contact(self.peer))
        add("Allow", b2bua.allow)
        add("User-Agent", b2bua.user_agent)
        add("X-Pbx-Hop", b2bua.node)
        if body:
            add("Content-Type", "application/sdp")
        return Request("INVITE", URI.parse(binding.contact), headers, body)

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    def start(self) -> None:
        self.transaction = self.b2bua.transactions.send_request(self.invite, self.peer, self)

    # -- ClientTransactionUser of the INVITE ---------------------------------------------
    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        status = response.status
        if status < 200:
            self._provisional(response)
        elif status < 300:
            self._success(response)
        elif not self.done and not self.answered:
            self.done = True
            self.final = (status, response.reason)
            if self.dialog is not None:
                self.dialog.update_from_response(response)
            self._tell("fork_failed", self, status, response.reason)

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        self._gone(408, "Request Timeout")

    def timer_c_fired(self, transaction: ClientTransaction) -> None:
        """RFC 3261 §16.8: the callee sent provisionals but no final response for Timer C
        (``sip.timers.timer_c``): CANCEL it and count this fork as a 408 (the caller
        gets 408 when no other fork is left).  The transaction stays to ACK the 487."""
        self.cancel_wanted = True  # a 2xx that still comes is refused (ACK + BYE)
        self._send_cancel()
        self._gone(408, "Request Timeout")

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        self._gone(503, "Service Unavailable")

    def _gone(self, status: int, reason: str) -> None:
        if self.answered or self.done:
            return
        self.done = True
        self.final = (status, reason)
        self._tell("fork_failed", self, status, reason)

    def _tell(self, method: str, *args: Any) -> None:
        call = self.call
        if call is not None:
            getattr(call, method)(*args)

    def _provisional(self, response: Response) -> None:
        self.provisional_seen = True
        if self.cancel_wanted:
            self._send_cancel()
            return
        if response.status == 100:
            return
        try:
            if response.to.tag and self.dialog is None:
                self.dialog = Dialog.from_uac(self.invite, response)
        except SIPParseError:
            pass
        self._tell("fork_provisional", self, response)

    def _success(self, response: Response) -> None:
        try:
            tag = response.to.tag
        except SIPParseError:
            tag = None
        dialog = self.dialog
        if dialog is not None and dialog.remote_tag == tag:
            if dialog.confirmed and self._ack is not None:
                self._send_ack(self._ack)  # a retransmission: ACK it again
                return
            dialog.update_from_response(response)
        elif dialog is not None and dialog.confirmed:
            self._stray_2xx(response)  # a second dialog behind a forking proxy
            return
        else:
            try:
                dialog = self.dialog = Dialog.from_uac(self.invite, response)
            except SIPParseError:
                log.warning("2xx without To tag or Contact from %s", self.peer)
                self._gone(502, "Bad Gateway")
                return
        self._ack = dialog.create_request("ACK", via=self.b2bua.make_via(self.peer),
                                          cseq=self.invite.cseq.seq)
        self._send_ack(self._ack)
        self.answered = True
        self.done = True
        call = self.call
        if call is None or not call.fork_answered(self, response):
            self.send_bye("SIP;cause=200;text=\"Call completed elsewhere\"")

    def _stray_2xx(self, response: Response) -> None:
        try:
            dialog = Dialog.from_uac(self.invite, response)
        except SIPParseError:
            return
        self._send_ack(dialog.create_request("ACK", via=self.b2bua.make_via(self.peer),
                                             cseq=self.invite.cseq.seq))
        bye = dialog.create_request("BYE", via=self.b2bua.make_via(self.peer))
        self.b2bua.transactions.send_request(bye, self.peer, _Client(_ignore, _ignore))

    def _send_ack(self, ack: Request) -> None:
        try:
            self.b2bua.transactions.send_ack(ack, self.peer)
        except TransportError:
            log.debug("ACK to %s failed", self.peer)

    # -- cancelling ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop ringing this fork: CANCEL once a provisional came (§9.1)."""
        if self.done or self.answered or self.cancel_wanted:
            return
        self.cancel_wanted = True
        if self.provisional_seen:
            self._send_cancel()

    def _send_cancel(self) -> None:
        if self.cancel_sent or self.answered or self.done:
            return
        self.cancel_sent = True
        invite = self.invite
        headers = Headers()
        add = headers.add
        add("Via", invite.headers.getall("Via")[0])
        add("Max-Forwards", "70")
        add("From", invite.headers.get("From") or "")
        add("To", invite.headers.get("To") or "")
        add("Call-ID", invite.call_id)
        add("CSeq", f"{invite.cseq.seq} CANCEL")
        add("User-Agent", self.b2bua.user_agent)
        cancel = Request("CANCEL", invite.uri.copy(), headers)
        self.b2bua.transactions.send_request(cancel, self.peer, _Client(_ignore, _ignore))


class Call(TimedChartModel):
    """The call machine (``statecharts/call.yaml``): one caller leg, N forks, one winner."""

    chart_name = "call"

    def __init__(self, b2bua: B2BUA, caller: CallerLeg, record: CallRecord, *,
                 caller_user: str, number: str, max_forwards: int) -> None:
        super().__init__()
        self.b2bua = b2bua
        self.clock = b2bua.clock
        self.id = secrets.token_hex(8)
        self.caller = caller
        caller.call = self
        self.caller_user = caller_user
        self.number = number
        self.max_forwards = max_forwards
        self.record = record
        self.forks: list[CalleeLeg] = []
        self.winner: CalleeLeg | None = None
        self.media: Any = None
        self.sdp_for_b = b""
        self.reinvite_pending = False
        self.created_at = b2bua.clock.seconds()
        self.answered_at: float | None = None
        self._media_closed = False
        self.start_timers()

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.caller_user}->{self.number} {self.state}>"

    # Values the chart's timers name.
    @property
    def ring_timeout(self) -> float:
        return self.b2bua.ring_timeout

    @property
    def terminate_timeout(self) -> float:
        return 128 * self.b2bua.transactions.t1 + 1.0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def other(self, leg: Leg) -> Leg | None:
        return self.winner if leg is self.caller else self.caller

    def summary(self) -> dict[str, Any]:
        """What the ops API lists for a call."""
        return {
            "id": self.id, "call_id": self.caller.request.call_id, "caller": self.caller_user,
            "callee": self.number, "state": self.state, "created_at": self.record.start_time,
            "answered_at": self.record.answer_time, "forks": len(self.forks),
            "media": getattr(self.media, "state", None),
        }

    # -- routing (driven by the B2BUA) ----------------------------------------------------
    def route_done(self, route: Route) -> None:
        if self.state != "routing":
            return
        if not route.ok:  # unknown or unreachable: the call failed, nobody was rung
            self.fire("reject", route.status, route.reason, FAILED)
            return
        try:
            self.media = self.b2bua.media_factory(self._media_timed_out)
            self.b2bua.place_media(self.media, self.caller.peer, route.targets)
            self.media.start()
        except Exception as exc:  # PortsExhausted or a broken media layer
            log.warning("call %s: no media session: %s", self.id, exc)
            self.media = None
            self.fire("reject", 503, "Service Unavailable")
            return
        try:
            self.sdp_for_b = self.media.offer_from_a(self.caller.request.body)
        except SIPParseError as exc:
            log.info("call %s: offer not acceptable: %s", self.id, exc)
            self.fire("reject", 488, "Not Acceptable Here")
            return
        except Exception:
            log.exception("call %s: offer processing failed", self.id)
            self.fire("reject", 500, "Server Internal Error")
            return
        self.fire("routed", route.targets)

    def route_failed(self, failure: Any) -> None:
        log.error("call %s: routing failed: %s", self.id, failure.getErrorMessage())
        self.fire("reject", 500, "Server Internal Error")

    # -- fork events (called by CalleeLeg) -------------------------------------------------
    def fork_provisional(self, fork: CalleeLeg, response: Response) -> None:
        if fork.cancel_wanted:
            return
        self.fire("provisional", fork, response)

    def fork_failed(self, fork: CalleeLeg, status: int, reason: str | None) -> None:
        self.fire("fork_failed", fork, status, reason)

    def fork_answered(self, fork: CalleeLeg, response: Response) -> bool:
        """First 2xx wins; False tells the fork it lost (it then sends BYE)."""
        if self.state != "ringing" or self.winner is not None or fork.cancel_wanted:
            return False
        body = response.body
        sdp_for_a = b""
        if body and self.media is not None:
            try:
                sdp_for_a = self.media.answer_from_b(body)
            except Exception as exc:
                log.info("call %s: answer from %s not acceptable: %s", self.id, fork.peer, exc)
                fork.final = (488, "Not Acceptable Here")
                self.fire("fork_failed", fork, 488, "Not Acceptable Here")
                return False
        elif not body:
            log.info("call %s: 2xx without SDP from %s", self.id, fork.peer)
            fork.final = (488, "Not Acceptable Here")
            self.fire("fork_failed", fork, 488, "Not Acceptable Here")
            return False
        self.winner = fork
        confirmed = getattr(self.media, "confirmed", None)
        if confirmed is not None:  # the callee's dialog is confirmed: media re-learns
            confirmed("b", fork.peer.host)
        self.fire("answer", sdp_for_a)
        return True

    # -- chart callbacks --------------------------------------------------------------------
    def no_forks_left(self, *_: Any) -> bool:
        return self.winner is None and all(f.done for f in self.forks)

    def all_legs_closed(self, *_: Any) -> bool:
        return self.caller.closed and (self.winner is None or self.winner.closed)

    def start_forks(self, targets: list[Binding]) -> None:
        max_forwards = max(0, self.max_forwards - 1)
        for binding in targets:
            try:
                fork = CalleeLeg(self.b2bua, self, binding, self.sdp_for_b, max_forwards)
            except SIPParseError:
                log.warning("call %s: unusable contact %r", self.id, binding.contact)
                continue
            self.forks.append(fork)
        if not self.forks:
            self.fire("reject", 480, "Temporarily Unavailable")
            return
        for fork in list(self.forks):
            fork.start()

    def relay_provisional(self, fork: CalleeLeg, response: Response) -> None:
        body = b""
        if response.body and self.media is not None:
            try:
                body = self.media.answer_from_b(response.body)
            except Exception as exc:
                log.info("call %s: early media SDP dropped: %s", self.id, exc)
        self.caller.send_provisional(response.status, response.reason, body)

    def relay_answer(self, sdp_for_a: bytes) -> None:
        winner = self.winner
        assert winner is not None
        for fork in self.forks:
            if fork is not winner:
                fork.cancel()
        if winner.dialog is not None:
            self.b2bua.dialogs.add(winner.dialog, winner)
        self.caller.send_answer(sdp_for_a, self._caller_ack_timeout)
        confirmed = getattr(self.media, "confirmed", None)
        if confirmed is not None:  # our 200 confirms the caller's dialog: media re-learns
            confirmed("a")
        self.answered_at = self.clock.seconds()
        self.b2bua.cdr.answered(self.record)
        self.b2bua.answered_calls += 1

    def _caller_ack_timeout(self) -> None:
        self.fire("ack_timeout", "pbx", "ACK Timeout")

    def _set_end(self, side: str, cause: str, disposition: str | None = None) -> None:
        record = self.record
        if record.hangup_cause is None:
            record.hangup_cause = cause
            record.hangup_side = side
        if disposition is not None:
            record.disposition = disposition

    def reject_caller(self, status: int, reason: str | None,
                      disposition: str | None = None, *_: Any) -> None:
        self._cancel_forks()
        self.caller.reject(status, reason)
        self._set_end("pbx", f"{status} {reason or ''}".strip(),
                      disposition or disposition_for_status(status))

    def reject_with_best(self, *_: Any) -> None:
        status, reason = best_final(f.final for f in self.forks if f.final is not None)
        self.caller.reject(status, reason)
        self._set_end("callee", f"{status} {reason or ''}".strip(),
                      disposition_for_status(status))

    def give_up_ringing(self, *_: Any) -> None:
        self._cancel_forks()
        self.caller.reject(480, "No Answer")
        self._set_end("pbx", "480 No Answer", NO_ANSWER)

    def cancel_call(self, *_: Any) -> None:
        self._cancel_forks()
        self.caller.reject(487, "Request Terminated")
        self._set_end("caller", "487 Request Terminated", CANCELLED)

    def abort_setup(self, side: str = "pbx", cause: str = "Hangup", *_: Any) -> None:
        self._cancel_forks()
        self.caller.reject(503, "Service Unavailable")
        self._set_end(side, cause, FAILED)

    def hang_up(self, side: str, cause: str, reason: str | None = None) -> None:
        """BYE to every leg that did not hang up itself; media stops now."""
        self._set_end(side, cause)
        self._close_media()
        if side == "caller":
            self.caller.remote_bye()
        elif side == "callee" and self.winner is not None:
            self.winner.remote_bye()
        for leg in (self.caller, self.winner):
            if leg is not None and not leg.closed:
                leg.send_bye(reason)
        self.fire("leg_closed")

    def finish(self, *_: Any) -> None:
        """Entering a final state: release media, stop timers, write the CDR once."""
        self._close_media()
        for leg in (self.caller, self.winner):
            if leg is not None:
                leg.stop_retransmitting()
                if leg.dialog is not None:
                    leg.dialog.terminate()
        self.b2bua.call_finished(self)
        self.b2bua.cdr.finished(self.record)
        self._release_legs()

    def _release_legs(self) -> None:
        """Legs may outlive the call in their transactions (a late 2xx is still ACKed
        and ended with BYE, which needs no call), so they let go of it: no leg<->call
        cycle, and refcounting frees the call and its media once the B2BUA forgets it."""
        for leg in (self.caller, *self.forks):
            leg.call = None

    # -- media -------------------------------------------------------------------------------
    def _media_timed_out(self, _session: Any = None) -> None:
        # Not re-entrantly from inside the media layer: next reactor turn.
        self.clock.callLater(0, self.fire, "media_timeout", "pbx", "Media Timeout",
                             'SIP;cause=408;text="Media Timeout"')

    def _close_media(self) -> None:
        media = self.media
        if media is None or self._media_closed:
            return
        self._media_closed = True
        try:
            self.record.qos = media.summary()
        except Exception:
            log.exception("call %s: QoS summary failed", self.id)
        try:
            media.close()
        except Exception:
            log.exception("call %s: closing media failed", self.id)

    def _cancel_forks(self) -> None:
        for fork in self.forks:
            fork.cancel()
