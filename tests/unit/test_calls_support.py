"""A sans-IO harness for the B2BUA: a real TransactionManager on a Clock, a recording
sender (every message goes through bytes and back, so what we build must parse), fake
phones, fake media sessions that count their ports, and a recording CDR sink.

No tests live here; the module name only makes pytest's rootdir import find it.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from pbx.calls import B2BUA
from pbx.sip import (
    URI,
    Binding,
    DigestAuthenticator,
    DigestPolicy,
    Headers,
    LocationService,
    Peer,
    Request,
    Response,
    SIPEndpoint,
    SIPParseError,
    TransactionManager,
    TransportError,
    make_response,
    new_branch,
    parse,
)
from pbx.sip.auth import compute_response, credentials_from_password

T0 = 1_700_000_000.0
REALM = "pbx.test"
PASSWORDS = {"1001": "secret-1001", "1002": "secret-1002", "1003": "secret-1003"}
CALLER = Peer("udp", "192.0.2.10", 5060)
PBX_HOST = "192.0.2.1"
SDP_A = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
         b"m=audio 4000 RTP/AVP 0 101\r\n")
SDP_B = (b"v=0\r\no=- 2 2 IN IP4 192.0.2.20\r\ns=-\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\n"
         b"m=audio 5000 RTP/AVP 0 101\r\n")


def callee_peer(i: int) -> Peer:
    return Peer("udp", f"192.0.2.{20 + i}", 5062)


# -- fakes -----------------------------------------------------------------------------


class FakeMedia:
    """Counts port pairs like a MediaSession: two per call, released once on close."""

    def __init__(self, factory: MediaFactory, on_timeout: Callable[[Any], None]) -> None:
        self.factory = factory
        self.on_timeout = on_timeout
        self.ports: list[int] = []
        self.state = "allocating"
        self.offers: list[tuple[str, bytes]] = []

    def start(self) -> None:
        if self.factory.exhausted:
            raise RuntimeError("PortsExhausted")
        for _ in range(2):
            port = self.factory.next_port
            self.factory.next_port += 2
            self.factory.allocated[port] += 1
            self.ports.append(port)
        self.state = "waiting"

    def offer_from_a(self, sdp: bytes) -> bytes:
        if not sdp or b"m=audio" not in sdp:
            raise SIPParseError("no audio stream")
        self.offers.append(("a", sdp))
        return sdp.replace(b"192.0.2.10", PBX_HOST.encode())

    def answer_from_b(self, sdp: bytes) -> bytes:
        if b"m=audio" not in sdp:
            raise SIPParseError("no audio stream")
        self.state = "active"
        return sdp.replace(b"192.0.2.20", PBX_HOST.encode())

    def reoffer(self, side: str, sdp: bytes) -> bytes:
        self.offers.append((side, sdp))
        return b"RE:" + sdp

    def reanswer(self, side: str, sdp: bytes) -> bytes:
        return b"REA:" + sdp

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        for port in self.ports:
            self.factory.released[port] += 1

    def summary(self) -> dict[str, Any]:
        return {"state": self.state, "mos": 4.3}

    def time_out(self) -> None:
        self.on_timeout(self)


class MediaFactory:
    def __init__(self) -> None:
        self.sessions: list[FakeMedia] = []
        self.allocated: Counter[int] = Counter()
        self.released: Counter[int] = Counter()
        self.next_port = 10000
        self.exhausted = False

    def __call__(self, on_timeout: Callable[[Any], None]) -> FakeMedia:
        session = FakeMedia(self, on_timeout)
        self.sessions.append(session)
        return session

    def balanced(self) -> bool:
        """Every allocated port released exactly once."""
        return all(self.released[p] == 1 for p in self.allocated) and \
            set(self.released) <= set(self.allocated)


class FakeCDR:
    """Records CDR writes like the store would keep them."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.adds: list[dict[str, Any]] = []
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.interrupted_calls: list[Any] = []

    def add_cdr(self, record: Any) -> Deferred[int]:
        row = dict(record)
        self.adds.append(dict(row))  # as inserted, never updated
        self.rows[row["call_id"]] = row
        return succeed(len(self.adds))

    def update_cdr(self, call_id: str, fields: Any) -> Deferred[int]:
        self.updates.append((call_id, dict(fields)))
        if call_id not in self.rows:
            return succeed(0)
        self.rows[call_id].update(fields)
        return succeed(1)

    def mark_open_cdrs_interrupted(self, node: Any) -> Deferred[int]:
        self.interrupted_calls.append(node)
        return succeed(0)


class Directory:
    """Credential lookup: the extensions that exist."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = dict(passwords)
        self.disabled: set[str] = set()

    def credentials(self, username: str) -> Deferred[Any]:
        password = self.passwords.get(username)
        if password is None:
            return succeed(None)
        return succeed(credentials_from_password(username, REALM, password,
                                                 enabled=username not in self.disabled))


class RecordingSender:
    """The transport: every message is serialised and parsed again, then recorded."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[Request | Response, Peer]] = []
        self.unreachable: set[Peer] = set()

    def send_request(self, request: Request, peer: Peer) -> None:
        self._record(request, peer)

    def send_response(self, response: Response, peer: Peer) -> None:
        self._record(response, peer)

    def _record(self, message: Request | Response, peer: Peer) -> None:
        if peer in self.unreachable:
            raise TransportError("unreachable")
        self.sent.append((parse(message.to_bytes()), peer))


# -- the harness -----------------------------------------------------------------------


class Harness:
    def __init__(self, *, ring_timeout: float = 30.0, max_calls: int = 10,
                 registered: dict[str, list[Peer]] | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.sender = RecordingSender(self.clock)
        self.ready = True
        self.endpoint = SIPEndpoint(is_ready=lambda: self.ready, retry_after=17)
        self.transactions = TransactionManager(self.sender, self.endpoint, self.clock,
                                               trying_delay=None)
        self.location = LocationService(self.clock, wall_clock=self.clock.seconds)
        self.directory = Directory(PASSWORDS)
        self.auth = DigestAuthenticator(REALM, DigestPolicy(("SHA-256", "MD5")),
                                        now=self.clock.seconds)
        self.media = MediaFactory()
        self.cdr = FakeCDR()
        self.failures: list[str] = []
        self.successes: list[str] = []
        guard = self

        self.b2bua = B2BUA(self.clock, self.transactions, self.endpoint, self.location,
                           self.auth, self.directory, self.media, self.cdr,
                           ring_timeout=ring_timeout, max_calls=max_calls,
                           local_host=PBX_HOST, local_port=5060, node="node-a",
                           domain=REALM, guard=guard, wall=self.clock.seconds)
        self.b2bua.install()
        for number, peers in (registered if registered is not None
                              else {"1002": [callee_peer(0)]}).items():
            for peer in peers:
                self.register(number, peer)
        self._seen = 0

    # SourceGuard's recording interface
    def record_failure(self, host: str, account: str | None = None) -> bool:
        self.failures.append(host)
        return False

    def record_success(self, host: str, account: str | None = None) -> None:
        self.successes.append(host)

    def register(self, number: str, peer: Peer) -> None:
        contact = f"sip:{number}@{peer.host}:{peer.port}"
        self.location.apply(number, [Binding(number, contact, self.clock.seconds() + 3600,
                                             1.0, secrets.token_hex(4), 1, peer.transport,
                                             peer.host, peer.port)])

    # -- delivering ------------------------------------------------------------------
    def request(self, request: Request, peer: Peer) -> None:
        self.transactions.handle_request(parse(request.to_bytes()), peer)

    def response(self, response: Response, peer: Peer) -> None:
        self.transactions.handle_response(parse(response.to_bytes()), peer)

    def advance(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.calls and self.clock.calls[0].getTime() <= end:
            self.clock.advance(max(0.0, self.clock.calls[0].getTime() - self.clock.seconds()))
        self.clock.advance(max(0.0, end - self.clock.seconds()))

    # -- looking at what was sent ----------------------------------------------------------
    def new_messages(self) -> list[tuple[Request | Response, Peer]]:
        out = self.sender.sent[self._seen:]
        self._seen = len(self.sender.sent)
        return out

    def to(self, peer: Peer) -> list[Request | Response]:
        return [m for m, p in self.sender.sent if p == peer]

    def requests_to(self, peer: Peer, method: str | None = None) -> list[Request]:
        return [m for m in self.to(peer) if isinstance(m, Request)
                and (method is None or m.method == method)]

    def responses_to(self, peer: Peer, method: str | None = None) -> list[Response]:
        return [m for m in self.to(peer) if isinstance(m, Response)
                and (method is None or m.cseq.method == method)]

    def statuses_to(self, peer: Peer, method: str = "INVITE") -> list[int]:
        return [r.status for r in self.responses_to(peer, method)]


# -- phones ------------------------------------------------------------------------------


_NONCE_RE = re.compile(r'nonce="([^"]+)"')
_ALG_RE = re.compile(r"algorithm=([A-Za-z0-9-]+)")


class CallerPhone:
    """The UAC that dials: INVITE with digest auth, then ACK/BYE/CANCEL/re-INVITE."""

    def __init__(self, h: Harness, user: str = "1001", peer: Peer = CALLER) -> None:
        self.h = h
        self.user = user
        self.peer = peer
        self.call_id = f"{secrets.token_hex(6)}@{peer.host}"
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self.invite: Request | None = None
        self.remote_tag: str | None = None
        self.remote_target: URI | None = None

    def _headers(self, method: str, seq: int, branch: str, to_tag: str | None,
                 number: str) -> Headers:
        to = f"<sip:{number}@{REALM}>" + (f";tag={to_tag}" if to_tag else "")
        return Headers([
            ("Via", f"SIP/2.0/UDP {self.peer.host}:{self.peer.port};branch={branch};rport"),
            ("Max-Forwards", "70"),
            ("From", f"\"Alice\" <sip:{self.user}@{REALM}>;tag={self.tag}"),
            ("To", to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{seq} {method}"),
            ("Contact", f"<sip:{self.user}@{self.peer.host}:{self.peer.port}>"),
        ])

    def build_invite(self, number: str = "1002", body: bytes = SDP_A,
                     authorization: str | None = None, max_forwards: int = 70) -> Request:
        self.cseq += 1
        headers = self._headers("INVITE", self.cseq, new_branch(), None, number)
        headers.set("Max-Forwards", str(max_forwards))
        if authorization:
            headers.add("Proxy-Authorization", authorization)
        if body:
            headers.add("Content-Type", "application/sdp")
        return Request("INVITE", URI.parse(f"sip:{number}@{REALM}"), headers, body)

    def authorization(self, challenge: Response, request_uri: str, *,
                      password: str | None = None, user: str | None = None) -> str:
        header = challenge.headers.getall("Proxy-Authenticate")[0]
        nonce = _NONCE_RE.search(header).group(1)  # type: ignore[union-attr]
        algorithm = _ALG_RE.search(header).group(1)  # type: ignore[union-attr]
        user = user or self.user
        password = password if password is not None else PASSWORDS.get(user, "x")
        creds = credentials_from_password(user, REALM, password, [algorithm])
        response = compute_response(creds.ha1[algorithm], "INVITE", request_uri, nonce,
                                    algorithm, qop="auth", nc="00000001", cnonce="c0ffee")
        return (f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", '
                f'uri="{request_uri}", response="{response}", algorithm={algorithm}, '
                f'qop=auth, nc=00000001, cnonce="c0ffee"')

    def dial(self, number: str = "1002", body: bytes = SDP_A, *,
             password: str | None = None, max_forwards: int = 70) -> Request:
        """INVITE, 407, ACK (by the transaction), INVITE with credentials."""
        first = self.build_invite(number, body, max_forwards=max_forwards)
        self.h.request(first, self.peer)
        challenge = self.h.responses_to(self.peer, "INVITE")[-1]
        assert challenge.status == 407, challenge
        self.h.request(_ack_for_failure(first, challenge), self.peer)
        uri = f"sip:{number}@{REALM}"
        invite = self.build_invite(number, body, self.authorization(challenge, uri,
                                                                    password=password),
                                   max_forwards=max_forwards)
        self.invite = invite
        self.h.request(invite, self.peer)
        return invite

    def final(self) -> Response | None:
        """The final response to our (authenticated) INVITE, if any."""
        assert self.invite is not None
        for r in self.h.responses_to(self.peer, "INVITE"):
            if r.call_id == self.call_id and r.cseq.seq == self.invite.cseq.seq \
                    and r.status >= 200:
                if r.status < 300:
                    self.remote_tag = r.to.tag
                    self.remote_target = r.contacts[0].uri
                return r
        return None

    def statuses(self) -> list[int]:
        assert self.invite is not None
        return [r.status for r in self.h.responses_to(self.peer, "INVITE")
                if r.call_id == self.call_id and r.cseq.seq == self.invite.cseq.seq]

    def ack(self) -> None:
        final = self.final()
        assert final is not None and final.status < 300 and self.invite is not None
        self.h.request(self._in_dialog("ACK", seq=self.invite.cseq.seq), self.peer)

    def ack_failure(self) -> None:
        final = self.final()
        assert final is not None and self.invite is not None
        self.h.request(_ack_for_failure(self.invite, final), self.peer)

    def _in_dialog(self, method: str, *, seq: int | None = None, body: bytes = b"",
                   number: str = "1002") -> Request:
        if seq is None:
            self.cseq += 1
            seq = self.cseq
        assert self.remote_tag and self.remote_target
        headers = self._headers(method, seq, new_branch(), self.remote_tag, number)
        if body:
            headers.add("Content-Type", "application/sdp")
        return Request(method, self.remote_target.copy(), headers, body)

    def send(self, method: str, body: bytes = b"", **kw: Any) -> Request:
        self.final()
        request = self._in_dialog(method, body=body, **kw)
        self.h.request(request, self.peer)
        return request

    def cancel(self) -> None:
        assert self.invite is not None
        invite = self.invite
        headers = Headers([
            ("Via", invite.headers.getall("Via")[0]), ("Max-Forwards", "70"),
            ("From", invite.headers.get("From") or ""), ("To", invite.headers.get("To") or ""),
            ("Call-ID", invite.call_id), ("CSeq", f"{invite.cseq.seq} CANCEL"),
        ])
        self.h.request(Request("CANCEL", invite.uri.copy(), headers), self.peer)

    def answer_request(self, request: Request, status: int = 200, body: bytes = b"") -> None:
        response = make_response(request, status)
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body
        if request.method == "INVITE" and status < 300:
            response.headers.add("Contact", f"<sip:{self.user}@{self.peer.host}>")
        self.h.response(response, self.peer)


def _ack_for_failure(invite: Request, response: Response) -> Request:
    headers = Headers([
        ("Via", invite.headers.getall("Via")[0]), ("Max-Forwards", "70"),
        ("From", invite.headers.get("From") or ""), ("To", response.headers.get("To") or ""),
        ("Call-ID", invite.call_id), ("CSeq", f"{invite.cseq.seq} ACK"),
    ])
    return Request("ACK", invite.uri.copy(), headers)


class CalleePhone:
    """A registered phone that receives our forks."""

    def __init__(self, h: Harness, peer: Peer, user: str = "1002") -> None:
        self.h = h
        self.peer = peer
        self.user = user
        self.tag = secrets.token_hex(4)
        self.cseq = 100

    @property
    def invite(self) -> Request:
        invites = [r for r in self.h.requests_to(self.peer, "INVITE") if not r.to.tag]
        assert invites, f"no INVITE reached {self.peer}"
        return invites[-1]

    def has_invite(self) -> bool:
        return any(not r.to.tag for r in self.h.requests_to(self.peer, "INVITE"))

    def respond(self, status: int, body: bytes = b"", request: Request | None = None,
                reason: str | None = None) -> Response:
        request = request or self.invite
        response = make_response(request, status, reason,
                                 to_tag=None if status == 100 else self.tag)
        if 100 < status < 300 and request.method == "INVITE":
            response.headers.add("Contact", f"<sip:{self.user}@{self.peer.host}:{self.peer.port}>")
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body
        self.h.response(response, self.peer)
        return response

    def ringing(self) -> Response:
        return self.respond(180)

    def answer(self, body: bytes = SDP_B) -> Response:
        return self.respond(200, body)

    def acks(self) -> list[Request]:
        return self.h.requests_to(self.peer, "ACK")

    def byes(self) -> list[Request]:
        return self.h.requests_to(self.peer, "BYE")

    def cancels(self) -> list[Request]:
        return self.h.requests_to(self.peer, "CANCEL")

    def send(self, method: str, body: bytes = b"") -> Request:
        """An in-dialog request from the callee (needs our 2xx to have been sent)."""
        invite = self.invite
        self.cseq += 1
        headers = Headers([
            ("Via", f"SIP/2.0/UDP {self.peer.host}:{self.peer.port};branch={new_branch()}"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.user}@{REALM}>;tag={self.tag}"),
            ("To", invite.headers.get("From") or ""),
            ("Call-ID", invite.call_id),
            ("CSeq", f"{self.cseq} {method}"),
            ("Contact", f"<sip:{self.user}@{self.peer.host}:{self.peer.port}>"),
        ])
        if body:
            headers.add("Content-Type", "application/sdp")
        contact = invite.headers.get("Contact") or ""
        uri = URI.parse(contact.strip("<>"))
        request = Request(method, uri, headers, body)
        self.h.request(request, self.peer)
        return request

    def reply_to_last(self, method: str, status: int = 200, body: bytes = b"") -> None:
        requests = self.h.requests_to(self.peer, method)
        assert requests, f"no {method} reached {self.peer}"
        request = requests[-1]
        response = make_response(request, status)
        if method == "INVITE" and status < 300:
            response.headers.add("Contact", f"<sip:{self.user}@{self.peer.host}>")
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body
        self.h.response(response, self.peer)
