"""Random lives of media sessions sharing one port allocator (hypothesis stateful testing).

Sessions are started, offered, answered, re-offered (hold/resume, unusable codecs,
garbage), fed packets from signalled, NATed and foreign sources, aged by the clock and
closed, in any order, on a fake reactor (some ports busy).  Whatever happens: every
port allocated is released exactly once and only once its session is closed, the
state is always one of the chart's, a closed session has no socket and never forwards,
and on_timeout fires exactly once per timeout.
"""

from __future__ import annotations

import struct
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pbx.media import MediaSession, PortAllocator, PortsExhausted, SDPError
from tests.unit.test_media_session import FakeReactor, sdp

SIDES = st.sampled_from(["a", "b"])
ENDPOINTS = {"a": ("192.0.2.1", 4000), "b": ("192.0.2.2", 6000)}
SOURCES = st.sampled_from(["signalled", "nat", "foreign", "rtcp"])
OFFERS = st.sampled_from(["sendrecv", "sendonly", "inactive", "null", "nocodec", "garbage",
                          "moved"])


class RecordingAllocator(PortAllocator):
    """Counts allocations and releases per port."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(lo, hi)
        self.allocations: Counter[int] = Counter()
        self.releases: Counter[int] = Counter()

    def allocate(self) -> int:
        port = super().allocate()
        self.allocations[port] += 1
        return port

    def release(self, port: int) -> None:
        super().release(port)
        self.releases[port] += 1


def rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, 5) + b"\xd5" * 160


class MediaSessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reactor = FakeReactor()
        self.reactor.busy = {30005, 30010}  # part of the range is held by someone else
        self.alloc = RecordingAllocator(30000, 30019)  # 10 pairs: 4 calls after the busy ones
        self.sessions: list[MediaSession] = []
        self.timeouts: Counter[int] = Counter()
        self.entered_timed_out: Counter[int] = Counter()
        self.sent_at_close: dict[int, int] = {}
        self.owned: dict[int, list[int]] = {}  # session id -> ports it got
        self.seq = 0

    def _session(self, index: int) -> MediaSession:
        return self.sessions[index % len(self.sessions)]

    @rule(media_timeout=st.sampled_from([1.0, 5.0]), hold=st.sampled_from([None, 8.0]))
    def new_session(self, media_timeout: float, hold: float | None) -> None:
        session = MediaSession(self.reactor, self.alloc, host="10.0.0.1",
                               media_timeout=media_timeout, hold_timeout=hold,
                               nat_latch_window=1.0, reap_delay=6.0,
                               on_timeout=lambda s: self.timeouts.update([id(s)]))
        original = session.state_changed

        def watch(previous: str, session: MediaSession = session) -> None:
            if session.state == "timed_out":
                self.entered_timed_out[id(session)] += 1
            if session.state == "closed":
                self.sent_at_close[id(session)] = len(self.reactor.sent)
            original(previous)

        session.state_changed = watch  # type: ignore[method-assign]
        self.sessions.append(session)
        try:
            session.start()
        except PortsExhausted:
            assert session.state == "closed"
            self.sent_at_close[id(session)] = len(self.reactor.sent)
        else:
            assert session.state == "waiting"
        self.owned[id(session)] = list(session.ports.values())

    @precondition(lambda self: self.sessions)
    @rule(index=st.integers(0, 9), side=SIDES, kind=OFFERS, answer=st.booleans())
    def exchange(self, index: int, side: str, kind: str, answer: bool) -> None:
        session = self._session(index)
        host, port = ENDPOINTS[side]
        body = {
            "sendrecv": sdp(port, host),
            "sendonly": sdp(port, host, attrs="a=sendonly"),
            "inactive": sdp(port, host, attrs="a=inactive"),
            "null": sdp(port, host, conn="0.0.0.0"),
            "nocodec": sdp(port, host, formats="18 101"),
            "garbage": b"v=0\r\no=broken\r\n",
            "moved": sdp(port + 100, host),
        }[kind]
        state = session.state
        try:
            session.answer(side, body) if answer else session.offer(side, body)  # type: ignore[arg-type]
        except RuntimeError:
            assert state in ("allocating", "closed", "timed_out")
            return
        except SDPError:
            assert session.state == state  # a refused body changes nothing
            return
        if answer:
            assert session.state in ("active", "on_hold")

    @precondition(lambda self: self.sessions)
    @rule(index=st.integers(0, 9), side=SIDES, source=SOURCES, count=st.integers(1, 5))
    def packets(self, index: int, side: str, source: str, count: int) -> None:
        session = self._session(index)
        leg = session.legs.get(side)
        if leg is None:
            return
        host, port = ENDPOINTS[side]
        sock, addr = leg.rtp, (host, port)
        if source == "nat":
            addr = ("198.51.100.7", 40000 + port)
        elif source == "foreign":
            addr = ("203.0.113.66", 1234)
        elif source == "rtcp":
            sock, addr = leg.rtcp, (host, port + 1)
        for _ in range(count):
            self.seq += 1
            sock.datagramReceived(rtp(self.seq), addr)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0]))
    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.1)):
            self.reactor.advance(0.1)

    @precondition(lambda self: self.sessions)
    @rule(index=st.integers(0, 9))
    def close(self, index: int) -> None:
        session = self._session(index)
        session.close()
        assert session.state == "closed"

    @invariant()
    def states_are_declared(self) -> None:
        names = set(MediaSession.chart().state_names)
        for session in self.sessions:
            assert session.state in names

    @invariant()
    def ports_are_released_exactly_once(self) -> None:
        assert self.alloc.release_errors == 0
        held: set[int] = set()
        for session in self.sessions:
            ports = self.owned.get(id(session), [])
            if session.state == "closed":
                for port in ports:
                    assert not session.legs[_side(session, port)].rtp.src
            else:
                held.update(ports)
        for port, n in self.alloc.allocations.items():
            released = self.alloc.releases[port]
            assert released in (n, n - 1)
            assert (released == n - 1) == (port in held)
        assert self.alloc.in_use == len(held)
        bound = set(self.reactor.bound)
        assert bound == {p for port in held for p in (port, port + 1)}

    @invariant()
    def closed_sessions_never_forward(self) -> None:
        for session in self.sessions:
            if session.state != "closed":
                continue
            at_close = self.sent_at_close[id(session)]
            own = {p for port in self.owned.get(id(session), []) for p in (port, port + 1)}
            later = self.reactor.sent[at_close:]
            assert not [s for s in later if s[0] in own]
            assert not any(c.active() for c in self.reactor.getDelayedCalls()
                           if getattr(c.func, "__self__", None) is session)

    @invariant()
    def timeout_is_reported_once_per_timeout(self) -> None:
        for session in self.sessions:
            assert self.timeouts[id(session)] == self.entered_timed_out[id(session)] <= 1

    def teardown(self) -> None:
        for session in self.sessions:
            session.close()
        assert self.alloc.in_use == 0 and self.alloc.release_errors == 0
        assert not self.reactor.bound
        assert all(self.alloc.releases[p] == n for p, n in self.alloc.allocations.items())


def _side(session: MediaSession, port: int) -> str:
    return next(side for side, leg in session.legs.items() if leg.port == port)


MediaSessionMachine.TestCase.settings = settings(MediaSessionMachine.TestCase.settings,
                                                 stateful_step_count=40)
TestMediaSessionMachine = MediaSessionMachine.TestCase
