"""SDP codec and the offer/answer rewriting helpers (RFC 8866, RFC 3264)."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SIPParseError
from pbx.sip.sdp import (
    Origin,
    SDPError,
    codec_names,
    connection_address,
    direction,
    filter_codecs,
    is_hold,
    parse,
    rewrite_media,
    rtpmap,
    serialize,
)

OFFER = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
    b"s=call\r\n"
    b"c=IN IP4 192.0.2.10\r\n"
    b"t=0 0\r\n"
    b"a=tool:phone\r\n"
    b"m=audio 49170 RTP/AVP 0 8 9 18 96 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:96 opus/48000/2\r\n"
    b"a=fmtp:96 useinbandfec=1\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=fmtp:18 annexb=no\r\n"
    b"a=ptime:20\r\n"
    b"a=rtcp:49171\r\n"
    b"a=candidate:1 1 UDP 2130706431 192.0.2.10 49170 typ host\r\n"
    b"a=ice-ufrag:abcd\r\n"
    b"a=sendrecv\r\n"
    b"m=video 51372 RTP/AVP 97\r\n"
    b"a=rtpmap:97 H264/90000\r\n"
)
OURS = Origin("pbx", "42", 7, "IN", "IP4", "203.0.113.5")


def test_parse_reads_session_and_media_sections() -> None:
    sdp = parse(OFFER)
    assert sdp.origin == Origin("alice", "2890844526", 2890844526, "IN", "IP4", "192.0.2.10")
    assert sdp.name == "call"
    assert sdp.connection is not None and sdp.connection.host == "192.0.2.10"
    assert [m.kind for m in sdp.media] == ["audio", "video"]
    audio = sdp.media[0]
    assert (audio.port, audio.proto, audio.formats) == (49170, "RTP/AVP",
                                                       ["0", "8", "9", "18", "96", "101"])
    assert ("ptime", "20") in audio.attributes()
    assert ("sendrecv", None) in audio.attributes()
    assert direction(sdp, audio) == "sendrecv"


def test_serialize_is_canonical_and_round_trips() -> None:
    sdp = parse(OFFER)
    assert serialize(sdp) == OFFER
    lf_only = OFFER.replace(b"\r\n", b"\n")
    assert serialize(parse(lf_only)) == OFFER
    assert parse(serialize(sdp)) == sdp


def test_static_payload_types_are_known_without_rtpmap() -> None:
    media = parse(OFFER).media[0]
    table = rtpmap(media)
    assert table["8"] == ("PCMA", 8000)
    assert table["9"] == ("G722", 8000)
    assert table["96"] == ("OPUS", 48000)
    assert codec_names(media) == ["PCMU", "PCMA", "G722", "G729", "OPUS", "TELEPHONE-EVENT"]


def test_rtpmap_overrides_the_static_table_and_malformed_rtpmap_is_unknown() -> None:
    sdp = parse(b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\n"
                b"m=audio 1000 RTP/AVP 0 97\r\na=rtpmap:0 PCMA/8000\r\na=rtpmap:97 junk\r\n")
    table = rtpmap(sdp.media[0])
    assert table["0"] == ("PCMA", 8000)
    assert "97" not in table


def test_filter_codecs_drops_formats_and_their_rtpmap_fmtp_only() -> None:
    media = filter_codecs(parse(OFFER).media[0], ["pcma", "PCMU", "telephone-event"])
    assert media.formats == ["0", "8", "101"]
    attrs = [v for k, v in media.lines if k == "a"]
    assert "rtpmap:96 opus/48000/2" not in attrs
    assert "fmtp:96 useinbandfec=1" not in attrs
    assert "fmtp:18 annexb=no" not in attrs
    assert "fmtp:101 0-16" in attrs and "ptime:20" in attrs and "sendrecv" in attrs


@pytest.mark.parametrize(
    ("session_attr", "media_attr", "expected"),
    [("", "", "sendrecv"), ("a=sendonly\r\n", "", "sendonly"),
     ("a=sendonly\r\n", "a=inactive\r\n", "inactive"), ("", "a=recvonly\r\n", "recvonly")],
)
def test_direction_media_level_overrides_session_level(
        session_attr: str, media_attr: str, expected: str) -> None:
    body = ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n"
            f"{session_attr}m=audio 1000 RTP/AVP 0\r\n{media_attr}").encode()
    sdp = parse(body)
    assert direction(sdp, sdp.media[0]) == expected


@pytest.mark.parametrize(
    ("conn", "attr", "held"),
    [("1.2.3.4", "a=sendrecv", False), ("1.2.3.4", "a=sendonly", True),
     ("1.2.3.4", "a=inactive", True), ("1.2.3.4", "a=recvonly", False),
     ("0.0.0.0", "a=sendrecv", True)],
)
def test_is_hold(conn: str, attr: str, held: bool) -> None:
    sdp = parse(f"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 {conn}\r\nt=0 0\r\n"
                f"m=audio 1000 RTP/AVP 0\r\n{attr}\r\n".encode())
    assert is_hold(sdp) is held


def test_rewrite_points_media_at_the_relay_and_disables_other_streams() -> None:
    out = rewrite_media(parse(OFFER), 0, address="203.0.113.5", port=30000, origin=OURS,
                        codecs=["PCMU", "PCMA", "G722", "telephone-event"])
    text = serialize(out).decode()
    assert "o=pbx 42 7 IN IP4 203.0.113.5\r\n" in text
    assert "c=IN IP4 203.0.113.5\r\n" in text and "192.0.2.10" not in text
    assert "m=audio 30000 RTP/AVP 0 8 9 101\r\n" in text
    assert "m=video 0 RTP/AVP 97\r\n" in text  # m-line count kept, stream refused
    assert "a=rtcp:" not in text and "candidate" not in text and "ice-ufrag" not in text
    assert "a=sendrecv" in text and "a=ptime:20" in text and "a=tool:phone" in text
    assert parse(text.encode()) == out


def test_rewrite_keeps_the_direction_and_a_null_hold_address() -> None:
    held = OFFER.replace(b"c=IN IP4 192.0.2.10", b"c=IN IP4 0.0.0.0").replace(
        b"a=sendrecv", b"a=inactive")
    out = rewrite_media(parse(held), 0, address="203.0.113.5", port=30000, origin=OURS,
                        codecs=["PCMU"])
    assert connection_address(out, out.media[0]) == "0.0.0.0"
    assert direction(out, out.media[0]) == "inactive"
    assert is_hold(out)


def test_rewrite_replaces_a_media_level_connection_and_adds_one_when_missing() -> None:
    body = (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\n"
            b"m=audio 1000 RTP/AVP 8\r\nc=IN IP4 10.0.0.1\r\n")
    out = rewrite_media(parse(body), 0, address="2001:db8::1", port=2000, origin=OURS,
                        codecs=["PCMA"])
    assert out.media[0].values("c") == ["IN IP6 2001:db8::1"]


def test_rewrite_without_a_common_codec_is_an_sdp_error_with_488() -> None:
    with pytest.raises(SDPError) as info:
        rewrite_media(parse(OFFER), 0, address="1.1.1.1", port=2, origin=OURS,
                      codecs=["telephone-event", "G726"])
    assert info.value.status == 488
    assert isinstance(info.value, SIPParseError)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n",
        b"o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\ns=-\r\n",
        b"v=0\r\no=- x 1 IN IP4 1.2.3.4\r\ns=-\r\n",
        b"v=0\r\no=- 1 1 IN IP4\r\ns=-\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nm=audio 1000 RTP/AVP\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nm=audio 1000 RTP/AVP 0\r\n",  # no c=
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP 0\r\n"
        b"t=0 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nbogus\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=\xff\r\n",
        b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\ns=again\r\n",
    ],
)
def test_malformed_bodies_raise_sdp_error(body: bytes) -> None:
    with pytest.raises(SDPError):
        parse(body)
