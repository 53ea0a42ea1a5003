"""IPv6 end to end: the real PBX (``twistd -n pbx``) on ``::1`` and on dual-stack ``::``,
SIPp as the phones over ``::1`` (``sipp -i ::1 [::1]:PORT``).

* ``sip.host: "::1"``: an extension REGISTERs over IPv6 (digest), then an authenticated
  call from a SIPp UAC to the registered SIPp UAS, RTP relayed both ways.  The IPv6
  scenarios check what the PBX sends: a bracketed Via sent-by and Contact (RFC 3261
  §25.1) and ``c=IN IP6 ::1`` in its SDP (RFC 4566).  Without brackets the UAS's
  responses never reached the PBX and the call failed.
* ``sip.host: "::"``: a caller over ``::1`` reaches a callee registered over
  ``127.0.0.1`` — each leg sees the PBX in its own family (IPv6 ``c=`` to the caller,
  IPv4 to the callee) and the relay copies between an IPv6 and an IPv4 socket.

Loopback only, ephemeral ports, a temporary data directory, no PBX_* from the caller.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import SCENARIOS, PBXProcess, clean_env, extension_seed, start_pbx

pytestmark = pytest.mark.integration

CALLER, CALLEE = "2001", "2002"
UDP_RE = re.compile(r"listening: SIP UDP on (\S+):(\d+)")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


if not _has_ipv6_loopback():  # pragma: no cover - depends on the machine
    pytest.skip("no IPv6 loopback on this machine", allow_module_level=True)


def free_port(family: socket.AddressFamily = socket.AF_INET6) -> int:
    """A free UDP port on the loopback of ``family``."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def media_port(family: socket.AddressFamily = socket.AF_INET6) -> int:
    for _ in range(50):
        port = free_port(family)
        if port % 2 == 0 and port < 65000:
            return port
    return 46000 + random.randrange(0, 1000, 2)


def write_config(tmp: Path, host: str, passwords: dict[str, str]) -> tuple[Path, dict[str, str]]:
    # SIPp answers only MD5 challenges, and only the first one offered: MD5 first.
    rtp_base = random.randrange(30000, 39000, 200)
    lines = [
        "sip:", f"  host: '{host}'", "  port: 0",
        "api:", "  host: 127.0.0.1", "  port: 0",
        f"data_dir: {tmp / 'var'}",
        "logging:", "  level: INFO",
        "auth:", "  algorithms: [MD5, SHA-256]",
        "calls:", "  ring_timeout: 5", "  media_timeout: 30", "  max_calls: 5",
        "rtp:", f"  port_min: {rtp_base}", f"  port_max: {rtp_base + 199}",
    ]
    seed, env = extension_seed(passwords)
    lines += seed
    config = tmp / "config.yml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config, env


def csv_for(tmp: Path, number: str, password: str) -> Path:
    path = tmp / f"{number}.csv"
    path.write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                    f"password={password}]\n", encoding="ascii")
    return path


def sip_port(pbx: PBXProcess) -> int:
    for line in list(pbx.lines):
        match = UDP_RE.search(line)
        if match:
            return int(match.group(2))
    raise AssertionError("no SIP UDP listener line:\n" + "\n".join(pbx.lines))


def sipp_cmd(tool: str, local: str, pbx_port: int, scenario: str, tmp: Path,
             *extra: str) -> list[str]:
    """SIPp on ``local`` (``::1`` or ``127.0.0.1``) toward the PBX's loopback of that
    family; an IPv6 remote host is bracketed on SIPp's command line."""
    remote = f"[::1]:{pbx_port}" if ":" in local else f"127.0.0.1:{pbx_port}"
    return [tool, remote, "-sf", str(SCENARIOS / scenario), "-m", "1", "-i", local,
            "-nostdin", "-timeout", "30", "-timeout_error", "-trace_err",
            "-error_file", str(tmp / f"{scenario}.{local}.errors"), *extra]


def check(result: subprocess.CompletedProcess[str], tmp: Path, scenario: str,
          local: str) -> None:
    errors = tmp / f"{scenario}.{local}.errors"
    text = errors.read_text() if errors.exists() else ""
    assert result.returncode == 0, f"{scenario}: {result.stdout[-2000:]}\n{text[-2000:]}"


def register(sipp: str, local: str, port: int, tmp: Path, password: str,
             uas_port: int) -> None:
    # SIPp 3.6 writes the digest uri of an IPv6 remote unbracketed ("sip:::1:PORT"),
    # which is not the Request-URI; -auth_uri names it as sent.
    remote = f"[::1]:{port}" if ":" in local else f"127.0.0.1:{port}"
    result = subprocess.run(
        sipp_cmd(sipp, local, port, "register.xml", tmp, "-inf",
                 str(csv_for(tmp, CALLEE, password)), "-p", str(uas_port),
                 "-key", "expires", "3600", "-auth_uri", remote),
        cwd=tmp, capture_output=True, text=True, timeout=60)
    check(result, tmp, "register.xml", local)


def call(sipp: str, port: int, tmp: Path, password: str, *, uas: str, uas_local: str,
         uas_port: int) -> None:
    """An authenticated call from a UAC on ``::1`` to the callee registered on
    ``uas_local:uas_port``, RTP from a pcap echoed back by the callee."""
    family = socket.AF_INET6 if ":" in uas_local else socket.AF_INET
    callee = subprocess.Popen(
        sipp_cmd(sipp, uas_local, port, uas, tmp, "-p", str(uas_port),
                 "-mp", str(media_port(family)), "-rtp_echo"),
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        caller = subprocess.run(
            sipp_cmd(sipp, "::1", port, "uac_call_ipv6.xml", tmp, "-inf",
                     str(csv_for(tmp, CALLER, password)), "-s", CALLEE,
                     "-p", str(free_port()),
                     # SIPp's digest uri is remote_ip:port unless told (DESIGN.md).
                     "-auth_uri", f"{CALLEE}@[::1]:{port}",
                     "-mp", str(media_port()), "-d", "3000"),
            cwd=tmp, capture_output=True, text=True, timeout=90)
        check(caller, tmp, "uac_call_ipv6.xml", "::1")
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


def run_pbx(tmp: Path, host: str) -> tuple[PBXProcess, dict[str, str]]:
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    config, env = write_config(tmp, host, passwords)
    return start_pbx(tmp, env=clean_env() | env, config=config), passwords


def assert_relayed_call(tmp: Path) -> None:
    (row,) = read_cdrs(tmp)
    assert row["disposition"] == "ANSWERED" and row["state"] == "closed", row
    assert (row["caller"], row["callee"]) == (CALLER, CALLEE)
    qos = row["qos"]
    assert isinstance(qos, dict)
    # RTP went caller -> PBX -> callee and the echo came back through the relay.
    assert qos["a_to_b"]["packets"] > 50, qos
    assert qos["b_to_a"]["packets"] > 50, qos


def test_register_and_authenticated_call_over_ipv6_loopback(sipp: str,
                                                            tmp_path: Path) -> None:
    pbx, passwords = run_pbx(tmp_path, "::1")
    try:
        port = sip_port(pbx)
        uas_port = free_port()
        register(sipp, "::1", port, tmp_path, passwords[CALLEE], uas_port)
        call(sipp, port, tmp_path, passwords[CALLER], uas="uas_answer_ipv6.xml",
             uas_local="::1", uas_port=uas_port)
    finally:
        assert pbx.stop() == 0
    assert_relayed_call(tmp_path)


def test_dual_stack_call_from_ipv6_to_an_ipv4_phone(sipp: str, tmp_path: Path) -> None:
    pbx, passwords = run_pbx(tmp_path, "::")
    try:
        port = sip_port(pbx)
        uas_port = free_port(socket.AF_INET)
        register(sipp, "127.0.0.1", port, tmp_path, passwords[CALLEE], uas_port)
        # The IPv4 callee's scenario checks it is sent IPv4 (Via, Contact, c=); the IPv6
        # caller's checks the IPv6 side's c=, o= and Contact.
        call(sipp, port, tmp_path, passwords[CALLER], uas="uas_answer_dual_ipv4.xml",
             uas_local="127.0.0.1", uas_port=uas_port)
    finally:
        assert pbx.stop() == 0
    assert_relayed_call(tmp_path)
