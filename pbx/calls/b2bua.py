"""The B2BUA: the SIP endpoint's INVITE, ACK, BYE, CANCEL, INFO and OPTIONS handlers.

Theory of operation
-------------------
A new INVITE (no To tag) walks these steps and stops at the first answer:

1. **Draining**: while the endpoint is not ready, 503 + Retry-After (in-dialog requests
   keep working, so calls that are up finish normally).
2. **Hops**: Max-Forwards 0 gets 483; an INVITE that already went through this PBX (our
   Via branch prefix or our loop header) gets 482.
3. **Authentication**: no call without digest credentials: 407 + Proxy-Authenticate with
   the registrar's realm and credentials.  Unknown users and wrong passwords get the same
   challenge after the same work (no enumeration); failures are recorded with the
   :class:`~pbx.sip.SourceGuard` like the registrar does.  The caller must call as the
   extension it authenticated as (From user), else 403.
4. **Admission**: ``max_calls`` calls up → 503 (a CONGESTION CDR).
5. **The call** (:class:`~pbx.calls.call.Call`): 100 Trying, routing, media, forks.

In-dialog requests find their leg through the :class:`~pbx.sip.DialogTable`; unknown
dialogs get 481, out-of-order CSeqs 500.  BYE is answered 200 and the other leg gets BYE;
re-INVITE (hold/resume, with or without an offer: :class:`_Reinvite`) and INFO/OPTIONS
are relayed to the other leg with SDP rewritten by the media session; a re-INVITE while
either leg's offer/answer (``statecharts/offer_answer.yaml``) is not stable, or while a
2xx awaits its ACK, gets 491 (glare, RFC 3261 §14.2, RFC 6337 §3.1).  An SDP we cannot
use gets 488 with a ``Warning`` (RFC 3261 §20.43: 302, 304, 305).  PRACK (RFC 3262),
UPDATE (RFC 3311) and session timers (RFC 4028) are terminated per leg by
:class:`~pbx.calls.features.CallFeatures`; an INVITE whose Session-Expires is below our
Min-SE gets 422 before a call exists.

Only the standard library, Twisted and ``pbx.sip`` are used: the store, media and
configuration come in as plain arguments and Protocols (see ``pbx.calls.wiring``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime

from pbx.calls.call import Call, CalleeLeg, CallerLeg, Leg, _Client
from pbx.calls.cdr import CONGESTION, CDRSink, CDRWriter
from pbx.calls.features import check_session_interval
from pbx.calls.routing import Dialplan, ExtensionDirectory, Locator, check_hops
from pbx.calls.session_timer import TimerPolicy
from pbx.sip import (
    MAGIC_COOKIE,
    AuthOutcome,
    ClientTransaction,
    DialogTable,
    DigestAuthenticator,
    NonceState,
    Peer,
    Request,
    Response,
    ServerTransaction,
    SIPEndpoint,
    SIPParseError,
    TransactionManager,
    make_response,
    new_tag,
)

__all__ = ["B2BUA", "MediaFactory"]

log = logging.getLogger(__name__)

MediaFactory = Callable[[Callable[[Any], None]], Any]
"""``factory(on_timeout) -> MediaSession``: start(), offer_from_a(), answer_from_b(),
reoffer(side, sdp), reanswer(side, sdp), close(), summary(), state; optionally place(side,
host), expect(side, sip_host) and confirmed(side[, sip_host]) (media address learning) and
reject_offer() (a failed re-INVITE's rollback, RFC 3264 §8)."""

_WARN_TEXT = {302: "Incompatible transport protocol", 304: "Media type not available",
              305: "Incompatible media format"}
WARN_MEDIA_NOT_AVAILABLE = 304
_RELAYED_HEADERS = ("Content-Type", "Info-Package", "Event", "Content-Disposition")
_PENDING = object()


def _bracket(host: str) -> str:
    """An IPv6 literal in its URI/Via form ``[...]`` (RFC 3261 §25.1, RFC 5952 §6)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class B2BUA:
    """Calls between registered extensions, through our own two user agents."""

    def __init__(self, reactor: IReactorTime, transactions: TransactionManager,
                 endpoint: SIPEndpoint, location: Locator,
                 authenticator: DigestAuthenticator, credentials: ExtensionDirectory,
                 media_factory: MediaFactory, cdr_sink: CDRSink | None, *,
                 dialplan: str = r"^[0-9]{2,15}$", ring_timeout: float = 30.0,
                 max_calls: int = 100, local_host: str = "127.0.0.1",
                 local_port: int = 5060, user_agent: str = "PBX", node: str = "pbx",
                 domain: str | None = None, guard: Any = None,
                 retry_after: int | None = None,
                 wall: Callable[[], float] | None = None,
                 local_host_for: Callable[[str], str] | None = None) -> None:
        self.clock = reactor
        self.transactions = transactions
        self.endpoint = endpoint
        self.location = location
        self.authenticator = authenticator
        self.credentials = credentials
        self.media_factory = media_factory
        self.cdr = CDRWriter(cdr_sink, node=node, **({"wall": wall} if wall else {}))
        self.dialplan = Dialplan(dialplan, location, credentials)
        self.ring_timeout = ring_timeout
        self.max_calls = max_calls
        self.local_host = local_host
        # Our host toward a peer host (by its family, dual stack); None: local_host always.
        self.local_host_for = local_host_for
        self.local_port = local_port
        self.transport_ports: dict[str, int] = {}
        self.user_agent = user_agent
        self.node = node
        self.domain = domain or _bracket(local_host)
        self.guard = guard
        self.retry_after = retry_after if retry_after is not None else endpoint.retry_after
        self.branch_prefix = f"{MAGIC_COOKIE}pbx{secrets.token_hex(3)}"
        self.allow = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, PRACK, UPDATE"
        # RFC 4028 session timers (calls.session_timer); None: none negotiated.
        self.session_timer: TimerPolicy | None = TimerPolicy()
        self.dialogs: DialogTable[Leg] = DialogTable()
        self.calls: dict[str, Call] = {}
        self._invites: dict[ServerTransaction, Any] = {}
        self.call_ended_hooks: list[Callable[[Call], None]] = []
        self.answered_calls = 0
        self.total_calls = 0
        self.challenges = 0
        self.auth_failures = 0

    # -- wiring ---------------------------------------------------------------------------
    def install(self) -> None:
        """Register the handlers on the endpoint (OPTIONS outside dialogs stays its own)."""
        handlers = self.endpoint.handlers
        self._options_fallback = handlers.get("OPTIONS")
        handlers["INVITE"] = self.handle_invite
        handlers["BYE"] = self.handle_in_dialog
        handlers["INFO"] = self.handle_in_dialog
        handlers["PRACK"] = self.handle_in_dialog   # RFC 3262 (answered by CallFeatures)
        handlers["UPDATE"] = self.handle_in_dialog  # RFC 3311 (relayed by CallFeatures)
        handlers["CANCEL"] = self.handle_cancel
        handlers["OPTIONS"] = self.handle_options
        self.endpoint.ack_handler = self.handle_ack
        if self.guard is not None and hasattr(self.guard, "dialog_exists"):
            self.guard.dialog_exists = self.dialog_exists  # only real dialogs skip limits

    def dialog_exists(self, call_id: str, to_tag: str, from_tag: str) -> bool:
        """Is there a dialog an incoming request with these identifiers belongs to (its
        To tag is our local tag, RFC 3261 §12.2.2)?  The source guard asks this so that
        a To tag alone never exempts a request from rate limiting."""
        return self.dialogs.get((call_id, to_tag, from_tag)) is not None

    @property
    def active_calls(self) -> int:
        """Calls not yet in a final state (what a drain waits for)."""
        return len(self.calls)

    def list_calls(self) -> list[dict[str, Any]]:
        return [call.summary() for call in self.calls.values()]

    def hangup(self, call_id: str, reason: str = "Hangup") -> bool:
        """End one call (ops API): BYE with a Reason header (RFC 3326), or CANCEL/503 while
        it is still being set up.  False when there is no such call."""
        call = self.calls.get(call_id)
        if call is None:
            return False
        text = reason.replace('"', "'").replace("\r", " ").replace("\n", " ")
        call.fire("hangup", "pbx", reason, f'SIP;cause=503;text="{text}"')
        return True

    def hangup_all(self, reason: str = "Service shutting down") -> int:
        """End every call (drain timeout); returns how many were asked to end."""
        ids = list(self.calls)
        for call_id in ids:
            self.hangup(call_id, reason)
        return len(ids)

    # -- helpers for the legs ------------------------------------------------------------
    def host_toward(self, peer: Peer) -> str:
        """Our address as ``peer`` can reach it: of its family when we are dual stack."""
        pick = self.local_host_for
        return pick(peer.host) if pick is not None else self.local_host

    def make_via(self, peer: Peer) -> str:
        """Our Via toward ``peer``; an IPv6 sent-by is bracketed (RFC 3261 §25.1
        IPv6reference), else the peer cannot parse it and its responses are lost."""
        branch = f"{self.branch_prefix}{secrets.token_hex(8)}"
        return (f"SIP/2.0/{peer.transport.upper()} {_bracket(self.host_toward(peer))}:"
                f"{self.port_for(peer)};branch={branch};rport")

    def contact(self, peer: Peer) -> str:
        """Our Contact toward ``peer`` (bracketed IPv6 host, RFC 3261 §25.1)."""
        suffix = "" if peer.transport == "udp" else f";transport={peer.transport}"
        return f"<sip:pbx@{_bracket(self.host_toward(peer))}:{self.port_for(peer)}{suffix}>"

    def port_for(self, peer: Peer) -> int:
        """Our listening port for ``peer``'s transport: TLS has its own (RFC 3261
        §26.2.1), and a Contact or Via naming the UDP/TCP port would send the peer's
        in-dialog requests and responses to a plain-TCP socket."""
        return self.transport_ports.get(peer.transport, self.local_port)

    def place_media(self, media: Any, caller: Peer, targets: list[Any]) -> None:
        """Put each side's relay socket in the family of its SIP peer (before start):
        the caller's flow, and the first fork target's (one offer goes to all forks)."""
        expect = getattr(media, "expect", None)
        if expect is not None:  # media from where the SIP comes from (a NAT) is preferred
            expect("a", caller.host)
            for target in targets:
                expect("b", getattr(target, "source_host", "") or None)
        place = getattr(media, "place", None)
        if place is None:
            return
        place("a", caller.host)
        if targets:
            place("b", getattr(targets[0], "source_host", "") or None)

    def call_finished(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        self._invites.pop(call.caller.transaction, None)
        for leg in (call.caller, call.winner, *call.forks):  # early forks' too
            if leg is not None and leg.dialog is not None:
                self.dialogs.remove(leg.dialog)
        for hook in list(self.call_ended_hooks):
            try:
                hook(call)
            except Exception:
                log.exception("call-ended hook failed")

    def warning(self, code: int) -> tuple[str, str]:
        """A ``Warning`` header for an SDP we refuse (RFC 3261 §20.43)."""
        text = _WARN_TEXT.get(code, "Miscellaneous warning")
        return ("Warning", f'{code} {self.domain} "{text}"')

    def _reply(self, transaction: ServerTransaction, request: Request, status: int,
               reason: str | None = None, headers: list[tuple[str, str]] | None = None
               ) -> Response:
        response = make_response(request, status, reason,
                                 to_tag=None if status == 100 else new_tag())
        for name, value in headers or ():
            response.headers.add(name, value)
        response.headers.add("Server", self.user_agent)
        transaction.respond(response)
        return response

    # -- INVITE -------------------------------------------------------------------------
    def handle_invite(self, request: Request, transaction: ServerTransaction,
                      peer: Peer) -> None:
        try:
            to_tag = request.to.tag
            request.from_  # noqa: B018 -- a broken From is a 400 before any work
            request.call_id  # noqa: B018
        except SIPParseError as exc:
            self._reply(transaction, request, 400, exc.reason)
            return
        if to_tag:
            self.handle_in_dialog(request, transaction, peer)
            return
        if not self.endpoint.is_ready():
            self._reply(transaction, request, 503, None,
                        [("Retry-After", str(self.retry_after))])
            return
        hop = check_hops(request, self.branch_prefix, self.node)
        if hop is not None:
            self._reply(transaction, request, hop[0], hop[1])
            return
        values = request.headers.getall("Proxy-Authorization")
        auth = self.authenticator
        digest = auth.select(values) if values else None
        if digest is None or auth.precheck(digest, peer.host) is NonceState.INVALID:
            self._challenge(transaction, request, peer)
            return
        locked = getattr(self.guard, "account_locked", None)
        if locked is not None and locked(peer.host, digest.username):
            self._challenge(transaction, request, peer)  # unchecked: no answer to a guess
            return
        self._invites[transaction] = _PENDING
        d = maybeDeferred(self.credentials.credentials, digest.username)
        d.addCallback(self._authenticated, request, transaction, peer, digest)
        d.addErrback(self._lookup_failed, request, transaction)

    def _challenge(self, transaction: ServerTransaction, request: Request, peer: Peer, *,
                   stale: bool = False) -> None:
        """407 with a fresh nonce (RFC 3261 §22.3), sent statelessly: an unauthenticated
        INVITE must cost one response, not Timer G's eleven (§8.2.7, §17.2.1)."""
        self.challenges += 1
        self._reply_stateless(transaction, request, 407, self.authenticator.challenge(
            peer.host, stale=stale, proxy=True))

    def _reply_stateless(self, transaction: ServerTransaction, request: Request,
                         status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """A final response that proves nothing about the sender (challenge, 481), sent
        once with no state kept (RFC 3261 §8.2.7); its ACK is a stray and is dropped."""
        respond = getattr(transaction, "respond_statelessly", None)
        if respond is None:
            self._reply(transaction, request, status, None, headers)
            return
        response = make_response(request, status, None, to_tag=new_tag())
        for name, value in headers or ():
            response.headers.add(name, value)
        response.headers.add("Server", self.user_agent)
        respond(response)

    def _lookup_failed(self, failure: Any, request: Request,
                       transaction: ServerTransaction) -> None:
        log.error("INVITE: credential lookup failed: %s", failure.getErrorMessage())
        if self._invites.pop(transaction, None) is _PENDING:
            self._reply(transaction, request, 500)

    def _authenticated(self, creds: Any, request: Request, transaction: ServerTransaction,
                       peer: Peer, digest: Any) -> None:
        if self._invites.get(transaction) is not _PENDING:
            return  # CANCELled while the credentials were looked up
        del self._invites[transaction]
        outcome = self.authenticator.verify(digest, "INVITE", request.uri, creds, peer.host)
        if outcome is not AuthOutcome.OK:
            if outcome is AuthOutcome.FAILED:
                self.auth_failures += 1
                if self.guard is not None:
                    self.guard.record_failure(peer.host, digest.username)
            if outcome is AuthOutcome.DISABLED:
                self._reply(transaction, request, 403, "Extension Disabled")
            else:
                self._challenge(transaction, request, peer,
                                stale=outcome is AuthOutcome.STALE)
            return
        if self.guard is not None:
            self.guard.record_success(peer.host, digest.username)
        user = digest.username
        if request.from_.uri is None or request.from_.uri.user != user:
            self._reply(transaction, request, 403, "From Does Not Match Credentials")
            return
        self._start_call(request, transaction, peer, user)

    def _start_call(self, request: Request, transaction: ServerTransaction, peer: Peer,
                    user: str) -> None:
        if check_session_interval(self, request, transaction):
            return  # 422 Session Interval Too Small (RFC 4028 §6): not a call attempt
        number = self.dialplan.dialled(request) or ""
        max_forwards = request.max_forwards
        caller = CallerLeg(self, request, transaction, peer, new_tag())
        record = self.cdr.new_record(request.call_id, user, number)
        call = Call(self, caller, record, caller_user=user, number=number,
                    max_forwards=70 if max_forwards is None else max_forwards)
        self.total_calls += 1
        if len(self.calls) >= self.max_calls:
            log.warning("max_calls (%d) reached: call from %s refused", self.max_calls, user)
            call.fire("reject", 503, "Service Unavailable")
            record.disposition = CONGESTION
            return
        self.calls[call.id] = call
        self._invites[transaction] = call
        caller.trying()
        d = self.dialplan.route(number)
        d.addCallbacks(call.route_done, call.route_failed)

    # -- CANCEL ---------------------------------------------------------------------------
    def handle_cancel(self, request: Request, transaction: ServerTransaction,
                      peer: Peer) -> None:
        invite_txn = self.transactions.find_invite_server_transaction(request)
        if invite_txn is None:
            self._reply(transaction, request, 481)
            return
        self._reply(transaction, request, 200)
        entry = self._invites.get(invite_txn)
        if entry is _PENDING:
            del self._invites[invite_txn]
            self._reply(invite_txn, invite_txn.request, 487)
        elif isinstance(entry, Call):
            entry.fire("caller_cancel")

    # -- ACK for our 2xx ----------------------------------------------------------------------
    def handle_ack(self, request: Request, peer: Peer) -> None:
        found = self.dialogs.match(request)
        if found is None:
            log.debug("ACK for an unknown dialog from %s dropped", peer)
            return
        _dialog, leg = found
        if not leg.ack_received(request) or leg.call is None:
            return
        call = leg.call
        relay = call.reinvite
        if relay is not None and relay.origin is leg and relay.awaiting_answer:
            relay.origin_acked(request)  # an offerless re-INVITE's answer
            return
        if isinstance(leg, CallerLeg):
            confirmed = getattr(call.media, "confirmed", None)
            if confirmed is not None:  # the ACK of our 2xx: the caller sends now
                confirmed("a")
            call.caller_acked(request)

    # -- OPTIONS: in a dialog it is relayed, outside it the endpoint answers -------------------
    def handle_options(self, request: Request, transaction: ServerTransaction,
                       peer: Peer) -> None:
        try:
            to_tag = request.to.tag
        except SIPParseError:
            to_tag = None
        if to_tag:
            self.handle_in_dialog(request, transaction, peer)
        elif self._options_fallback is not None:
            self._options_fallback(request, transaction, peer)

    # -- in-dialog requests ----------------------------------------------------------------
    def handle_in_dialog(self, request: Request, transaction: ServerTransaction,
                         peer: Peer) -> None:
        found = self.dialogs.match(request)
        if found is None:
            self._reply_stateless(transaction, request, 481)  # §12.2.2, no Timer G
            return
        dialog, leg = found
        try:
            status = dialog.check_request(request)
        except SIPParseError:
            status = 400
        if status is not None:
            self._reply(transaction, request, status)
            return
        call = leg.call
        method = request.method
        if call is None or (isinstance(leg, CalleeLeg) and leg is not call.winner
                            and method != "UPDATE"):
            # An early (or losing) fork's dialog takes only UPDATE (RFC 3311 §5).
            self._reply(transaction, request, 481)
            return
        if method == "BYE":
            leg.respond(transaction, request, 200)
            self._remote_bye(call, leg)
        elif method == "INVITE":
            self._relay_reinvite(call, leg, request, transaction)
        elif method in ("PRACK", "UPDATE") and call.features is not None:
            if method == "PRACK":
                call.features.handle_prack(leg, request, transaction)
            else:
                call.features.handle_update(leg, request, transaction)
        else:
            self._relay_request(call, leg, request, transaction)

    def _remote_bye(self, call: Call, leg: Leg) -> None:
        if call.state in ("routing", "ringing"):
            # A caller may end an early dialog with BYE: that is a CANCEL for us.
            call.fire("caller_cancel")
            return
        if call.state in ("answered", "connected"):
            call.fire(f"{leg.hangup_side}_bye", leg.hangup_side, "BYE")
        else:
            leg.remote_bye()
            call.fire("leg_closed")

    def _relay_request(self, call: Call, leg: Leg, request: Request,
                       transaction: ServerTransaction) -> None:
        other = call.other(leg)
        if other is None or not other.confirmed or other.closed:
            leg.respond(transaction, request, 481, "Leg Not Established")
            return
        extra = [(name, value) for name in _RELAYED_HEADERS if name != "Content-Type"
                 for value in request.headers.getall(name)]

        def relayed(_txn: ClientTransaction, response: Response) -> None:
            if response.status < 200:
                return
            leg.respond(transaction, request, response.status, response.reason,
                        body=response.body,
                        content_type=response.headers.get("Content-Type"))

        def failed(_txn: ClientTransaction) -> None:
            leg.respond(transaction, request, 408)

        sent = other.send_in_dialog(request.method, _Client(relayed, failed),
                                    body=request.body,
                                    content_type=request.headers.get("Content-Type"),
                                    extra=extra)
        if sent is None:
            leg.respond(transaction, request, 481)

    def _relay_reinvite(self, call: Call, leg: Leg, request: Request,
                        transaction: ServerTransaction) -> None:
        """Hold/resume and other re-offers: relayed to the other leg through
        :class:`_Reinvite`.  Glare (RFC 3261 §14.2, RFC 6337 §3.1): an INVITE while
        either leg's offer/answer is not stable, or a 2xx of ours awaits its ACK,
        gets 491 with Retry-After."""
        other = call.other(leg)
        if (call.state != "connected" or other is None or not other.confirmed
                or other.closed or leg.awaiting_ack or other.awaiting_ack
                or not leg.oa.stable or not other.oa.stable):
            leg.respond(transaction, request, 491, None, headers=[("Retry-After", "1")])
            return
        if call.media is None:
            leg.respond(transaction, request, 488)
            return
        _Reinvite(self, call, leg, other, request, transaction).start()


class _Reinvite:
    """One in-dialog INVITE relayed from leg ``origin`` to leg ``target``.

    What the ``offer_answer`` chart of each leg does not show: which message carries
    the SDP.  With an offer (RFC 3264 §8): the offer is relayed in our re-INVITE, the
    target's 2xx answer comes back in our 2xx, and a non-2xx rolls the media session
    back (``reject_offer``).  Offerless (RFC 3261 §14.1, RFC 6337 §3.2): our re-INVITE
    has no SDP either, the target's 2xx offer goes into our 2xx, the origin's ACK
    carries the answer, which goes into our ACK to the target; an ACK without one (or
    none in 64*T1) ends the call with BYE on both legs.  The object lives in the call's
    ``reinvite`` while it is needed to route the origin's ACK, and refers to the legs,
    not to the call (the legs' ``call`` is gone once the call ended).
    """

    __slots__ = ("_cseq", "ack", "b2bua", "done", "offerless", "origin", "request", "target",
                 "transaction")

    def __init__(self, b2bua: B2BUA, call: Call, origin: Leg, target: Leg, request: Request,
                 transaction: ServerTransaction) -> None:
        self.b2bua = b2bua
        self.origin = origin
        self.target = target
        self.request = request
        self.transaction = transaction
        self.offerless = not request.body
        self.ack: Request | None = None
        self.done = False
        self._cseq = 0

    def _call(self) -> Call | None:
        return self.origin.call

    def start(self) -> None:
        call, origin, target = self._call(), self.origin, self.target
        assert call is not None
        if self.offerless:
            origin.oa.fire("receive_offerless")
            target.oa.fire("send_offerless")
            body = b""
        else:
            try:
                body = call.media.reoffer(origin.side, self.request.body)
            except Exception as exc:
                log.info("call %s: re-INVITE offer refused: %s", call.id, exc)
                origin.respond(self.transaction, self.request, 488, headers=[
                    self.b2bua.warning(getattr(exc, "warning", WARN_MEDIA_NOT_AVAILABLE))])
                return
            origin.oa.fire("receive_offer")
            target.oa.fire("send_offer")
        call.reinvite = self
        if target.send_in_dialog("INVITE", _Client(self._answered, self._failed),
                                 body=body) is None:
            self._rollback()
            origin.respond(self.transaction, self.request, 481)

    # -- the target's responses ---------------------------------------------------------------
    def _answered(self, txn: ClientTransaction, response: Response) -> None:
        status = response.status
        if status < 200:
            return
        if status < 300:
            self._target_2xx(txn, response)
            return
        if self.done:
            return
        self.done = True
        self._rollback()
        self.origin.respond(self.transaction, self.request, status, response.reason)
        call = self._call()
        if call is not None and status in (408, 481):
            call.fire("leg_lost", "pbx", f"{status} {response.reason}")

    def _failed(self, _txn: ClientTransaction) -> None:
        if self.done:
            return
        self.done = True
        self._rollback()
        self.origin.respond(self.transaction, self.request, 408)
        call = self._call()
        if call is not None:
            call.fire("leg_lost", "pbx", "408 Request Timeout")

    def _target_2xx(self, txn: ClientTransaction, response: Response) -> None:
        target = self.target
        if self.done:
            if self.ack is not None:
                self._send_ack(self.ack)  # a retransmitted 2xx: the same ACK again
            return
        self.done = True
        if target.dialog is not None:
            target.dialog.update_from_response(response)
        self._cseq = txn.request.cseq.seq
        call = self._call()
        media = call.media if call is not None else None
        body = b""
        warning = WARN_MEDIA_NOT_AVAILABLE
        if response.body and media is not None:
            try:
                body = (media.reoffer(target.side, response.body) if self.offerless
                        else media.reanswer(target.side, response.body))
            except Exception as exc:
                log.info("call %s: re-INVITE 2xx SDP refused: %s",
                         call.id if call else "-", exc)
                warning = getattr(exc, "warning", warning)
        if not body:  # the target's dialog has moved on; ours stays as it was
            self.ack_target()
            self._rollback()
            self.origin.respond(self.transaction, self.request, 488,
                                headers=[self.b2bua.warning(warning)])
            return
        if self.offerless:
            target.oa.fire("receive_offer")
            self.origin.oa.fire("send_offer")
        else:
            target.oa.fire("receive_answer")
            self.origin.oa.fire("send_answer")
            self.ack_target()
            self._finished()
        reply = self.origin.respond(self.transaction, self.request, 200, None, body=body)
        self.origin.await_ack(reply, self.request.cseq.seq)

    # -- the origin's ACK (offerless only: it carries the answer) ---------------------------
    def origin_acked(self, ack: Request) -> None:
        call = self._call()
        media = call.media if call is not None else None
        body = b""
        if ack.body and media is not None:
            try:
                body = media.reanswer(self.origin.side, ack.body)
            except Exception as exc:
                log.info("re-INVITE answer in the ACK refused: %s", exc)
        if not body:
            self._no_answer()
            return
        self.origin.oa.fire("receive_answer")
        self.target.oa.fire("send_answer")
        self.ack_target(body)
        self._finished()

    def ack_missing(self, leg: Leg, _cseq: int) -> None:
        if leg is self.origin and self.offerless and self.origin.oa.offer_outstanding:
            self._no_answer()

    def _no_answer(self) -> None:
        self.ack_target()
        self._rollback()
        call = self._call()
        if call is not None:
            call.fire("hangup", "pbx", "No SDP answer in ACK",
                      'SIP;cause=488;text="No SDP answer in ACK"')

    # -- helpers ------------------------------------------------------------------------------
    @property
    def awaiting_answer(self) -> bool:
        return self.offerless and self.origin.oa.offer_outstanding

    def ack_target(self, body: bytes = b"") -> None:
        dialog = self.target.dialog
        if self.ack is not None or dialog is None:
            return
        self.ack = dialog.create_request(
            "ACK", via=self.b2bua.make_via(self.target.peer), cseq=self._cseq, body=body,
            content_type="application/sdp" if body else None)
        self._send_ack(self.ack)

    def _send_ack(self, ack: Request) -> None:
        try:
            self.b2bua.transactions.send_ack(ack, self.target.peer)
        except Exception:
            log.debug("ACK for re-INVITE 2xx could not be sent")

    def _rollback(self) -> None:
        """RFC 3264 §8: the exchange failed, both legs and the media are as before."""
        call = self._call()
        if call is not None and call.media is not None:
            reject = getattr(call.media, "reject_offer", None)
            if reject is not None:
                reject()
        self.origin.oa.fire("rollback")
        self.target.oa.fire("rollback")
        self._finished()

    def _finished(self) -> None:
        call = self._call()
        if call is not None and call.reinvite is self:
            call.reinvite = None
