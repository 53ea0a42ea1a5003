"""Dialogs (RFC 3261 §12): creation on both sides, in-dialog requests, validation."""

from __future__ import annotations

import pytest

from pbx.sip import (
    URI,
    Dialog,
    DialogTable,
    Headers,
    Request,
    SIPParseError,
    make_response,
    parse,
)

VIA = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnew"


def invite(*, record_routes: tuple[str, ...] = (), contact: str | None =
           "<sip:alice@10.0.0.2:5062>", uri: str = "sip:bob@example.com") -> Request:
    headers = Headers([
        ("Via", "SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bK1"),
        ("Max-Forwards", "70"),
        *[("Record-Route", rr) for rr in record_routes],
        ("From", '"Alice" <sip:alice@example.com>;tag=atag'),
        ("To", "<sip:bob@example.com>"),
        ("Call-ID", "cid-1"),
        ("CSeq", "7 INVITE"),
    ])
    if contact:
        headers.add("Contact", contact)
    return Request("INVITE", URI.parse(uri), headers)


def answer(request: Request, status: int = 200, *, tag: str | None = "btag",
           contact: str | None = "<sip:bob@10.0.0.3:5070>",
           record_routes: tuple[str, ...] = ()):
    response = make_response(request, status, to_tag=tag)
    for rr in record_routes:
        response.headers.add("Record-Route", rr)
    if contact:
        response.headers.add("Contact", contact)
    return response


def test_uac_dialog_from_2xx_is_confirmed_with_reversed_route_set() -> None:
    req = invite()
    resp = answer(req, record_routes=("<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"))
    dialog = Dialog.from_uac(req, resp)
    assert dialog.state == "confirmed"
    assert dialog.id == ("cid-1", "atag", "btag")
    assert dialog.route_set == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert str(dialog.remote_target) == "sip:bob@10.0.0.3:5070"
    assert dialog.local_seq == 7


def test_uac_early_dialog_from_tagged_1xx_then_confirmed_by_2xx() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, 180, record_routes=("<sip:old;lr>",)))
    assert dialog.state == "early"
    dialog.update_from_response(answer(req, 200, record_routes=("<sip:new.example;lr>",),
                                       contact="<sip:bob@10.9.9.9>"))
    assert dialog.state == "confirmed"
    assert dialog.route_set == ["<sip:new.example;lr>"]
    assert str(dialog.remote_target) == "sip:bob@10.9.9.9"
    dialog.update_from_response(answer(req, 200))  # a retransmission changes nothing
    assert dialog.state == "confirmed"


def test_early_dialog_ends_with_a_failure_response() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, 183))
    dialog.update_from_response(answer(req, 486, contact=None))
    assert dialog.terminated


def test_responses_without_tag_or_contact_cannot_create_a_dialog() -> None:
    req = invite()
    with pytest.raises(SIPParseError):
        Dialog.from_uac(req, answer(req, 180, tag=None))
    with pytest.raises(SIPParseError):
        Dialog.from_uac(req, answer(req, 200, contact=None))


def test_uas_dialog_keeps_record_route_order_and_swaps_uris() -> None:
    req = invite(record_routes=("<sip:p1;lr>", "<sip:p2;lr>"))
    dialog = Dialog.from_uas(req, "mytag", confirmed=True)
    assert dialog.id == ("cid-1", "mytag", "atag")
    assert dialog.route_set == ["<sip:p1;lr>", "<sip:p2;lr>"]
    assert dialog.remote_seq == 7 and dialog.local_seq == 0
    bye = dialog.create_request("BYE", via=VIA)
    assert bye.to.tag == "atag" and bye.from_.tag == "mytag"
    assert bye.from_.uri is not None and bye.from_.uri.user == "bob"
    assert str(bye.uri) == "sip:alice@10.0.0.2:5062"
    assert bye.headers.getall("Route") == ["<sip:p1;lr>", "<sip:p2;lr>"]


def test_in_dialog_requests_increment_cseq_and_ack_repeats_the_invite_cseq() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    info = dialog.create_request("INFO", via=VIA, body=b"Signal=5", content_type="x/y")
    bye = dialog.create_request("BYE", via=VIA)
    assert (info.cseq.seq, bye.cseq.seq) == (8, 9)
    assert info.headers.get("Content-Type") == "x/y"
    ack = dialog.create_request("ACK", via=VIA, cseq=7)
    assert ack.cseq.seq == 7 and ack.cseq.method == "ACK"
    assert dialog.local_seq == 9
    with pytest.raises(ValueError):
        dialog.create_request("ACK", via=VIA)
    parsed = parse(bye.to_bytes())  # what we build is valid SIP
    assert parsed.call_id == "cid-1" and parsed.to.tag == "btag"


def test_strict_router_goes_into_the_request_uri() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req, record_routes=("<sip:strict.example>",)))
    bye = dialog.create_request("BYE", via=VIA)
    assert str(bye.uri) == "sip:strict.example"
    assert bye.headers.getall("Route") == ["<sip:bob@10.0.0.3:5070>"]


def test_incoming_requests_with_old_cseq_get_500_and_target_refresh_applies() -> None:
    req = invite()
    dialog = Dialog.from_uas(req, "mytag", confirmed=True)
    old = invite()
    assert dialog.check_request(old) == 500  # CSeq 7 again: not higher
    refresh = invite(contact="<sip:alice@10.0.0.99>")
    refresh.headers.set("CSeq", "8 INVITE")
    assert dialog.check_request(refresh) is None
    assert dialog.remote_seq == 8
    assert str(dialog.remote_target) == "sip:alice@10.0.0.99"
    ack = invite()
    ack.method = "ACK"
    ack.headers.set("CSeq", "8 ACK")
    assert dialog.check_request(ack) is None


def test_terminate_is_idempotent() -> None:
    dialog = Dialog.from_uas(invite(), "t")
    dialog.terminate()
    dialog.terminate()
    dialog.confirm()
    assert dialog.terminated


def test_table_matches_incoming_requests_from_the_receivers_side() -> None:
    req = invite()
    dialog = Dialog.from_uac(req, answer(req))
    table: DialogTable[str] = DialogTable()
    table.add(dialog, "leg-b")
    # The callee's BYE: From carries its tag (our remote), To ours (our local).
    bye = Request("BYE", URI.parse("sip:x@10.0.0.1"), Headers([
        ("Via", VIA), ("From", "<sip:bob@example.com>;tag=btag"),
        ("To", "<sip:alice@example.com>;tag=atag"), ("Call-ID", "cid-1"), ("CSeq", "1 BYE"),
    ]))
    assert table.match(bye) == (dialog, "leg-b")
    bye.headers.set("From", "<sip:bob@example.com>;tag=other")
    assert table.match(bye) is None
    assert dialog in table and len(table) == 1
    table.remove(dialog)
    assert len(table) == 0 and list(table) == []
