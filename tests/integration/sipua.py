"""A small scripted SIP UA over UDP for tests against the real PBX.

Enough of RFC 3261 for a phone: REGISTER and INVITE with digest MD5 (RFC 2617 / RFC
8760, ``qop=auth`` or none), answering an INVITE (180, then 200 with SDP after a chosen
ring time), ACK, BYE, and an RTP socket that can sit on another loopback address than
the one the SDP names (a phone behind NAT: it signals its private address, its packets
come from the NAT's public one).  For offer/answer tests: a chosen offer body (none: a
late offer, answered in the ACK), a chosen answer (``answer_sdp``), re-INVITEs sent from
either side (:meth:`Phone.reinvite`) and answered with a chosen status, and a log of
every request received (``requests``) and ACK body (``ack_bodies``).  Blocking sockets
and one :class:`Net` poll loop in the test's thread; no reactor.  Only loopback
addresses are meant to be used.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Message", "Net", "Phone", "RtpEndpoint", "parse", "rtp_packet"]


@dataclass
class Message:
    start: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/2.0")

    @property
    def status(self) -> int:
        return int(self.start.split()[1]) if self.is_response else 0

    @property
    def method(self) -> str:
        return self.start.split()[0] if not self.is_response else self.get("CSeq").split()[1]

    def get(self, name: str) -> str:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return ""

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def encode(self) -> bytes:
        headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
        lines = [self.start, *(f"{k}: {v}" for k, v in headers),
                 f"Content-Length: {len(self.body)}", "", ""]
        return "\r\n".join(lines).encode() + self.body


_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact",
            "l": "Content-Length", "c": "Content-Type"}


def parse(data: bytes) -> Message:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip()
        headers.append((_COMPACT.get(name.lower(), name), value.strip()))
    return Message(lines[0], headers, body)


def _digest(challenge: str, method: str, uri: str, user: str, password: str) -> str:
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
    realm, nonce = params["realm"], params["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    parts = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"',
             "algorithm=MD5"]
    if "auth" in params.get("qop", "").split(","):
        cnonce, nc = secrets.token_hex(8), "00000001"
        response = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        parts += [f'cnonce="{cnonce}"', f"nc={nc}", "qop=auth"]
    else:
        response = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    parts.append(f'response="{response}"')
    if "opaque" in params:
        parts.append(f'opaque="{params["opaque"]}"')
    return "Digest " + ", ".join(parts)


def rtp_packet(seq: int, ssrc: int, payload: bytes, pt: int = 0) -> bytes:
    """An RTP packet (RFC 3550 §5.1): version 2, no padding/extension/CSRC."""
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF,
                       ssrc) + payload


class RtpEndpoint:
    """A UDP socket on ``host`` (the address packets really come from) that records
    what it receives."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def readable(self) -> None:
        while True:
            try:
                self.received.append(self.sock.recvfrom(4096))
            except BlockingIOError:
                return

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # ICMP unreachable from a previous send
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()


class Net:
    """Polls every socket of the phones and RTP endpoints it knows; runs timed actions."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.background: list[Callable[[], None]] = []  # run every tick of every run()

    def add(self, sock: socket.socket, reader: Callable[[], None]) -> None:
        self.readers[sock.fileno()] = reader

    def later(self, delay: float, action: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, action))

    def run(self, seconds: float, until: Callable[[], bool] | None = None,
            tick: Callable[[], None] | None = None, every: float = 0.02) -> bool:
        """Pump for ``seconds`` (or until ``until()``); ``tick`` runs every ``every`` s."""
        end = time.monotonic() + seconds
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            if until is not None and until():
                return True
            if now >= end:
                return until is None
            for due, action in [t for t in self.timers if t[0] <= now]:
                self.timers.remove((due, action))
                action()
            ticking = tick is not None or bool(self.background)
            if ticking and now >= next_tick:
                if tick is not None:
                    tick()
                for action in list(self.background):
                    action()
                next_tick = now + every
            wait = max(0.0, min(end, next_tick if ticking else end,
                                *(t[0] for t in self.timers)) - time.monotonic())
            ready, _, _ = select.select(list(self.readers), [], [], min(wait, 0.01))
            for fd in ready:
                self.readers[fd]()


class Phone:
    """One extension: a SIP socket on ``sip_host`` and a media socket on ``rtp_host``,
    while its Contact and SDP name ``private_host`` (what a phone behind NAT says)."""

    def __init__(self, net: Net, number: str, password: str, pbx: tuple[str, int], *,
                 private_host: str, public_host: str) -> None:
        self.net, self.number, self.password, self.pbx = net, number, password, pbx
        self.private_host = private_host
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((public_host, 0))
        self.sip.setblocking(False)
        self.sip_port = int(self.sip.getsockname()[1])
        self.rtp = RtpEndpoint(public_host)
        self.sdp_port = 20000 + secrets.randbelow(20000) * 2  # nothing listens there
        self.inbox: list[Message] = []
        self.cseq = 1
        self.call_id = ""
        self.tags = {"local": secrets.token_hex(4), "remote": ""}
        self.remote_rtp: tuple[str, int] | None = None
        self.dialog_uri = ""
        self.invite: Message | None = None
        self.answered = False
        self.acked = False
        self.requests: list[Message] = []        # every request received
        self.ack_bodies: list[bytes] = []
        self.reinvite_status = 200               # what re-INVITEs received get
        # The SDP this phone answers an offer with (default: its own sdp()).
        self.answer_sdp: Callable[[bytes], bytes] = lambda _offer: self.sdp()
        self.offer_sdp: Callable[[], bytes] = lambda: self.sdp()  # 2xx to an offerless INVITE
        self.dialog: dict[str, str] = {}         # call_id, from, to, target (after setup)
        net.add(self.sip, self._readable)
        net.add(self.rtp.sock, self.rtp.readable)

    # -- plumbing -------------------------------------------------------------------------
    def _readable(self) -> None:
        while True:
            try:
                data, _addr = self.sip.recvfrom(65535)
            except BlockingIOError:
                return
            message = parse(data)
            if not message.is_response:
                self._request(message)
            else:
                self.inbox.append(message)

    def send(self, message: Message) -> None:
        self.sip.sendto(message.encode(), self.pbx)

    def _via(self) -> str:
        return (f"SIP/2.0/UDP {self.private_host}:{self.sip_port};rport;"
                f"branch=z9hG4bK{secrets.token_hex(8)}")

    def sdp(self) -> bytes:
        host = self.private_host
        return (f"v=0\r\no={self.number} 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\n"
                f"t=0 0\r\nm=audio {self.sdp_port} RTP/AVP 0 8 101\r\n"
                "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n").encode()

    def _learn_sdp(self, body: bytes) -> None:
        text = body.decode(errors="replace")
        host = re.search(r"c=IN IP4 (\S+)", text)
        port = re.search(r"m=audio (\d+)", text)
        if host and port:
            self.remote_rtp = (host.group(1), int(port.group(1)))

    def _request_msg(self, method: str, uri: str, *, to: str, body: bytes = b"",
                     extra: list[tuple[str, str]] | None = None, cseq: int | None = None,
                     branch_via: str | None = None) -> Message:
        headers = [("Via", branch_via or self._via()), ("Max-Forwards", "70"),
                   ("From", f"<sip:{self.number}@{self.pbx[0]}>;tag={self.tags['local']}"),
                   ("To", to), ("Call-ID", self.call_id),
                   ("CSeq", f"{cseq or self.cseq} {method}"),
                   ("Contact", f"<sip:{self.number}@{self.private_host}:{self.sip_port}>"),
                   ("User-Agent", "sipua-test"), *(extra or [])]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return Message(f"{method} {uri} SIP/2.0", headers, body)

    def _transact(self, build: Callable[[list[tuple[str, str]]], Message], method: str,
                  timeout: float = 5.0) -> Message:
        """Send, answer one digest challenge, return the final response."""
        extra: list[tuple[str, str]] = []
        for _attempt in range(2):
            request = build(extra)
            self.inbox.clear()
            self.send(request)
            final = self._final(method, timeout)
            if final.status in (401, 407):
                name = "WWW-Authenticate" if final.status == 401 else "Proxy-Authenticate"
                header = "Authorization" if final.status == 401 else "Proxy-Authorization"
                uri = request.start.split()[1]
                extra = [(header, _digest(final.get(name), method, uri, self.number,
                                          self.password))]
                if method == "INVITE":
                    self._ack_error(request, final)
                self.cseq += 1
                continue
            return final
        raise AssertionError(f"{method} still challenged")

    def _final(self, method: str, timeout: float) -> Message:
        found: list[Message] = []

        def done() -> bool:
            for message in self.inbox:
                if message.method == method and message.status >= 200:
                    found.append(message)
                    return True
            return False

        if not self.net.run(timeout, until=done):
            raise AssertionError(f"no final response to {method}")
        return found[0]

    def _ack_error(self, invite: Message, response: Message) -> None:
        ack = Message(f"ACK {invite.start.split()[1]} SIP/2.0",
                      [("Via", invite.get("Via")), ("Max-Forwards", "70"),
                       ("From", invite.get("From")), ("To", response.get("To")),
                       ("Call-ID", invite.get("Call-ID")),
                       ("CSeq", f"{invite.get('CSeq').split()[0]} ACK")])
        self.send(ack)

    # -- UAC ----------------------------------------------------------------------------
    def register(self) -> None:
        self.call_id = secrets.token_hex(8)
        uri = f"sip:{self.pbx[0]}:{self.pbx[1]}"
        to = f"<sip:{self.number}@{self.pbx[0]}>"
        final = self._transact(lambda extra: self._request_msg(
            "REGISTER", uri, to=to, extra=[("Expires", "300"), *extra]), "REGISTER")
        assert final.status == 200, final.start

    def call(self, number: str, timeout: float = 30.0, *, body: bytes | None = None,
             ack_body: bytes | None = None) -> Message:
        """INVITE ``number`` with SDP (``body``; ``b""``: a late offer, whose answer goes
        in the ACK: ``ack_body``, default ``answer_sdp``); returns the 2xx (ACKed)."""
        final = self.invite_final(number, timeout, body=body)
        assert final.status == 200, final.start
        self._learn_sdp(final.body)
        self.tags["remote_to"] = final.get("To")
        contact = re.search(r"<([^>]+)>", final.get("Contact"))
        self.dialog_uri = contact.group(1) if contact else self._uri(number)
        self.dialog = {"call_id": self.call_id, "to": final.get("To"),
                       "from": f"<sip:{self.number}@{self.pbx[0]}>;tag={self.tags['local']}",
                       "target": self.dialog_uri}
        if body == b"" and ack_body is None:
            ack_body = self.answer_sdp(final.body)
        ack = self._request_msg("ACK", self.dialog_uri, to=final.get("To"),
                                cseq=int(final.get("CSeq").split()[0]), body=ack_body or b"")
        self.send(ack)
        return final

    def _uri(self, number: str) -> str:
        return f"sip:{number}@{self.pbx[0]}:{self.pbx[1]}"

    def invite_final(self, number: str, timeout: float = 30.0, *,
                     body: bytes | None = None) -> Message:
        """INVITE ``number`` and return its final response (a failure is ACKed)."""
        self.call_id = secrets.token_hex(8)
        self.cseq += 1
        uri, to = self._uri(number), f"<sip:{number}@{self.pbx[0]}>"
        sdp = self.sdp() if body is None else body
        sent: list[Message] = []

        def build(extra: list[tuple[str, str]]) -> Message:
            sent.append(self._request_msg("INVITE", uri, to=to, body=sdp, extra=extra))
            return sent[-1]

        final = self._transact(build, "INVITE", timeout)
        if final.status >= 300:
            self._ack_error(sent[-1], final)
        return final

    def reinvite(self, body: bytes, timeout: float = 10.0,
                 ack_body: bytes | None = None) -> Message:
        """A re-INVITE in the call's dialog (caller or callee side); its final response
        is returned, a 2xx ACKed (with ``ack_body``: the answer to an offer in it)."""
        d = self.dialog
        assert d, "no dialog"
        self.cseq += 1
        headers = [("Via", self._via()), ("Max-Forwards", "70"), ("From", d["from"]),
                   ("To", d["to"]), ("Call-ID", d["call_id"]),
                   ("CSeq", f"{self.cseq} INVITE"),
                   ("Contact", f"<sip:{self.number}@{self.private_host}:{self.sip_port}>")]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        self.inbox.clear()
        self.send(Message(f"INVITE {d['target']} SIP/2.0", headers, body))
        final = self._final("INVITE", timeout)
        ack_headers = [("Via", self._via()), ("Max-Forwards", "70"), ("From", d["from"]),
                       ("To", d["to"]), ("Call-ID", d["call_id"]),
                       ("CSeq", f"{self.cseq} ACK")]
        if final.status < 300:
            if final.body:
                self._learn_sdp(final.body)
            if ack_body:
                ack_headers.append(("Content-Type", "application/sdp"))
            self.send(Message(f"ACK {d['target']} SIP/2.0", ack_headers, ack_body or b""))
        else:
            self.send(Message(f"ACK {d['target']} SIP/2.0",
                              [(k, final.get("To") if k == "To" else v)
                               for k, v in ack_headers]))
        return final

    def bye(self) -> None:
        self.cseq += 1
        self.inbox.clear()
        self.send(self._request_msg("BYE", self.dialog_uri, to=self.tags["remote_to"]))
        self._final("BYE", 5.0)

    # -- UAS ----------------------------------------------------------------------------
    def answer_after(self, ring: float) -> None:
        """Answer the next INVITE: 180 at once, 200 with SDP after ``ring`` seconds."""
        self.ring = ring

    def _reply(self, request: Message, status: int, reason: str, body: bytes = b"") -> None:
        to = request.get("To")
        if ";tag=" not in to:
            to += f";tag={self.tags['local']}"
        headers = [*(("Via", v) for v in request.getall("Via")), ("From", request.get("From")),
                   ("To", to), ("Call-ID", request.get("Call-ID")), ("CSeq", request.get("CSeq")),
                   ("Contact", f"<sip:{self.number}@{self.private_host}:{self.sip_port}>")]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        self.send(Message(f"SIP/2.0 {status} {reason}", headers, body))

    def _request(self, request: Message) -> None:
        method = request.start.split()[0]
        self.requests.append(request)
        if method == "INVITE" and self.invite is None:
            self.invite = request
            if request.body:
                self._learn_sdp(request.body)
            self._reply(request, 180, "Ringing")
            self.net.later(getattr(self, "ring", 0.0), self._answer)
        elif method == "INVITE":
            if self.reinvite_status >= 300:
                self._reply(request, self.reinvite_status, "Not Acceptable Here")
            elif self.answered:
                body = self.answer_sdp(request.body) if request.body else self.offer_sdp()
                self._reply(request, 200, "OK", body)
        elif method == "ACK":
            self.acked = True
            self.ack_bodies.append(request.body)
            if request.body:
                self._learn_sdp(request.body)
        elif method in ("BYE", "OPTIONS", "INFO") or method == "CANCEL":
            self._reply(request, 200, "OK")

    def _answer(self) -> None:
        invite = self.invite
        assert invite is not None
        self.answered = True
        to = invite.get("To")
        self.dialog = {"call_id": invite.get("Call-ID"), "from": f"{to};tag={self.tags['local']}"
                       if ";tag=" not in to else to, "to": invite.get("From"),
                       "target": (re.search(r"<([^>]+)>", invite.get("Contact")) or
                                  re.search(r"(\S+)", invite.get("Contact"))).group(1)}
        body = self.answer_sdp(invite.body) if invite.body else self.offer_sdp()
        self._reply(invite, 200, "OK", body)

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()
