#!/usr/bin/env python3
"""The SIP edge under attack-shaped traffic: one figure per attack of issue 10.

Starts a real PBX (``pbx run``) from a source tree (default: this checkout; ``--src``
runs another, e.g. a ``git worktree`` of an older commit, for before/after figures) on
loopback and measures:

- ``via_steer``: responses that reached a host the attacker named in Via
  ``received``/``rport`` (of 50 requests);
- ``via_tcp``: TCP connections the PBX opened to an address named by a UDP request whose
  Via says TCP (of 20 requests);
- ``to_tag_flood``: SIP packets out per INVITE in, for 50 INVITEs with random To tags
  (unknown dialogs), counted over ``--window`` seconds (Timer G retransmissions count);
- ``tcp_flood``: of 200 TCP connections from one address, how many are still open;
- ``slow_header``: seconds a connection sending half a header is kept (cut at 30 s);
- ``folding_stall``: how long one OPTIONS waits for its answer behind one 8 KB UDP
  datagram of a folded line and spaces (reactor time spent parsing).

Every packet goes to 127.0.0.0/8.  Numbers are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = re.compile(rb"SIP/2\.0 (\d{3}) ")


def start(src: Path, directory: Path) -> tuple[subprocess.Popen[str], int]:
    config = directory / "config.yml"
    config.write_text(
        "sip:\n  host: 127.0.0.1\n  port: 0\n"
        "api:\n  host: 127.0.0.1\n  port: 0\n"
        f"data_dir: {directory / 'var'}\nlogging:\n  level: INFO\n"
        "security:\n  rate_limit:\n    requests_per_second: 1000\n    burst: 1000\n",
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_")}
    env["PYTHONUNBUFFERED"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(src)!r}); "
            "from pbx.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "--config", str(config)],
                            cwd=src, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    port = 0
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening: SIP UDP on \S+:(\d+)", line)
        if match:
            port = int(match.group(1))
        if "starting -> ready" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()],
                             daemon=True).start()
            return proc, port
    raise SystemExit("PBX did not start:\n" + "".join(lines))


def request(method: str, port: int, via: str, *, to_tag: str = "", branch: str = "",
            extra: str = "") -> bytes:
    branch = branch or "z9hG4bK" + secrets.token_hex(6)
    tag = f";tag={to_tag}" if to_tag else ""
    return (f"{method} sip:1000@127.0.0.1:{port} SIP/2.0\r\nVia: {via};branch={branch}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:evil@127.0.0.1>;tag=e1\r\n"
            f"To: <sip:1000@127.0.0.1>{tag}\r\nCall-ID: {secrets.token_hex(8)}@x\r\n"
            f"CSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def drain(sock: socket.socket, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(65535))
        except (TimeoutError, BlockingIOError):
            break
    return got


def via_steer(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        victim.bind(("127.0.0.2", 0))
        attacker.bind(("127.0.0.1", 0))
        vport = victim.getsockname()[1]
        for _ in range(50):
            # sent-by is the real source host: only the parameters lie
            via = f"SIP/2.0/UDP 127.0.0.1:5060;received=127.0.0.2;rport={vport}"
            attacker.sendto(request("OPTIONS", port, via), ("127.0.0.1", port))
        to_victim = len(drain(victim, 2.0))
        to_sender = len(drain(attacker, 0.5))
    return f"{to_victim}/50 responses to the named host, {to_sender} to the sender"


def via_tcp(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as target, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        target.bind(("127.0.0.3", 0))
        target.listen(64)
        attacker.bind(("127.0.0.1", 0))
        tport = target.getsockname()[1]
        for _ in range(20):
            via = f"SIP/2.0/TCP 127.0.0.1:{tport};received=127.0.0.3"
            attacker.sendto(request("OPTIONS", port, via), ("127.0.0.1", port))
        accepted = 0
        end = time.monotonic() + 2.0
        while (left := end - time.monotonic()) > 0:
            target.settimeout(left)
            try:
                conn, _ = target.accept()
                conn.close()
                accepted += 1
            except TimeoutError:
                break
    return f"{accepted}/20 TCP connections opened to the named address"


def to_tag_flood(port: int, window: float) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
        for _ in range(50):
            via = f"SIP/2.0/UDP 127.0.0.1:{local};rport"
            sock.sendto(request("INVITE", port, via, to_tag=secrets.token_hex(4)),
                        ("127.0.0.1", port))
        got = drain(sock, window)
    finals = sum(1 for g in got if (m := STATUS.match(g)) and int(m.group(1)) >= 200)
    return (f"{len(got) / 50:.2f} packets out per INVITE in ({finals} finals, "
            f"{len(got)} packets in {window:.0f} s)")


def tcp_flood(port: int) -> str:
    socks = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        time.sleep(1.0)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    return f"{alive}/200 connections from one address still open after 1 s"


def slow_header(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5")
        began = time.monotonic()
        sock.settimeout(30)
        try:
            while sock.recv(65535):
                pass
        except TimeoutError:
            return "kept for > 30 s"
        except ConnectionResetError:
            pass
    return f"closed after {time.monotonic() - began:.1f} s"


def folding_stall(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
        head = request("OPTIONS", port, f"SIP/2.0/UDP 127.0.0.1:{local};rport")
        # A folded line, then a long run of spaces that no line break ends.
        bad = head.replace(b"Max-Forwards: 70\r\n", b"X-Fold: a\r\n b\r\nX-Pad: a"
                           + b" " * 7800 + b"b\r\nMax-Forwards: 70\r\n")
        sock.sendto(bad, ("127.0.0.1", port))
        began = time.monotonic()
        sock.sendto(request("OPTIONS", port, f"SIP/2.0/UDP 127.0.0.1:{local};rport"),
                    ("127.0.0.1", port))
        while (left := began + 30.0 - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            if data.startswith(b"SIP/2.0 200"):
                return f"OPTIONS answered {1000 * (time.monotonic() - began):.1f} ms later"
    return "OPTIONS unanswered in 30 s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="source tree to run")
    parser.add_argument("--window", type=float, default=12.0,
                        help="seconds to count responses to the To-tag flood")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start(args.src.resolve(), Path(tmp))
        try:
            for name, run in (("via_steer", lambda: via_steer(port)),
                              ("via_tcp", lambda: via_tcp(port)),
                              ("folding_stall", lambda: folding_stall(port)),
                              ("to_tag_flood", lambda: to_tag_flood(port, args.window)),
                              ("tcp_flood", lambda: tcp_flood(port)),
                              ("slow_header", lambda: slow_header(port))):
                print(f"{name:14s} {run()}", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
