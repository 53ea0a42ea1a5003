"""RFC 3261 §17 transaction layer with RFC 6026's Accepted state.

Behaviour lives in ``statecharts/{ict,nict,ist,nist}.yaml`` (states, triggers, timers);
the classes here only supply the callbacks those charts name and the §17.1.3/§17.2.3
matching rules.  Each chart is compiled into one shared ``transitions`` machine, so a new
transaction costs a model object, not a machine (see ``scripts/bench_transactions.py``).

The layer is sans-IO: messages come in through :meth:`TransactionManager.handle_request`
and :meth:`~TransactionManager.handle_response`, go out through a :class:`MessageSender`
(the transport), and time is an injected ``IReactorTime``.

Edge rules kept here (DESIGN.md "every table has a cap"): the server and the client
table each hold at most ``max_transactions``; a request that would create one more
server transaction is answered 503 + Retry-After statelessly, a client request beyond
the cap is reported to its user as a transport error.  Server transactions whose TU
never answers end by the charts' ``deadline`` timer with a 500.  Merged requests
(RFC 3261 §8.2.2.2) are found through an index of the pending out-of-dialog server
transactions, bounded by the server table.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from twisted.internet.interfaces import IReactorTime

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import Headers
from pbx.sip.message import Request, Response, make_response, parse
from pbx.statechart_timers import TimedChartModel

__all__ = [
    "DEFAULT_MAX_TRANSACTIONS",
    "MAGIC_COOKIE",
    "ClientTransaction",
    "ClientTransactionUser",
    "InviteClientTransaction",
    "InviteServerTransaction",
    "MessageSender",
    "NonInviteClientTransaction",
    "NonInviteServerTransaction",
    "Peer",
    "SentResponse",
    "ServerTransaction",
    "Transaction",
    "TransactionManager",
    "TransactionStats",
    "TransactionUser",
    "TransportError",
    "build_ack_for_failure",
    "new_branch",
]

log = logging.getLogger(__name__)

MAGIC_COOKIE = "z9hG4bK"
TERMINATED = "terminated"
_RELIABLE = frozenset({"tcp", "tls", "sctp", "ws", "wss"})
_DEFAULT_PORTS = {"TLS": 5061, "WSS": 443, "WS": 80}
# Per table (server, client).  Sized from measurement, not guessed: at the 3,000
# REGISTER/s this PBX sustains, about 100,000 non-INVITE server transactions wait out
# Timer J (32 s) at any moment, so a smaller cap would refuse load we can carry.
DEFAULT_MAX_TRANSACTIONS = 200_000


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie plus 64 random bits (§8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a message came from or goes to (the transport-level address)."""

    transport: str  # 'udp' | 'tcp' | 'tls'
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        """Reliable transports get no retransmissions and zero-length wait timers."""
        return self.transport in _RELIABLE


class TransportError(Exception):
    """Raised by a :class:`MessageSender` that could not send (§17.1.4, §17.2.4)."""


@dataclass(frozen=True, slots=True)
class SentResponse:
    """A response as a transport sent it: the bytes and where they went.

    A transport that returns these from ``send_response`` also offers
    ``resend_response(sent)``; a completed non-INVITE server transaction then keeps
    only this to answer retransmissions (see
    :meth:`NonInviteServerTransaction._retain_for_absorption`).
    """

    data: bytes
    peer: Peer          # the peer of the transaction (its connection, if reliable)
    destination: Peer   # where the response went without a connection (§18.2.2)
    status: int


class MessageSender(Protocol):
    """The transport layer, as the transactions see it.

    ``send_response`` may return a :class:`SentResponse` (anything else, e.g. None, is
    ignored); a sender that does must also provide ``resend_response(sent)``, which
    sends the same bytes again and raises :class:`TransportError` like the others.
    """

    def send_request(self, request: Request, peer: Peer) -> None: ...

    def send_response(self, response: Response, peer: Peer) -> SentResponse | None: ...


class TransactionUser(Protocol):
    """The core above the server side.

    The manager also calls, when the TU has them, ``transaction_timeout(transaction)``
    (Timer H: the ACK for a 3xx-6xx never came, §17.2.1) and
    ``transaction_transport_error(transaction)`` (a response could not be sent,
    §17.2.4); ``response_received_stray`` is optional too (looked up with ``getattr``).
    """

    def request_received(self, request: Request, transaction: ServerTransaction | None,
                         peer: Peer) -> None:
        """A new request (``transaction`` None for an ACK, which never creates one)."""

    def response_received_stray(self, response: Response, peer: Peer) -> None:
        """A response that matches no client transaction (e.g. a late 2xx)."""


class ClientTransactionUser(Protocol):
    """Whoever sent a request through :meth:`TransactionManager.send_request`."""

    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        """A provisional or final response (retransmitted non-2xx finals are absorbed)."""

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        """Timer B or F fired (or Timer C, for a user without ``timer_c_fired``)."""

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        """The request or the ACK could not be sent (also: a TCP/TLS connection to the
        peer failed, §17.1.4, or the client table is full)."""

    # Optional (looked up with getattr): ``timer_c_fired(transaction)``, Timer C of an
    # INVITE fired after a provisional response: the user should CANCEL the INVITE
    # (RFC 3261 §16.8); the transaction stays alive to ACK the final response.


@dataclass
class TransactionStats:
    """Counters for metrics: created/terminated per type, terminations per outcome."""

    created: Counter[str] = field(default_factory=Counter)
    terminated: dict[str, Counter[str]] = field(
        default_factory=lambda: {k: Counter() for k in ("ict", "nict", "ist", "nist")})
    retransmissions_sent: Counter[str] = field(default_factory=Counter)
    retransmissions_received: Counter[str] = field(default_factory=Counter)
    stray_responses: int = 0
    stray_acks: int = 0
    dropped: int = 0
    # Refused because the table was full, per type: server requests answered 503
    # statelessly, client requests reported as transport errors.
    overloaded: Counter[str] = field(default_factory=Counter)
    merged_requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "overloaded": dict(self.overloaded),
            "merged_requests": self.merged_requests,
            "created": dict(self.created),
            "terminated": {k: dict(v) for k, v in self.terminated.items()},
            "retransmissions_sent": dict(self.retransmissions_sent),
            "retransmissions_received": dict(self.retransmissions_received),
            "stray_responses": self.stray_responses,
            "stray_acks": self.stray_acks,
            "dropped": self.dropped,
        }


# -- transactions ---------------------------------------------------------------------


class Transaction(TimedChartModel):
    """What the four transaction types share: identity, timer values, sending, ending.

    ``outcome`` becomes ``'timeout'`` or ``'transport_error'`` when the transaction ends
    that way (``'tu_timeout'``: a server transaction answered 500 itself because its TU
    never did), and stays ``'completed'`` otherwise.
    """

    kind: ClassVar[str]
    # (Call-ID, From tag, CSeq number, method) of an out-of-dialog server request, for
    # RFC 3261 §8.2.2.2; a class default so that other transactions pay nothing.
    merge_key: tuple[str, str | None, int, str] | None = None

    def __init__(self, manager: TransactionManager, request: Request, peer: Peer,
                 key: Hashable) -> None:
        super().__init__()
        self.manager = manager
        self.request = request
        self.peer = peer
        self.key = key
        self.outcome = "completed"
        self.last_response: Response | None = None

    # Values the charts' timer expressions name.
    @property
    def clock(self) -> IReactorTime:  # type: ignore[override]
        return self.manager.clock

    @property
    def reliable(self) -> bool:
        return self.peer.reliable

    @property
    def T1(self) -> float:  # the RFC's name, used by the charts
        return self.manager.t1

    @property
    def T2(self) -> float:
        return self.manager.t2

    @property
    def T4(self) -> float:
        return self.manager.t4

    @property
    def id(self) -> str:
        """Printable identity: the branch (or RFC 2543 Call-ID) and the method."""
        key = self.key
        if isinstance(key, tuple) and key and key[0] == "rfc2543":
            return f"rfc2543:{key[4]}:{key[5]}:{key[6]}"
        return f"{key[0]}:{key[-1]}" if isinstance(key, tuple) else str(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state}>"

    def state_changed(self, previous: str) -> None:
        if self.state == TERMINATED:
            self.manager._terminated(self)

    def _count_retransmission(self) -> None:
        self.manager.stats.retransmissions_sent[self.kind] += 1

    # Shared callbacks.
    def report_timeout(self, *_: Any) -> None:
        self.outcome = "timeout"
        self._tell("transaction_timeout")

    def report_transport_error(self, *_: Any) -> None:
        self.outcome = "transport_error"
        self._tell("transaction_transport_error")

    def _tell(self, method: str) -> None:
        raise NotImplementedError


class ClientTransaction(Transaction):
    """ICT or NICT: sends a request, retransmits it over UDP, reports responses."""

    def __init__(self, manager: TransactionManager, request: Request, peer: Peer,
                 user: ClientTransactionUser, key: Hashable) -> None:
        super().__init__(manager, request, peer, key)
        self.user = user

    def start(self) -> None:
        """Send the request and arm the initial state's timers."""
        self._run(self._start)

    def _start(self) -> None:
        self._send(self.request)
        self._sync_timers()

    def receive_response(self, response: Response) -> None:
        raise NotImplementedError

    def _send(self, request: Request) -> None:
        if self.state == TERMINATED:  # never reached by the charts; kept as a guarantee
            return
        try:
            self.manager.sender.send_request(request, self.peer)
        except TransportError as exc:
            log.debug("%r: transport error: %s", self, exc)
            self.fire("transport_error")

    # Callbacks named by the charts.
    def retransmit(self, *_: Any) -> None:
        self._count_retransmission()
        self._send(self.request)

    def pass_response(self, response: Response) -> None:
        self.last_response = response
        self.user.response_received(self, response)

    def _tell(self, method: str) -> None:
        getattr(self.user, method)(self)


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.1 + RFC 6026 (statecharts/ict.yaml)."""

    chart_name = "ict"
    kind = "ict"

    @property
    def timer_c(self) -> float | None:
        return self.manager.timer_c

    def receive_response(self, response: Response) -> None:
        status = response.status
        if status < 200:
            # 100 is hop by hop and does not reset Timer C (RFC 3261 §16.7 step 2).
            self.fire("trying" if status == 100 else "provisional", response)
        elif status < 300:
            self.fire("success", response)
        else:
            self.fire("failure", response)

    def send_ack(self, response: Response) -> None:
        self._send(build_ack_for_failure(self.request, response))

    def report_timer_c(self, *_: Any) -> None:
        """Timer C fired in Proceeding: RFC 3261 §16.8 wants a CANCEL, which is the TU's
        to build (§9.1); the chart keeps the transaction to ACK the final response."""
        self.outcome = "timeout"
        callback = getattr(self.user, "timer_c_fired", None)
        if callback is not None:
            callback(self)
        else:
            self.user.transaction_timeout(self)


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.2 (statecharts/nict.yaml)."""

    chart_name = "nict"
    kind = "nict"

    def receive_response(self, response: Response) -> None:
        self.fire("provisional" if response.status < 200 else "final", response)


class ServerTransaction(Transaction):
    """IST or NIST: carries the TU's responses, absorbs request retransmissions."""

    _final_triggers: ClassVar[tuple[str, str]]  # (2xx trigger, 3xx-6xx trigger)

    def __init__(self, manager: TransactionManager, request: Request, peer: Peer,
                 key: Hashable) -> None:
        self._sent: SentResponse | None = None
        super().__init__(manager, request, peer, key)

    @property
    def last_response(self) -> Response | None:  # type: ignore[override]
        """The last response sent (rebuilt from its bytes once only those are kept)."""
        response = self._last_response
        if response is None and self._sent is not None:
            try:
                parsed = parse(self._sent.data)
            except SIPParseError:
                return None
            return parsed if isinstance(parsed, Response) else None
        return response

    @last_response.setter
    def last_response(self, response: Response | None) -> None:
        self._last_response = response
        self._sent = None

    def start(self) -> None:
        """Arm the initial state's timers (the IST's automatic 100 Trying)."""
        self.start_timers()

    def respond(self, response: Response) -> None:
        """Send ``response`` through the transaction; the chart decides whether it may.

        Responses a state does not accept (a second final, anything after the end) are
        discarded, as §17.2 requires.
        """
        status = response.status
        if status < 200:
            self.fire("tu_provisional", response)
        else:
            self.fire(self._final_triggers[status >= 300], response)

    def receive_retransmission(self, request: Request) -> None:
        self.fire("request_retransmit", request)

    def _send_response(self, response: Response) -> None:
        if self.state == TERMINATED:  # never reached by the charts; kept as a guarantee
            return
        try:
            sent = self.manager.sender.send_response(response, self.peer)
        except TransportError as exc:
            log.debug("%r: transport error: %s", self, exc)
            self.fire("transport_error")
            return
        if self._last_response is response and isinstance(sent, SentResponse):
            self._sent = sent

    # Callbacks named by the charts.
    def send_response(self, response: Response) -> None:
        self.last_response = response
        self._send_response(response)

    def resend_response(self, *_: Any) -> None:
        response = self._last_response
        if response is not None:
            self._count_retransmission()
            self._send_response(response)
        elif self._sent is not None and self.state != TERMINATED:
            self._count_retransmission()
            try:
                self.manager.sender.resend_response(self._sent)  # type: ignore[attr-defined]
            except TransportError as exc:
                log.debug("%r: transport error: %s", self, exc)
                self.fire("transport_error")

    def send_server_error(self, *_: Any) -> None:
        """The chart's ``deadline`` fired: the TU never answered (a bug, or work that
        never ended), so the transaction answers 500 itself (RFC 3261 §21.5.1) and can
        end, instead of living forever."""
        self.outcome = "tu_timeout"
        log.warning("%r: no response from the TU in time, answering 500", self)
        self.send_response(make_response(self.request, 500, "Server Internal Error",
                                         to_tag=secrets.token_hex(6)))

    def responded(self) -> bool:
        """A response went out through this transaction and may still be repeated."""
        return self._last_response is not None or self._sent is not None

    def abandon(self) -> None:
        """Forget this transaction at once, sending nothing more (outcome
        ``'stateless'``): a blocked source gets silence, or the TU answered statelessly.

        Not a chart transition: like :meth:`TransactionManager.close`, the transaction
        simply stops existing; responses the TU sends afterwards are discarded, and a
        retransmitted request is a new request (RFC 3261 §8.2.7).
        """
        if self.state == TERMINATED:
            return
        self.cancel_timers()
        self.outcome = "stateless"
        previous, self.state = self.state, TERMINATED
        self.state_changed(previous)

    def respond_statelessly(self, response: Response) -> None:
        """Send ``response`` once and keep no state (RFC 3261 §8.2.7 stateless UAS).

        For answers that prove nothing about the sender (a 401/407 challenge, a 481 for
        a dialog that does not exist): a 3xx-6xx to an INVITE sent through the
        transaction would be retransmitted by Timer G for 32 s to whoever the source
        claims to be.  A retransmission of the request is handled as a new request and
        gets one new answer; the ACK of this response matches nothing and reaches the
        TU as a stray ACK, which drops it.
        """
        self.abandon()
        try:
            self.manager.sender.send_response(response, self.peer)
        except TransportError as exc:
            log.debug("%r: stateless %d not sent: %s", self, response.status, exc)

    def _tell(self, method: str) -> None:
        callback = getattr(self.manager.tu, method, None)
        if callback is not None:
            callback(self)


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.1 + RFC 6026 (statecharts/ist.yaml)."""

    chart_name = "ist"
    kind = "ist"
    _final_triggers = ("tu_success", "tu_failure")

    @property
    def trying_delay(self) -> float | None:
        return self.manager.trying_delay

    def receive_ack(self, ack: Request, peer: Peer) -> None:
        self.fire("ack", ack, peer)

    def has_responded(self, *_: Any) -> bool:
        return self.last_response is not None

    def send_trying(self, *_: Any) -> None:
        self.send_response(make_response(self.request, 100))

    def pass_ack(self, ack: Request, peer: Peer) -> None:
        self.manager.tu.request_received(ack, None, peer)


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.2 (statecharts/nist.yaml)."""

    chart_name = "nist"
    kind = "nist"
    _final_triggers = ("tu_final", "tu_final")

    def state_changed(self, previous: str) -> None:
        if self.state == "completed":
            self._retain_for_absorption()
        super().state_changed(previous)

    def _retain_for_absorption(self) -> None:
        """Completed lasts Timer J (32 s over UDP) only to answer retransmissions with
        the final response, so keep just that.  Tens of thousands of completed
        transactions are alive at a few thousand requests per second: what each one
        holds is what the memory and the garbage collector pay for.

        The request (and every view parsed from it) is released: ``request`` becomes
        None.  When the transport returned the response's bytes (a
        :class:`SentResponse`, which ``resend_response`` repeats) only those are kept
        and ``last_response`` is rebuilt from them on demand; otherwise the response
        object stays, without its parsed views.
        """
        self.request = None  # type: ignore[assignment]
        response = self._last_response
        if response is None:
            return
        if self._sent is not None and hasattr(self.manager.sender, "resend_response"):
            self._last_response = None
        else:
            response._cache = None


def build_ack_for_failure(invite: Request, response: Response) -> Request:
    """The ACK an INVITE client transaction sends for a 3xx-6xx (§17.1.1.3).

    Same Request-URI, Call-ID, From and CSeq number as the INVITE, CSeq method ACK, one
    Via equal to the INVITE's top Via, To from the response (with its tag), the INVITE's
    Route set and Max-Forwards.  ACKs for 2xx are the TU's business (§13.2.2.4).
    """
    src = invite.headers
    headers = Headers()
    headers.add("Via", src.getall("Via")[0])
    max_forwards = src.get("Max-Forwards")
    headers.add("Max-Forwards", max_forwards if max_forwards is not None else "70")
    for route in src.getall("Route"):
        headers.add("Route", route)
    headers.add("From", src.get("From") or "")
    headers.add("To", response.headers.get("To") or src.get("To") or "")
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq.seq} ACK")
    return Request("ACK", invite.uri, headers)


class _DetachedUser:
    """The user of a terminated client transaction: nothing reaches it any more (the
    transaction left the table), but a stray callback finds a no-op, not ``None``."""

    __slots__ = ()

    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        return None

    def transaction_timeout(self, transaction: ClientTransaction) -> None:
        return None

    def transaction_transport_error(self, transaction: ClientTransaction) -> None:
        return None


_DETACHED = _DetachedUser()


# -- manager --------------------------------------------------------------------------

_KINDS: tuple[type[Transaction], ...] = (
    InviteClientTransaction, NonInviteClientTransaction,
    InviteServerTransaction, NonInviteServerTransaction,
)


def _sent_by(request: Request) -> tuple[str, int]:
    via = request.top_via
    return via.host.lower(), via.port or _DEFAULT_PORTS.get(via.transport, 5060)


def _rfc2543_key(request: Request, method: str, to_tag: str | None) -> tuple[Any, ...]:
    """§17.2.3's fallback for requests without the magic cookie."""
    via = request.top_via
    via_key = (via.transport, via.host.lower(), via.port, via.branch)
    return ("rfc2543", str(request.uri), to_tag, request.from_.tag, request.call_id,
            request.cseq.seq, method, via_key)


class TransactionManager:
    """Creates, matches and forgets transactions; the transport's message handler."""

    def __init__(self, sender: MessageSender, tu: TransactionUser, clock: IReactorTime, *,
                 t1: float = 0.5, t2: float = 4.0, t4: float = 5.0,
                 trying_delay: float | None = 0.2, timer_c: float | None = 180.0,
                 max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
                 overload_retry_after: int = 5) -> None:
        """``trying_delay``: when the IST sends 100 Trying itself (None: never).
        ``timer_c``: how long an ICT waits in Proceeding without a provisional
        response (None: forever; RFC 3261 §16.6 asks more than 3 minutes of proxies).
        ``max_transactions``: the cap of the server table and of the client table;
        ``overload_retry_after``: the Retry-After of the 503 sent beyond it."""
        if max_transactions < 1:
            raise ValueError("max_transactions must be at least 1")
        self.sender = sender
        self.tu = tu
        self.clock = clock
        self.t1 = t1
        self.t2 = t2
        self.t4 = t4
        self.trying_delay = trying_delay
        self.timer_c = timer_c
        self.max_transactions = max_transactions
        self.overload_retry_after = overload_retry_after
        self.stats = TransactionStats()
        self._client: dict[Hashable, ClientTransaction] = {}
        self._server: dict[Hashable, ServerTransaction] = {}
        # merge key -> the first live server transaction with it (RFC 3261 §8.2.2.2);
        # entries leave with their transaction, so the server cap bounds it.
        self._merge_index: dict[tuple[str, str | None, int, str], ServerTransaction] = {}

    # -- inbound ------------------------------------------------------------------------
    def handle_request(self, request: Request, peer: Peer) -> None:
        """Match a request to a server transaction (§17.2.3) or create one."""
        method = request.method
        try:
            key = self._server_key(request, "INVITE" if method == "ACK" else method)
            txn = self._server.get(key)
            if txn is None and method == "ACK" and key[0] == "rfc2543":
                txn = self._match_rfc2543_ack(request)
        except SIPParseError as exc:
            log.debug("dropping a request that cannot be matched: %s", exc)
            self.stats.dropped += 1
            return
        if method == "ACK":
            if isinstance(txn, InviteServerTransaction):
                txn.receive_ack(request, peer)  # absorbed, or passed up in Accepted
            else:
                self.stats.stray_acks += 1  # ACK for a 2xx: end to end, for the TU
                self.tu.request_received(request, None, peer)
            return
        if txn is not None:
            self.stats.retransmissions_received[txn.kind] += 1
            txn.receive_retransmission(request)
            return
        cls: type[ServerTransaction] = (InviteServerTransaction if method == "INVITE"
                                        else NonInviteServerTransaction)
        if len(self._server) >= self.max_transactions and not self._admit_over_cap(
                request, peer, cls):
            return
        txn = cls(self, request, peer, key)
        self._server[key] = txn
        self.stats.created[txn.kind] += 1
        if method != "CANCEL":
            self._index_merge_key(txn, request)
        try:
            self.tu.request_received(request, txn, peer)
        finally:
            # Timers are armed after the TU had its turn: most requests are answered
            # at once, and then the TU's response has already left the initial state,
            # so its deadline (and the IST's 100 timer) never costs an arm and a
            # cancel.  ``finally``: a TU that raised still gets the deadline.
            txn.start()

    def _admit_over_cap(self, request: Request, peer: Peer,
                        cls: type[ServerTransaction]) -> bool:
        """The server table is full: answer statelessly, creating no state.

        A CANCEL is the exception: one whose INVITE transaction is alive still gets its
        transaction (at most one per INVITE transaction, so the table stays bounded by
        twice the cap), since ending calls is what relieves an overload; any other
        CANCEL gets the 481 its TU would send.  Everything else gets 503 + Retry-After
        (RFC 3261 §21.5.4).
        """
        if request.method == "CANCEL":
            if self.find_invite_server_transaction(request) is not None:
                return True
            status, extra = 481, ()
        else:
            status, extra = 503, (("Retry-After", str(self.overload_retry_after)),)
        self.stats.overloaded[cls.kind] += 1
        response = make_response(request, status, to_tag=secrets.token_hex(6), extra=extra)
        try:
            self.sender.send_response(response, peer)
        except TransportError as exc:
            log.debug("stateless %d to %s not sent: %s", status, peer, exc)
        return False

    def _index_merge_key(self, txn: ServerTransaction, request: Request) -> None:
        try:
            if request.to.tag is not None:
                return
            merge_key = (request.call_id, request.from_.tag, request.cseq.seq,
                         request.method)
        except SIPParseError:
            return  # the TU answers 400
        txn.merge_key = merge_key
        self._merge_index.setdefault(merge_key, txn)

    def merged_transaction(self, txn: ServerTransaction) -> ServerTransaction | None:
        """The live transaction ``txn``'s request merges with, if any (§8.2.2.2).

        A request without To tag whose Call-ID, From tag and CSeq equal those of a
        pending server transaction it did not match (§17.2.3) reached us twice, forked
        on the way: the UAS core answers the second copy 482 (Loop Detected).
        """
        merge_key = txn.merge_key
        if merge_key is None:
            return None
        first = self._merge_index.get(merge_key)
        if first is None or first is txn or first.state == TERMINATED:
            return None
        self.stats.merged_requests += 1
        return first

    def handle_response(self, response: Response, peer: Peer) -> None:
        """Match a response to a client transaction (§17.1.3): top Via branch + method."""
        try:
            key = (response.top_via.branch, response.cseq.method)
        except SIPParseError as exc:
            log.debug("dropping a response that cannot be matched: %s", exc)
            self.stats.dropped += 1
            return
        txn = self._client.get(key)
        if txn is not None:
            txn.receive_response(response)
            return
        self.stats.stray_responses += 1
        stray = getattr(self.tu, "response_received_stray", None)
        if stray is not None:
            stray(response, peer)

    def find_invite_server_transaction(self, cancel: Request) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL targets (§9.2), if it is still alive."""
        try:
            txn = self._server.get(self._server_key(cancel, "INVITE"))
        except SIPParseError:
            return None
        return txn if isinstance(txn, InviteServerTransaction) else None

    # -- outbound -----------------------------------------------------------------------
    def send_request(self, request: Request, peer: Peer,
                     user: ClientTransactionUser) -> ClientTransaction:
        """Send ``request`` in a new client transaction.

        The top Via must carry a fresh :func:`new_branch`.  A transport error on the
        first send is reported to ``user`` before this returns (the transaction is then
        already terminated).
        """
        method = request.method
        if method == "ACK":
            raise ValueError("ACK never creates a transaction: use send_ack()")
        branch = request.top_via.branch
        if not branch or not branch.startswith(MAGIC_COOKIE):
            raise ValueError("a client transaction needs a z9hG4bK branch (new_branch())")
        key = (branch, method)
        if key in self._client:
            raise ValueError(f"branch {branch} is already used by a {method} transaction")
        cls: type[ClientTransaction] = (InviteClientTransaction if method == "INVITE"
                                        else NonInviteClientTransaction)
        txn = cls(self, request, peer, user, key)
        if len(self._client) >= self.max_transactions:
            # Never registered and nothing sent: the user hears a transport error, as
            # for a request that could not be sent (§17.1.4).
            self.stats.overloaded[txn.kind] += 1
            log.debug("client table full (%d): %s not sent", self.max_transactions, method)
            txn.fire("transport_error")
            return txn
        self._client[key] = txn
        self.stats.created[txn.kind] += 1
        txn.start()
        return txn

    def connection_failed(self, peer: Peer) -> None:
        """A TCP/TLS connection to ``peer`` could not be made (RFC 3261 §17.1.4, §18.4).

        The transport calls this from its client factory's ``clientConnectionFailed``:
        every client transaction bound for ``peer``, and every server transaction with
        a response out to it, fails now with a transport error instead of waiting for
        Timer B/F/H.
        """
        client = [t for t in self._client.values() if t.peer == peer]
        server = [t for t in self._server.values()
                  if t.responded() and (t.peer == peer or (
                      t._sent is not None and t._sent.destination == peer))]
        for txn in (*client, *server):
            txn.fire("transport_error")

    def send_ack(self, ack: Request, peer: Peer) -> None:
        """Send the ACK for a 2xx: end to end, outside any transaction (§13.2.2.4).

        Raises :class:`TransportError` like the sender does.
        """
        if ack.method != "ACK":
            raise ValueError("send_ack() sends ACK requests only")
        self.sender.send_request(ack, peer)

    def send_stateless(self, message: Request | Response, peer: Peer) -> None:
        """Send a request or response with no transaction (stateless proxying, replies
        to requests that must not create state)."""
        if isinstance(message, Request):
            self.sender.send_request(message, peer)
        else:
            self.sender.send_response(message, peer)

    # -- bookkeeping --------------------------------------------------------------------
    def _server_key(self, request: Request, method: str) -> tuple[Any, ...]:
        branch = request.top_via.branch
        if branch and branch.startswith(MAGIC_COOKIE):
            host, port = _sent_by(request)
            return (branch, host, port, method)
        return _rfc2543_key(request, method, request.to.tag)

    def _match_rfc2543_ack(self, ack: Request) -> ServerTransaction | None:
        """An RFC 2543 ACK carries the To tag of the response, not of the INVITE."""
        txn = self._server.get(_rfc2543_key(ack, "INVITE", None))
        if txn is None or txn.last_response is None:
            return None
        return txn if txn.last_response.to.tag == ack.to.tag else None

    def _terminated(self, txn: Transaction) -> None:
        table: dict[Hashable, Any] = self._server
        if isinstance(txn, ClientTransaction):
            # The user (a call leg, a closure of a relayed request) usually holds its
            # transaction too: detaching it here breaks that cycle, so both are freed by
            # reference counting when the call lets go, not by a full collection.
            txn.user = _DETACHED
            table = self._client
        if table.get(txn.key) is not txn:
            return  # refused at the cap (never counted as created), or forgotten
        del table[txn.key]
        merge_key = txn.merge_key
        if merge_key is not None and self._merge_index.get(merge_key) is txn:
            del self._merge_index[merge_key]
        self.stats.terminated[txn.kind][txn.outcome] += 1

    def live_count(self) -> int:
        """How many transactions are alive (without building a list of them)."""
        return len(self._client) + len(self._server)

    def transactions(self) -> list[Transaction]:
        """Every live transaction (tests, diagnostics)."""
        return [*self._client.values(), *self._server.values()]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Live transactions per type and state, every non-final state listed."""
        out = {cls.kind: dict.fromkeys(
            (s for s in cls.chart().state_names if s != TERMINATED), 0) for cls in _KINDS}
        for txn in self.transactions():
            out[txn.kind][txn.state] += 1
        return out

    def close(self) -> None:
        """Cancel every timer (process shutdown); transactions are forgotten."""
        for txn in self.transactions():
            txn.cancel_timers()
        self._client.clear()
        self._server.clear()
        self._merge_index.clear()
