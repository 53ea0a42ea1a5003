"""The SIP transaction user at the top of the stack: dispatches requests by method.

Later features (registrar, B2BUA) register method handlers; what is not handled gets
``501 Not Implemented``.  Before a request reaches its handler the endpoint applies the
UAS core's checks of RFC 3261 §8.2.2 in the RFC's order: a merged request (§8.2.2.2)
gets ``482 Loop Detected``, a ``Require`` naming an option tag we do not implement
(§8.2.2.3) gets ``420 Bad Extension`` with ``Unsupported`` listing it.  OPTIONS is
answered here from the PBX's readiness so SIP load balancers (Kamailio's dispatcher
probes nodes with OPTIONS) route away from a node that is starting or draining.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from pbx.sip.message import Request, Response, make_response
from pbx.sip.transactions import Peer, ServerTransaction

log = logging.getLogger(__name__)

RequestHandler = Callable[[Request, ServerTransaction, Peer], None]

ACCEPTED_BODY_TYPES = ("application/sdp",)
# Option tags (RFC 3261 §19.2) we implement, and we never claim one we lack: "100rel"
# (RFC 3262, PRACK; pbx.calls.reliable) and "timer" (RFC 4028 session timers;
# pbx.calls.session_timer), both terminated per leg by the B2BUA.
# The single source: OPTIONS advertises these in Supported, and a Require naming any
# other tag is refused with 420 (see unsupported_extensions()).
SUPPORTED_EXTENSIONS: tuple[str, ...] = ("100rel", "timer")
# Require in ACK and CANCEL is not checked (§8.2.2.3): an ACK cannot be refused and a
# CANCEL must not be refused for an extension the INVITE already passed.
_REQUIRE_EXEMPT = frozenset({"ACK", "CANCEL"})


def unsupported_extensions(request: Request,
                           supported: tuple[str, ...] | None = None) -> list[str]:
    """Option tags of ``request``'s Require that we do not implement (RFC 3261 §8.2.2.3).

    Tags are tokens, compared case-insensitively (§7.3.1); each unknown tag is listed
    once, as the peer spelled it.  Empty for ACK and CANCEL.
    """
    if request.method in _REQUIRE_EXEMPT:
        return []
    values = request.headers.getall("Require")
    if not values:
        return []
    known = {tag.lower() for tag in (SUPPORTED_EXTENSIONS if supported is None
                                     else supported)}
    unknown: list[str] = []
    seen: set[str] = set()
    for value in values:
        tag = value.strip()
        folded = tag.lower()
        if tag and folded not in known and folded not in seen:
            seen.add(folded)
            unknown.append(tag)
    return unknown


class SIPEndpoint:
    """Transaction user that answers OPTIONS and routes other methods to handlers."""

    def __init__(self, *, is_ready: Callable[[], bool], retry_after: int = 30,
                 user_agent: str = "PBX") -> None:
        self.is_ready = is_ready
        self.retry_after = retry_after
        self.user_agent = user_agent
        self.handlers: dict[str, RequestHandler] = {"OPTIONS": self.handle_options}
        self.ack_handler: Callable[[Request, Peer], None] | None = None

    @property
    def allowed_methods(self) -> list[str]:
        methods = set(self.handlers) | {"ACK"}
        if "INVITE" in methods:
            methods.add("CANCEL")
        return sorted(methods)

    # -- TransactionUser --------------------------------------------------------------
    def request_received(self, request: Request, transaction: ServerTransaction | None,
                         peer: Peer) -> None:
        if transaction is None:  # ACK for a 2xx: no transaction of its own
            if self.ack_handler is not None:
                self.ack_handler(request, peer)
            return
        handler = self.handlers.get(request.method)
        if handler is None:
            if request.method == "CANCEL":
                self.respond(transaction, request, 481)
            else:
                self.respond(transaction, request, 501)
            return
        if getattr(transaction, "merge_key", None) is not None and self._merged(transaction):
            self.respond(transaction, request, 482, "Loop Detected")
            return
        unknown = unsupported_extensions(request)
        if unknown:
            self.respond(transaction, request, 420, "Bad Extension",
                         extra={"Unsupported": ", ".join(unknown)})
            return
        handler(request, transaction, peer)

    @staticmethod
    def _merged(transaction: ServerTransaction) -> bool:
        """RFC 3261 §8.2.2.2: the same out-of-dialog request (Call-ID, From tag, CSeq)
        is pending in another transaction; this copy came by another path."""
        manager = getattr(transaction, "manager", None)
        finder = getattr(manager, "merged_transaction", None)
        return finder is not None and finder(transaction) is not None

    def response_received_stray(self, response: Response, peer: Peer) -> None:
        log.debug("stray %s response from %s dropped", response.status, peer)

    # -- helpers --------------------------------------------------------------------
    def respond(self, transaction: ServerTransaction, request: Request, status: int,
                reason: str | None = None, extra: dict[str, str] | None = None) -> Response:
        """Build and send a response with our To-tag and server headers."""
        to_tag = None if status == 100 else secrets.token_hex(6)
        headers = [("Server", self.user_agent)]
        if extra:
            headers += extra.items()
        response = make_response(request, status, reason, to_tag=to_tag, extra=headers)
        transaction.respond(response)
        return response

    def capability_headers(self) -> dict[str, str]:
        return {
            "Allow": ", ".join(self.allowed_methods),
            "Accept": ", ".join(ACCEPTED_BODY_TYPES),
            "Supported": ", ".join(SUPPORTED_EXTENSIONS),
        }

    def handle_options(self, request: Request, transaction: ServerTransaction,
                       peer: Peer) -> None:
        """RFC 3261 §11: capabilities when ready, 503 + Retry-After otherwise."""
        if not self.is_ready():
            self.respond(transaction, request, 503, extra={"Retry-After": str(self.retry_after)})
            return
        self.respond(transaction, request, 200, extra=self.capability_headers())
