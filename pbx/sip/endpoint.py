"""The SIP transaction user at the top of the stack: dispatches requests by method.

Later features (registrar, B2BUA) register method handlers; what is not handled gets
``501 Not Implemented``.  OPTIONS is answered here from the PBX's readiness so SIP load
balancers (Kamailio's dispatcher probes nodes with OPTIONS) route away from a node that
is starting or draining.
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
# Option tags (RFC 3261 §19.2) we implement; none yet, and we never claim one we lack.
SUPPORTED_EXTENSIONS: tuple[str, ...] = ()


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
        handler(request, transaction, peer)

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
