"""No amplification: a request that belongs to nothing gets at most one response.

Counted on the wire (every message the stack sends) over 35 s of Clock time, longer
than Timer G/H's 32 s: 481s for unknown dialogs and 401/407 challenges are sent once,
statelessly (RFC 3261 §8.2.7), their ACKs are absorbed without an answer or new state,
and a retransmitted request gets one new answer (one out per one in).
"""

from __future__ import annotations

import secrets

from twisted.internet.task import Clock

from pbx.sip import (
    URI,
    DigestAuthenticator,
    DigestPolicy,
    Headers,
    Peer,
    Request,
    Response,
    SIPEndpoint,
    TransactionManager,
    new_branch,
    parse,
)
from pbx.sip.abuse import SecurityPolicy, SourceGuard
from pbx.sip.location import LocationService
from pbx.sip.registrar import Registrar

from .test_calls_support import (
    REALM,
    CalleePhone,
    CallerPhone,
    Harness,
    _ack_for_failure,
    callee_peer,
)

ATTACKER = Peer("udp", "203.0.113.50", 5070)
B = callee_peer(0)  # where the harness registered 1002


def live_server_transactions(h: Harness) -> int:
    return sum(1 for t in h.transactions.transactions() if t.kind in ("ist", "nist"))


def tagged_request(method: str, *, to_tag: str, peer: Peer = ATTACKER,
                   call_id: str | None = None) -> Request:
    headers = Headers([
        ("Via", f"SIP/2.0/UDP {peer.host}:{peer.port};branch={new_branch()};rport"),
        ("Max-Forwards", "70"),
        ("From", f"<sip:1001@{REALM}>;tag={secrets.token_hex(4)}"),
        ("To", f"<sip:1002@{REALM}>;tag={to_tag}"),
        ("Call-ID", call_id or secrets.token_hex(8)),
        ("CSeq", f"1 {method}"),
        ("Contact", f"<sip:1001@{peer.host}:{peer.port}>"),
    ])
    return Request(method, URI.parse(f"sip:1002@{REALM}"), headers)


def test_invite_for_an_unknown_dialog_gets_one_481_in_35_seconds() -> None:
    h = Harness()
    invite = tagged_request("INVITE", to_tag=secrets.token_hex(6))
    h.request(invite, ATTACKER)
    h.advance(35)
    answers = h.responses_to(ATTACKER)
    assert [r.status for r in answers] == [481]
    assert live_server_transactions(h) == 0  # nothing kept for it
    # its ACK: no answer, no new state
    h.request(_ack_for_failure(invite, answers[0]), ATTACKER)
    h.advance(35)
    assert len(h.to(ATTACKER)) == 1
    assert live_server_transactions(h) == 0


def test_each_retransmission_gets_exactly_one_answer() -> None:
    h = Harness()
    invite = tagged_request("INVITE", to_tag="feedbeef")
    for _ in range(5):  # the same request, as a peer retransmits it
        h.request(invite, ATTACKER)
    h.advance(35)
    assert [r.status for r in h.responses_to(ATTACKER)] == [481] * 5


def test_in_dialog_non_invite_for_an_unknown_dialog_gets_one_481() -> None:
    h = Harness()
    for method in ("BYE", "INFO", "OPTIONS"):
        h.request(tagged_request(method, to_tag=secrets.token_hex(6)), ATTACKER)
    h.advance(35)
    assert [r.status for r in h.responses_to(ATTACKER)] == [481, 481, 481]
    assert live_server_transactions(h) == 0


def test_unauthenticated_invite_gets_one_407_and_its_ack_is_absorbed() -> None:
    h = Harness()
    a = CallerPhone(h, peer=ATTACKER)
    invite = a.build_invite()
    h.request(invite, ATTACKER)
    h.advance(35)
    challenges = h.responses_to(ATTACKER)
    assert [r.status for r in challenges] == [407]
    assert live_server_transactions(h) == 0
    acks_before = h.transactions.stats.stray_acks
    h.request(_ack_for_failure(invite, challenges[0]), ATTACKER)
    h.advance(35)
    assert len(h.to(ATTACKER)) == 1
    assert h.transactions.stats.stray_acks == acks_before + 1
    assert live_server_transactions(h) == 0


def test_wrong_password_gets_one_407() -> None:
    h = Harness()
    a = CallerPhone(h, peer=ATTACKER)
    a.dial(password="wrong")
    h.advance(35)
    assert [r.status for r in h.responses_to(ATTACKER)] == [407, 407]
    assert live_server_transactions(h) == 0


def test_a_call_still_works_after_a_stateless_challenge() -> None:
    h = Harness()
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()
    a.ack()
    assert a.final() is not None and a.final().status == 200  # type: ignore[union-attr]
    # an in-dialog request of the real dialog is handled, not answered 481
    a.send("BYE")
    assert [r.status for r in h.responses_to(a.peer, "BYE")] == [200]


def test_b2bua_tells_the_guard_which_dialogs_exist() -> None:
    h = Harness()
    guard = SourceGuard(SecurityPolicy())
    h.b2bua.guard = guard
    h.b2bua.install()
    assert guard.dialog_exists is not None
    assert guard.dialog_exists("nope", "a", "b") is False
    a = CallerPhone(h)
    b = CalleePhone(h, B)
    a.dial()
    b.ringing()
    b.answer()
    a.ack()
    final = a.final()
    assert final is not None
    assert guard.dialog_exists(a.call_id, final.to.tag or "", a.tag) is True


# -- the registrar's challenge ---------------------------------------------------------------


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[Response | Request, Peer]] = []

    def send_request(self, request: Request, peer: Peer) -> None:
        self.sent.append((parse(request.to_bytes()), peer))

    def send_response(self, response: Response, peer: Peer) -> None:
        self.sent.append((parse(response.to_bytes()), peer))


def test_register_challenge_is_stateless_one_per_request() -> None:
    clock = Clock()
    wire = Wire()
    endpoint = SIPEndpoint(is_ready=lambda: True)
    manager = TransactionManager(wire, endpoint, clock)
    auth = DigestAuthenticator(REALM, DigestPolicy(secret=b"k" * 32), now=clock.seconds)

    class NoUsers:
        def credentials(self, username: str) -> object:
            raise AssertionError("no lookup for an unauthenticated REGISTER")

    registrar = Registrar(location=LocationService(clock, None), authenticator=auth,
                          credentials=NoUsers(), domains=[REALM])  # type: ignore[arg-type]
    endpoint.handlers["REGISTER"] = registrar.handle_register
    text = (f"REGISTER sip:{REALM} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {ATTACKER.host}:{ATTACKER.port};branch=z9hG4bKreg1;rport\r\n"
            f"From: <sip:1001@{REALM}>;tag=f1\r\nTo: <sip:1001@{REALM}>\r\n"
            "Call-ID: reg-1\r\nCSeq: 1 REGISTER\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:1001@{ATTACKER.host}:{ATTACKER.port}>\r\nContent-Length: 0\r\n\r\n")
    for _ in range(3):
        manager.handle_request(parse(text.encode()), ATTACKER)  # type: ignore[arg-type]
    clock.advance(35)
    assert [m.status for m, _ in wire.sent if isinstance(m, Response)] == [401, 401, 401]
    assert manager.transactions() == []
    assert manager.stats.terminated["nist"]["stateless"] == 3
