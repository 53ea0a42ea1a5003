"""SIP dialogs (RFC 3261 §12) as a statechart model, and the table that finds them.

A :class:`Dialog` holds what §12 says a dialog is: its identity (Call-ID, local tag,
remote tag), the local and remote sequence numbers, the local and remote URIs, the
remote target (from Contact) and the route set (from Record-Route: reversed for the UAC,
as received for the UAS).  Its lifecycle (early → confirmed → terminated) is the chart
``statecharts/dialog.yaml``; everything else is plain attributes so a dialog costs one
object and no machine.

:meth:`Dialog.create_request` builds in-dialog requests (§12.2.1.1) and
:meth:`Dialog.check_request` validates incoming ones (§12.2.2): a CSeq lower than the
remote sequence number gets 500.  A request whose dialog is unknown gets 481 from the
caller of :meth:`DialogTable.match`.  Sans-IO: nothing here sends anything.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import Headers, NameAddress
from pbx.sip.message import Request, Response
from pbx.sip.uri import URI
from pbx.statecharts import ChartModel

__all__ = ["Dialog", "DialogId", "DialogTable", "new_tag"]

DialogId = tuple[str, str, str]
"""(Call-ID, local tag, remote tag)."""

T = TypeVar("T")


def new_tag() -> str:
    """A fresh From/To tag: 48 random bits are plenty for global uniqueness (§19.3)."""
    return secrets.token_hex(6)


def _record_routes(message: Request | Response) -> list[str]:
    return message.headers.getall("Record-Route")


class Dialog(ChartModel):
    """One dialog, UAC or UAS side (``role``)."""

    chart_name = "dialog"

    def __init__(self, *, role: str, call_id: str, local_tag: str, remote_tag: str,
                 local_uri: str, remote_uri: str, remote_target: URI,
                 route_set: Iterable[str] = (), local_seq: int = 0,
                 remote_seq: int | None = None, secure: bool = False) -> None:
        super().__init__()
        self.role = role
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri      # name-addr text without tag (our From in requests)
        self.remote_uri = remote_uri    # name-addr text without tag (our To in requests)
        self.remote_target = remote_target
        self.route_set = list(route_set)
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.secure = secure

    def __repr__(self) -> str:
        return f"<Dialog {self.role} {self.call_id} {self.local_tag}/{self.remote_tag} " \
               f"{self.state}>"

    # -- identity -----------------------------------------------------------------------
    @property
    def id(self) -> DialogId:
        return (self.call_id, self.local_tag, self.remote_tag)

    @property
    def confirmed(self) -> bool:
        return self.state == "confirmed"

    @property
    def terminated(self) -> bool:
        return self.state == "terminated"

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def from_uac(cls, request: Request, response: Response) -> Dialog:
        """The UAC's dialog from its INVITE and a tagged 1xx or a 2xx (§12.1.2).

        Raises :class:`SIPParseError` when the response carries no To tag or no usable
        Contact (a 2xx without Contact is a broken peer; a 1xx without one keeps the
        Request-URI as target until one arrives).
        """
        tag = response.to.tag
        if not tag:
            raise SIPParseError("Response without To tag cannot create a dialog")
        target = _contact_uri(response)
        if target is None:
            if response.status >= 200:
                raise SIPParseError("2xx without Contact")
            target = request.uri.copy()
        from_ = request.from_
        dialog = cls(
            role="uac", call_id=request.call_id, local_tag=from_.tag or "",
            remote_tag=tag, local_uri=_without_tag(from_), remote_uri=_without_tag(request.to),
            remote_target=target, route_set=list(reversed(_record_routes(response))),
            local_seq=request.cseq.seq, remote_seq=None,
            secure=request.uri.scheme == "sips")
        if response.status >= 200:
            dialog.fire("confirm")
        return dialog

    @classmethod
    def from_uas(cls, request: Request, local_tag: str, *, confirmed: bool = False) -> Dialog:
        """The UAS's dialog from the INVITE it answers with ``local_tag`` (§12.1.1)."""
        target = _contact_uri(request)
        if target is None:
            raise SIPParseError("INVITE without Contact")
        from_ = request.from_
        dialog = cls(
            role="uas", call_id=request.call_id, local_tag=local_tag,
            remote_tag=from_.tag or "", local_uri=_without_tag(request.to),
            remote_uri=_without_tag(from_), remote_target=target,
            route_set=_record_routes(request), local_seq=0, remote_seq=request.cseq.seq,
            secure=request.uri.scheme == "sips")
        if confirmed:
            dialog.fire("confirm")
        return dialog

    # -- updates ------------------------------------------------------------------------
    def update_from_response(self, response: Response) -> None:
        """Apply a response to the dialog-creating INVITE or a re-INVITE.

        A 2xx confirms; while early, the route set is recomputed from it (§12.1.2 says the
        2xx's Record-Route is authoritative); a Contact refreshes the remote target.
        A non-2xx final to the initial INVITE ends an early dialog.
        """
        status = response.status
        target = _contact_uri(response)
        if target is not None:
            self.remote_target = target
        if 200 <= status < 300:
            if self.state == "early" and self.role == "uac":
                self.route_set = list(reversed(_record_routes(response)))
            if self.may_fire("confirm"):
                self.fire("confirm")
        elif status >= 300 and self.state == "early":
            self.fire("reject")

    def confirm(self) -> None:
        """Confirm (a UAS sending its 2xx); a no-op once confirmed or ended."""
        if self.may_fire("confirm"):
            self.fire("confirm")

    def terminate(self) -> None:
        """End the dialog (BYE, 481/408, call over); idempotent."""
        if self.may_fire("terminate"):
            self.fire("terminate")

    # -- in-dialog requests ---------------------------------------------------------------
    def next_cseq(self) -> int:
        """Allocate the next local sequence number (§12.2.1.1: strictly increasing)."""
        self.local_seq += 1
        return self.local_seq

    def create_request(self, method: str, *, via: str, contact: str | None = None,
                       body: bytes = b"", content_type: str | None = None,
                       cseq: int | None = None, max_forwards: int = 70,
                       extra: Iterable[tuple[str, str]] = ()) -> Request:
        """Build an in-dialog request (§12.2.1.1).

        ``via`` is the complete Via value (with a fresh branch).  The CSeq is the next
        local one, except for ACK (pass the INVITE's ``cseq``).  With a loose-routing
        first route (``;lr``) the Request-URI is the remote target and the route set goes
        in Route; with a strict router the first route becomes the Request-URI and the
        remote target is appended to the Route list.
        """
        if cseq is None:
            if method == "ACK":
                raise ValueError("an ACK repeats its INVITE's CSeq: pass cseq")
            cseq = self.next_cseq()
        uri, routes = self._target_and_routes()
        headers = Headers()
        add = headers.add
        add("Via", via)
        add("Max-Forwards", str(max_forwards))
        for route in routes:
            add("Route", route)
        add("From", f"{self.local_uri};tag={self.local_tag}")
        add("To", f"{self.remote_uri};tag={self.remote_tag}")
        add("Call-ID", self.call_id)
        add("CSeq", f"{cseq} {method}")
        if contact is not None:
            add("Contact", contact)
        for name, value in extra:
            add(name, value)
        if body:
            add("Content-Type", content_type or "application/sdp")
        return Request(method, uri, headers, body)

    def _target_and_routes(self) -> tuple[URI, list[str]]:
        if not self.route_set:
            return self.remote_target.copy(), []
        first = NameAddress.parse(self.route_set[0])
        if first.uri is not None and "lr" in first.uri.params:
            return self.remote_target.copy(), list(self.route_set)
        assert first.uri is not None
        uri = first.uri.copy()
        return uri, [*self.route_set[1:], f"<{self.remote_target}>"]

    def check_request(self, request: Request) -> int | None:
        """Validate an incoming in-dialog request (§12.2.2); the status to reject it with.

        ``500`` for a CSeq lower than (or, except ACK/CANCEL, equal to) the remote
        sequence number: an out-of-order or replayed request.  Otherwise records the
        sequence number and, for a target-refresh request (re-INVITE, UPDATE), the new
        remote target, and returns ``None``.
        """
        method = request.method
        seq = request.cseq.seq
        if method in ("ACK", "CANCEL"):
            return None
        if self.remote_seq is not None and seq <= self.remote_seq:
            return 500
        self.remote_seq = seq
        if method in ("INVITE", "UPDATE"):
            target = _contact_uri(request)
            if target is not None:
                self.remote_target = target
        return None


def _without_tag(addr: NameAddress) -> str:
    params = {k: v for k, v in addr.params.items() if k != "tag"}
    return str(NameAddress(addr.display_name, addr.uri, params))


def _contact_uri(message: Request | Response) -> URI | None:
    value = message.headers.get("Contact")
    if not value:
        return None
    try:
        contact = NameAddress.parse(value)
    except SIPParseError:
        return None
    return contact.uri


class DialogTable(Generic[T]):
    """Dialogs by identity, each with an owner (the B2BUA's call leg).

    :meth:`match` looks an incoming request up from the receiver's side: the request's
    To tag is our local tag and its From tag the remote one (§12.2.2).
    """

    def __init__(self) -> None:
        self._by_id: dict[DialogId, tuple[Dialog, T]] = {}

    def add(self, dialog: Dialog, owner: T) -> None:
        self._by_id[dialog.id] = (dialog, owner)

    def remove(self, dialog: Dialog) -> None:
        entry = self._by_id.get(dialog.id)
        if entry is not None and entry[0] is dialog:
            del self._by_id[dialog.id]

    def get(self, dialog_id: DialogId) -> tuple[Dialog, T] | None:
        return self._by_id.get(dialog_id)

    def match(self, request: Request) -> tuple[Dialog, T] | None:
        """The dialog an incoming request belongs to, or ``None`` (answer 481)."""
        try:
            key = (request.call_id, request.to.tag or "", request.from_.tag or "")
        except SIPParseError:
            return None
        return self._by_id.get(key)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Dialog]:
        return (d for d, _ in list(self._by_id.values()))

    def __contains__(self, item: Any) -> bool:
        return isinstance(item, Dialog) and self._by_id.get(item.id, (None,))[0] is item
