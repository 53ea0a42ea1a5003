"""Media learning through the real PBX (issue 11.1) with scripted phones (sipua.py).

A phone "behind NAT" is simulated on loopback: its Contact and SDP name 127.0.0.x while
its SIP and RTP really come from 127.0.0.(x+1) (the NAT's public address).  The callee
rings for several seconds — longer than the old 2 s latch window — before answering.
An attacker on a third loopback address sprays valid-looking RTP at the whole relay
range.  Assertions count packets (which payload reached which phone), never timings.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PBXProcess, clean_env, extension_seed, start_pbx
from .sipua import Net, Phone, RtpEndpoint, rtp_packet

pytestmark = pytest.mark.integration

CALLER, CALLEE = "3001", "3002"


@pytest.fixture
def pbx_setup(tmp_path: Path) -> Iterator[tuple[PBXProcess, dict[str, str], range]]:
    base = random.randrange(30000, 39000, 200)
    passwords = {n: secrets.token_urlsafe(12) for n in (CALLER, CALLEE)}
    lines = ["auth:", "  algorithms: [MD5]",
             "calls:", "  ring_timeout: 20", "  media_timeout: 30", "  max_calls: 10",
             "rtp:", f"  port_min: {base}", f"  port_max: {base + 39}", "  learning_window: 5"]
    seed, seeded_env = extension_seed(passwords)
    lines += seed
    env = clean_env() | seeded_env
    pbx = start_pbx(tmp_path, env=env, extra="\n".join(lines) + "\n")
    yield pbx, passwords, range(base, base + 40)
    if pbx.proc.poll() is None:
        pbx.proc.kill()
        pbx.proc.wait(5)


def _phones(pbx: PBXProcess, passwords: dict[str, str]) -> tuple[Net, Phone, Phone]:
    net = Net()
    address = ("127.0.0.1", pbx.sip_port)
    caller = Phone(net, CALLER, passwords[CALLER], address,
                   private_host="127.0.0.10", public_host="127.0.0.11")
    callee = Phone(net, CALLEE, passwords[CALLEE], address,
                   private_host="127.0.0.20", public_host="127.0.0.21")
    caller.register()
    callee.register()
    return net, caller, callee


def _talk(net: Net, caller: Phone, callee: Phone, packets: int) -> None:
    """Both phones send ``packets`` RTP packets (20 ms apart) to the relay address their
    SDP answer/offer named, from their NAT's public address."""
    assert caller.remote_rtp and callee.remote_rtp
    sent = {"n": 0}

    def tick() -> None:
        n = sent["n"]
        if n < packets:
            caller.rtp.send(rtp_packet(n, 0x1111, b"A" * 160), caller.remote_rtp)  # type: ignore[arg-type]
            callee.rtp.send(rtp_packet(n, 0x2222, b"B" * 160), callee.remote_rtp)  # type: ignore[arg-type]
            sent["n"] = n + 1

    net.run(packets * 0.02 + 5.0, tick=tick,
            until=lambda: sent["n"] >= packets and len(callee.rtp.received) >= packets
            and len(caller.rtp.received) >= packets)


def _payloads(endpoint: RtpEndpoint) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for data, _addr in endpoint.received:
        key = data[12:13]
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_nat_caller_and_callee_with_long_ringing_get_two_way_audio(
        pbx_setup: tuple[PBXProcess, dict[str, str], range]) -> None:
    pbx, passwords, _ports = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    try:
        callee.answer_after(8.0)  # rings 8 s: far longer than the learning window
        caller.call(CALLEE)
        assert callee.acked or net.run(3.0, until=lambda: callee.acked)
        _talk(net, caller, callee, 100)
        heard_by_callee, heard_by_caller = _payloads(callee.rtp), _payloads(caller.rtp)
        # A few leading packets may go to the SDP address before the other side spoke.
        assert heard_by_callee.get(b"A", 0) >= 90, heard_by_callee
        assert heard_by_caller.get(b"B", 0) >= 90, heard_by_caller
        caller.bye()
    finally:
        caller.close()
        callee.close()


def test_rtp_sprayed_at_the_relay_range_never_reaches_a_phone(
        pbx_setup: tuple[PBXProcess, dict[str, str], range]) -> None:
    pbx, passwords, ports = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    attacker = RtpEndpoint("127.0.0.66")
    net.add(attacker.sock, attacker.readable)
    seq = {"n": 0}

    def spray() -> None:
        n = seq["n"] = seq["n"] + 1
        for port in ports:  # RTP (PT 0, the negotiated codec) and RTCP-shaped, every port
            payload = (rtp_packet(n, 0x6666, b"E" * 160) if port % 2 == 0
                       else b"\x81\xc9\x00\x07" + b"E" * 28)
            attacker.send(payload, ("127.0.0.1", port))

    try:
        callee.answer_after(5.0)
        net.background.append(spray)  # while it rings, and after the answer
        caller.call(CALLEE)
        _talk(net, caller, callee, 100)
        net.run(0.5)
        net.background.clear()
        heard_by_callee, heard_by_caller = _payloads(callee.rtp), _payloads(caller.rtp)
        assert seq["n"] > 300  # the attack really ran, ringing and talking
        assert b"E" not in heard_by_callee and b"E" not in heard_by_caller
        assert attacker.received == []  # never latched: nothing was sent back to it
        assert heard_by_callee.get(b"A", 0) >= 90 and heard_by_caller.get(b"B", 0) >= 90
        caller.bye()
    finally:
        attacker.close()
        caller.close()
        callee.close()
