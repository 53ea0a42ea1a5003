"""URI parsing and canonical serialisation (RFC 3261 §19.1, RFC 3966, RFC 4475 style)."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SIPParseError
from pbx.sip.uri import URI, format_hostport, parse_hostport


def test_full_sip_uri_fields() -> None:
    u = URI.parse("sip:alice:secret@Atlanta.Example.COM:5061;transport=TCP;lr?subject=hi&x=1")
    assert u.scheme == "sip"
    assert u.user == "alice"
    assert u.password == "secret"
    assert u.host == "atlanta.example.com"  # hosts are case-insensitive: lower-cased
    assert u.port == 5061
    assert u.params == {"transport": "TCP", "lr": None}
    assert u.transport == "tcp"
    assert u.headers == {"subject": "hi", "x": "1"}
    assert str(u) == "sip:alice:secret@atlanta.example.com:5061;transport=TCP;lr?subject=hi&x=1"


def test_host_only_and_sips() -> None:
    u = URI.parse("SIPS:registrar.example.com")
    assert (u.scheme, u.user, u.host, u.port) == ("sips", None, "registrar.example.com", None)
    assert str(u) == "sips:registrar.example.com"


def test_param_order_is_preserved_and_names_lowercased() -> None:
    u = URI.parse("sip:h;Z=1;a=2;M")
    assert list(u.params) == ["z", "a", "m"]
    assert str(u) == "sip:h;z=1;a=2;m"


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("sip:[::1]:5060", "::1", 5060, "sip:[::1]:5060"),
        ("sip:user@[2001:DB8:0:0::1]", "2001:db8::1", None, "sip:user@[2001:db8::1]"),
        ("sip:[2001:db8::10:5070]", "2001:db8::10:5070", None, "sip:[2001:db8::10:5070]"),
        ("sip:[::ffff:192.0.2.1];transport=udp", None, None, None),
    ],
)
def test_ipv6_references(text: str, host: str | None, port: int | None,
                         canonical: str | None) -> None:
    u = URI.parse(text)
    if host is not None:
        assert u.host == host
        assert u.port == port
    if canonical is not None:
        assert str(u) == canonical
    assert URI.parse(str(u)) == u
    assert ":" in u.host and "[" not in u.host  # stored without brackets


def test_escaped_user_is_unescaped_and_reescaped_minimally() -> None:
    # RFC 4475 §3.1.1.2 ("escruri") style: escapes in the user part.
    u = URI.parse("sip:sips%3Auser%40example.com@example.net")
    assert u.user == "sips:user@example.com"
    assert u.host == "example.net"
    assert str(u) == "sip:sips%3Auser%40example.com@example.net"
    # Escaped unreserved characters are equivalent to the plain ones (RFC 3261 §19.1.4).
    assert URI.parse("sip:%61lice@atlanta.com") == URI.parse("sip:alice@atlanta.com")
    assert str(URI.parse("sip:%61lice@atlanta.com")) == "sip:alice@atlanta.com"


def test_user_with_reserved_user_unreserved_chars_and_params() -> None:
    u = URI.parse("sip:alice;day=tuesday@atlanta.com")
    assert u.user == "alice;day=tuesday"
    assert u.params == {}
    assert str(u) == "sip:alice;day=tuesday@atlanta.com"


def test_user_with_space_and_unicode_is_escaped() -> None:
    u = URI(user="alice smith ü", host="example.com")
    assert str(u) == "sip:alice%20smith%20%C3%BC@example.com"
    assert URI.parse(str(u)).user == "alice smith ü"


def test_invalid_utf8_escape_survives_round_trip() -> None:
    u = URI.parse("sip:%FF%fe@h")
    assert str(u) == "sip:%FF%FE@h"
    assert URI.parse(str(u)) == u


def test_escaped_params_and_headers() -> None:
    u = URI.parse("sip:h;maddr=%31.2.3.4;x=a%3Bb?Replaces=abc%40d%3Bto-tag%3D1")
    assert u.params == {"maddr": "1.2.3.4", "x": "a;b"}
    assert u.headers == {"Replaces": "abc@d;to-tag=1"}
    assert str(u) == "sip:h;maddr=1.2.3.4;x=a%3Bb?Replaces=abc%40d%3Bto-tag%3D1"


def test_tel_uri() -> None:
    u = URI.parse("tel:+1-201-555-0123;phone-context=example.com")
    assert u.scheme == "tel"
    assert u.user == "+1-201-555-0123"
    assert u.host == ""
    assert u.params == {"phone-context": "example.com"}
    assert str(u) == "tel:+1-201-555-0123;phone-context=example.com"


def test_copy_is_independent() -> None:
    u = URI.parse("sip:a@b;lr")
    c = u.copy()
    c.params["transport"] = "tcp"
    assert "transport" not in u.params
    assert c != u


@pytest.mark.parametrize(
    "text",
    [
        "", "sip:", "sip:@host", "sip:user@", "sip:host:port", "sip:host:70000",
        "sip:host:", "sip:[::1", "sip:[zz::1]", "sip:[::1]x", "sip:ho st", "sip:a@-h",
        "http://example.com", "mailto:a@b", "sip:h;=x", "tel:", "tel:12 34", "sip:h?=v",
        "sip:hé.com", "sip:1.2.3.4:5060:1",
    ],
)
def test_invalid_uris_raise_parse_error(text: str) -> None:
    with pytest.raises(SIPParseError):
        URI.parse(text)


def test_unsupported_scheme_reason() -> None:
    with pytest.raises(SIPParseError) as exc:
        URI.parse("urn:service:sos")
    assert exc.value.reason == "Unsupported URI scheme"


def test_hostport_helpers() -> None:
    assert parse_hostport("Example.com:5060") == ("example.com", 5060)
    assert parse_hostport("[::1]") == ("::1", None)
    assert format_hostport("::1", 5060) == "[::1]:5060"
    assert format_hostport("h", None) == "h"
    with pytest.raises(SIPParseError):
        parse_hostport("h:99999")


def test_equality_is_field_based() -> None:
    assert URI.parse("sip:a@H.com;lr") == URI.parse("sip:a@h.com;LR")
    assert URI.parse("sip:a@h.com") != URI.parse("sip:A@h.com")  # user is case-sensitive
    assert URI.parse("sip:a@h.com") != URI.parse("sips:a@h.com")
