"""Transport rules that need no socket: Via stamping (§18.2.1, RFC 3581) and response
routing (§18.2.2); plus the TCP protocol on an in-memory transport."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport

from pbx.sip import Peer, Request, Response, parse
from pbx.sip.transport import SIPTransport, response_destination, stamp_via


def request(via: str, extra: str = "") -> Request:
    data = (
        "OPTIONS sip:pbx@10.0.0.1 SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:pbx@10.0.0.1>\r\n"
        f"Call-ID: c@x\r\nCSeq: 7 OPTIONS\r\nMax-Forwards: 70\r\n{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    message = parse(data)
    assert isinstance(message, Request)
    return message


def test_received_added_when_host_differs() -> None:
    req = request("SIP/2.0/UDP phone.example.com:5062;branch=z9hG4bK1")
    stamp_via(req, Peer("udp", "192.0.2.4", 5062))
    top = req.top_via
    assert top.received == "192.0.2.4"
    assert top.rport is None and not top.rport_requested
    assert [v.host for v in req.vias] == ["phone.example.com", "proxy.example.com"]


def test_nothing_added_when_host_matches_and_no_rport() -> None:
    req = request("SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bK1")
    before = req.to_bytes()
    stamp_via(req, Peer("udp", "192.0.2.4", 5062))
    assert req.to_bytes() == before


def test_rport_filled_and_received_always_set() -> None:
    req = request("SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bK1;rport")
    stamp_via(req, Peer("udp", "192.0.2.4", 40000))
    top = req.top_via
    assert top.rport == 40000
    assert top.received == "192.0.2.4"


def response_for(req: Request) -> Response:
    from pbx.sip import make_response

    return make_response(req, 200)


def test_udp_response_goes_to_received_and_rport() -> None:
    req = request("SIP/2.0/UDP phone.example.com:5062;branch=z9hG4bK1;rport")
    stamp_via(req, Peer("udp", "198.51.100.9", 34567))
    dest = response_destination(response_for(req), Peer("udp", "198.51.100.9", 34567))
    assert dest == Peer("udp", "198.51.100.9", 34567)


def test_udp_response_without_rport_still_goes_to_the_source() -> None:
    """Never trust the Via: a UDP request is answered to where it came from."""
    req = request("SIP/2.0/UDP phone.example.com:5062;branch=z9hG4bK1")
    stamp_via(req, Peer("udp", "198.51.100.9", 34567))
    dest = response_destination(response_for(req), Peer("udp", "198.51.100.9", 34567))
    assert dest == Peer("udp", "198.51.100.9", 34567)


def test_default_port_when_sent_by_has_none() -> None:
    req = request("SIP/2.0/TCP 198.51.100.9;branch=z9hG4bK1")
    dest = response_destination(response_for(req), Peer("tcp", "198.51.100.9", 40001))
    assert dest == Peer("tcp", "198.51.100.9", 5060)


def tcp_protocol() -> tuple[SIPTransport, StringTransport, list[Request]]:
    received: list[Request] = []

    class Sink:
        def handle_request(self, req: Request, peer: Peer) -> None:
            received.append(req)

        def handle_response(self, resp: Response, peer: Peer) -> None:
            raise AssertionError("no responses expected")

    owner = SIPTransport(MemoryReactorClock())
    owner.handler = Sink()
    from pbx.sip.transport import SIPStreamFactory

    proto = SIPStreamFactory(owner, "tcp").buildProtocol(_Addr("192.0.2.7", 45000))  # type: ignore[arg-type]
    wire = StringTransport(peerAddress=_Addr("192.0.2.7", 45000))
    proto.makeConnection(wire)
    return owner, wire, received


class _Addr:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


def test_tcp_stream_split_anywhere_and_keepalive_pong() -> None:
    owner, wire, received = tcp_protocol()
    data = request("SIP/2.0/TCP 192.0.2.7:45000;branch=z9hG4bK1").to_bytes()
    proto = owner._connections.get(("tcp", "192.0.2.7", 45000))
    proto.dataReceived(b"\r\n\r\n")
    assert wire.value() == b"\r\n"
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    proto.dataReceived(data + data)
    assert len(received) == 3


def test_tcp_broken_framing_closes_only_that_connection() -> None:
    owner, wire, received = tcp_protocol()
    proto = owner._connections.get(("tcp", "192.0.2.7", 45000))
    proto.dataReceived(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h\r\n\r\n")
    assert wire.disconnecting
    assert owner.stats.dropped["stream_framing"] == 1
    assert not received


def guarded_transport(rate: float) -> tuple[SIPTransport, list[Request]]:
    from pbx.sip import SecurityPolicy, SourceGuard
    from pbx.sip.abuse import RateLimitPolicy

    received: list[Request] = []

    class Sink:
        def handle_request(self, req: Request, peer: Peer) -> None:
            received.append(req)

        def handle_response(self, resp: Response, peer: Peer) -> None:
            raise AssertionError("no responses expected")

    guard = SourceGuard(SecurityPolicy(rate_limit=RateLimitPolicy(True, rate, 1)),
                        now=lambda: 0.0)
    owner = SIPTransport(MemoryReactorClock(), guard=guard)
    owner.handler = Sink()
    return owner, received


def test_guard_is_not_bypassed_by_tag_in_display_name_or_on_register() -> None:
    owner, received = guarded_transport(0.001)  # burst 1, no refill: one request passes
    peer = Peer("udp", "198.51.100.7", 5062)
    base = request("SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK1").to_bytes()
    owner.message_received(base, peer, datagram=True)
    sneaky = base.replace(b"To: <sip:pbx@10.0.0.1>", b'To: "tag=x" <sip:pbx@10.0.0.1>')
    owner.message_received(sneaky, peer, datagram=True)
    register = (base.replace(b"OPTIONS", b"REGISTER")
                .replace(b"To: <sip:pbx@10.0.0.1>", b"To: <sip:pbx@10.0.0.1>;tag=abc"))
    owner.message_received(register, peer, datagram=True)
    assert len(received) == 1
    assert owner.stats.dropped["rate_limited"] == 2
    in_dialog = base.replace(b"To: <sip:pbx@10.0.0.1>", b"To: <sip:pbx@10.0.0.1>;tag=abc")
    owner.message_received(in_dialog, peer, datagram=True)
    assert len(received) == 1  # a To tag of a dialog that does not exist: still limited
    assert owner.guard is not None
    owner.guard.dialog_exists = lambda call_id, to_tag, from_tag: to_tag == "abc"
    owner.message_received(in_dialog, peer, datagram=True)
    assert len(received) == 2  # the dialog exists: in-dialog, not limited


def test_bad_requests_and_cancels_are_rate_limited_too() -> None:
    """A flood of garbage or of CANCELs from one source is not answered 1:1 for ever."""
    owner, received = guarded_transport(rate=0.0)  # burst 1, no refill
    sent: list[bytes] = []
    owner._send = lambda data, peer: sent.append(data)  # type: ignore[method-assign]
    peer = Peer("udp", "192.0.2.50", 5060)
    good = request("SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKbad").to_bytes()
    bad = good.replace(b"Max-Forwards: 70", b"Max-Forwards: x")
    for _ in range(5):
        owner.message_received(bad, peer, datagram=True)
    assert len(sent) == 1 and sent[0].startswith(b"SIP/2.0 400")
    assert owner.stats.dropped["unparseable_limited"] == 4
    cancel = request("SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKc").to_bytes().replace(
        b"OPTIONS", b"CANCEL")
    for _ in range(3):
        owner.message_received(cancel, peer, datagram=True)
    assert not received  # the bucket is empty: CANCELs are limited like the rest
