"""Message parsing, serialisation, responses and TCP framing (incl. RFC 4475-style cases)."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import CSeq, Headers, NameAddress, Via
from pbx.sip.message import (
    MAX_MESSAGE_SIZE,
    Request,
    Response,
    StreamFramer,
    make_response,
    parse,
)
from pbx.sip.uri import URI

SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"


def invite(body: bytes = SDP, *, cl: int | None = None, extra: str = "",
           drop: str = "") -> bytes:
    """A well-formed INVITE; ``drop`` removes the header line starting with that name."""
    lines = [
        "INVITE sip:bob@biloxi.example.com SIP/2.0",
        "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport",
        "Via: SIP/2.0/TCP 192.0.2.10:5070;branch=z9hG4bKa1;received=192.0.2.10",
        "Max-Forwards: 70",
        "To: Bob <sip:bob@biloxi.example.com>",
        'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774',
        "Call-ID: a84b4c76e66710@pc33.atlanta.example.com",
        "CSeq: 314159 INVITE",
        "Contact: <sip:alice@pc33.atlanta.example.com>",
        "Content-Type: application/sdp",
        f"Content-Length: {len(body) if cl is None else cl}",
    ]
    if drop:
        lines = [ln for ln in lines if not ln.startswith(drop + ":")]
    text = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return text.encode() + body


RESPONSE = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


# -- basic parsing ---------------------------------------------------------------------------


def test_parse_request_fields_and_accessors() -> None:
    m = parse(invite())
    assert isinstance(m, Request) and m.is_request
    assert m.method == "INVITE"
    assert m.uri == URI.parse("sip:bob@biloxi.example.com")
    assert m.version == "SIP/2.0"
    assert m.body == SDP
    assert m.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert m.cseq == CSeq(314159, "INVITE")
    assert [v.host for v in m.vias] == ["pc33.atlanta.example.com", "192.0.2.10"]
    assert m.top_via.branch == "z9hG4bK776asdhds"
    assert m.top_via.rport_requested
    assert m.from_.tag == "1928301774" and m.from_.display_name == "Alice"
    assert m.to.tag is None
    assert m.max_forwards == 70
    assert m.content_length == len(SDP)
    assert [c.uri for c in m.contacts] == [URI.parse("sip:alice@pc33.atlanta.example.com")]
    assert repr(m) == "<Request INVITE sip:bob@biloxi.example.com>"


def test_parse_response() -> None:
    m = parse(RESPONSE)
    assert isinstance(m, Response) and not m.is_request
    assert (m.status, m.reason) == (180, "Ringing")
    assert m.to.tag == "a6c85cf"
    assert m.method == "INVITE"
    assert m.body == b""
    assert repr(m) == "<Response 180 Ringing>"


def test_response_reason_may_be_empty_or_contain_spaces_and_utf8() -> None:
    r = parse(RESPONSE.replace(b"180 Ringing", b"180"))
    assert isinstance(r, Response) and r.reason == ""
    r = parse(RESPONSE.replace(b"Ringing", "Läuft  gerade".encode()))
    assert isinstance(r, Response) and r.reason == "Läuft  gerade"
    assert parse(r.to_bytes()) == r


def test_max_forwards_optional() -> None:
    m = parse(invite(drop="Max-Forwards"))
    assert m.max_forwards is None


def test_leading_crlf_keepalives_are_skipped() -> None:
    assert parse(b"\r\n\r\n\r\n" + invite()) == parse(invite())


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\n\r\n\n"])
def test_empty_message(data: bytes) -> None:
    with pytest.raises(SIPParseError) as exc:
        parse(data)
    assert exc.value.reason == "Empty message"


# -- serialisation ----------------------------------------------------------------------------


def test_to_bytes_is_canonical() -> None:
    raw = (
        b"OPTIONS sip:h SIP/2.0\r\n"
        b"v: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"l: 999\r\n"
        b"t :  <sip:b@h>\r\n"
        b"f:<sip:a@h>;tag=1\r\n"
        b"i: abc\r\n"
        b"cseq: 1 OPTIONS\r\n"
        b"x-custom-thing: yes\r\n\r\n"
    )
    with pytest.raises(SIPParseError, match="Body shorter"):
        parse(raw)
    m = parse(raw.replace(b"l: 999", b"l: 0"))
    assert m.to_bytes() == (
        b"OPTIONS sip:h SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"To: <sip:b@h>\r\n"
        b"From: <sip:a@h>;tag=1\r\n"
        b"Call-ID: abc\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"X-Custom-Thing: yes\r\n"
        b"Content-Length: 0\r\n\r\n"
    )


def test_content_length_always_matches_body() -> None:
    h = Headers([("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("To", "<sip:b@h>"),
                 ("From", "<sip:a@h>;tag=1"), ("Call-ID", "c"), ("CSeq", "1 MESSAGE"),
                 ("Content-Length", "12345")])
    m = Request("MESSAGE", URI.parse("sip:b@h"), h, b"hello")
    data = m.to_bytes()
    assert data.endswith(b"Content-Length: 5\r\n\r\nhello")
    assert data.count(b"Content-Length") == 1
    assert parse(data) == m  # equality ignores the (derived) Content-Length line
    assert bytes(m) == data


def test_round_trip_and_idempotence() -> None:
    m = parse(invite())
    assert parse(m.to_bytes()) == m
    assert parse(m.to_bytes()).to_bytes() == m.to_bytes()
    r = parse(RESPONSE)
    assert parse(r.to_bytes()) == r


def test_equality_distinguishes_messages() -> None:
    a = parse(invite())
    assert a != parse(invite(body=b"other"))
    assert a != parse(invite(extra="Subject: x\r\n"))
    assert a != parse(RESPONSE)
    assert a != "not a message"


def test_accessor_cache_is_invalidated_on_header_change() -> None:
    m = parse(invite())
    assert m.to.tag is None
    m.headers.set("To", "<sip:bob@biloxi.example.com>;tag=xyz")
    assert m.to.tag == "xyz"
    m.headers.add("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp", first=True)
    assert m.top_via.host == "proxy.example.com"
    assert len(m.vias) == 3
    m.headers = Headers([("CSeq", "7 INVITE")])
    assert m.cseq == CSeq(7, "INVITE")
    with pytest.raises(SIPParseError, match="Missing Via"):
        _ = m.top_via


def test_binary_body_stays_bytes() -> None:
    body = bytes(range(256))
    m = parse(invite(body=body))
    assert m.body == body
    assert parse(m.to_bytes()).body == body


# -- RFC 4475-style torture cases -----------------------------------------------------------------


def test_folded_headers_are_unfolded() -> None:
    raw = invite(extra="Subject: I know you're there,\r\n   pull up the car\r\n\t\tnow\r\n")
    raw = raw.replace(b"Via: SIP/2.0/TCP", b"Via:\r\n   SIP/2.0/TCP")
    m = parse(raw)
    assert m.headers.get("Subject") == "I know you're there, pull up the car now"
    assert m.vias[1].transport == "TCP"
    assert b"Subject: I know you're there, pull up the car now\r\n" in m.to_bytes()


def test_unusual_whitespace_and_case() -> None:
    raw = (
        b"INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n"
        b"TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n"
        b'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\r\n'
        b"  ;\r\n  tag = 98asjd8\r\n"
        b"MaX-fOrWaRdS: 0068\r\n"
        b"Call-ID: wsinv.ndaksdj@192.0.2.1\r\n"
        b"cseq: 0009\r\n  INVITE\r\n"
        b"Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;rport;branch=390skdjuw\r\n"
        b"s :\r\n"
        b"NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n"
        b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n"
        b"Content-Type: application/sdp\r\n"
        b"v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n"
        b" SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n"
        b"m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n"
        b"      newvalue ;\r\n  secondparam ; q = 0.33\r\n\r\n"
    )
    m = parse(raw)
    assert isinstance(m, Request)
    assert m.uri.params == {"unknownparam": None}
    assert m.to.tag == "1918181833n"
    assert m.from_.display_name == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq == CSeq(9, "INVITE")
    assert [(v.transport, v.host) for v in m.vias] == [
        ("UDP", "192.0.2.2"), ("TCP", "spindle.example.com"), ("UDP", "192.168.255.111")]
    assert m.vias[2].branch == "z9hG4bK30239"
    assert m.headers.get("Subject") == ""
    assert m.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    contact = m.contacts[0]
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert parse(m.to_bytes()) == m


def test_escaped_request_uri_and_ipv6() -> None:
    raw = invite().replace(
        b"sip:bob@biloxi.example.com SIP",
        b"sip:sips%3Auser%40ex.com@[2001:db8::10]:5070;%74ransport=udp SIP")
    m = parse(raw)
    assert isinstance(m, Request)
    assert m.uri.user == "sips:user@ex.com"
    assert (m.uri.host, m.uri.port) == ("2001:db8::10", 5070)
    assert m.uri.params == {"transport": "udp"}
    assert m.to_bytes().startswith(
        b"INVITE sip:sips%3Auser%40ex.com@[2001:db8::10]:5070;transport=udp SIP/2.0\r\n")


def test_bare_lf_line_endings_are_tolerated() -> None:
    raw = invite(body=b"").replace(b"\r\n", b"\n")
    assert parse(raw) == parse(invite(body=b""))
    mixed = invite(body=b"").replace(b"\r\n\r\n", b"\r\n\n")
    assert parse(mixed) == parse(invite(body=b""))
    assert parse(invite(body=b"", cl=2).replace(b"\r\n", b"\n") + b"a\n").body == b"a\n"


def test_compact_forms_on_input_become_full_names() -> None:
    raw = (b"BYE sip:b@h SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\nt: <sip:b@h>;tag=2\r\n"
           b"f: <sip:a@h>;tag=1\r\ni: cid\r\nCSeq: 2 BYE\r\nk: timer\r\nl: 0\r\n\r\n")
    m = parse(raw)
    assert [n for n, _ in m.headers.items()] == [
        "Via", "To", "From", "Call-ID", "CSeq", "Supported", "Content-Length"]
    assert m.call_id == "cid"


def test_lazy_structured_errors_surface_on_access_only() -> None:
    m = parse(invite().replace(b"To: Bob <sip:bob@biloxi.example.com>", b"To: <urn:x:y>"))
    with pytest.raises(SIPParseError):
        _ = m.to
    assert m.from_.tag == "1928301774"


# -- validation errors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Via", "To", "From", "Call-ID", "CSeq"])
def test_missing_mandatory_header(name: str) -> None:
    with pytest.raises(SIPParseError) as exc:
        parse(invite(drop=name))
    assert exc.value.reason == f"Missing {name}"
    partial = exc.value.partial
    assert isinstance(partial, Request) and partial.method == "INVITE"
    assert name not in partial.headers


@pytest.mark.parametrize("name", ["Via", "To", "From", "Call-ID", "CSeq"])
def test_response_missing_mandatory_header_has_no_partial(name: str) -> None:
    raw = b"\r\n".join(ln for ln in RESPONSE.split(b"\r\n") if not ln.startswith(name.encode()
                                                                                   + b":"))
    with pytest.raises(SIPParseError) as exc:
        parse(raw)
    assert exc.value.reason == f"Missing {name}"
    assert exc.value.partial is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (invite(extra="Call-ID: second\r\n"), "Duplicate Call-ID"),
        (invite(extra="l: 5\r\n"), "Duplicate Content-Length"),
        (invite().replace(b"CSeq: 314159 INVITE", b"CSeq: 314159 ACK"),
         "CSeq method does not match"),
        (invite().replace(b"CSeq: 314159 INVITE", b"CSeq: 99999999999 INVITE"), "Invalid CSeq"),
        (invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 300"), "Invalid Max-Forwards"),
        (invite().replace(b"Max-Forwards: 70", b"Max-Forwards: -1"), "Invalid Max-Forwards"),
        (invite(cl=-3), "Invalid Content-Length"),
        (invite(cl=len(SDP) + 1), "Body shorter than Content-Length"),
        (invite(extra="This is not a header\r\n"), "Malformed header line"),
        (invite(extra="Bad Name: x\r\n"), "Invalid header name"),
        (b"INVITE sip:a@b SIP/2.0\r\n Via: SIP/2.0/UDP h\r\n\r\n", "Malformed header line"),
        (invite().replace(b"Contact:", b" Contact:"), "Invalid CSeq"),  # folded into CSeq
        (invite().replace(b"sip:bob@biloxi.example.com SIP/2.0",
                          b"sip:bob@biloxi.example.com  SIP/2.0"), "Malformed request line"),
        (invite().replace(b"INVITE sip", b"INV(TE sip"), "Invalid method"),
        (invite().replace(b"sip:bob@biloxi.example.com SIP/2.0", b"sip:bob@bi loxi SIP/2.0"),
         "Malformed request line"),
        (invite().replace(b"sip:bob@biloxi.example.com SIP/2.0", b"sip:bob@[::1 SIP/2.0"),
         "Invalid Request-URI"),
        (invite().replace(b"Contact: <sip:alice", "Contact: <sip:ålice".encode("latin-1")),
         "Invalid UTF-8 in headers"),
        (invite().replace(b"Call-ID: a84", b"Call-ID: a\rb84"), "Bare CR in headers"),
        (invite().replace(b"Call-ID: a84", b"Call-ID: a\x0084"), "NUL in headers"),
        (b"SIP/2.0 99 Too Low\r\n\r\n", "Invalid status code"),
        (b"SIP/2.0 700 Too High\r\n\r\n", "Invalid status code"),
        (b"SIP/2.0 2OO OK\r\n\r\n", "Invalid status code"),
        (b"SIP/3.0 200 OK\r\n\r\n", "Unsupported SIP version"),
        (b"SIP/2.0\r\n\r\n", "Malformed status line"),
        (b"garbage\r\n\r\n", "Malformed request line"),
    ],
)
def test_invalid_messages(raw: bytes, reason: str) -> None:
    with pytest.raises(SIPParseError) as exc:
        parse(raw)
    assert exc.value.reason == reason


def test_unsupported_version_and_scheme_carry_status() -> None:
    with pytest.raises(SIPParseError) as exc:
        parse(invite().replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1))
    assert exc.value.status == 505
    assert isinstance(exc.value.partial, Request)
    with pytest.raises(SIPParseError) as exc:
        parse(invite().replace(b"INVITE sip:bob@biloxi.example.com", b"INVITE urn:service:sos"))
    assert exc.value.status == 416
    assert exc.value.reason == "Unsupported URI scheme"
    partial = exc.value.partial
    assert isinstance(partial, Request) and partial.uri is None
    assert partial.call_id == "a84b4c76e66710@pc33.atlanta.example.com"


def test_partial_request_can_be_answered_with_400() -> None:
    raw = invite(extra="Broken header line without colon\r\n")
    with pytest.raises(SIPParseError) as exc:
        parse(raw)
    err = exc.value
    assert err.status == 400
    assert isinstance(err.partial, Request)
    resp = make_response(err.partial, err.status, err.reason)
    data = resp.to_bytes()
    assert data.startswith(b"SIP/2.0 400 Malformed header line\r\n")
    again = parse(data)
    assert isinstance(again, Response)
    assert again.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert [v.branch for v in again.vias] == ["z9hG4bK776asdhds", "z9hG4bKa1"]


def test_datagram_body_longer_than_content_length_is_truncated() -> None:
    m = parse(invite(body=SDP + b"trailing junk", cl=len(SDP)))
    assert m.body == SDP


def test_datagram_without_content_length_takes_rest() -> None:
    m = parse(invite(drop="Content-Length"))
    assert m.body == SDP
    assert m.to_bytes().endswith(f"Content-Length: {len(SDP)}\r\n\r\n".encode() + SDP)


def test_stream_mode_requires_exact_content_length() -> None:
    with pytest.raises(SIPParseError, match="Missing Content-Length"):
        parse(invite(drop="Content-Length"), datagram=False)
    with pytest.raises(SIPParseError, match="Body longer than Content-Length"):
        parse(invite(body=SDP + b"x", cl=len(SDP)), datagram=False)
    assert parse(invite(), datagram=False) == parse(invite())


def test_missing_blank_line_is_an_error() -> None:
    raw = invite(body=b"")[:-2]  # drop the empty line
    with pytest.raises(SIPParseError) as exc:
        parse(raw)
    assert exc.value.reason == "Missing empty line after headers"
    assert isinstance(exc.value.partial, Request)


def test_oversize_message() -> None:
    raw = invite(body=b"x" * 200)
    with pytest.raises(SIPParseError) as exc:
        parse(raw, max_size=len(raw) - 1)
    assert exc.value.reason == "Message too large"
    assert parse(raw, max_size=len(raw)).body == b"x" * 200
    with pytest.raises(SIPParseError):
        parse(b"x" * (MAX_MESSAGE_SIZE + 1))


def test_non_bytes_input_is_a_parse_error() -> None:
    with pytest.raises(SIPParseError):
        parse("INVITE sip:a@b SIP/2.0\r\n\r\n")  # type: ignore[arg-type]
    assert parse(bytearray(invite())) == parse(invite())


# -- make_response --------------------------------------------------------------------------------


def test_make_response_copies_rfc3261_headers() -> None:
    req = parse(invite(extra="Timestamp: 54\r\nRecord-Route: <sip:p;lr>\r\n"))
    assert isinstance(req, Request)
    r = make_response(req, 180, to_tag="abc")
    assert (r.status, r.reason) == (180, "Ringing")
    assert [n for n, _ in r.headers.items()] == ["Via", "Via", "From", "To", "Call-ID", "CSeq"]
    assert r.headers.getall("Via") == req.headers.getall("Via")
    assert r.to.tag == "abc"
    assert r.from_ == req.from_
    assert r.call_id == req.call_id and r.cseq == req.cseq
    assert r.body == b""
    trying = make_response(req, 100)
    assert trying.headers.get("Timestamp") == "54"
    assert trying.to.tag is None


def test_make_response_keeps_existing_to_tag_and_custom_reason() -> None:
    req = parse(invite().replace(b"To: Bob <sip:bob@biloxi.example.com>",
                                 b"To: <sip:bob@biloxi.example.com>;tag=orig"))
    assert isinstance(req, Request)
    r = make_response(req, 486, "Busy Now", to_tag="new")
    assert r.reason == "Busy Now"
    assert r.to.tag == "orig"


def test_make_response_addr_spec_to_gets_header_tag() -> None:
    req = parse(invite().replace(b"To: Bob <sip:bob@biloxi.example.com>",
                                 b"To: sip:bob@biloxi.example.com"))
    assert isinstance(req, Request)
    r = make_response(req, 200, to_tag="t1")
    assert r.to.tag == "t1"
    assert r.to.uri is not None and r.to.uri.params == {}


@pytest.mark.parametrize(
    ("status", "reason"),
    [(100, "Trying"), (200, "OK"), (401, "Unauthorized"), (407, "Proxy Authentication Required"),
     (481, "Call/Transaction Does Not Exist"), (487, "Request Terminated"),
     (488, "Not Acceptable Here"), (491, "Request Pending"), (503, "Service Unavailable"),
     (603, "Decline"), (499, "Client Error"), (299, "OK")],
)
def test_default_reason_phrases(status: int, reason: str) -> None:
    req = parse(invite())
    assert isinstance(req, Request)
    assert make_response(req, status).reason == reason


def test_response_constructor_default_reason() -> None:
    assert Response(404).reason == "Not Found"


def test_build_request_from_structured_values() -> None:
    h = Headers()
    h.add("Via", str(Via(transport="TCP", host="::1", port=5060, params={"branch": "z9hG4bKq"})))
    h.add("From", str(NameAddress('Al "x"', URI(user="al", host="h"), {"tag": "1"})))
    h.add("To", str(NameAddress(None, URI(user="bo", host="h"))))
    h.add("Call-ID", "c1")
    h.add("CSeq", str(CSeq(1, "MESSAGE")))
    m = Request("MESSAGE", URI(user="bo", host="h"), h, b"hi")
    p = parse(m.to_bytes())
    assert p == m
    assert p.top_via.host == "::1"
    assert p.from_.display_name == 'Al "x"'


# -- StreamFramer ----------------------------------------------------------------------------------


def test_framer_byte_by_byte() -> None:
    data = invite() + RESPONSE
    framer = StreamFramer()
    frames: list[bytes] = []
    for i in range(len(data)):
        frames += framer.feed(data[i : i + 1])
    assert frames == [invite(), RESPONSE]
    assert framer.buffered == 0
    assert parse(frames[0], datagram=False) == parse(invite())


def test_framer_two_messages_in_one_chunk_and_partial_third() -> None:
    framer = StreamFramer()
    third = invite(body=b"abc")
    frames = framer.feed(invite() + RESPONSE + third[:50])
    assert frames == [invite(), RESPONSE]
    assert framer.feed(third[50:-1]) == []
    assert framer.feed(third[-1:]) == [third]


def test_framer_keepalive_pings() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == []
    assert framer.take_pings() == 1
    assert framer.take_pings() == 0
    # A lone CRLF (a pong) is skipped without counting; a split ping is still recognised.
    assert framer.feed(b"\r\n" + RESPONSE + b"\r\n") == [RESPONSE]
    assert framer.feed(b"\r\n") == []
    assert framer.pings == 2 and framer.take_pings() == 1
    assert framer.feed(b"\r\n" + RESPONSE) == [RESPONSE]
    assert framer.take_pings() == 0


def test_framer_compact_content_length_and_lf_only() -> None:
    msg = invite(body=b"12345").replace(b"Content-Length:", b"l:")
    assert StreamFramer().feed(msg + msg) == [msg, msg]
    lf = invite(body=b"").replace(b"\r\n", b"\n")
    assert StreamFramer().feed(lf) == [lf]


def test_framer_folded_content_length() -> None:
    msg = invite(body=b"xyz").replace(b"Content-Length: 3", b"Content-Length:\r\n  3")
    assert StreamFramer().feed(msg + b"\r\n\r\n") == [msg]
    assert parse(msg, datagram=False).body == b"xyz"


def test_hostile_inputs_stay_linear() -> None:
    import time

    started = time.perf_counter()
    folds = b"INVITE sip:a@b SIP/2.0\r\nSubject: a\r\n" + b" x\r\n" * 15000 + b"\r\n"
    with pytest.raises(SIPParseError):
        parse(folds)
    spaces = invite().replace(b"Via: SIP/2.0/UDP pc33.atlanta.example.com;",
                              b"Via: SIP/2.0/UDP pc33" + b" " * 30000 + b"x;")
    with pytest.raises(SIPParseError):
        _ = parse(spaces).vias
    assert time.perf_counter() - started < 1.0


def test_framer_missing_content_length() -> None:
    with pytest.raises(SIPParseError, match="Missing Content-Length"):
        StreamFramer().feed(invite(drop="Content-Length"))


def test_framer_invalid_content_length() -> None:
    with pytest.raises(SIPParseError, match="Invalid Content-Length"):
        StreamFramer().feed(invite(cl=-1))


def test_framer_oversize_headers_and_body() -> None:
    framer = StreamFramer(max_size=300)
    with pytest.raises(SIPParseError, match="Message too large"):
        for _ in range(10):
            framer.feed(b"INVITE sip:a@b SIP/2.0\r\nX-Filler: " + b"a" * 40)
    with pytest.raises(SIPParseError, match="Message too large"):
        # Known to be too large as soon as the header block (with Content-Length) is complete.
        StreamFramer(max_size=len(invite()) - 1).feed(invite()[: -len(SDP)])


def test_replace_top_via_keeps_other_vias_and_cached_views() -> None:
    from pbx.sip.headers import Via

    message = parse(
        b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1, SIP/2.0/TCP b.example.com\r\n"
        b"Via: SIP/2.0/UDP c.example.com;branch=z9hG4bK3\r\n"
        b"To: <sip:bob@example.com>\r\nFrom: <sip:alice@example.com>;tag=1\r\n"
        b"Call-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    to = message.to
    top = message.top_via
    stamped = Via(top.protocol, top.transport, top.host, top.port,
                  {**top.params, "received": "192.0.2.1"})
    message.replace_top_via(stamped)
    assert message.top_via is stamped
    assert message.to is to  # other views stay cached
    assert message.headers.getall("Via") == [
        "SIP/2.0/UDP a.example.com;branch=z9hG4bK1;received=192.0.2.1",
        "SIP/2.0/TCP b.example.com", "SIP/2.0/UDP c.example.com;branch=z9hG4bK3"]
    assert [v.host for v in parse(message.to_bytes()).vias] == [
        "a.example.com", "b.example.com", "c.example.com"]


def test_make_response_extra_headers_and_to_tag_without_reparsing() -> None:
    message = parse(
        b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP a.example.com;branch=z9hG4bK1\r\n"
        b"To: <sip:bob@example.com;tag=uri-param-not-a-to-tag>\r\n"
        b"From: <sip:bob@example.com>;tag=1\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\n\r\n")
    assert isinstance(message, Request)
    top = message.top_via  # parsed once: the response shares it
    response = make_response(message, 200, to_tag="srv",
                             extra=[("server", "PBX"), ("Contact", "<sip:bob@192.0.2.1>")])
    assert response.headers.get("To") == "<sip:bob@example.com;tag=uri-param-not-a-to-tag>;tag=srv"
    assert response.headers.items()[-2:] == [("Server", "PBX"), ("Contact", "<sip:bob@192.0.2.1>")]
    assert response.top_via is top
    tagged = make_response(parse(message.to_bytes().replace(b"tag=uri", b"x=uri").replace(
        b">\r\nFrom", b">;tag=abc\r\nFrom")), 200, to_tag="srv")  # type: ignore[arg-type]
    assert tagged.to.tag == "abc"
    with pytest.raises(ValueError):
        make_response(message, 200, extra=[("X-Bad", "a\r\nInjected: yes")])
