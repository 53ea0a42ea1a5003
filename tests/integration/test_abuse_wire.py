"""Abuse defence on the wire, against the real PBX (``twistd -n pbx``) over loopback UDP.

* A flood of INVITEs with invented To tags is rate limited and gets at most one
  response per request: no 481 is retransmitted (issue 10 item 3).
* An unauthenticated INVITE gets one 407, not Timer G's retransmissions.
* Guesses at another extension's password interleaved with logins to one's own are
  blocked; the victim's phone, from its own address, still registers (item 5).

Counts, not timings: responses are collected for a few seconds after the last request,
longer than Timer G's first retransmissions (0.5 s, 1.5 s, 3.5 s).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from .conftest import PBXProcess, clean_env, start_pbx

pytestmark = pytest.mark.integration

COLLECT = 5.0  # seconds of listening after the last request (Timer G: 0.5, 1.5, 3.5 s)


def collect(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within ``seconds``."""
    out: list[bytes] = []
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        sock.settimeout(left)
        try:
            out.append(sock.recv(65535))
        except TimeoutError:
            return out


def call_id_of(message: bytes) -> str:
    match = re.search(rb"\r\nCall-ID: *([^\r\n]+)", message, re.IGNORECASE)
    return match.group(1).decode() if match else ""


def status_of(message: bytes) -> int:
    return int(message.split(b" ", 2)[1]) if message.startswith(b"SIP/2.0 ") else 0


def invite(port: int, local: tuple[str, int], *, to_tag: str | None) -> bytes:
    host, lport = local
    branch = "z9hG4bK" + secrets.token_hex(8)
    tag = f";tag={to_tag}" if to_tag else ""
    return (
        f"INVITE sip:7002@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{lport};branch={branch};rport\r\n"
        f"From: <sip:7001@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:7002@127.0.0.1>{tag}\r\n"
        f"Call-ID: {secrets.token_hex(10)}@flood\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:7001@{host}:{lport}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    return sock


FLOOD = """
security:
  rate_limit:
    requests_per_second: 1
    burst: 20
"""


def test_to_tag_flood_is_rate_limited_and_never_amplified(tmp_path: Path) -> None:
    pbx = start_pbx(tmp_path, extra=FLOOD)
    try:
        with udp_socket() as sock:
            target = ("127.0.0.1", pbx.sip_port)
            sent = 200
            for _ in range(sent):
                sock.sendto(invite(pbx.sip_port, sock.getsockname(),
                                   to_tag=secrets.token_hex(6)), target)
            replies = collect(sock, COLLECT)
        per_request = Counter(call_id_of(r) for r in replies)
        statuses = Counter(status_of(r) for r in replies)
        assert set(statuses) <= {481}, statuses
        assert max(per_request.values(), default=0) <= 1, "a 481 was retransmitted"
        assert len(replies) <= sent
        # burst 20, 1 token/s: the flood is cut once the burst is spent
        assert 1 <= len(replies) <= 50, len(replies)
    finally:
        assert pbx.stop() == 0


def test_unauthenticated_invite_gets_exactly_one_407(tmp_path: Path) -> None:
    pbx = start_pbx(tmp_path)
    try:
        with udp_socket() as sock:
            sock.sendto(invite(pbx.sip_port, sock.getsockname(), to_tag=None),
                        ("127.0.0.1", pbx.sip_port))
            replies = collect(sock, COLLECT)
        assert [status_of(r) for r in replies if status_of(r) >= 200] == [407]
        assert len(replies) == 1  # no 100 Trying, no retransmission
    finally:
        assert pbx.stop() == 0


# -- brute force -------------------------------------------------------------------------

PASSWORDS = {"7001": secrets.token_hex(10), "7002": secrets.token_hex(10)}
GUESSING = """
auth:
  algorithms: [SHA-256, MD5]
security:
  rate_limit:
    requests_per_second: 2000
    burst: 4000
  brute_force:
    max_failures: 4
    window: 60
    block_time: 600
    action: reject
extensions:
""" + "".join(f"  - {{number: '{n}', password_env: PBX_EXT_{n}_PASSWORD}}\n" for n in PASSWORDS)


class Phone:
    """REGISTERs with SHA-256 digest from its own loopback address."""

    def __init__(self, pbx: PBXProcess, host: str) -> None:
        self.port = pbx.sip_port
        self.sock = udp_socket(host)
        self.sock.settimeout(3)
        self.cseq = 0
        self.call_id = secrets.token_hex(8)

    def _send(self, user: str, authorization: str = "") -> bytes:
        host, lport = self.sock.getsockname()
        self.cseq += 1
        branch = "z9hG4bK" + secrets.token_hex(8)
        message = (
            f"REGISTER sip:127.0.0.1:{self.port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{lport};branch={branch};rport\r\n"
            f"From: <sip:{user}@127.0.0.1>;tag=t{branch[-6:]}\r\n"
            f"To: <sip:{user}@127.0.0.1>\r\n"
            f"Call-ID: {self.call_id}-{user}\r\nCSeq: {self.cseq} REGISTER\r\n"
            f"Max-Forwards: 70\r\nContact: <sip:{user}@{host}:{lport}>\r\nExpires: 60\r\n"
            f"{authorization}Content-Length: 0\r\n\r\n").encode()
        self.sock.sendto(message, ("127.0.0.1", self.port))
        return self.sock.recv(65535)

    def register(self, user: str, password: str) -> int:
        """The whole exchange; the final status (403 straight away when blocked)."""
        challenge = self._send(user)
        if status_of(challenge) != 401:
            return status_of(challenge)
        header = next(ln for ln in challenge.decode().split("\r\n")
                      if ln.startswith("WWW-Authenticate:") and "SHA-256" in ln)
        realm = re.search(r'realm="([^"]+)"', header).group(1)  # type: ignore[union-attr]
        nonce = re.search(r'nonce="([^"]+)"', header).group(1)  # type: ignore[union-attr]

        def h(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()

        uri = f"sip:127.0.0.1:{self.port}"
        cnonce, nc = secrets.token_hex(4), "00000001"
        response = h(f"{h(f'{user}:{realm}:{password}')}:{nonce}:{nc}:{cnonce}:auth:"
                     f"{h(f'REGISTER:{uri}')}")
        auth = (f'Authorization: Digest username="{user}", realm="{realm}", '
                f'nonce="{nonce}", uri="{uri}", response="{response}", '
                f'algorithm=SHA-256, qop=auth, nc={nc}, cnonce="{cnonce}"\r\n')
        return status_of(self._send(user, auth))

    def close(self) -> None:
        self.sock.close()


def test_interleaved_guessing_is_blocked_and_the_victim_still_registers(
        tmp_path: Path) -> None:
    env = clean_env() | {f"PBX_EXT_{n}_PASSWORD": p for n, p in PASSWORDS.items()}
    pbx = start_pbx(tmp_path, env=env, extra=GUESSING)
    attacker = Phone(pbx, "127.0.0.1")
    victim = Phone(pbx, "127.0.0.2")
    try:
        assert victim.register("7002", PASSWORDS["7002"]) == 200
        outcomes = []
        for _ in range(6):
            outcomes.append(attacker.register("7002", "guess-" + secrets.token_hex(3)))
            outcomes.append(attacker.register("7001", PASSWORDS["7001"]))  # its own
        # 4 wrong guesses (each followed by a good login of its own) block the source
        assert outcomes[:7] == [401, 200, 401, 200, 401, 200, 401], outcomes
        assert set(outcomes[7:]) == {403}, outcomes
        # the victim's phone, from its own address, is not locked out
        assert victim.register("7002", PASSWORDS["7002"]) == 200
    finally:
        attacker.close()
        victim.close()
        assert pbx.stop() == 0
