"""Calls end to end through the real PBX (``twistd -n pbx``) with SIPp as the phones.

The callee SIPp registers (register.xml, from the port it then listens on as UAS) and
the caller SIPp dials it with digest authentication.  Answered call with G.711 RTP from
a pcap echoed back by the callee (``-rtp_echo``) through the PBX relay; busy; the
caller's CANCEL; no answer within the ring timeout.  Each attempt leaves one CDR, read
from the PBX's SQLite database after a clean stop.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import SCENARIOS, PBXProcess, clean_env, free_port, start_pbx

pytestmark = pytest.mark.integration

CALLER, CALLEE = "2001", "2002"
RTP_BASE = random.randrange(30000, 39000, 200)


def config(passwords: dict[str, str]) -> tuple[str, dict[str, str]]:
    # SIPp answers only MD5 challenges and takes the first one offered: MD5 first.
    lines = [
        "auth:", "  algorithms: [MD5, SHA-256]",
        "security:", "  rate_limit:", "    requests_per_second: 2000", "    burst: 4000",
        "calls:", "  ring_timeout: 3", "  media_timeout: 30", "  max_calls: 20",
        "rtp:", f"  port_min: {RTP_BASE}", f"  port_max: {RTP_BASE + 199}",
        "extensions:",
    ]
    env = {}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'User {number}', password_env: {var}}}")
        env[var] = password
    return "\n".join(lines) + "\n", env


def csv_for(tmp: Path, number: str, password: str) -> Path:
    path = tmp / f"{number}.csv"
    path.write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                    f"password={password}]\n", encoding="ascii")
    return path


def sipp_cmd(tool: str, pbx_port: int, scenario: str, tmp: Path, *extra: str) -> list[str]:
    return [tool, f"127.0.0.1:{pbx_port}", "-sf", str(SCENARIOS / scenario), "-m", "1",
            "-i", "127.0.0.1", "-nostdin", "-timeout", "30", "-timeout_error", "-trace_err",
            "-error_file", str(tmp / f"{scenario}.errors"), *extra]


def check(result: subprocess.CompletedProcess[str], tmp: Path, scenario: str) -> None:
    errors = tmp / f"{scenario}.errors"
    text = errors.read_text() if errors.exists() else ""
    assert result.returncode == 0, f"{scenario}: {result.stdout[-2000:]}\n{text[-2000:]}"


def media_port() -> int:
    for _ in range(50):
        port = free_port()
        if port % 2 == 0 and port < 65000:
            return port
    return 46000 + random.randrange(0, 1000, 2)


class Phones:
    """The callee (registered, then UAS on the same port) and the caller (UAC)."""

    def __init__(self, sipp: str, pbx: PBXProcess, tmp: Path, passwords: dict[str, str]):
        self.sipp = sipp
        self.pbx = pbx
        self.tmp = tmp
        self.uas_port = free_port()
        self.caller_csv = csv_for(tmp, CALLER, passwords[CALLER])
        callee_csv = csv_for(tmp, CALLEE, passwords[CALLEE])
        result = subprocess.run(
            sipp_cmd(sipp, pbx.sip_port, "register.xml", tmp, "-inf", str(callee_csv),
                     "-p", str(self.uas_port), "-key", "expires", "3600"),
            cwd=tmp, capture_output=True, text=True, timeout=60)
        check(result, tmp, "register.xml")

    def call(self, uas: str, uac: str, *uac_extra: str) -> None:
        uas_media = media_port()
        callee = subprocess.Popen(
            sipp_cmd(self.sipp, self.pbx.sip_port, uas, self.tmp, "-p", str(self.uas_port),
                     "-mp", str(uas_media), "-rtp_echo"),
            cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            caller = subprocess.run(
                sipp_cmd(self.sipp, self.pbx.sip_port, uac, self.tmp, "-inf",
                         str(self.caller_csv), "-s", CALLEE, "-p", str(free_port()),
                         # SIPp's digest uri is remote_ip:port unless told: it must name
                         # the Request-URI (the dialled extension) for the PBX to accept it.
                         "-auth_uri", f"{CALLEE}@127.0.0.1:{self.pbx.sip_port}",
                         "-mp", str(media_port()), *uac_extra),
                cwd=self.tmp, capture_output=True, text=True, timeout=90)
            check(caller, self.tmp, uac)
            out, _ = callee.communicate(timeout=30)
        finally:
            if callee.poll() is None:
                callee.kill()
                callee.wait(5)
        assert callee.returncode == 0, f"{uas}: {out[-2000:]}"


def read_cdrs(tmp: Path) -> list[dict[str, object]]:
    with sqlite3.connect(tmp / "var" / "pbx.sqlite3") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM cdr ORDER BY id")]
    for row in rows:
        if isinstance(row.get("qos"), str):
            row["qos"] = json.loads(row["qos"])  # type: ignore[arg-type]
    return rows


def test_answered_busy_cancelled_and_unanswered_calls(sipp: str, tmp_path: Path) -> None:
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    extra, env = config(passwords)
    pbx = start_pbx(tmp_path, env=clean_env() | env, extra=extra)
    try:
        phones = Phones(sipp, pbx, tmp_path, passwords)
        phones.call("uas_answer.xml", "uac_call.xml", "-d", "3000")
        phones.call("uas_busy.xml", "uac_busy.xml")
        phones.call("uas_noanswer.xml", "uac_cancel.xml")
        phones.call("uas_noanswer.xml", "uac_noanswer.xml")
        # Hold and resume: re-INVITEs pass through with SDP rewritten; the callee's
        # recvonly answer reaches the caller (both scenarios check the directions).
        phones.call("uas_hold.xml", "uac_hold.xml")
    finally:
        assert pbx.stop() == 0
    rows = read_cdrs(tmp_path)
    assert [r["disposition"] for r in rows] == ["ANSWERED", "BUSY", "CANCELLED", "NO ANSWER",
                                                "ANSWERED"]
    assert rows[4]["hangup_side"] == "caller"
    assert all(r["state"] == "closed" and r["caller"] == CALLER and r["callee"] == CALLEE
               for r in rows)
    answered = rows[0]
    assert float(answered["billsec"]) >= 2.5  # type: ignore[arg-type]
    qos = answered["qos"]
    assert isinstance(qos, dict)
    # RTP went caller -> PBX -> callee and the echo came back through the relay.
    assert qos["a_to_b"]["packets"] > 50, qos
    assert qos["b_to_a"]["packets"] > 50, qos
    assert [r["hangup_side"] for r in rows[1:3]] == ["callee", "caller"]
