#!/usr/bin/env python3
"""Micro-benchmark of the SIP codec: µs per ``parse(data)`` + ``.to_bytes()``.

Usage: ``python scripts/bench_sip_codec.py [--runs N] [--number N] [--json]``.
The budget for the INVITE case is 40 µs on the reference (slow, 2-core) box.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pbx.sip.message import parse

SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.101\r\n"
    b"t=0 0\r\n"
    b"m=audio 49172 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-16\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK4b43c2ff8.1;received=192.0.2.10\r\n"
    "Max-Forwards: 70\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    "Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.atlanta.example.com;transport=udp>\r\n"
    "Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY\r\n"
    "Supported: replaces, timer\r\n"
    "User-Agent: pbx-bench/1.0\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n"
    "\r\n"
).encode() + SDP

REGISTER = (
    b"REGISTER sip:registrar.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.55:5062;branch=z9hG4bKnashds7;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@registrar.example.com>\r\n'
    b'From: "Bob" <sip:bob@registrar.example.com>;tag=456248\r\n'
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1827 REGISTER\r\n"
    b"Contact: <sip:bob@192.0.2.55:5062;transport=udp>;expires=3600\r\n"
    b'Authorization: Digest username="bob", realm="registrar.example.com", '
    b'nonce="ea9c8e88df84f1cec4341ae6cbe5a359", uri="sip:registrar.example.com", '
    b'response="dfe56131d1958046689d83306477ecc", algorithm=MD5, qop=auth, '
    b'nc=00000001, cnonce="0a4f113b"\r\n'
    b"User-Agent: pbx-bench/1.0\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

CASES = {"INVITE": INVITE, "REGISTER": REGISTER}


def bench(data: bytes, runs: int, number: int) -> float:
    """Median µs per parse+serialise over ``runs`` timeit repeats."""
    assert parse(parse(data).to_bytes()) == parse(data)  # sanity: round-trips
    timer = timeit.Timer(lambda: parse(data).to_bytes())
    times = timer.repeat(repeat=runs, number=number)
    return statistics.median(times) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--number", type=int, default=5000)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    results = {name: bench(data, args.runs, args.number) for name, data in CASES.items()}
    if args.json:
        print(json.dumps({
            "unit": "us", "runs": args.runs, "number": args.number,
            "results": {name: round(us, 2) for name, us in results.items()},
            "sizes": {name: len(data) for name, data in CASES.items()},
        }))
    else:
        for name, us in results.items():
            print(f"{name} parse+serialize: {us:.1f} us (median of {args.runs}, "
                  f"{len(CASES[name])} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
