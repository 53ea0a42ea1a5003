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
    .venv/bin/python scripts/bench_registrar.py --stack     # the whole SIP stack, see below

``--stack`` drives the full receive path in process (SIPTransport with a fake socket,
the transaction layer, the endpoint and the registrar, MD5 as SIPp uses it) at a
simulated 2,000 registrations/s on a heap-based clock for ``--seconds`` simulated
seconds, so completed transactions pile up for Timer J (32 s) and expire as in
production.  It reports server CPU per registration, live transactions, garbage
collection pauses with the collector driven as the PBX drives it (``ScheduledGC``:
young generations every simulated second), and any cyclic garbage left behind.
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


def stack(seconds: float, users: int, rate: int = 2000) -> None:
    from twisted.internet.base import ReactorBase

    from pbx.sip.auth import DigestPolicy
    from pbx.sip.endpoint import SIPEndpoint
    from pbx.sip.transactions import TransactionManager
    from pbx.sip.transport import SIPTransport

    class SimClock(ReactorBase):  # the reactor's heap of timers, on simulated time
        def __init__(self) -> None:
            self.now = 1000.0
            super().__init__()

        def seconds(self) -> float:
            return self.now

        def installWaker(self) -> None:
            pass

    class Socket:
        def __init__(self) -> None:
            self.last = b""

        def write(self, data: bytes, addr: Any) -> None:
            self.last = data

    clock = SimClock()
    store = Store(users)
    creds = CachedCredentialLookup(store, clock, ttl=1e9, negative_ttl=1e9)
    for name in store.creds:
        creds.credentials(name)
    location = LocationService(clock, store, sweep_interval=5.0)
    guard = SourceGuard(SecurityPolicy(trusted_networks=("192.0.2.0/24",)))
    transport = SIPTransport(clock, guard=guard)  # type: ignore[arg-type]
    sock = Socket()
    transport._udp = type("UDP", (), {"transport": sock})()  # type: ignore[assignment]
    endpoint = SIPEndpoint(is_ready=lambda: True)
    manager = TransactionManager(transport, endpoint, clock)
    transport.handler = manager
    registrar = Registrar(location=location, credentials=creds, guard=guard,
                          authenticator=DigestAuthenticator(REALM, DigestPolicy(("MD5",))),
                          check_guard=False)
    endpoint.handlers["REGISTER"] = registrar.handle_register
    pauses: list[float] = []
    gc.collect()
    gc.freeze()
    gc.disable()
    n = int(seconds * rate)
    busy = 0.0
    peak = 0
    uri = f"sip:{SERVER}:5060"
    ha1 = {name: compute_ha1(name, REALM, PASSWORD, "MD5") for name in store.creds}
    try:
        for i in range(n):
            user = str(1000 + i % users)
            first = register_bytes(i, user, 1, None)
            t = time.perf_counter()
            transport.message_received(first, CLIENT, datagram=True)
            busy += time.perf_counter() - t
            nonce = nonce_of(sock.last)
            digest = compute_response(ha1[user], "REGISTER", uri, nonce, "MD5", qop="auth",
                                      nc="00000001", cnonce="6b8b4567")
            auth = (f'Authorization: Digest username="{user}", realm="{REALM}", '
                    f'nonce="{nonce}", uri="{uri}", response="{digest}", algorithm=MD5, '
                    'cnonce="6b8b4567", qop=auth, nc=00000001')
            second = register_bytes(i, user, 2, auth)
            t = time.perf_counter()
            transport.message_received(second, CLIENT, datagram=True)
            clock.now += 1.0 / rate
            clock.runUntilCurrent()
            if i % rate == 0:
                g = time.perf_counter()
                gc.collect(1)
                pauses.append(time.perf_counter() - g)
            busy += time.perf_counter() - t
            assert sock.last.startswith(b"SIP/2.0 200"), sock.last[:60]
            peak = max(peak, len(manager._server))
    finally:
        gc.enable()
        gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    left = len(gc.garbage)
    gc.set_debug(0)
    gc.garbage.clear()
    print(f"full stack: {n} registrations, {seconds:.0f} simulated s at {rate}/s")
    print(f"  server CPU per registration (both exchanges)  {busy / n * 1e6:7.1f} µs"
          f"  (= {n / busy:,.0f}/s of one core, before syscalls and the reactor)")
    print(f"  live server transactions at peak              {peak:7d}")
    print(f"  young-generation collections: {len(pauses)}, longest "
          f"{max(pauses, default=0) * 1e3:.1f} ms; cyclic garbage left: {left} objects")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="every credential lookup misses the cache (Deferred path)")
    parser.add_argument("--stack", action="store_true",
                        help="the whole SIP stack in process, Timer J included")
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="simulated seconds for --stack")
    args = parser.parse_args()
    if args.stack:
        stack(args.seconds, min(args.users, 2000))
        return
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
