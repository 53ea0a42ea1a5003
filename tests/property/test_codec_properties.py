"""Property tests of the SIP codec: round-trips, idempotence and robustness.

Example counts come from the profile in tests/conftest.py (``ci`` / ``fuzz``).
"""

from __future__ import annotations

import contextlib
import itertools
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import CSeq, Headers, NameAddress, Via, quote_string
from pbx.sip.message import Request, Response, SIPMessage, StreamFramer, parse
from pbx.sip.uri import URI

TOKEN_CHARS = string.ascii_letters + string.digits + "-.!%*_+`'~"

tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12)
lower_tokens = tokens.map(str.lower)
# Printable text of any script: no control characters, no surrogates.
texts = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=20)
nonempty_texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)

labels = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
hosts = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.none() | st.integers(0, 65535)
uri_params = st.dictionaries(
    nonempty_texts.filter(lambda s: s == s.lower()), st.none() | texts, max_size=3
)


@st.composite
def sip_uris(draw: st.DrawFn) -> URI:
    user = draw(st.none() | nonempty_texts)
    password = draw(st.none() | texts) if user is not None else None
    headers = draw(st.dictionaries(nonempty_texts, texts, max_size=2))
    return URI(draw(st.sampled_from(["sip", "sips"])), user, draw(hosts), draw(ports),
               draw(uri_params), headers, password)


tel_uris = st.builds(
    lambda num, params: URI("tel", num, "", None, params),
    st.from_regex(r"\+?[0-9][0-9\-]{0,14}", fullmatch=True),
    uri_params,
)
uris = st.one_of(sip_uris(), tel_uris)

param_values = st.one_of(st.none(), tokens, texts.map(quote_string))
header_params = st.dictionaries(lower_tokens, param_values, max_size=3)

name_addresses = st.builds(
    NameAddress,
    display_name=st.none() | texts,
    uri=uris,
    params=header_params,
)

vias = st.builds(
    Via,
    protocol=st.just("SIP/2.0"),
    transport=st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS", "WSS"]),
    host=hosts,
    port=ports,
    params=st.fixed_dictionaries(
        {"branch": tokens.map(lambda t: "z9hG4bK" + t)},
        optional={
            "rport": st.none() | st.integers(1, 65535).map(str),
            "received": st.ip_addresses().map(str),
        },
    ),
)

header_text = st.text(
    st.characters(exclude_categories=("Cc", "Cs"), include_characters="\t"), max_size=40
)
extra_headers = st.lists(st.tuples(tokens.map(lambda t: "X-" + t), header_text), max_size=4)
methods = st.one_of(st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS"]),
                    tokens)


@st.composite
def common_headers(draw: st.DrawFn, method: str) -> Headers:
    via_list = draw(st.lists(vias, min_size=1, max_size=3))
    h = Headers()
    if draw(st.booleans()):
        h.add("Via", ", ".join(map(str, via_list)))
    else:
        for v in via_list:
            h.add("Via", str(v))
    h.add("From", str(draw(name_addresses)))
    h.add("To", str(draw(name_addresses)))
    h.add("Call-ID", draw(tokens) + "@" + draw(hostnames))
    h.add("CSeq", str(CSeq(draw(st.integers(0, 2**31 - 1)), method)))
    if draw(st.booleans()):
        h.add("Max-Forwards", str(draw(st.integers(0, 255))))
    for name, value in draw(extra_headers):
        h.add(name, value)
    return h


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(methods)
    body = draw(st.binary(max_size=200))
    return Request(method, draw(uris), draw(common_headers(method)), body)


@st.composite
def responses(draw: st.DrawFn) -> Response:
    headers = draw(common_headers(draw(methods)))
    reason = draw(st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=30))
    return Response(draw(st.integers(100, 699)), reason, headers, draw(st.binary(max_size=200)))


messages = st.one_of(requests(), responses())


# -- structured values round-trip ----------------------------------------------------------


@given(uris)
def test_uri_round_trip(uri: URI) -> None:
    assert URI.parse(str(uri)) == uri


@given(name_addresses)
def test_name_address_round_trip(na: NameAddress) -> None:
    assert NameAddress.parse(str(na)) == na


@given(vias)
def test_via_round_trip(via: Via) -> None:
    assert Via.parse(str(via)) == via


@given(st.lists(name_addresses, min_size=1, max_size=4), st.booleans())
def test_comma_lists_split_back_into_items(contacts: list[NameAddress], one_line: bool) -> None:
    h = Headers()
    if one_line:
        h.add("Contact", " , ".join(map(str, contacts)))
    else:
        for c in contacts:
            h.add("m", str(c))
    assert [NameAddress.parse(v) for v in h.getall("Contact")] == contacts
    assert NameAddress.parse(h.get("Contact") or "") == contacts[0]


# -- messages ------------------------------------------------------------------------------


@given(messages, st.binary(max_size=20))
def test_message_round_trip(msg: Request | Response, junk: bytes) -> None:
    data = msg.to_bytes()
    parsed = parse(data)
    assert parsed == msg
    assert parse(data, datagram=False) == msg
    assert parse(b"\r\n" + data + junk) == msg  # datagram: bytes beyond Content-Length dropped
    assert parsed.to_bytes() == data
    assert parsed.vias == msg.vias
    assert parsed.from_ == msg.from_
    assert parsed.to == msg.to
    assert parsed.cseq == msg.cseq
    if isinstance(msg, Request):
        assert isinstance(parsed, Request)
        assert parsed.uri == msg.uri


@given(st.lists(messages, min_size=1, max_size=4),
       st.lists(st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]), min_size=4, max_size=4),
       st.lists(st.integers(0, 5000), max_size=8))
def test_stream_framer_reassembles(msgs: list[SIPMessage], gaps: list[bytes],
                                   cuts: list[int]) -> None:
    blobs = [m.to_bytes() for m in msgs]
    stream = b"".join(gap + blob for gap, blob in zip(gaps, blobs, strict=False))
    framer = StreamFramer()
    frames: list[bytes] = []
    pings = 0
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        frames += framer.feed(stream[a:b])
        pings += framer.take_pings()
    assert frames == blobs
    assert pings == gaps[: len(blobs)].count(b"\r\n\r\n")
    assert [parse(f, datagram=False) for f in frames] == msgs


# -- robustness -----------------------------------------------------------------------------


def _check_total(data: bytes, datagram: bool = True) -> None:
    """parse() returns or raises SIPParseError; a result is canonical and its views safe."""
    try:
        msg = parse(data, datagram=datagram)
    except SIPParseError as err:
        assert err.reason and "\n" not in err.reason and "\r" not in err.reason
        if err.partial is not None:
            assert isinstance(err.partial, Request)
        return
    again = parse(msg.to_bytes())
    assert again == msg
    assert again.to_bytes() == msg.to_bytes()
    for attr in ("vias", "from_", "to", "cseq", "call_id", "max_forwards", "contacts"):
        with contextlib.suppress(SIPParseError):
            getattr(msg, attr)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_parse_error(data: bytes) -> None:
    _check_total(data)
    _check_total(data, datagram=False)


_PREFIXES = [
    b"INVITE sip:bob@example.com SIP/2.0\r\n",
    b"SIP/2.0 200 OK\r\n",
    b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n",
]


@given(st.sampled_from(_PREFIXES), st.binary(max_size=300))
def test_plausible_prefix_then_garbage(prefix: bytes, tail: bytes) -> None:
    _check_total(prefix + tail)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(messages).to_bytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b",", b"\"",
                                                   b"<", b";", b":", b"\xff", b"\r\n "]))
        elif data:
            del data[pos]
    return bytes(data)


@given(mutated())
def test_mutated_messages_only_raise_parse_error(data: bytes) -> None:
    _check_total(data)


@given(st.lists(st.binary(max_size=200), max_size=6))
def test_framer_on_garbage_only_raises_parse_error(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_size=1000)
    try:
        for chunk in chunks:
            for frame in framer.feed(chunk):
                _check_total(frame, datagram=False)
    except SIPParseError as err:
        assert err.reason


@settings(deadline=None)
@given(texts)
def test_uri_parse_on_text_only_raises_parse_error(text: str) -> None:
    for candidate in (text, "sip:" + text, "tel:" + text, "sips:" + text + "@h"):
        try:
            uri = URI.parse(candidate)
        except SIPParseError:
            continue
        assert URI.parse(str(uri)) == uri
