"""Fakes and builders shared by the transaction tests (the transport boundary and a TU).

No tests live here; the module name only makes pytest's rootdir import find it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from pbx.sip.headers import Headers
from pbx.sip.message import Request, Response, make_response
from pbx.sip.transactions import (
    ClientTransaction,
    Peer,
    ServerTransaction,
    TransactionManager,
    TransportError,
    new_branch,
)
from pbx.sip.uri import URI

UDP = Peer("udp", "10.0.0.2", 5060)
TCP = Peer("tcp", "10.0.0.2", 5060)


def make_request(method: str = "OPTIONS", *, branch: str | None = None,
                 transport: str = "UDP", via_host: str = "10.0.0.2", via_port: int = 5060,
                 call_id: str = "call-1@10.0.0.2", seq: int = 1, to_tag: str | None = None,
                 from_tag: str = "ft1", uri: str = "sip:bob@10.0.0.1",
                 routes: tuple[str, ...] = ()) -> Request:
    branch = new_branch() if branch is None else branch
    via = f"SIP/2.0/{transport} {via_host}:{via_port}" + (f";branch={branch}" if branch else "")
    items = [("Via", via), ("Via", "SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKdownstream"),
             ("Max-Forwards", "69")]
    items += [("Route", r) for r in routes]
    items += [
        ("From", f"\"Alice\" <sip:alice@10.0.0.2>;tag={from_tag}"),
        ("To", "<sip:bob@10.0.0.1>" + (f";tag={to_tag}" if to_tag else "")),
        ("Call-ID", call_id),
        ("CSeq", f"{seq} {method}"),
        ("Contact", "<sip:alice@10.0.0.2:5060>"),
    ]
    return Request(method, URI.parse(uri), Headers(items))


def reply(request: Request, status: int, to_tag: str | None = "tt1") -> Response:
    return make_response(request, status, to_tag=None if status == 100 else to_tag)


def ack_for(invite: Request, response: Response, *, branch: str | None = None) -> Request:
    """An ACK as a UAC would send it: same branch for a non-2xx, a new one for a 2xx."""
    headers = Headers([
        ("Via", invite.headers.getall("Via")[0] if branch is None else
         f"SIP/2.0/UDP 10.0.0.2:5060;branch={branch}"),
        ("Max-Forwards", "70"),
        ("From", invite.headers.get("From") or ""),
        ("To", response.headers.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq.seq} ACK"),
    ])
    return Request("ACK", invite.uri, headers)


class FakeSender:
    """Records (time, message, peer); raises TransportError while ``fail`` is set."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Request | Response, Peer]] = []
        self.fail = False
        self.on_send: Any = None

    def send_request(self, request: Request, peer: Peer) -> None:
        self._record(request, peer)

    def send_response(self, response: Response, peer: Peer) -> None:
        self._record(response, peer)

    def _record(self, message: Request | Response, peer: Peer) -> None:
        if self.on_send is not None:
            self.on_send(message, peer)
        if self.fail:
            raise TransportError("unreachable")
        self.sent.append((self.clock.seconds(), message, peer))

    def times(self, what: str | int | None = None) -> list[float]:
        """Send times of requests of method ``what`` / responses of status ``what``."""
        return [t for t, m, _ in self.sent if what is None or label(m) == what]

    def labels(self) -> list[str | int]:
        return [label(m) for _, m, _ in self.sent]


def label(message: Request | Response) -> str | int:
    return message.method if isinstance(message, Request) else message.status


class RecordingTU:
    """Server-side TU and client-side user in one: records every upcall."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any]] = []
        self.requests: list[tuple[Request, ServerTransaction | None, Peer]] = []
        self.on_request: Any = None

    def request_received(self, request: Request, transaction: ServerTransaction | None,
                         peer: Peer) -> None:
        self.requests.append((request, transaction, peer))
        self.events.append(("request", request.method, transaction))
        if self.on_request is not None:
            self.on_request(request, transaction, peer)

    def response_received_stray(self, response: Response, peer: Peer) -> None:
        self.events.append(("stray", response.status, peer))

    def response_received(self, transaction: ClientTransaction, response: Response) -> None:
        self.events.append(("response", response.status, transaction))

    def transaction_timeout(self, transaction: Any) -> None:
        self.events.append(("timeout", None, transaction))

    def transaction_transport_error(self, transaction: Any) -> None:
        self.events.append(("transport_error", None, transaction))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def statuses(self) -> list[Any]:
        return [e[1] for e in self.events if e[0] == "response"]


def advance_to(clock: Clock, until: float) -> None:
    """Advance to ``until``, stopping at every scheduled call so each runs on time."""
    while clock.calls and clock.calls[0].getTime() <= until:
        clock.advance(max(0.0, clock.calls[0].getTime() - clock.seconds()))
    clock.advance(max(0.0, until - clock.seconds()))


def setup(**kwargs: Any) -> tuple[Clock, FakeSender, RecordingTU, TransactionManager]:
    clock = Clock()
    sender = FakeSender(clock)
    tu = RecordingTU()
    return clock, sender, tu, TransactionManager(sender, tu, clock, **kwargs)
