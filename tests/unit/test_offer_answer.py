"""RFC 3264 offer/answer in the media session: hold from offer and answer, rollback,
codec subset, m-line count, SRTP pass-through, refusals with a warn-code."""

from __future__ import annotations

import pytest

from pbx.media import MediaSession, PortAllocator
from pbx.media.negotiation import (
    WARN_INCOMPATIBLE_FORMAT,
    WARN_INCOMPATIBLE_TRANSPORT,
    WARN_MEDIA_NOT_AVAILABLE,
    NegotiationError,
    answer_direction,
    negotiated_direction,
    warning_header,
)
from pbx.sip.sdp import direction, parse, rtpmap
from tests.unit.test_media_session import FakeReactor, rtp

A = ("192.0.2.1", 4000)
B = ("192.0.2.2", 6000)
CRYPTO = ("a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
          "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32")


def body(host: str, port: int, *, proto: str = "RTP/AVP", formats: str = "0 8 101",
         attrs: tuple[str, ...] = ("a=rtpmap:101 telephone-event/8000",),
         extra: str = "", conn: str | None = None) -> bytes:
    lines = ["v=0", f"o=ep 1 1 IN IP4 {host}", "s=-", f"c=IN IP4 {conn or host}", "t=0 0",
             f"m=audio {port} {proto} {formats}", *attrs]
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


def session() -> MediaSession:
    s = MediaSession(FakeReactor(), PortAllocator(30000, 30099), host="10.0.0.5",
                     advertise="203.0.113.7", media_timeout=20.0)
    s.start()
    return s


def up() -> MediaSession:
    s = session()
    s.offer_from_a(body(*A))
    s.answer_from_b(body(*B))
    return s


def test_direction_tables_follow_rfc3264_6_1() -> None:
    assert answer_direction("inactive", "sendrecv") == "inactive"
    assert answer_direction("sendonly", "sendrecv") == "recvonly"
    assert answer_direction("recvonly", "sendrecv") == "sendonly"
    assert answer_direction("sendrecv", "recvonly") == "recvonly"
    assert negotiated_direction("sendrecv", "inactive") == "inactive"
    assert negotiated_direction("sendonly", "recvonly") == "sendonly"
    assert warning_header(304, "pbx.test") == ("Warning",
                                               '304 pbx.test "Media type not available"')


def test_hold_answered_inactive_stays_held_across_the_other_sides_reoffer() -> None:
    s = up()
    s.reoffer("a", body(*A, attrs=("a=inactive",)))
    s.reanswer("b", body(*B, attrs=("a=inactive",)))
    assert s.state == "on_hold"
    # B re-offers sendrecv; the held A answers inactive: still on hold (the old bug).
    s.reoffer("b", body(*B))
    assert s.state == "on_hold"
    for_b = parse(s.reanswer("a", body(*A, attrs=("a=inactive",))))
    assert direction(for_b, for_b.media[0]) == "inactive"
    assert s.state == "on_hold" and s.direction == "inactive"


def test_an_answer_breaking_the_direction_table_is_corrected() -> None:
    s = up()
    s.reoffer("a", body(*A, attrs=("a=sendonly",)))
    for_a = parse(s.reanswer("b", body(*B, attrs=("a=sendrecv",))))
    assert direction(for_a, for_a.media[0]) == "recvonly"
    assert s.state == "on_hold"


def test_a_rejected_reoffer_rolls_back_address_and_direction() -> None:
    s = up()
    reactor: FakeReactor = s.clock  # type: ignore[assignment]
    s.reoffer("a", body("192.0.2.99", 7000, attrs=("a=sendonly",)))
    s.reject_offer("a")
    assert s.state == "active"
    s.legs["b"].rtp.datagramReceived(rtp(1), B)
    assert reactor.sent[-1][2] == A  # still the old address
    s.reoffer("b", body(*B, attrs=("a=sendonly",)))  # the next exchange works
    s.reanswer("a", body(*A, attrs=("a=recvonly",)))
    assert s.state == "on_hold"


def test_the_answer_is_a_subset_of_the_offer_with_its_payload_numbers() -> None:
    s = session()
    offer = body(*A, formats="0 8 96 101",
                 attrs=("a=rtpmap:96 G722/8000", "a=fmtp:96 x=1",
                        "a=rtpmap:101 telephone-event/8000"))
    s.offer_from_a(offer)
    # The callee answers PCMA, a codec never offered (GSM), and renumbers telephone-event.
    answer = body(*B, formats="8 3 100",
                  attrs=("a=rtpmap:100 telephone-event/8000", "a=fmtp:100 0-15"))
    for_a = parse(s.answer_from_b(answer))
    media = for_a.media[0]
    assert media.formats == ["8", "101"]
    assert rtpmap(media)["101"] == ("TELEPHONE-EVENT", 8000)
    assert "fmtp:101 0-15" in [v for k, v in media.lines if k == "a"]


def test_no_common_codec_in_the_answer_is_refused_with_305() -> None:
    s = session()
    s.offer_from_a(body(*A, formats="0"))
    with pytest.raises(NegotiationError) as info:
        s.answer_from_b(body(*B, formats="8"))
    assert info.value.warning == WARN_INCOMPATIBLE_FORMAT and info.value.status == 488


def test_an_offer_without_a_usable_codec_is_refused_with_304() -> None:
    s = session()
    with pytest.raises(NegotiationError) as info:
        s.offer_from_a(body(*A, formats="18 101",
                            attrs=("a=rtpmap:101 telephone-event/8000",)))
    assert info.value.warning == WARN_MEDIA_NOT_AVAILABLE


def test_extra_m_lines_are_declined_with_port_zero_and_never_dropped() -> None:
    s = session()
    video = "m=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\nm=audio 4004 RTP/AVP 0\r\n"
    for_b = parse(s.offer_from_a(body(*A, extra=video)))
    assert [(m.kind, m.port == 0) for m in for_b.media] == [
        ("audio", False), ("video", True), ("audio", True)]
    # A callee that answers only the first m-line still gives the caller three.
    for_a = parse(s.answer_from_b(body(*B)))
    assert [(m.kind, m.port) for m in for_a.media] == [
        ("audio", s.local_port("a")), ("video", 0), ("audio", 0)]
    assert for_a.media[1].formats == ["96"]


def test_srtp_crypto_lines_pass_through_untouched() -> None:
    s = session()
    offer = body(*A, proto="RTP/SAVP", attrs=("a=rtpmap:101 telephone-event/8000", CRYPTO))
    for_b = s.offer_from_a(offer)
    assert CRYPTO.encode() + b"\r\n" in for_b and b"RTP/SAVP" in for_b
    answer_crypto = CRYPTO.replace("WVNf", "QUJD")
    for_a = s.answer_from_b(body(*B, proto="RTP/SAVP", attrs=(answer_crypto,)))
    assert answer_crypto.encode() + b"\r\n" in for_a


def test_an_srtp_profile_mismatch_is_refused_never_downgraded() -> None:
    s = session()
    s.offer_from_a(body(*A, proto="RTP/SAVP", attrs=(CRYPTO,)))
    with pytest.raises(NegotiationError) as info:
        s.answer_from_b(body(*B, proto="RTP/AVP"))
    assert info.value.warning == WARN_INCOMPATIBLE_TRANSPORT


def test_an_unknown_payload_type_mid_call_is_relayed() -> None:
    s = up()
    reactor: FakeReactor = s.clock  # type: ignore[assignment]
    s.reoffer("a", body(*A, formats="0 77"))  # 77: no rtpmap, unknown
    s.reanswer("b", body(*B, formats="0 77"))
    s.legs["a"].rtp.datagramReceived(rtp(1, pt=77), A)
    s.legs["b"].rtp.datagramReceived(rtp(1, pt=99), B)
    assert [addr for _port, _data, addr in reactor.sent] == [B, A]
