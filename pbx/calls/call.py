"""One call through the B2BUA: the call machine and its two kinds of legs.

The call's life is the chart ``statecharts/call.yaml``, each leg's the chart
``statecharts/leg.yaml`` (and each leg's SDP offer/answer state
``statecharts/offer_answer.yaml``, :mod:`pbx.calls.offer_answer`); this module supplies
the callbacks.  A :class:`CallerLeg` is the UAS side towards the phone that dialled (its
INVITE, server transaction and dialog); a :class:`CalleeLeg` is one fork of our own
INVITE to one registered contact of the dialled extension, with its *own* Call-ID, From
tag and CSeq (nothing of the caller's identifiers crosses to the callee).

What the charts do not show:

* which SDP goes where: the call hands every body to its media session and relays the
  result; in a late-offer call (the caller's INVITE has no SDP) the forks are INVITEd
  without SDP, the winner's 2xx offer goes to the caller in our 200 and the caller's
  ACK answer to the callee in our ACK (RFC 3261 §13.2.1; :meth:`Call.caller_acked`);
* data the states need: the 2xx being retransmitted and its CSeq, the BYE's Reason, a
  fork's final status (for :func:`best_final`), the ACK we sent (re-sent for every
  retransmitted 2xx);
* a caller INVITE without a usable Contact: the caller leg's dialog then targets the
  flow the INVITE came on (:meth:`CallerLeg._flow_dialog`), so the BYE still goes out.

Rules the legs enforce whatever the call's state:

* a callee leg gets BYE only after its 2xx (confirmed dialog); before that it gets
  CANCEL, and CANCEL waits for a provisional response (RFC 3261 §9.1);
* every 2xx a callee leg receives is ACKed (retransmissions too), and one that arrives
  when the call no longer wants it (another fork won, the caller cancelled) is then
  ended with BYE;
* a leg retransmits its 2xx until the ACK (§13.3.1.4) and sends BYE only after that
  ACK or after giving up on it (64*T1), as §15 requires of a UAS.

Transitions fired from inside callbacks are queued (run to completion), so a callback
can fire follow-up events freely.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pbx.calls.cdr import (
    CANCELLED,
    FAILED,
    NO_ANSWER,
    CallRecord,
    disposition_for_status,
)
from pbx.calls.features import CallFeatures
from pbx.calls.offer_answer import OfferAnswer
from pbx.sip import (
    URI,
    Binding,
    ClientTransaction,
    Dialog,
    Headers,
    NameAddress,
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

# RFC 3261 §20.43 warn-code for an offer we cannot use (pbx.media.negotiation says which
# applies; calls only import pbx.media's public face, through wiring).
WARN_MEDIA_NOT_AVAILABLE = 304

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


def _without_tag(addr: NameAddress) -> str:
    params = {k: v for k, v in addr.params.items() if k != "tag"}
    return str(NameAddress(addr.display_name, addr.uri, params))


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


class Leg(TimedChartModel):
    """What both legs share (the ``leg`` chart): a dialog, the flow to the phone,
    in-dialog requests, the UAS duty of retransmitting a 2xx until its ACK, and BYE.

    Extension points (for 100rel, UPDATE and session timers): :meth:`extension_headers`
    is asked for extra headers of every INVITE and 2xx-to-INVITE this leg sends;
    :meth:`CallerLeg.send_provisional` / :meth:`CalleeLeg.provisional_received` are where
    a provisional leaves / arrives; :meth:`send_in_dialog` sends any in-dialog request
    (UPDATE included) and :meth:`respond` answers one.
    """

    chart_name = "leg"
    side = ""           # "a" (caller) or "b" (callee): the MediaSession's names
    hangup_side = ""    # "caller" or "callee" for the CDR

    def __init__(self, b2bua: B2BUA, peer: Peer) -> None:
        super().__init__()
        self.b2bua = b2bua
        self.clock = b2bua.clock
        self.peer = peer
        self.call: Call | None = None
        self.dialog: Dialog | None = None
        self.oa = OfferAnswer()
        self._2xx: Response | None = None     # our 2xx awaiting its ACK...
        self._2xx_cseq = 0                    # ...for the INVITE with this CSeq
        self._bye_reason: str | None = None
        self.sdp_sent = b""   # our last SDP on this leg (a session refresh repeats it)

    # Values the chart's timers name.
    @property
    def T1(self) -> float:
        return self.b2bua.transactions.t1

    @property
    def T2(self) -> float:
        return self.b2bua.transactions.t2

    @property
    def reliable(self) -> bool:
        return self.peer.reliable

    @property
    def confirmed(self) -> bool:
        return self.dialog is not None and self.dialog.confirmed

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def awaiting_ack(self) -> bool:
        return self.state in ("awaiting_ack", "bye_pending")

    def extension_headers(self, kind: str) -> list[tuple[str, str]]:
        """Extra headers for an outgoing ``kind`` ("invite": our INVITE or re-INVITE,
        "2xx": our 2xx to an INVITE): 100rel/timer option tags and RFC 4028
        Session-Expires, from the call's :class:`~pbx.calls.features.CallFeatures`."""
        features = self.call.features if self.call is not None else None
        return features.extension_headers(self, kind) if features is not None else []

    # -- in-dialog requests -----------------------------------------------------------
    def send_in_dialog(self, method: str, user: Any, *, body: bytes = b"",
                       content_type: str | None = None,
                       extra: Iterable[tuple[str, str]] = ()) -> ClientTransaction | None:
        """Send ``method`` in this leg's dialog; ``None`` when it could not be sent."""
        dialog = self.dialog
        if dialog is None or dialog.terminated:
            return None
        b2bua = self.b2bua
        headers = [*extra, ("User-Agent", b2bua.user_agent)]
        if method == "INVITE":
            headers += self.extension_headers("invite")
        request = dialog.create_request(
            method, via=b2bua.make_via(self.peer),
            contact=b2bua.contact(self.peer) if method in ("INVITE", "UPDATE") else None,
            body=body, content_type=content_type, extra=headers)
        if body and method in ("INVITE", "UPDATE"):
            self.sdp_sent = body
        try:
            return b2bua.transactions.send_request(request, self.peer, user)
        except TransportError:
            log.debug("%s to %s could not be sent", method, self.peer)
            return None

    def send_bye(self, reason: str | None = None) -> None:
        """End this leg's dialog with BYE (RFC 3326 ``Reason`` if given); a UAS waits for
        the ACK of its 2xx first.  Never raises: a leg that cannot send BYE closes."""
        if self._bye_reason is None:
            self._bye_reason = reason or ""
        if self.state in ("calling", "early"):
            self.fire("reject")   # no dialog to end (a caller leg never answered)
            return
        self.fire("hang_up")

    # -- chart callbacks ------------------------------------------------------------------
    def send_cancel(self, *_: Any) -> None:
        """CANCEL our INVITE (a callee leg's; a caller leg never sends one)."""

    def send_bye_now(self, *_: Any) -> None:
        reason = self._bye_reason
        extra = [("Reason", reason)] if reason else []
        txn = self.send_in_dialog("BYE", _Client(self._bye_done, self._bye_failed),
                                  extra=extra)
        if txn is None:
            self.fire("bye_done")

    def _bye_done(self, _txn: ClientTransaction, response: Response) -> None:
        if response.status >= 200:
            self.fire("bye_done")

    def _bye_failed(self, _txn: ClientTransaction) -> None:
        self.fire("bye_done")

    def leg_closed(self, *_: Any) -> None:
        self._2xx = None
        if self.dialog is not None:
            self.dialog.terminate()
        call = self.call
        if call is not None:
            call.fire("leg_closed")

    def remote_bye(self) -> None:
        """The phone sent BYE (answered 200 by the B2BUA): this leg is gone."""
        self.fire("remote_bye")

    def stop_retransmitting(self) -> None:
        """The call is over: no more 2xx retransmissions, nothing more on this leg."""
        self.fire("close")

    # -- 2xx retransmission (we are the UAS of an INVITE on this leg) ------------------
    def await_ack(self, response: Response, cseq: int) -> None:
        """Retransmit ``response`` until its ACK (the chart's T1..T2 timer, UDP only);
        64*T1 without it: ``ack_timeout``."""
        self._2xx, self._2xx_cseq = response, cseq
        self.fire("sent_2xx")

    def resend_2xx(self, *_: Any) -> None:
        if self._2xx is None:
            return
        try:
            self.b2bua.transactions.send_stateless(self._2xx, self.peer)
        except TransportError:
            log.debug("2xx retransmission to %s failed", self.peer)

    def ack_arrived(self, *_: Any) -> None:
        self._2xx = None

    def ack_missing(self, *_: Any) -> None:
        self._2xx = None
        call = self.call
        if call is not None:
            call.ack_missing(self, self._2xx_cseq)

    def ack_received(self, ack: Request) -> bool:
        """An ACK for a 2xx of ours arrived; True when it was the one awaited."""
        if not self.awaiting_ack:
            return False
        try:
            if ack.cseq.seq != self._2xx_cseq:
                return False
        except SIPParseError:
            return False
        self.fire("ack")
        return True

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
            for name, value in self.extension_headers("2xx"):
                response.headers.add(name, value)
        response.headers.add("Server", self.b2bua.user_agent)
        if body:
            response.headers.add("Content-Type", content_type or "application/sdp")
            response.body = body
            if status < 300 and request.method in ("INVITE", "UPDATE"):
                self.sdp_sent = body
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
        if 200 <= status < 300:
            for name, value in self.extension_headers("2xx"):
                add(name, value)
        add("Server", self.b2bua.user_agent)
        if body:
            add("Content-Type", "application/sdp")
            response.body = body
        return response

    def _ensure_dialog(self) -> Dialog:
        if self.dialog is None:
            try:
                self.dialog = Dialog.from_uas(self.request, self.local_tag)
            except SIPParseError:
                self.dialog = self._flow_dialog()
            self.b2bua.dialogs.add(self.dialog, self)
        return self.dialog

    def _flow_dialog(self) -> Dialog:
        """The dialog of an INVITE without a usable Contact (§8.1.1.8 makes it
        mandatory; some phones get it wrong): the remote target is the flow the INVITE
        came on, so the ACK still matches and a BYE still reaches the phone."""
        request, peer = self.request, self.peer
        from_ = request.from_
        host = f"[{peer.host}]" if ":" in peer.host else peer.host
        suffix = "" if peer.transport == "udp" else f";transport={peer.transport}"
        log.info("INVITE from %s without a usable Contact: using its flow", peer)
        return Dialog(
            role="uas", call_id=request.call_id, local_tag=self.local_tag,
            remote_tag=from_.tag or "", local_uri=_without_tag(request.to),
            remote_uri=_without_tag(from_),
            remote_target=URI.parse(f"sip:{host}:{peer.port}{suffix}"),
            route_set=request.headers.getall("Record-Route"), local_seq=0,
            remote_seq=request.cseq.seq)

    def trying(self) -> None:
        self.transaction.respond(make_response(self.request, 100))

    def send_provisional(self, status: int, reason: str | None, body: bytes = b"") -> None:
        """A provisional response to the caller (before any final one)."""
        if self.state not in ("calling", "early"):
            return
        self._ensure_dialog()
        response = self._response(status, reason, body)
        features = self.call.features if self.call is not None else None
        if features is None or not features.caller_provisional(response):  # RFC 3262
            self.transaction.respond(response)
        self.fire("provisional")

    def send_answer(self, body: bytes) -> None:
        """200 OK with our SDP; the dialog is confirmed; retransmitted until the ACK.
        It waits while a reliable 18x is not PRACKed (RFC 3262 §3)."""
        features = self.call.features if self.call is not None else None
        if features is not None and features.hold_answer(lambda: self.send_answer(body)):
            return
        dialog = self._ensure_dialog()
        response = self._response(200, None, body)
        dialog.confirm()
        self.transaction.respond(response)
        self.await_ack(response, self.request.cseq.seq)
        if features is not None:
            features.caller_answered(body)

    def reject(self, status: int, reason: str | None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        if self.state not in ("calling", "early"):
            return
        response = self._response(status, reason)
        for name, value in headers:
            response.headers.add(name, value)
        self.transaction.respond(response)
        if self.call is not None and self.call.features is not None:
            self.call.features.caller_final()  # no more reliable 18x retransmissions
        self.fire("reject")


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
        self.final: tuple[int, str | None] | None = None  # failed (>= 300, timeout)
        self._ack: Request | None = None

    @property
    def done(self) -> bool:
        """Finished without an answer (a final >= 300, a timeout, Timer C)."""
        return self.final is not None

    @property
    def unanswered(self) -> bool:
        return self.state in ("calling", "early", "cancel_pending", "cancelling")

    @property
    def cancelled(self) -> bool:
        return self.state in ("cancel_pending", "cancelling")

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
        for name, value in self.extension_headers("invite"):
            add(name, value)
        if body:
            add("Content-Type", "application/sdp")
        return Request("INVITE", URI.parse(binding.contact), headers, body)

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    def start(self) -> None:
        self.oa.fire("send_offer" if self.invite.body else "send_offerless")
        self.transaction = self.b2bua.transactions.send_request(self.invite, self.peer, self)

    # -- ClientTransactionUser of the INVITE ---------------------------------------------
    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        status = response.status
        if status < 200:
            self.provisional_received(response)
        elif status < 300:
            self._success(response)
        elif self.unanswered and self.final is None:
            features = self.call.features if self.call is not None else None
            if features is not None and features.callee_final(self, response):
                return  # a 422 retried with a larger Session-Expires (RFC 4028 §7.4)
            self.final = (status, response.reason)
            if self.dialog is not None:
                self.dialog.update_from_response(response)
            self.fire("failure")
            self._tell("fork_failed", self, status, response.reason)
        elif self.unanswered:
            self.fire("failure")  # the 487 after Timer C's CANCEL

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        self._gone(408, "Request Timeout")

    def timer_c_fired(self, transaction: ClientTransaction) -> None:
        """RFC 3261 §16.8: the callee sent provisionals but no final response for Timer C
        (``sip.timers.timer_c``): CANCEL it and count this fork as a 408 (the caller
        gets 408 when no other fork is left).  The transaction stays to ACK the 487;
        a 2xx that still comes is refused (ACK + BYE)."""
        self.fire("timer_c")
        self._gone(408, "Request Timeout", close=False)

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        self._gone(503, "Service Unavailable")

    def _gone(self, status: int, reason: str, *, close: bool = True) -> None:
        if not self.unanswered or self.final is not None:
            return
        self.final = (status, reason)
        if close:
            self.fire("failure")
        self._tell("fork_failed", self, status, reason)

    def _tell(self, method: str, *args: Any) -> None:
        call = self.call
        if call is not None:
            getattr(call, method)(*args)

    def provisional_received(self, response: Response) -> None:
        """A 1xx of our INVITE; a reliable one is PRACKed (RFC 3262 §4) and its
        retransmissions are dropped here."""
        self.fire("provisional")
        if self.cancelled or response.status == 100:
            return
        try:
            if response.to.tag and self.dialog is None:
                self.dialog = Dialog.from_uac(self.invite, response)
                call = self.call
                if call is not None and not call.finished:
                    # RFC 3311 §5: the early dialog takes UPDATE from the callee.
                    self.b2bua.dialogs.add(self.dialog, self)
        except SIPParseError:
            pass
        features = self.call.features if self.call is not None else None
        if features is not None and not features.callee_provisional(self, response):
            return
        self._tell("fork_provisional", self, response)

    def _success(self, response: Response) -> None:
        try:
            tag = response.to.tag
        except SIPParseError:
            tag = None
        dialog = self.dialog
        if dialog is not None and dialog.remote_tag == tag:
            if dialog.confirmed:
                if self._ack is not None:
                    self._send_ack(self._ack)  # a retransmission: ACK it again
                return  # (or our ACK waits for the caller's answer: it will come)
            dialog.update_from_response(response)
        elif dialog is not None and dialog.confirmed:
            self._stray_2xx(response)  # a second dialog behind a forking proxy
            return
        else:
            if dialog is not None:  # an early dialog of another To tag: it is over
                self.b2bua.dialogs.remove(dialog)
            try:
                dialog = self.dialog = Dialog.from_uac(self.invite, response)
            except SIPParseError:
                log.warning("2xx without To tag or Contact from %s", self.peer)
                self._gone(502, "Bad Gateway")
                return
        wanted = not self.cancelled and self.final is None
        self.fire("success")
        call = self.call
        if not wanted or call is None or not call.fork_answered(self, response):
            self.send_ack()
            self.send_bye("SIP;cause=200;text=\"Call completed elsewhere\"")
        elif not self.oa.answer_owed:
            self.send_ack()  # else the ACK carries the answer, once the caller gave it

    def leg_closed(self, *_: Any) -> None:
        """A fork that ended (failed, cancelled, lost) leaves the dialog table; the
        winner's entry goes with the call (:meth:`B2BUA.call_finished`)."""
        call = self.call
        if call is not None and call.early_fork is self:
            call.early_fork = None
        if self.dialog is not None and (call is None or call.winner is not self):
            self.b2bua.dialogs.remove(self.dialog)
        super().leg_closed()

    def send_ack(self, body: bytes = b"") -> None:
        """ACK our INVITE's 2xx (RFC 3261 §13.2.2.4); ``body``: the answer to an offer
        the 2xx carried (late offer).  Once only; retransmitted 2xx get the same ACK."""
        if self._ack is not None or self.dialog is None:
            return
        self._ack = self.dialog.create_request(
            "ACK", via=self.b2bua.make_via(self.peer), cseq=self.invite.cseq.seq,
            body=body, content_type="application/sdp" if body else None)
        self._send_ack(self._ack)

    def send_bye(self, reason: str | None = None) -> None:
        if self.unanswered:  # no dialog to BYE yet: CANCEL it (§9.1, §15)
            self.cancel()
            return
        self.send_ack()  # a 2xx whose ACK waited for an answer is ACKed before its BYE
        super().send_bye(reason)

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
        if self.final is None:
            self.fire("cancel")

    def send_cancel(self, *_: Any) -> None:
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
        # The fork whose early dialog the caller's mirrors (its 18x relayed last).
        self.early_fork: CalleeLeg | None = None
        self.media: Any = None
        self.sdp_for_b = b""
        self.reinvite: Any = None   # the in-dialog INVITE being relayed (pbx.calls.b2bua)
        # 100rel, UPDATE, session timers of both legs (pbx.calls.features)
        self.features: CallFeatures | None = CallFeatures(
            self, getattr(b2bua, "session_timer", None))
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

    def update_peer(self, leg: Leg) -> Leg | None:
        """Where an UPDATE from ``leg`` is relayed (RFC 3311 §5): the other leg once
        answered; while ringing, the caller's UPDATE goes to :attr:`early_fork` and an
        early fork's to the caller, if we sent it an 18x (its early dialog exists)."""
        winner = self.winner
        if winner is not None:
            return self.other(leg) if leg is self.caller or leg is winner else None
        if leg is self.caller:
            fork = self.early_fork
            if fork is None or fork.done or not fork.unanswered or fork.cancelled:
                return None
            return fork
        caller = self.caller
        return caller if caller.dialog is not None and caller.state == "early" else None

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
        body = self.caller.request.body
        if not body:  # late offer (RFC 3261 §13.2.1): the callee's 2xx will offer
            self.caller.oa.fire("receive_offerless")
            self.fire("routed", route.targets)
            return
        try:
            self.sdp_for_b = self.media.offer_from_a(body)
        except SIPParseError as exc:
            log.info("call %s: offer not acceptable: %s", self.id, exc)
            self.fire("reject", 488, "Not Acceptable Here", None,
                      self.b2bua.warning(getattr(exc, "warning", WARN_MEDIA_NOT_AVAILABLE)))
            return
        except Exception:
            log.exception("call %s: offer processing failed", self.id)
            self.fire("reject", 500, "Server Internal Error")
            return
        self.caller.oa.fire("receive_offer")
        self.fire("routed", route.targets)

    def route_failed(self, failure: Any) -> None:
        log.error("call %s: routing failed: %s", self.id, failure.getErrorMessage())
        self.fire("reject", 500, "Server Internal Error")

    # -- fork events (called by CalleeLeg) -------------------------------------------------
    def fork_provisional(self, fork: CalleeLeg, response: Response) -> None:
        if fork.cancelled:
            return
        self.fire("provisional", fork, response)

    def fork_failed(self, fork: CalleeLeg, status: int, reason: str | None) -> None:
        self.fire("fork_failed", fork, status, reason)

    def fork_answered(self, fork: CalleeLeg, response: Response) -> bool:
        """First 2xx wins; False tells the fork it lost (it then sends ACK + BYE).

        The 2xx answers our offer, or (late offer: the caller's INVITE had no SDP) it
        carries the callee's offer, which goes to the caller in our 200 and whose answer
        comes in the caller's ACK (RFC 3261 §13.2.1; :meth:`caller_acked`)."""
        if self.state != "ringing" or self.winner is not None or fork.cancelled:
            return False
        body = response.body
        late = self.caller.oa.state == "offer_due"
        if not body or self.media is None:
            log.info("call %s: 2xx without SDP from %s", self.id, fork.peer)
            return self._fork_refused(fork, 488, "Not Acceptable Here")
        try:
            sdp_for_a = (self.media.reoffer("b", body) if late
                         else self.media.answer_from_b(body))
        except Exception as exc:
            repeat = (self.features.early_sdp_for_caller(fork)
                      if self.features is not None and not late else None)
            if repeat is None:
                log.info("call %s: SDP from %s not acceptable: %s", self.id, fork.peer, exc)
                return self._fork_refused(fork, 488, "Not Acceptable Here")
            sdp_for_a = repeat  # the 2xx repeats an early session the caller already has
        fork.oa.fire("receive_offer" if late else "receive_answer")
        self.winner = fork
        if self.features is not None:  # that leg's session timer (RFC 4028 §7.2)
            self.features.callee_answered(fork, response)
        confirmed = getattr(self.media, "confirmed", None)
        if confirmed is not None:  # the callee's dialog is confirmed: media re-learns
            confirmed("b", fork.peer.host)
        self.fire("answer", sdp_for_a)
        return True

    def _fork_refused(self, fork: CalleeLeg, status: int, reason: str) -> bool:
        fork.final = (status, reason)
        self.fire("fork_failed", fork, status, reason)
        return False

    def caller_acked(self, ack: Request) -> None:
        """The ACK of our 200: in a late-offer call it carries the caller's answer to
        the callee's offer, which goes to the callee in our ACK; without one both legs
        get BYE (RFC 3261 §13.2.2.4: an offer in a 2xx needs its answer in the ACK)."""
        winner = self.winner
        if self.caller.oa.offer_outstanding and winner is not None:
            body = b""
            if ack.body and self.media is not None:
                try:
                    body = self.media.reanswer("a", ack.body)
                except Exception as exc:
                    log.info("call %s: answer in the ACK not acceptable: %s", self.id, exc)
            if not body:
                self.caller.oa.fire("rollback")
                winner.oa.fire("rollback")
                self.fire("hangup", "pbx", "No SDP answer in ACK",
                          'SIP;cause=488;text="No SDP answer in ACK"')
                return
            self.caller.oa.fire("receive_answer")
            winner.oa.fire("send_answer")
            winner.send_ack(body)
        self.fire("caller_ack")

    def ack_missing(self, leg: Leg, cseq: int) -> None:
        """A 2xx of ours on ``leg`` got no ACK in 64*T1 (§13.3.1.4)."""
        if leg is self.caller and self.state == "answered":
            self.fire("ack_timeout", "pbx", "ACK Timeout")
            return
        relay = self.reinvite
        if relay is not None:
            relay.ack_missing(leg, cseq)

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
        if response.body and self.media is not None and self.caller.oa.state != "offer_due":
            try:
                body = self.media.answer_from_b(response.body)
            except Exception as exc:
                log.info("call %s: early media SDP dropped: %s", self.id, exc)
        self.caller.send_provisional(response.status, response.reason, body)
        if fork.dialog is not None and (body or self.early_fork is None):
            self.early_fork = fork  # the caller's early dialog now mirrors this fork's
        if body:  # an early answer (RFC 3261 §13.2.1); the 2xx repeats it
            fork.oa.fire("receive_answer")
            self.caller.oa.fire("send_answer")

    def relay_answer(self, sdp_for_a: bytes) -> None:
        winner = self.winner
        assert winner is not None
        for fork in self.forks:
            if fork is not winner:
                fork.cancel()
        if winner.dialog is not None:
            self.b2bua.dialogs.add(winner.dialog, winner)
        self.caller.oa.fire("send_offer" if self.caller.oa.state == "offer_due"
                            else "send_answer")
        self.caller.send_answer(sdp_for_a)
        confirmed = getattr(self.media, "confirmed", None)
        if confirmed is not None:  # our 200 confirms the caller's dialog: media re-learns
            confirmed("a")
        self.answered_at = self.clock.seconds()
        self.b2bua.cdr.answered(self.record)
        self.b2bua.answered_calls += 1

    def _set_end(self, side: str, cause: str, disposition: str | None = None) -> None:
        record = self.record
        if record.hangup_cause is None:
            record.hangup_cause = cause
            record.hangup_side = side
        if disposition is not None:
            record.disposition = disposition

    def reject_caller(self, status: int, reason: str | None,
                      disposition: str | None = None,
                      warning: tuple[str, str] | None = None, *_: Any) -> None:
        self._cancel_forks()
        self.caller.reject(status, reason, [warning] if warning else ())
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
                try:
                    leg.send_bye(reason)
                except Exception:  # one leg's failure must not cost the other its BYE
                    log.exception("call %s: BYE to %s failed", self.id, leg.peer)
                    leg.fire("close")
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
        if self.features is not None:
            self.features.stop()  # timers, retransmissions, and its link to the call
        self._release_legs()

    def _release_legs(self) -> None:
        """Legs may outlive the call in their transactions (a late 2xx is still ACKed
        and ended with BYE, which needs no call), so they let go of it: no leg<->call
        cycle, and refcounting frees the call and its media once the B2BUA forgets it."""
        self.early_fork = None
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
