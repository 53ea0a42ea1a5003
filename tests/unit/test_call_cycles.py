"""Calls free themselves: nothing of a finished call waits for the garbage collector.

A call used to leave ~32 KB in reference cycles (leg <-> call, fork <-> its INVITE
transaction, call -> media -> ``on_timeout`` bound method -> call, relay socket <-> the
other leg's socket), freed only by a full collection, which pauses RTP for every call
that is up.  Here real calls run through the B2BUA (real TransactionManager on a Clock,
real MediaSession whose sockets are bound on a fake reactor) with automatic collection
off; once the calls ended and their timers ran out:

* weak references to every call object are dead *without* a collection (plain
  reference counting freed them), and
* a collection finds nothing of ours unreachable (``gc.DEBUG_SAVEALL`` keeps what it
  finds in ``gc.garbage``).

No timing is asserted; pauses and memory figures come from scripts/bench_memory.py and
the ``pbx_gc_*`` metrics.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import defer

from pbx.calls import Call
from pbx.media import MediaSession, PortAllocator
from tests.unit.test_calls_support import (
    CALLER,
    SDP_A,
    SDP_B,
    CalleePhone,
    CallerPhone,
    Harness,
    callee_peer,
)
from tests.unit.test_media_session import FakePort

B, B2 = callee_peer(0), callee_peer(1)
CALLS = 4


class _Port(FakePort):
    """Stops like Twisted's ``udp.Port``: ``connectionLost`` runs the protocol's
    ``doStop`` (which drops its ``transport``)."""

    def stopListening(self) -> defer.Deferred[None]:
        self.reactor.bound.pop(self.port)
        self.protocol.doStop()
        return defer.succeed(None)


class _MediaReactor:
    """The harness's Clock for time, plus UDP "binding" for the relay sockets."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.bound: dict[int, _Port] = {}
        self.sent: list[Any] = []

    def seconds(self) -> float:
        return float(self.clock.seconds())

    def callLater(self, delay: float, func: Callable[..., Any], *args: Any,
                  **kw: Any) -> Any:
        return self.clock.callLater(delay, func, *args, **kw)

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> _Port:
        bound = _Port(self, port, protocol)  # type: ignore[arg-type]
        self.bound[port] = bound
        protocol.makeConnection(bound)
        return bound


# -- what the phones do ---------------------------------------------------------------


def caller_hangs_up(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()
    a.ack()
    h.advance(5)
    a.send("BYE")
    b.reply_to_last("BYE")


def callee_hangs_up(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    a.ack()
    b.send("BYE")
    a.answer_request(h.requests_to(CALLER, "BYE")[-1])


def caller_cancels(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.ringing()
    a.cancel()
    b.reply_to_last("CANCEL")
    b.respond(487)
    a.ack_failure()


def cancel_crosses_2xx(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    a.cancel()
    b.ringing()
    b.answer()  # ACKed and ended with BYE by the fork
    b.reply_to_last("BYE")
    a.ack_failure()


def callee_busy(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.respond(486)
    a.ack_failure()


def forked_with_late_2xx(h: Harness) -> None:
    a, b1, b2 = CallerPhone(h), CalleePhone(h, B), CalleePhone(h, B2)
    a.dial()
    b1.ringing()
    b2.ringing()
    b2.answer()
    b1.answer()  # crossing our CANCEL: ACK + BYE
    b1.reply_to_last("BYE")
    a.ack()
    a.send("BYE")
    b2.reply_to_last("BYE")


def hold_and_info(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    a.ack()
    a.send("INVITE", body=SDP_A + b"a=sendonly\r\n")
    b.reply_to_last("INVITE", 200, SDP_B + b"a=recvonly\r\n")
    h.request(a._in_dialog("ACK", seq=a.cseq), CALLER)
    a.send("INFO", body=b"Signal=5\r\nDuration=160\r\n")
    b.reply_to_last("INFO", 200)
    a.send("BYE")
    b.reply_to_last("BYE")


def caller_never_acks(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    h.advance(40)  # ACK timeout: BYE to both legs, nobody answers it


def media_times_out(h: Harness) -> None:
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    b.answer()
    a.ack()
    for _ in range(40):  # no RTP: the session's media timer ends the call
        h.advance(1)
    a.answer_request(h.requests_to(CALLER, "BYE")[-1])
    b.reply_to_last("BYE")


def unknown_number(h: Harness) -> None:
    a = CallerPhone(h)
    a.dial("4711")
    a.ack_failure()


SCENARIOS = [caller_hangs_up, callee_hangs_up, caller_cancels, cancel_crosses_2xx,
             callee_busy, forked_with_late_2xx, hold_and_info, caller_never_acks,
             media_times_out, unknown_number]


# -- the harness --------------------------------------------------------------------


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Automatic collection off and the heap clean, so that anything unreachable a
    collection finds afterwards was made by the test; settings restored after."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def _harness(scenario: Callable[[Harness], None]) -> tuple[Harness, list[weakref.ref[Any]]]:
    h = Harness(registered={"1002": [B, B2]} if scenario is forked_with_late_2xx else None,
                max_calls=100)
    reactor = _MediaReactor(h.clock)
    allocator = PortAllocator(30000, 30999)

    def media(on_timeout: Callable[[Any], None]) -> MediaSession:
        return MediaSession(reactor, allocator, host="192.0.2.1", on_timeout=on_timeout,
                            media_timeout=20.0)

    h.b2bua.media_factory = media
    refs: list[weakref.ref[Any]] = []
    h.b2bua.call_ended_hooks.append(lambda call: refs.extend(_parts(call)))
    return h, refs


def _parts(call: Call) -> list[weakref.ref[Any]]:
    """Weak references to everything a call is made of, taken as it ends."""
    objects: list[Any] = [call, call.caller.transaction]  # (CallRecord: slots, no weakref)
    for leg in (call.caller, *call.forks):
        objects += [leg, leg.dialog, getattr(leg, "transaction", None)]
    media = call.media
    if media is not None:
        objects.append(media)
        for leg in media.legs.values():
            objects += [leg, leg.rtp, leg.rtcp]
    return [weakref.ref(o) for o in objects if o is not None]


def _ours(obj: Any) -> bool:
    """An object of a class of the PBX, or a bound method of one."""
    target = getattr(obj, "__self__", obj)
    return type(target).__module__.startswith("pbx.")


def _run(scenario: Callable[[Harness], None]) -> tuple[Harness, list[weakref.ref[Any]]]:
    h, refs = _harness(scenario)
    for _ in range(CALLS):
        scenario(h)
    h.advance(100)  # every transaction, 2xx retransmission and media timer runs out
    h.sender.sent.clear()
    assert h.b2bua.active_calls == 0 and not h.b2bua.dialogs
    assert not h.transactions.transactions()
    return h, refs


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_a_finished_call_is_freed_by_reference_counting(
        scenario: Callable[[Harness], None], no_automatic_gc: None) -> None:
    _run(scenario)  # the first calls compile charts and warm caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    h, refs = _run(scenario)
    assert len({id(r) for r in refs}) >= CALLS * 3
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f"still referenced without a collection: {alive[:5]}"
    found = gc.collect()
    ours = [o for o in gc.garbage if _ours(o)]
    assert ours == [], f"{found} unreachable objects, ours: {ours[:10]}"
    assert h.b2bua.total_calls == CALLS


def test_a_terminated_client_transaction_lets_go_of_its_user(no_automatic_gc: None) -> None:
    """The transaction layer's share: a user that holds its transaction (a fork and its
    INVITE) forms no cycle once the transaction has ended."""
    h, _refs = _harness(callee_busy)
    a, b = CallerPhone(h), CalleePhone(h, B)
    a.dial()
    (call,) = h.b2bua.calls.values()
    (fork,) = call.forks
    txn = fork.transaction
    assert txn is not None and txn.user is fork
    b.respond(486)
    a.ack_failure()
    h.advance(40)  # Timer D
    assert txn.state == "terminated" and txn.user is not fork
    txn.user.transaction_timeout(txn)  # a no-op, not an AttributeError on None


def test_timer_queues_of_one_off_delays_leave_the_registry() -> None:
    """Timers are queued per (clock, delay); a delay computed from the time (a session
    timer's ``time_left``) is new for every call, so an empty queue must not stay."""
    from pbx.statechart_timers import _QUEUES
    from tests.unit.test_media_session import FakeReactor, sdp

    reactor = FakeReactor()
    allocator = PortAllocator(30000, 30999)
    for i in range(50):
        session = MediaSession(reactor, allocator, host="10.0.0.5",
                               media_timeout=20.0 + i / 64)
        session.start()
        session.offer_from_a(sdp(4000, "192.0.2.1"))
        session.answer_from_b(sdp(6000, "192.0.2.2"))
        assert session.active_timers()  # the media check, armed with its own delay
        if i % 2:
            session.close()  # cancelled
        else:
            reactor.advance(20.0)  # expired (and re-armed), then cancelled by the close
            session.close()
    assert not _QUEUES.get(reactor)
