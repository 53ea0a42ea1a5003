"""Header container, name canonicalisation, lists, params and structured values."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import (
    CSeq,
    Headers,
    NameAddress,
    Via,
    canonical_name,
    format_params,
    parse_params,
    quote_string,
    split_comma_list,
    unquote_string,
)
from pbx.sip.uri import URI

# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("i", "Call-ID"), ("m", "Contact"), ("e", "Content-Encoding"), ("l", "Content-Length"),
        ("f", "From"), ("t", "To"), ("v", "Via"), ("k", "Supported"), ("s", "Subject"),
        ("c", "Content-Type"), ("o", "Event"), ("u", "Allow-Events"), ("r", "Refer-To"),
        ("b", "Referred-By"), ("x", "Session-Expires"), ("a", "Accept-Contact"),
        ("j", "Reject-Contact"), ("d", "Request-Disposition"), ("y", "Identity"),
        ("n", "Identity-Info"), ("I", "Call-ID"), ("V", "Via"),
        ("call-id", "Call-ID"), ("CALL-ID", "Call-ID"), ("cSeQ", "CSeq"),
        ("www-authenticate", "WWW-Authenticate"), ("max-forwards", "Max-Forwards"),
        ("RECORD-route", "Record-Route"), ("proxy-authorization", "Proxy-Authorization"),
        ("x-my-HEADER", "X-My-Header"), ("p-asserted-identity", "P-Asserted-Identity"),
        ("Via ", "Via"),
    ],
)
def test_canonical_name(raw: str, canonical: str) -> None:
    assert canonical_name(raw) == canonical


@pytest.mark.parametrize("bad", ["", "a b", "Via:", "Ü-Header", "x\x00"])
def test_canonical_name_rejects_non_tokens(bad: str) -> None:
    with pytest.raises(SIPParseError):
        canonical_name(bad)


# -- container -----------------------------------------------------------------------


def test_headers_are_case_insensitive_and_compact_forms_normalised() -> None:
    h = Headers([("v", "SIP/2.0/UDP a"), ("call-id", "x@y"), ("VIA", "SIP/2.0/UDP b")])
    assert h.items() == [("Via", "SIP/2.0/UDP a"), ("Call-ID", "x@y"), ("Via", "SIP/2.0/UDP b")]
    assert h.get("i") == "x@y"
    assert h.get("CALL-id") == "x@y"
    assert "i" in h and "Call-ID" in h and "To" not in h
    assert "bad name" not in h
    assert len(h) == 3


def test_get_default_and_first_value() -> None:
    h = Headers([("Subject", "one"), ("Subject", "two")])
    assert h.get("Subject") == "one"
    assert h.get("To") is None
    assert h.get("To", "dflt") == "dflt"


def test_getall_splits_list_headers_across_lines_and_commas() -> None:
    h = Headers([
        ("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2"),
        ("Via", "SIP/2.0/UDP c;branch=z9hG4bK3"),
        ("Contact", '"Doe, John" <sip:j@h;x=a,b>;q=0.5, <sip:k@h>'),
        ("Allow", "INVITE,ACK , ,BYE"),
    ])
    assert h.getall("Via") == [
        "SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/TCP b;branch=z9hG4bK2",
        "SIP/2.0/UDP c;branch=z9hG4bK3",
    ]
    assert h.get("Via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.getall("m") == ['"Doe, John" <sip:j@h;x=a,b>;q=0.5', "<sip:k@h>"]
    assert h.getall("Allow") == ["INVITE", "ACK", "BYE"]


def test_getall_does_not_split_auth_and_date() -> None:
    auth = 'Digest username="bob", realm="x", nonce="n", response="r", algorithm=MD5'
    date = "Sat, 13 Nov 2010 23:29:00 GMT"
    h = Headers([("Authorization", auth), ("WWW-Authenticate", auth), ("Date", date)])
    assert h.getall("Authorization") == [auth]
    assert h.getall("www-authenticate") == [auth]
    assert h.get("Date") == date


def test_set_replaces_all_at_first_position() -> None:
    h = Headers([("X-A", "1"), ("Via", "v1"), ("X-B", "2"), ("Via", "v2")])
    h.set("v", "new")
    assert h.items() == [("X-A", "1"), ("Via", "new"), ("X-B", "2")]
    h.set("X-C", "3")
    assert h.items()[-1] == ("X-C", "3")


def test_add_first_and_remove() -> None:
    h = Headers([("From", "f"), ("Via", "v1")])
    h.add("Via", "v0", first=True)
    assert h.items() == [("From", "f"), ("Via", "v0"), ("Via", "v1")]
    h.add("Route", "<sip:r>", first=True)
    assert h.items()[0] == ("Route", "<sip:r>")
    h.add("Via", "v2")
    assert h.getall("Via") == ["v0", "v1", "v2"]
    assert h.remove("via") == 3
    assert "Via" not in h
    assert h.remove("via") == 0


def test_values_are_trimmed_and_injection_refused() -> None:
    h = Headers()
    h.add("Subject", "  hello\t")
    assert h.get("Subject") == "hello"
    for bad in ("a\r\nVia: x", "a\nb", "a\x00"):
        with pytest.raises(ValueError):
            h.add("Subject", bad)


def test_copy_equality_and_version_bump() -> None:
    h = Headers([("To", "t")])
    c = h.copy()
    assert c == h and c is not h
    ver = c._ver
    c.add("From", "f")
    assert c != h
    assert c._ver > ver
    assert h.items() == [("To", "t")]
    assert Headers([("to", "t")]) == Headers([("To", "t")])


# -- comma lists, quoted strings, params -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ("a, b,c", ["a", "b", "c"]),
        ('"a, b" <sip:x>, c', ['"a, b" <sip:x>', "c"]),
        ('"quote \\" , inside" <sip:x>, d', ['"quote \\" , inside" <sip:x>', "d"]),
        ("<sip:a@b;x=1,2>;p=q, <sip:c>", ["<sip:a@b;x=1,2>;p=q", "<sip:c>"]),
        ("", []),
        (" , ,", []),
        ("single", ["single"]),
    ],
)
def test_split_comma_list(value: str, items: list[str]) -> None:
    assert split_comma_list(value) == items


def test_quote_and_unquote_strings() -> None:
    assert quote_string('say "hi" \\o/') == '"say \\"hi\\" \\\\o/"'
    assert unquote_string('"say \\"hi\\" \\\\o/"') == 'say "hi" \\o/'
    assert unquote_string("token") == "token"
    with pytest.raises(SIPParseError):
        unquote_string('"open')
    with pytest.raises(SIPParseError):
        unquote_string('"a"b')
    with pytest.raises(ValueError):
        quote_string("a\r\nb")


def test_parse_params() -> None:
    p = parse_params(' ; Tag = abc ;lr; expires=60;+sip.instance="<urn:uuid:1;2>";q=0.7')
    assert p == {"tag": "abc", "lr": None, "expires": "60",
                 "+sip.instance": '"<urn:uuid:1;2>"', "q": "0.7"}
    assert format_params(p) == ';tag=abc;lr;expires=60;+sip.instance="<urn:uuid:1;2>";q=0.7'
    assert parse_params("") == {}
    for bad in (";a b=c", ";=x", ';a="open', ";a=b c"):
        with pytest.raises(SIPParseError):
            parse_params(bad)


# -- Via ---------------------------------------------------------------------------------------


def test_via_parse_fields_and_properties() -> None:
    v = Via.parse(
        "SIP/2.0/udp pc33.Atlanta.com:5066;branch=z9hG4bK776;rport;received=1.2.3.4")
    assert (v.protocol, v.transport, v.host, v.port) == ("SIP/2.0", "UDP", "pc33.atlanta.com",
                                                         5066)
    assert v.branch == "z9hG4bK776"
    assert v.received == "1.2.3.4"
    assert "rport" in v.params and v.params["rport"] is None
    assert v.rport is None and v.rport_requested
    v.params["rport"] = "5070"
    assert v.rport == 5070
    assert str(v) == (
        "SIP/2.0/UDP pc33.atlanta.com:5066;branch=z9hG4bK776;rport=5070;received=1.2.3.4")


def test_via_unusual_whitespace_and_ipv6() -> None:
    v = Via.parse("SIP / 2.0 / TCP   [2001:db8::9:1] : 5060 ; branch = z9hG4bKx "
                  ";received=2001:db8::9:255")
    assert v.transport == "TCP"
    assert v.host == "2001:db8::9:1"
    assert v.port == 5060
    assert v.params == {"branch": "z9hG4bKx", "received": "2001:db8::9:255"}
    assert str(v) == "SIP/2.0/TCP [2001:db8::9:1]:5060;branch=z9hG4bKx;received=2001:db8::9:255"
    assert Via.parse(str(v)) == v
    assert Via.parse("SIP/2.0/UDP h").rport_requested is False


@pytest.mark.parametrize("bad", ["", "SIP/2.0 host", "SIP/2.0/UDP", "SIP/2.0/UDP h:x",
                                 "SIP/2.0/UDP [::1", "SIP/2.0/UDP h;branch=a b"])
def test_via_invalid(bad: str) -> None:
    with pytest.raises(SIPParseError):
        Via.parse(bad)


# -- NameAddress -----------------------------------------------------------------------------


def test_name_addr_with_quoted_display_and_escapes() -> None:
    na = NameAddress.parse('"Alice \\"Al\\" O\'Neil" <sip:alice@atlanta.com>;tag=1928301774')
    assert na.display_name == 'Alice "Al" O\'Neil'
    assert na.uri == URI.parse("sip:alice@atlanta.com")
    assert na.tag == "1928301774"
    assert str(na) == '"Alice \\"Al\\" O\'Neil" <sip:alice@atlanta.com>;tag=1928301774'


def test_name_addr_token_display_name_is_canonicalised_to_quoted() -> None:
    na = NameAddress.parse("Bob   Smith<sip:bob@biloxi.com> ; tag = a6c85cf")
    assert na.display_name == "Bob Smith"
    assert na.tag == "a6c85cf"
    assert str(na) == '"Bob Smith" <sip:bob@biloxi.com>;tag=a6c85cf'


def test_addr_spec_params_belong_to_header() -> None:
    na = NameAddress.parse("sip:alice@atlanta.com;tag=x;transport=tcp")
    assert na.display_name is None
    assert na.uri is not None and na.uri.params == {}
    assert na.params == {"tag": "x", "transport": "tcp"}
    assert str(na) == "<sip:alice@atlanta.com>;tag=x;transport=tcp"


def test_name_addr_uri_params_stay_in_uri() -> None:
    na = NameAddress.parse("<sip:a@b;transport=tcp;lr>;expires=60;q=0.5")
    assert na.uri is not None and na.uri.params == {"transport": "tcp", "lr": None}
    assert na.params == {"expires": "60", "q": "0.5"}


def test_name_addr_display_with_angle_brackets_in_quotes_and_ipv6() -> None:
    na = NameAddress.parse('"<not a uri>" <sip:[::1]:5070>')
    assert na.display_name == "<not a uri>"
    assert na.uri is not None and (na.uri.host, na.uri.port) == ("::1", 5070)
    assert str(na) == '"<not a uri>" <sip:[::1]:5070>'


def test_empty_quoted_display_name_kept_distinct_from_none() -> None:
    assert NameAddress.parse('"" <sip:a@b>').display_name == ""
    assert NameAddress.parse("<sip:a@b>").display_name is None
    assert str(NameAddress.parse('"" <sip:a@b>')) == '"" <sip:a@b>'


def test_contact_wildcard() -> None:
    na = NameAddress.parse(" * ")
    assert na.is_wildcard
    assert na.uri is None
    assert str(na) == "*"
    assert NameAddress.wildcard() == na
    assert not NameAddress.parse("<sip:a@b>").is_wildcard


@pytest.mark.parametrize("bad", ['"Alice <sip:a@b>', '"Alice" sip:a@b', "<sip:a@b", "<sip:a@b> x",
                                 "Al>ice <sip:a@b>", "<http://x>", ""])
def test_name_addr_invalid(bad: str) -> None:
    with pytest.raises(SIPParseError):
        NameAddress.parse(bad)


# -- CSeq -------------------------------------------------------------------------------------


def test_cseq() -> None:
    c = CSeq.parse(" 4711   INVITE ")
    assert c == CSeq(4711, "INVITE")
    assert str(c) == "4711 INVITE"


@pytest.mark.parametrize("bad", ["", "INVITE", "1", "x INVITE", "-1 INVITE", "2147483648 INVITE",
                                 "1 INV ITE", "\u0661 INVITE", "36893488147419103232 INVITE"])
def test_cseq_invalid(bad: str) -> None:
    with pytest.raises(SIPParseError):
        CSeq.parse(bad)
