"""Graceful drain end to end: the real PBX (``twistd -n pbx``) with SIPp as the phones.

Calls are up through the PBX (a registered SIPp callee answering, a SIPp caller placing
long calls with digest auth) when the drain starts: by SIGTERM or by
``POST /api/admin/drain``.  From that instant ``/ready`` and OPTIONS answer 503, a new
INVITE gets 503 with Retry-After, while REGISTER and the calls' in-dialog requests are
still served.  The calls then end by themselves (all successful, CDRs closed, exit 0),
or, past ``lifecycle.drain_timeout``, the PBX ends them with a BYE carrying a Reason
header on both legs (CDR ``hangup_side`` pbx) and exits 0.  An admin drain can be
cancelled while calls hold it: ``/ready`` is 200 again and new calls are taken.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import SCENARIOS, PBXProcess, clean_env, free_port, start_pbx

pytestmark = pytest.mark.integration

CALLER, CALLEE = "2101", "2102"
RETRY_AFTER = 7
TOKEN = secrets.token_urlsafe(32)
RTP_BASE = random.randrange(42000, 48000, 400)


# -- the PBX -----------------------------------------------------------------------------
def start(tmp: Path, passwords: dict[str, str], *, drain_timeout: float) -> PBXProcess:
    lines = [
        # SIPp answers only MD5 challenges and takes the first one offered: MD5 first.
        "auth:", "  algorithms: [MD5, SHA-256]",
        "security:", "  rate_limit:", "    requests_per_second: 2000", "    burst: 4000",
        "calls:", "  ring_timeout: 5", "  media_timeout: 60", "  max_calls: 50",
        "rtp:", f"  port_min: {RTP_BASE}", f"  port_max: {RTP_BASE + 399}",
        "lifecycle:", f"  drain_timeout: {drain_timeout}", f"  retry_after: {RETRY_AFTER}",
        "extensions:",
    ]
    env = clean_env() | {"PBX_API__TOKEN": TOKEN}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'User {number}', password_env: {var}}}")
        env[var] = password
    return start_pbx(tmp, env=env, extra="\n".join(lines) + "\n")


def api_base(pbx: PBXProcess) -> str:
    line = pbx.wait_for(r"listening: API HTTP on [\d.]+:\d+")
    match = re.search(r"listening: API HTTP on ([\d.]+):(\d+)", line)
    assert match is not None
    return f"http://{match.group(1)}:{match.group(2)}"


def http(method: str, url: str, *, token: str | None = None,
         timeout: float = 3.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def active_calls(base: str) -> list[dict[str, Any]]:
    status, body = http("GET", f"{base}/api/calls", token=TOKEN)
    assert status == 200, body
    return list(json.loads(body)["calls"])


def wait_connected(base: str, count: int, timeout: float = 15.0) -> None:
    """Until ``count`` calls are up and answered (the SIPp callee's 200 relayed)."""
    deadline = time.monotonic() + timeout
    calls: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        calls = active_calls(base)
        if len(calls) == count and all(c["answered_at"] for c in calls):
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} connected calls expected; the PBX lists {calls}")


def poll_ready(base: str, want: int, timeout: float = 2.0) -> float:
    """Seconds until ``/ready`` answers ``want`` (polled as fast as it answers)."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last, _ = http("GET", f"{base}/ready", timeout=1.0)
        if last == want:
            return time.monotonic() - started
        time.sleep(0.005)
    raise AssertionError(f"/ready stayed {last}, expected {want}")


def read_cdrs(tmp: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp / "var" / "pbx.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM cdr ORDER BY id")]


# -- raw SIP (what a new caller or a load balancer's probe sends) ---------------------------
def sip_transaction(port: int, method: str, user: str = CALLEE) -> dict[str, str]:
    """One out-of-dialog request over UDP; returns the final response's status line and
    headers (lower-case names).  A non-2xx final answer to INVITE is ACKed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        local = sock.getsockname()[1]
        branch = "z9hG4bK" + secrets.token_hex(8)
        call_id = secrets.token_hex(8) + "@drain-test"
        uri = f"sip:{user}@127.0.0.1:{port}"
        head = (f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch={branch};rport\r\n"
                f"From: <sip:{CALLER}@127.0.0.1>;tag=t{branch[-6:]}\r\n")
        sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               "m=audio 40000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n") if method == "INVITE" else ""
        extra = "Content-Type: application/sdp\r\n" if sdp else ""
        message = (f"{method} {uri} SIP/2.0\r\n{head}To: <{uri}>\r\nCall-ID: {call_id}\r\n"
                   f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\n"
                   f"Contact: <sip:{CALLER}@127.0.0.1:{local}>\r\n{extra}"
                   f"Content-Length: {len(sdp)}\r\n\r\n{sdp}")
        sock.sendto(message.encode(), ("127.0.0.1", port))
        while True:
            data = sock.recv(65535).decode(errors="replace")
            status_line, _, rest = data.partition("\r\n")
            if not re.match(r"SIP/2\.0 1\d\d ", status_line):
                break
        headers = {"status": status_line}
        for line in rest.split("\r\n\r\n", 1)[0].split("\r\n"):
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        if method == "INVITE" and not status_line.startswith("SIP/2.0 2"):
            ack = (f"ACK {uri} SIP/2.0\r\n{head}To: {headers.get('to', f'<{uri}>')}\r\n"
                   f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
                   "Content-Length: 0\r\n\r\n")
            sock.sendto(ack.encode(), ("127.0.0.1", port))
        return headers


def status_of(reply: dict[str, str]) -> int:
    return int(reply["status"].split()[1])


# -- SIPp phones ---------------------------------------------------------------------------
def media_port() -> int:
    for _ in range(50):
        port = free_port()
        if port % 2 == 0 and port < 65000:
            return port
    raise AssertionError("no even UDP port free for media")


class Phones:
    """The callee (registered, then UAS on the same port) and the caller (UAC)."""

    def __init__(self, sipp: str, pbx: PBXProcess, tmp: Path, passwords: dict[str, str]):
        self.sipp = sipp
        self.pbx = pbx
        self.tmp = tmp
        self.passwords = passwords
        self.uas_port = free_port()
        self.csv = {n: self._csv(n, p) for n, p in passwords.items()}
        self.uas: subprocess.Popen[str] | None = None
        self.uac: subprocess.Popen[str] | None = None
        self.register(CALLEE, self.uas_port)

    def _csv(self, number: str, password: str) -> Path:
        path = self.tmp / f"{number}.csv"
        path.write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                        f"password={password}]\n", encoding="ascii")
        return path

    def cmd(self, scenario: str, *extra: str) -> list[str]:
        return [self.sipp, f"127.0.0.1:{self.pbx.sip_port}", "-sf", str(SCENARIOS / scenario),
                "-i", "127.0.0.1", "-nostdin", "-timeout", "40", "-timeout_error",
                "-trace_err", "-error_file", str(self.tmp / f"{scenario}.errors"), *extra]

    def register(self, number: str, port: int) -> None:
        result = subprocess.run(
            self.cmd("register.xml", "-m", "1", "-inf", str(self.csv[number]),
                     "-p", str(port), "-key", "expires", "600"),
            cwd=self.tmp, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, self.diagnose("register.xml", result.stdout)

    def place_calls(self, uas: str, uac: str, calls: int, *uac_extra: str) -> None:
        self.uas = subprocess.Popen(
            self.cmd(uas, "-m", str(calls), "-p", str(self.uas_port), "-mp", str(media_port()),
                     "-rtp_echo"),
            cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.uac = subprocess.Popen(
            self.cmd(uac, "-m", str(calls), "-r", "20", "-inf", str(self.csv[CALLER]),
                     "-s", CALLEE, "-p", str(free_port()), "-mp", str(media_port()),
                     # The digest uri must name the Request-URI (see test_calls_sipp.py).
                     "-auth_uri", f"{CALLEE}@127.0.0.1:{self.pbx.sip_port}", *uac_extra),
            cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self, calls: int, timeout: float = 30.0) -> None:
        """Both SIPp ends exit 0 with every call successful."""
        for name, proc in (("UAC", self.uac), ("UAS", self.uas)):
            assert proc is not None
            scenario = str(proc.args[3]) if isinstance(proc.args, list) else "?"
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate(timeout=5)
                raise AssertionError(f"{name} still running after {timeout} s: "
                                     + self.diagnose(Path(scenario).name, out)) from None
            assert proc.returncode == 0, f"{name}: " + self.diagnose(Path(scenario).name, out)
            ok = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", out)
            failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", out)
            assert ok and int(ok.group(1)) == calls, f"{name}: {out[-1500:]}"
            assert failed and int(failed.group(1)) == 0, f"{name}: {out[-1500:]}"

    def diagnose(self, scenario: str, out: str) -> str:
        errors = self.tmp / f"{scenario}.errors"
        text = errors.read_text() if errors.exists() else ""
        return f"{scenario}: {out[-1500:]}\n{text[-2000:]}\nPBX:\n" + "\n".join(
            self.pbx.lines[-40:])

    def kill(self) -> None:
        for proc in (self.uac, self.uas):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)


def passwords() -> dict[str, str]:
    return {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}


def assert_refusing_new_work(pbx: PBXProcess, base: str) -> None:
    """Draining: 503 to /ready, OPTIONS and a new INVITE (with Retry-After)."""
    assert http("GET", f"{base}/ready")[0] == 503
    options = sip_transaction(pbx.sip_port, "OPTIONS")
    assert status_of(options) == 503 and "retry-after" in options, options
    invite = sip_transaction(pbx.sip_port, "INVITE")
    assert status_of(invite) == 503, invite
    assert invite.get("retry-after") == str(RETRY_AFTER), invite


def kill_pbx(pbx: PBXProcess) -> None:
    if pbx.proc.poll() is None:
        pbx.proc.kill()
        pbx.proc.wait(5)


# -- the tests ------------------------------------------------------------------------------
CALLS = 10


def test_sigterm_drains_while_calls_finish_normally(sipp: str, tmp_path: Path) -> None:
    pbx = start(tmp_path, pw := passwords(), drain_timeout=30)
    base = api_base(pbx)
    phones = Phones(sipp, pbx, tmp_path, pw)
    try:
        phones.place_calls("uas_answer.xml", "uac_call.xml", CALLS, "-d", "6000")
        wait_connected(base, CALLS)
        assert http("GET", f"{base}/ready")[0] == 200
        assert status_of(sip_transaction(pbx.sip_port, "OPTIONS")) == 200
        signalled = time.monotonic()
        pbx.proc.send_signal(signal.SIGTERM)
        assert poll_ready(base, 503) < 0.5, "/ready must flip to 503 at once"
        assert_refusing_new_work(pbx, base)
        # REGISTER is still served (digest challenge, then 200) while draining.
        phones.register(CALLER, free_port())
        assert pbx.proc.poll() is None, "the PBX exited while calls were up"
        assert len(active_calls(base)) == CALLS
        # The callers hang up after their pause: in-dialog BYEs are served, all succeed.
        phones.finish(CALLS)
        assert pbx.proc.wait(15) == 0
        took = time.monotonic() - signalled
    finally:
        phones.kill()
        kill_pbx(pbx)
    assert took > 3.0, "the PBX did not wait for the calls"
    pbx.wait_for(r"lifecycle: ready -> draining", 1)
    pbx.wait_for(r"lifecycle: draining -> stopped", 1)
    rows = read_cdrs(tmp_path)
    assert len(rows) == CALLS, rows
    assert all(r["state"] == "closed" and r["disposition"] == "ANSWERED" and
               r["hangup_side"] == "caller" and r["caller"] == CALLER and
               r["callee"] == CALLEE for r in rows), rows
    assert all(float(r["billsec"]) >= 5.0 for r in rows), rows


def test_drain_timeout_ends_remaining_calls_with_bye_and_reason(sipp: str,
                                                                 tmp_path: Path) -> None:
    calls = 4
    pbx = start(tmp_path, pw := passwords(), drain_timeout=2)
    base = api_base(pbx)
    phones = Phones(sipp, pbx, tmp_path, pw)
    try:
        # Both ends hold the call until the PBX's BYE, which must carry a Reason header.
        phones.place_calls("drain_uas_bye.xml", "drain_uac_held.xml", calls)
        wait_connected(base, calls)
        signalled = time.monotonic()
        pbx.proc.send_signal(signal.SIGTERM)
        assert poll_ready(base, 503) < 0.5
        assert_refusing_new_work(pbx, base)
        assert pbx.proc.wait(15) == 0
        took = time.monotonic() - signalled
        assert 1.8 <= took < 10.0, f"the drain timeout is 2 s; the PBX took {took:.1f} s"
        rows = read_cdrs(tmp_path)
        assert len(rows) == calls, rows
        assert all(r["state"] == "closed" and r["disposition"] == "ANSWERED" and
                   r["hangup_side"] == "pbx" for r in rows), rows
        # The PBX is gone: each phone must have had its BYE (with Reason) by now.
        phones.finish(calls, timeout=3)
    finally:
        phones.kill()
        kill_pbx(pbx)


def test_admin_drain_and_cancel(sipp: str, tmp_path: Path) -> None:
    calls = 3
    pbx = start(tmp_path, pw := passwords(), drain_timeout=30)
    base = api_base(pbx)
    phones = Phones(sipp, pbx, tmp_path, pw)
    try:
        phones.place_calls("uas_answer.xml", "uac_call.xml", calls, "-d", "5000")
        wait_connected(base, calls)
        assert http("POST", f"{base}/api/admin/drain")[0] == 401
        assert http("GET", f"{base}/ready")[0] == 200, "an unauthorised drain drained"
        status, body = http("POST", f"{base}/api/admin/drain", token=TOKEN)
        assert status == 202, body
        assert_refusing_new_work(pbx, base)
        # Cancelled while the calls hold the drain open: ready again, new calls taken.
        status, body = http("POST", f"{base}/api/admin/drain/cancel", token=TOKEN)
        assert status == 200, body
        assert http("GET", f"{base}/ready")[0] == 200
        assert status_of(sip_transaction(pbx.sip_port, "OPTIONS")) == 200
        assert status_of(sip_transaction(pbx.sip_port, "INVITE")) == 407
        assert http("POST", f"{base}/api/admin/drain/cancel", token=TOKEN)[0] == 409
        # Drain again (by the API): the calls finish normally, then the PBX exits 0.
        assert http("POST", f"{base}/api/admin/drain", token=TOKEN)[0] == 202
        assert http("GET", f"{base}/ready")[0] == 503
        assert pbx.proc.poll() is None, "the PBX exited while calls were up"
        phones.finish(calls)
        assert pbx.proc.wait(15) == 0
    finally:
        phones.kill()
        kill_pbx(pbx)
    rows = read_cdrs(tmp_path)
    assert len(rows) == calls, rows
    assert all(r["state"] == "closed" and r["disposition"] == "ANSWERED" and
               r["hangup_side"] == "caller" for r in rows), rows
