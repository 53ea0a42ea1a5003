"""SDP codec properties: canonical round trip, and the parser raises only SDPError."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pbx.sip.sdp import (
    Media,
    Origin,
    SDPError,
    SessionDescription,
    filter_codecs,
    is_hold,
    parse,
    rewrite_media,
    rtpmap,
    serialize,
)

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./+_",
                min_size=1, max_size=10)
# Values of other lines: anything printable but CR/LF/NUL, including spaces and UTF-8.
VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
                max_size=30)
ADDRESS = st.sampled_from(["192.0.2.1", "0.0.0.0", "10.1.2.3", "2001:db8::5", "host.example"])
PT = st.sampled_from(["0", "8", "9", "18", "96", "101", "127"])
ATTRIBUTE = st.one_of(
    st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive", "ptime:20", "rtcp-mux",
                     "rtpmap:101 telephone-event/8000", "fmtp:101 0-15", "rtpmap:96 opus/48000/2",
                     "rtpmap:97 broken", "rtcp:9999 IN IP4 192.0.2.1", "candidate:1 1 UDP 1 x 1"]),
    VALUE.filter(lambda v: v != ""),
)


@st.composite
def connections(draw: st.DrawFn) -> tuple[str, str]:
    address = draw(ADDRESS)
    return ("c", f"IN {'IP6' if ':' in address else 'IP4'} {address}")


@st.composite
def media_sections(draw: st.DrawFn) -> Media:
    lines: list[tuple[str, str]] = []
    if draw(st.booleans()):
        lines.append(draw(connections()))
    lines += [("a", a) for a in draw(st.lists(ATTRIBUTE, max_size=5))]
    if draw(st.booleans()):
        lines.insert(0, ("i", draw(VALUE)))
    return Media(kind=draw(st.sampled_from(["audio", "video", "image"])),
                 port=draw(st.integers(0, 65535)),
                 proto=draw(st.sampled_from(["RTP/AVP", "RTP/SAVP", "udptl"])),
                 formats=draw(st.lists(PT, min_size=1, max_size=5)),
                 port_count=draw(st.none() | st.integers(1, 4)),
                 lines=lines)


@st.composite
def descriptions(draw: st.DrawFn) -> SessionDescription:
    origin = Origin(draw(TOKEN), str(draw(st.integers(0, 2**63))), draw(st.integers(0, 2**40)),
                    "IN", "IP4", draw(ADDRESS))
    lines = [draw(connections()), ("t", "0 0")]
    lines += [("a", a) for a in draw(st.lists(ATTRIBUTE, max_size=3))]
    return SessionDescription(origin=origin, name=draw(VALUE), lines=lines,
                              media=draw(st.lists(media_sections(), max_size=3)))


@given(descriptions())
def test_serialize_then_parse_is_identity(sdp: SessionDescription) -> None:
    wire = serialize(sdp)
    assert parse(wire) == sdp
    assert serialize(parse(wire)) == wire


def _exercise(sdp: SessionDescription) -> None:
    """Every helper the session uses on a parsed body: only SDPError may escape."""
    is_hold(sdp)
    for i, media in enumerate(sdp.media):
        rtpmap(media)
        filter_codecs(media, ["PCMU", "telephone-event"])
        try:
            out = rewrite_media(sdp, i, address="203.0.113.1", port=40000,
                                origin=Origin("pbx", "1", 2), codecs=["PCMU", "PCMA"])
        except SDPError:
            continue
        assert parse(serialize(out)) == out


@given(st.binary(max_size=300))
def test_parser_raises_only_sdp_error_on_random_bytes(body: bytes) -> None:
    try:
        sdp = parse(body)
    except SDPError:
        return
    _exercise(sdp)


@given(descriptions(), st.data())
def test_parser_raises_only_sdp_error_on_mutated_bodies(sdp: SessionDescription,
                                                        data: st.DataObject) -> None:
    wire = bytearray(serialize(sdp))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.sampled_from([b" ", b"\r\n", b"=", b"m=", b"c=IN", b"/", b"x",
                                           b"\xff", b"0", b"99999", b"\n\n"]))
        if action == "insert":
            wire[pos:pos] = chunk
        elif action == "delete":
            del wire[pos:pos + len(chunk)]
        else:
            wire[pos:pos + len(chunk)] = chunk
    try:
        parsed = parse(bytes(wire))
    except SDPError:
        return
    assert parse(serialize(parsed)) == parsed
    _exercise(parsed)
