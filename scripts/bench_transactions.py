#!/usr/bin/env python3
"""Micro-benchmark of the transaction layer (no sockets, no codec work in the loop).

Prints µs per complete NIST and NICT lifecycle with a no-op sender on a
``task.Clock`` (so timer arming, firing and cancelling are included), and what creating
a transaction costs with the shared, precompiled machine compared with building a
``transitions.Machine`` (or ``add_model``) per transaction, which is the cost the shared
machine amortises away.

    .venv/bin/python scripts/bench_transactions.py [--n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

from transitions import Machine
from twisted.internet.task import Clock

from pbx.sip.headers import Headers
from pbx.sip.message import Request, Response, make_response
from pbx.sip.transactions import (
    NonInviteServerTransaction,
    Peer,
    TransactionManager,
)
from pbx.sip.uri import URI
from pbx.statecharts import load_chart

UDP = Peer("udp", "192.0.2.10", 5060)
TCP = Peer("tcp", "192.0.2.10", 5060)


class NullSender:
    def send_request(self, request: Request, peer: Peer) -> None:
        pass

    def send_response(self, response: Response, peer: Peer) -> None:
        pass


class AnsweringTU:
    """Answers every request at once with a prebuilt 200 (the TU's own cost is not ours)."""

    def __init__(self) -> None:
        self.ok: Response | None = None

    def request_received(self, request: Request, transaction: Any, peer: Peer) -> None:
        if transaction is not None and self.ok is not None:
            transaction.respond(self.ok)

    def response_received(self, transaction: Any, response: Response) -> None:
        pass

    def transaction_timeout(self, transaction: Any) -> None:
        pass

    def transaction_transport_error(self, transaction: Any) -> None:
        pass


def request(method: str, transport: str = "UDP") -> Request:
    headers = Headers([
        ("Via", f"SIP/2.0/{transport} 192.0.2.10:5060;branch=z9hG4bKbench1"),
        ("Max-Forwards", "70"),
        ("From", "<sip:bench@192.0.2.10>;tag=1"),
        ("To", "<sip:pbx@192.0.2.1>"),
        ("Call-ID", "bench@192.0.2.10"),
        ("CSeq", f"1 {method}"),
    ])
    return Request(method, URI.parse("sip:pbx@192.0.2.1"), headers)


def best_us(func: Callable[[int], None], n: int, repeat: int) -> float:
    """Best-of-``repeat`` µs per iteration (GC off while timing, as timeit does)."""
    results = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        func(n)
        elapsed = time.perf_counter() - start
        gc.enable()
        results.append(elapsed / n * 1e6)
    return min(results)


def nist_lifecycle(peer: Peer) -> Callable[[int], None]:
    clock = Clock()
    tu = AnsweringTU()
    mgr = TransactionManager(NullSender(), tu, clock)
    req = request("OPTIONS", peer.transport.upper())
    tu.ok = make_response(req, 200, to_tag="b")
    advance = clock.advance
    handle = mgr.handle_request

    def run(n: int) -> None:
        for _ in range(n):
            handle(req, peer)      # new NIST -> TU -> 200 -> Completed (J armed)
            advance(32.0)          # Timer J -> Terminated (over TCP J is zero)
        assert not mgr.transactions() and not clock.calls
    return run


def nict_lifecycle(peer: Peer) -> Callable[[int], None]:
    clock = Clock()
    tu = AnsweringTU()
    mgr = TransactionManager(NullSender(), tu, clock)
    req = request("OPTIONS", peer.transport.upper())
    ok = make_response(req, 200, to_tag="b")
    advance = clock.advance
    send = mgr.send_request
    handle = mgr.handle_response

    def run(n: int) -> None:
        for _ in range(n):
            send(req, peer, tu)    # Trying: E (UDP) and F armed
            handle(ok, peer)       # Completed: E, F cancelled, K armed
            advance(5.0)           # Timer K -> Terminated (over TCP K is zero)
        assert not mgr.transactions() and not clock.calls
    return run


def creation_costs(n: int, repeat: int) -> dict[str, float]:
    clock = Clock()
    mgr = TransactionManager(NullSender(), AnsweringTU(), clock)
    req = request("OPTIONS")
    NonInviteServerTransaction(mgr, req, UDP, "warm-up")  # compile the shared machine once
    chart = load_chart("nist")

    def shared(n: int) -> None:
        for i in range(n):
            NonInviteServerTransaction(mgr, req, UDP, i)

    def machine_per_txn(n: int) -> None:
        kwargs = chart.machine_kwargs()
        for _ in range(n):
            Machine(model=_Bare(), **kwargs)

    shared_machine = Machine(model=None, **chart.machine_kwargs())

    def add_model(n: int) -> None:
        models = [_Bare() for _ in range(n)]
        for model in models:
            shared_machine.add_model(model)
        for model in models:  # keep the machine small between repeats
            shared_machine.remove_model(model)

    machine_n = max(200, n // 50)
    return {
        "model on the shared machine (ours)": best_us(shared, n, repeat),
        "transitions.Machine per transaction": best_us(machine_per_txn, machine_n, repeat),
        "Machine.add_model on a shared machine (incl. remove)":
            best_us(add_model, machine_n, repeat),
    }


class _Bare:
    pass


def trigger_cost(n: int, repeat: int) -> float:
    """One real transition (NIST Proceeding self-transition: send a provisional)."""
    clock = Clock()
    mgr = TransactionManager(NullSender(), AnsweringTU(), clock)
    req = request("OPTIONS")
    trying = make_response(req, 100)
    server = NonInviteServerTransaction(mgr, req, UDP, "k")
    server.respond(trying)

    def run(n: int) -> None:
        respond = server.respond
        for _ in range(n):
            respond(trying)
    return best_us(run, n, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, repeat = args.n, args.repeat
    rows = [
        ("NIST lifecycle UDP (request, 200, Timer J)", best_us(nist_lifecycle(UDP), n, repeat)),
        ("NIST lifecycle TCP (request, 200, J=0)", best_us(nist_lifecycle(TCP), n, repeat)),
        ("NICT lifecycle UDP (send, 200, Timer K; E/F cancelled)",
         best_us(nict_lifecycle(UDP), n, repeat)),
        ("NICT lifecycle TCP (send, 200, K=0)", best_us(nict_lifecycle(TCP), n, repeat)),
        ("one trigger through the chart (respond 1xx in Proceeding)",
         trigger_cost(n, repeat)),
    ]
    rows += list(creation_costs(n, repeat).items())
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  µs/op     ops/s")
    for name, us in rows:
        print(f"{name:{width}}  {us:7.2f}  {1e6 / us:9,.0f}")


if __name__ == "__main__":
    main()
