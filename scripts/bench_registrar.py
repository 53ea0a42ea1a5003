#!/usr/bin/env python3
"""Micro-benchmark of the registrar (in process: no sockets, no transaction layer).

One registration is REGISTER -> 401 -> REGISTER with Authorization -> 200 OK, as SIPp
does it.  The two halves are timed separately (the client's digest computation in
between is not ours and is not timed), each including the parse of the request bytes
and the serialisation of the response, so the figures add up to the registrar's share
of the per-registration budget.  Parsing/serialising alone is measured too, to show
what the registrar itself adds.  Credentials come from a warm
``CachedCredentialLookup``; bindings go to a ``LocationService`` whose write-behind
flush is timed at the end (amortised per registration).

    .venv/bin/python scripts/bench_registrar.py [--n 20000] [--users 5000] [--repeat 3]
    .venv/bin/python scripts/bench_registrar.py --profile   # cProfile of both halves
    .venv/bin/python scripts/bench_registrar.py --cold      # lookups miss the cache
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from pbx.sip.abuse import SecurityPolicy, SourceGuard
from pbx.sip.auth import (
    CachedCredentialLookup,
    Credentials,
    DigestAuthenticator,
    compute_ha1,
    compute_response,
)
from pbx.sip.location import LocationService
from pbx.sip.message import Response, parse
from pbx.sip.registrar import Registrar
from pbx.sip.transactions import Peer

REALM = "pbx.local"
PASSWORD = "secret-password"
SERVER = "192.0.2.1"
CLIENT = Peer("udp", "192.0.2.10", 5061)


class Store:
    """Credential and binding store fake: answers at once, remembers nothing."""

    def __init__(self, users: int) -> None:
        self.creds = {
            str(1000 + i): Credentials(str(1000 + i), REALM, {
                a: compute_ha1(str(1000 + i), REALM, PASSWORD, a) for a in ("SHA-256", "MD5")})
            for i in range(users)
        }
        self.saved_rows = 0

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        return succeed(self.creds.get(username))

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([])

    def save_bindings(self, upserts: list[dict[str, Any]],
                      deletes: list[tuple[str, str]]) -> Deferred[None]:
        self.saved_rows += len(upserts) + len(deletes)
        return succeed(None)


class Txn:
    """Fake server transaction: serialises the response as the transport would, and
    keeps only the bytes (holding every message object would make the benchmark about
    the garbage collector)."""

    __slots__ = ("status", "wire")

    def __init__(self) -> None:
        self.status = 0
        self.wire = b""

    def respond(self, response: Response) -> None:
        self.status = response.status
        self.wire = response.to_bytes()


def register_bytes(i: int, user: str, cseq: int, auth: str | None) -> bytes:
    lines = [
        f"REGISTER sip:{SERVER}:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP {CLIENT.host}:{CLIENT.port};branch=z9hG4bK{i:x}c{cseq};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{SERVER}>;tag={i}SIPpTag01",
        f"To: <sip:{user}@{SERVER}>",
        f"Call-ID: {i}-bench@{CLIENT.host}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <sip:{user}@{CLIENT.host}:{CLIENT.port};transport=udp>",
    ]
    if auth:
        lines.append(auth)
    lines += ["Expires: 3600", "User-Agent: SIPp", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def authorization(user: str, nonce: str) -> str:
    uri = f"sip:{SERVER}:5060"
    ha1 = compute_ha1(user, REALM, PASSWORD, "SHA-256")
    cnonce = "6b8b4567"
    response = compute_response(ha1, "REGISTER", uri, nonce, "SHA-256", qop="auth",
                                nc="00000001", cnonce=cnonce)
    return (f'Authorization: Digest username="{user}", realm="{REALM}", nonce="{nonce}", '
            f'uri="{uri}", response="{response}", algorithm=SHA-256, cnonce="{cnonce}", '
            f"qop=auth, nc=00000001")


def nonce_of(wire: bytes) -> str:
    return wire.split(b'nonce="', 1)[1].split(b'"', 1)[0].decode()


def build(users: int, cold: bool = False) -> tuple[Registrar, LocationService, Store]:
    clock = Clock()
    store = Store(users)
    creds = CachedCredentialLookup(store, clock, ttl=-1.0 if cold else 1e9,
                                   negative_ttl=-1.0 if cold else 1e9)
    for name in store.creds:  # warm the cache as a running PBX would be
        creds.credentials(name)
    location = LocationService(clock, store, sweep_interval=5.0)
    guard = SourceGuard(SecurityPolicy(trusted_networks=("192.0.2.0/24",)))
    registrar = Registrar(location=location, authenticator=DigestAuthenticator(REALM),
                          credentials=creds, guard=guard)
    return registrar, location, store


def run(n: int, users: int, profile: bool, cold: bool) -> dict[str, float]:
    registrar, location, _ = build(users, cold)
    names = [str(1000 + i % users) for i in range(n)]
    first = [register_bytes(i, names[i], 1, None) for i in range(n)]
    txns = [Txn() for _ in range(n)]

    gc.collect()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    handle = registrar.handle_register
    for i in range(n):
        handle(parse(first[i]), txns[i], CLIENT)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    if prof:
        prof.disable()
    assert all(t.status == 401 for t in txns)

    second = [register_bytes(i, names[i], 2, authorization(names[i], nonce_of(txns[i].wire)))
              for i in range(n)]
    txns2 = [Txn() for _ in range(n)]
    gc.collect()
    if prof:
        prof.enable()
    t2 = time.perf_counter()
    for i in range(n):
        handle(parse(second[i]), txns2[i], CLIENT)  # type: ignore[arg-type]
    t3 = time.perf_counter()
    if prof:
        prof.disable()
    bad = [t.status for t in txns2 if t.status != 200]
    assert not bad, f"unexpected answers: {bad[:5]}"

    t4 = time.perf_counter()
    location.flush()
    t5 = time.perf_counter()

    # codec share: parse the same requests, re-parse and serialise the responses
    r1 = [parse(t.wire) for t in txns[:1000]]
    r2 = [parse(t.wire) for t in txns2[:1000]]
    t6 = time.perf_counter()
    for i in range(n):
        parse(first[i])
        parse(second[i])
        r1[i % 1000].to_bytes()
        r2[i % 1000].to_bytes()
    t7 = time.perf_counter()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return {
        "challenge": (t1 - t0) / n * 1e6,
        "authenticated": (t3 - t2) / n * 1e6,
        "flush": (t5 - t4) / n * 1e6,
        "codec": (t7 - t6) / n * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="every credential lookup misses the cache (Deferred path)")
    args = parser.parse_args()
    results = [run(args.n, args.users, args.profile and r == 0, args.cold)
               for r in range(args.repeat)]
    best = {k: min(r[k] for r in results) for k in results[0]}
    total = best["challenge"] + best["authenticated"] + best["flush"]
    cache = "cold (every lookup misses)" if args.cold else "warm"
    print(f"registrations: {args.n} over {args.users} users, best of {args.repeat}, "
          f"credential cache {cache}")
    print(f"  REGISTER -> 401 (parse, handle, serialise)      {best['challenge']:7.1f} µs")
    print(f"  REGISTER+auth -> 200 (parse, handle, serialise) {best['authenticated']:7.1f} µs")
    print(f"  write-behind flush, per registration            {best['flush']:7.1f} µs")
    print(f"  full registration                               {total:7.1f} µs"
          f"  (= {1e6 / total:,.0f}/s of one core, before transport and transactions)")
    print(f"    of which codec (2 parses + 2 serialisations)  {best['codec']:7.1f} µs")
    print(f"    registrar logic                               {total - best['codec']:7.1f} µs")


if __name__ == "__main__":
    main()
