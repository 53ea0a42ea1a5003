"""Offer/answer through the real PBX with scripted phones (sipua.py): hold answered
inactive, a rejected re-INVITE's rollback, late offer, codec subset, extra m-lines, SRTP
pass-through, 488 + Warning (issue 11.2, 11.3, 11.5, 11.7).

Both phones signal and send from the same loopback address (no NAT here) and put their
RTP socket's port in their SDP.  Assertions count packets and look at SDP and the ops
API's call state, never at timings.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PBXProcess, clean_env, extension_seed, start_pbx
from .sipua import Net, Phone, RtpEndpoint, rtp_packet

pytestmark = pytest.mark.integration

CALLER, CALLEE = "3101", "3102"
TOKEN = secrets.token_urlsafe(24)
PASSWORDS = {n: secrets.token_urlsafe(12) for n in (CALLER, CALLEE)}
CRYPTO_A = ("a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
            "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32")
CRYPTO_B = ("a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
            "inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj|2^20|1:32")


@pytest.fixture
def pbx(tmp_path: Path) -> Iterator[PBXProcess]:
    base = random.randrange(30000, 39000, 200)
    lines = ["auth:", "  algorithms: [MD5]",
             "calls:", "  ring_timeout: 20", "  media_timeout: 30", "  max_calls: 10",
             "rtp:", f"  port_min: {base}", f"  port_max: {base + 39}"]
    seed, seeded_env = extension_seed({n: PASSWORDS[n] for n in (CALLER, CALLEE)})
    lines += seed
    env = clean_env() | {"PBX_API__TOKEN": TOKEN} | seeded_env
    process = start_pbx(tmp_path, env=env, extra="\n".join(lines) + "\n")
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


def sdp(phone: Phone, *, formats: str = "0 8 101", attrs: tuple[str, ...] = ("a=sendrecv",),
        proto: str = "RTP/AVP", extra: str = "", port: int | None = None) -> bytes:
    host = phone.private_host
    lines = ["v=0", f"o={phone.number} 1 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}",
             "t=0 0", f"m=audio {port or phone.rtp.port} {proto} {formats}"]
    if "101" in formats.split():
        lines.append("a=rtpmap:101 telephone-event/8000")
    lines += attrs
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


def phones(pbx: PBXProcess) -> tuple[Net, Phone, Phone]:
    net = Net()
    address = ("127.0.0.1", pbx.sip_port)
    a = Phone(net, CALLER, PASSWORDS[CALLER], address,
              private_host="127.0.0.1", public_host="127.0.0.1")
    b = Phone(net, CALLEE, PASSWORDS[CALLEE], address,
              private_host="127.0.0.1", public_host="127.0.0.1")
    for phone in (a, b):
        phone.sdp_port = phone.rtp.port  # no NAT: the SDP names the real socket
        phone.register()
    return net, a, b


def api_calls(pbx: PBXProcess) -> list[dict[str, object]]:
    line = pbx.wait_for(r"listening: API HTTP on [\d.]+:\d+")
    match = re.search(r"listening: API HTTP on ([\d.]+):(\d+)", line)
    assert match is not None
    request = urllib.request.Request(f"http://{match.group(1)}:{match.group(2)}/api/calls")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=3) as response:
        data = json.loads(response.read())
    return data["calls"] if isinstance(data, dict) else data


def media_lines(body: bytes) -> list[str]:
    return re.findall(r"^m=([^\r\n]+)", body.decode(), flags=re.M)


def attr_lines(body: bytes, name: str) -> list[str]:
    return re.findall(rf"^(a={name}[^\r\n]*)", body.decode(), flags=re.M)


def stream(net: Net, sender: Phone, receiver: RtpEndpoint, packets: int, ssrc: int,
           payload: bytes) -> None:
    assert sender.remote_rtp is not None
    sent = {"n": 0}
    before = len(receiver.received)

    def tick() -> None:
        if sent["n"] < packets:
            sender.rtp.send(rtp_packet(sent["n"], ssrc, payload * 160), sender.remote_rtp)  # type: ignore[arg-type]
            sent["n"] += 1

    net.run(packets * 0.02 + 3.0, tick=tick,
            until=lambda: sent["n"] >= packets and len(receiver.received) - before >= packets)


def test_hold_answered_inactive_stays_held_across_the_other_sides_reinvite(
        pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    try:
        a.call(CALLEE)
        assert net.run(3.0, until=lambda: b.acked)
        b.answer_sdp = lambda _offer: sdp(b, attrs=("a=inactive",))
        held = a.reinvite(sdp(a, attrs=("a=inactive",)))
        assert held.status == 200 and attr_lines(held.body, "inactive")
        assert [c["media"] for c in api_calls(pbx)] == ["on_hold"]
        # B re-offers sendrecv; A (still holding) answers inactive: the call stays held.
        a.answer_sdp = lambda _offer: sdp(a, attrs=("a=inactive",))
        reply = b.reinvite(sdp(b))
        assert reply.status == 200 and attr_lines(reply.body, "inactive")
        assert [c["media"] for c in api_calls(pbx)] == ["on_hold"]
        a.answer_sdp = lambda _offer: sdp(a)
        resumed = b.reinvite(sdp(b))
        assert resumed.status == 200
        assert [c["media"] for c in api_calls(pbx)] == ["active"]
        a.bye()
    finally:
        a.close()
        b.close()


def test_a_rejected_reinvite_keeps_the_old_media_address(pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    other = RtpEndpoint("127.0.0.1")
    net.add(other.sock, other.readable)
    try:
        a.call(CALLEE)
        assert net.run(3.0, until=lambda: b.acked)
        stream(net, a, b.rtp, 10, 0x1111, b"A")  # both latched on their real sockets
        stream(net, b, a.rtp, 10, 0x2222, b"B")
        b.reinvite_status = 488
        refused = a.reinvite(sdp(a, port=other.port, attrs=("a=sendrecv",)))
        assert refused.status == 488
        before = len(a.rtp.received)
        stream(net, b, a.rtp, 30, 0x2222, b"B")
        assert len(a.rtp.received) - before >= 25  # still the old address (RFC 3264 §8)
        assert other.received == []
        b.reinvite_status = 200
        a.bye()
    finally:
        other.close()
        a.close()
        b.close()


def test_late_offer_caller_invite_without_sdp_gets_two_way_rtp(pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    try:
        final = a.call(CALLEE, body=b"")  # our 200 offers; our ACK answers
        assert final.body and media_lines(final.body)
        assert net.run(3.0, until=lambda: b.acked)
        assert b.invite is not None and b.invite.body == b""
        assert b.ack_bodies and media_lines(b.ack_bodies[-1])  # the answer reached B
        stream(net, a, b.rtp, 40, 0x1111, b"A")
        stream(net, b, a.rtp, 40, 0x2222, b"B")
        assert sum(1 for d, _ in b.rtp.received if d[12:13] == b"A") >= 35
        assert sum(1 for d, _ in a.rtp.received if d[12:13] == b"B") >= 35
        a.bye()
    finally:
        a.close()
        b.close()


def test_the_caller_gets_a_subset_of_its_offer_with_the_same_payload_types(
        pbx: PBXProcess) -> None:
    _net, a, b = phones(pbx)
    try:
        offer = sdp(a, formats="8 96 101", attrs=("a=rtpmap:96 G722/8000", "a=sendrecv"))
        # The callee answers PCMA, and PCMU, which the caller never offered.
        b.answer_sdp = lambda _offer: sdp(b, formats="0 8")
        final = a.call(CALLEE, body=offer)
        assert media_lines(final.body) == [f"audio {a.remote_rtp[1]} RTP/AVP 8"]  # type: ignore[index]
        assert b.invite is not None
        assert media_lines(b.invite.body)[0].endswith("RTP/AVP 8 96 101")
        assert attr_lines(b.invite.body, "rtpmap:96") == ["a=rtpmap:96 G722/8000"]
        a.bye()
    finally:
        a.close()
        b.close()


def test_a_video_m_line_is_declined_and_the_m_line_count_kept(pbx: PBXProcess) -> None:
    _net, a, b = phones(pbx)
    try:
        video = "m=video 40000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
        final = a.call(CALLEE, body=sdp(a, extra=video))  # B answers audio only
        assert b.invite is not None
        offered = media_lines(b.invite.body)
        assert len(offered) == 2 and offered[1].startswith("video 0 ")
        answered = media_lines(final.body)
        assert len(answered) == 2 and answered[0].startswith("audio ")
        assert answered[1] == "video 0 RTP/AVP 96"
        a.bye()
    finally:
        a.close()
        b.close()


def test_srtp_is_passed_through_with_the_crypto_lines_untouched(pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    try:
        b.answer_sdp = lambda _offer: sdp(b, proto="RTP/SAVP", attrs=(CRYPTO_B,))
        final = a.call(CALLEE, body=sdp(a, proto="RTP/SAVP", attrs=(CRYPTO_A,)))
        assert b.invite is not None
        assert attr_lines(b.invite.body, "crypto") == [CRYPTO_A]
        assert " RTP/SAVP " in media_lines(b.invite.body)[0]
        assert attr_lines(final.body, "crypto") == [CRYPTO_B]
        assert net.run(3.0, until=lambda: b.acked)
        stream(net, a, b.rtp, 20, 0x1111, b"S")  # opaque to the relay: relayed as is
        assert sum(1 for d, _ in b.rtp.received if d[12:13] == b"S") >= 15
        a.bye()
    finally:
        a.close()
        b.close()


def test_an_srtp_profile_mismatch_gets_488_never_a_downgrade(pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    try:
        b.answer_sdp = lambda _offer: sdp(b)  # plain RTP/AVP to an RTP/SAVP offer
        final = a.invite_final(CALLEE, body=sdp(a, proto="RTP/SAVP", attrs=(CRYPTO_A,)))
        assert final.status == 488
        assert net.run(3.0, until=lambda: any(r.start.startswith("BYE") for r in b.requests))
    finally:
        a.close()
        b.close()


def test_no_common_codec_gets_488_with_a_warning(pbx: PBXProcess) -> None:
    net, a, b = phones(pbx)
    try:
        final = a.invite_final(CALLEE, body=sdp(a, formats="18"))  # G729 only
        assert final.status == 488
        assert re.match(r'304 \S+ "Media type not available"', final.get("Warning"))
        net.run(0.3)
        assert b.invite is None  # nobody was rung
    finally:
        a.close()
        b.close()
