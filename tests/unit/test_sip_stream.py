"""Stream transport limits (issue 10 item 4): caps, deadlines, buffers, on a fake clock.

A hypothesis state machine drives random interleavings of connects from a few sources,
partial frames, garbage, keep-alives, clock advances, stalled readers and closes, and
checks after every step: connections within the total and per-source caps, every read
buffer within ``max_message_size``, exactly one live deadline per open connection and
none for a closed one (so every timer either fires or is cancelled), and that closing
everything leaves no timer behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pbx.sip import Peer, Request, Response
from pbx.sip.stream import (
    SIPStreamFactory,
    SIPStreamProtocol,
    StreamLimits,
    normalize_host,
    source_key,
)
from pbx.sip.transport import SIPTransport

LIMITS = StreamLimits(max_connections=6, max_per_source=3, header_timeout=2.0,
                      idle_timeout=5.0, max_write_buffer=4096, max_message_size=2048)


@dataclass
class _Addr:
    host: str
    port: int
    type: str = "TCP"


class Sink:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    def handle_request(self, request: Request, peer: Peer) -> None:
        self.requests.append(request)

    def handle_response(self, response: Response, peer: Peer) -> None:
        pass


def new_transport() -> tuple[SIPTransport, MemoryReactorClock, Sink]:
    clock = MemoryReactorClock()
    owner = SIPTransport(clock, limits=LIMITS, max_message_size=LIMITS.max_message_size)
    sink = Sink()
    owner.handler = sink
    return owner, clock, sink


def accept(owner: SIPTransport, host: str, port: int
           ) -> tuple[SIPStreamProtocol | None, StringTransport]:
    addr = _Addr(host, port)
    proto = SIPStreamFactory(owner, "tcp").buildProtocol(addr)  # type: ignore[arg-type]
    wire = StringTransport(peerAddress=addr)
    if proto is not None:
        proto.makeConnection(wire)
    return proto, wire


def options(n: int = 1) -> bytes:
    return (
        "OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bKs{n}\r\n"
        "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:pbx@127.0.0.1>\r\n"
        f"Call-ID: s{n}@x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def lose(proto: SIPStreamProtocol, wire: StringTransport) -> None:
    """What the reactor does after an abort or a close: connectionLost, once."""
    if wire.disconnecting and proto.transport is not None:
        proto.connectionLost()
        proto.transport = None  # type: ignore[assignment]


# -- plain unit tests ---------------------------------------------------------------------


def test_per_source_and_total_caps_refuse_at_accept() -> None:
    owner, _, _ = new_transport()
    accepted = [accept(owner, "192.0.2.1", 1000 + i)[0] for i in range(5)]
    assert [p is not None for p in accepted] == [True] * 3 + [False] * 2
    others = [accept(owner, f"192.0.2.{n}", 2000)[0] for n in range(10, 15)]
    assert [p is not None for p in others] == [True] * 3 + [False] * 2
    refused = owner.stats.connections_refused
    assert refused == {"max_per_source": 2, "max_connections": 2}


def test_ipv6_slash_64_is_one_source() -> None:
    owner, _, _ = new_transport()
    hosts = [f"2001:db8:1:2::{i:x}" for i in range(1, 6)]
    accepted = [accept(owner, h, 5060)[0] for h in hosts]
    assert sum(p is not None for p in accepted) == LIMITS.max_per_source
    assert accept(owner, "2001:db8:1:3::1", 5060)[0] is not None  # another /64


def test_closing_frees_the_slot() -> None:
    owner, _, _ = new_transport()
    conns = [accept(owner, "192.0.2.1", 1000 + i) for i in range(3)]
    assert accept(owner, "192.0.2.1", 1100)[0] is None
    proto, wire = conns[0]
    assert proto is not None
    wire.loseConnection()
    lose(proto, wire)
    assert accept(owner, "192.0.2.1", 1101)[0] is not None


def test_blocked_source_is_refused_at_accept() -> None:
    from pbx.sip import SecurityPolicy, SourceGuard

    owner, clock, _ = new_transport()
    owner.guard = SourceGuard(SecurityPolicy(), now=clock.seconds)
    owner.guard.block("192.0.2.66", 60)
    assert accept(owner, "192.0.2.66", 4000)[0] is None
    assert owner.stats.connections_refused["blocked_source"] == 1
    assert accept(owner, "192.0.2.67", 4000)[0] is not None


def test_slow_header_is_dropped_at_the_deadline() -> None:
    owner, clock, sink = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    data = options()
    proto.dataReceived(data[:20])
    clock.advance(1.0)
    proto.dataReceived(data[20:40])  # trickling does not extend the deadline
    clock.advance(0.99)
    assert not wire.disconnecting
    clock.advance(0.02)
    assert wire.disconnecting and owner.stats.dropped["header_timeout"] == 1
    assert not sink.requests


def test_a_complete_message_resets_the_message_deadline() -> None:
    owner, clock, sink = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    for n in range(5):
        proto.dataReceived(options(n))
        clock.advance(1.5)
    assert not wire.disconnecting
    assert len(sink.requests) == 5


def test_keepalives_count_as_traffic_and_silence_ends_the_connection() -> None:
    owner, clock, _ = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    for _ in range(10):
        clock.advance(4.0)
        proto.dataReceived(b"\r\n\r\n")
    assert not wire.disconnecting
    assert wire.value() == b"\r\n" * 10  # one pong per ping (RFC 5626 §3.5.1)
    proto.dataReceived(b"\r\n")  # a lone CRLF is not the start of a message
    clock.advance(4.9)
    assert not wire.disconnecting
    clock.advance(0.2)
    assert wire.disconnecting and owner.stats.dropped["idle_timeout"] == 1


def test_read_buffer_is_capped_at_the_message_size() -> None:
    owner, _, _ = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    proto.dataReceived(b"OPTIONS sip:x SIP/2.0\r\nX-Long: " + b"a" * 3000)
    assert wire.disconnecting
    assert owner.stats.dropped["stream_framing"] == 1


def test_a_peer_that_never_reads_is_dropped_past_the_write_cap() -> None:
    owner, _, _ = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    proto.write(b"x" * 10_000)  # before a pause: no limit of ours applies
    proto.pauseProducing()  # Twisted: the kernel and our buffer are full
    for _ in range(4):
        proto.write(b"y" * 1000)
    assert not wire.disconnecting
    proto.write(b"z" * 1000)
    assert wire.disconnecting and owner.stats.dropped["write_buffer_full"] == 1


def test_write_cap_resets_when_the_peer_reads_again() -> None:
    owner, _, _ = new_transport()
    proto, wire = accept(owner, "192.0.2.1", 1000)
    assert proto is not None
    proto.pauseProducing()
    proto.write(b"y" * 4000)
    proto.resumeProducing()
    proto.pauseProducing()
    proto.write(b"y" * 4000)
    assert not wire.disconnecting


def test_outbound_connect_failure_is_reported_to_the_handler() -> None:
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    owner, _, _ = new_transport()
    failed: list[Peer] = []

    class Handler(Sink):
        def connection_failed(self, peer: Peer) -> None:
            failed.append(peer)

    owner.handler = Handler()
    destination = Peer("tcp", "192.0.2.9", 5060)
    owner._send(b"INVITE", destination)
    owner._send(b"BYE", destination)  # queued on the same pending connection
    factory = owner._connecting[("tcp", "192.0.2.9", 5060)]
    assert factory.pending == [b"INVITE", b"BYE"]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert failed == [destination]
    assert not owner._connecting


def test_normalize_host() -> None:
    assert normalize_host("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_host("2001:DB8:0:0::1") == "2001:db8::1"
    assert normalize_host("192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"


def test_server_tls_context_refuses_old_protocols(tmp_path: object) -> None:
    import subprocess
    from pathlib import Path

    from OpenSSL import SSL

    from pbx.sip.tls import ReloadableServerContext
    from tests.conftest import require_tool

    directory = Path(str(tmp_path))
    cert, key = directory / "c.pem", directory / "k.pem"
    subprocess.run([require_tool("openssl", "openssl"), "req", "-x509", "-newkey",
                    "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-subj", "/CN=t", "-days", "1"], check=True, capture_output=True)
    context = ReloadableServerContext(cert, key).getContext()
    options = context.set_options(0)  # returns the options in force
    for flag in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
        assert options & flag, hex(flag)
    assert not options & SSL.OP_NO_TLSv1_2


# -- the state machine --------------------------------------------------------------------

SOURCES = ("192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2")


class StreamTransportMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.owner, self.clock, self.sink = new_transport()
        self.open: list[tuple[SIPStreamProtocol, StringTransport]] = []
        self.next_port = 1000
        self.messages = 0

    def _reap(self) -> None:
        still = []
        for proto, wire in self.open:
            lose(proto, wire)
            if proto.transport is not None:
                still.append((proto, wire))
        self.open = still

    @rule(source=st.sampled_from(SOURCES))
    def connect(self, source: str) -> None:
        self.next_port += 1
        proto, wire = accept(self.owner, source, self.next_port)
        if proto is not None:
            self.open.append((proto, wire))

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50), cut=st.integers(0, 400))
    def partial_frame(self, index: int, cut: int) -> None:
        proto, _ = self.open[index % len(self.open)]
        self.messages += 1
        proto.dataReceived(options(self.messages)[:cut])
        self._reap()

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50), data=st.binary(max_size=600))
    def garbage(self, index: int, data: bytes) -> None:
        proto, _ = self.open[index % len(self.open)]
        proto.dataReceived(data)
        self._reap()

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50), repeat=st.integers(1, 4))
    def big_chunk(self, index: int, repeat: int) -> None:
        proto, _ = self.open[index % len(self.open)]
        proto.dataReceived(b"X" * 700 * repeat)
        self._reap()

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50))
    def keepalive(self, index: int) -> None:
        proto, _ = self.open[index % len(self.open)]
        proto.dataReceived(b"\r\n\r\n")
        self._reap()

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50), size=st.integers(1, 3000), paused=st.booleans())
    def write(self, index: int, size: int, paused: bool) -> None:
        proto, _ = self.open[index % len(self.open)]
        if paused:
            proto.pauseProducing()
        else:
            proto.resumeProducing()
        proto.write(b"w" * size)
        self._reap()

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 1.99, 2.0, 2.5, 4.9, 5.0, 7.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._reap()

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 50))
    def client_closes(self, index: int) -> None:
        _, wire = self.open[index % len(self.open)]
        wire.loseConnection()
        self._reap()

    @invariant()
    def within_caps(self) -> None:
        assert len(self.owner._connections) <= LIMITS.max_connections
        assert len(self.owner._connections) == len(self.open)
        for source in SOURCES:
            assert self.owner.connections_from(source) <= LIMITS.max_per_source
        per_source: dict[str, int] = {}
        for proto, _ in self.open:
            key = source_key(proto.peer.host)
            per_source[key] = per_source.get(key, 0) + 1
        assert all(n <= LIMITS.max_per_source for n in per_source.values())

    @invariant()
    def buffers_within_caps(self) -> None:
        for proto, _ in self.open:
            assert proto.framer.buffered <= LIMITS.max_message_size
            assert (proto.paused_bytes or 0) <= LIMITS.max_write_buffer

    @invariant()
    def one_live_timer_per_open_connection(self) -> None:
        live = [c for c in self.clock.getDelayedCalls() if c.active()]
        assert len(live) == len(self.open)
        for proto, _ in self.open:
            assert proto._timer is not None and proto._timer.active()

    def teardown(self) -> None:
        # Silence for longer than every deadline: all connections end, no timer is left.
        self.clock.advance(LIMITS.idle_timeout + LIMITS.header_timeout + 1)
        self._reap()
        assert not self.open
        assert not [c for c in self.clock.getDelayedCalls() if c.active()]
        assert len(self.owner._connections) == 0


TestStreamTransportMachine = StreamTransportMachine.TestCase


def test_connection_counts_per_transport() -> None:
    owner, _, _ = new_transport()
    accept(owner, "192.0.2.1", 1000)
    accept(owner, "192.0.2.2", 1000)
    assert owner.connection_counts() == {"tcp": 2, "tls": 0}
