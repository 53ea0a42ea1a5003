"""The real PBX process against real peers: SIPp over UDP/TCP, raw sockets, signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SCENARIOS, TWISTD, PBXProcess, clean_env, start_pbx, write_config

pytestmark = pytest.mark.integration


def run_sipp(sipp: str, port: int, scenario: str, transport: str, tmp: Path) -> None:
    cmd = [
        sipp, f"127.0.0.1:{port}", "-sf", str(SCENARIOS / scenario), "-m", "1",
        "-t", transport, "-i", "127.0.0.1", "-nostdin", "-timeout", "15",
        "-timeout_error", "-recv_timeout", "5000", "-trace_err",
        "-error_file", str(tmp / "sipp_errors.log"),
    ]
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=30)
    errors = (tmp / "sipp_errors.log").read_text() if (tmp / "sipp_errors.log").exists() else ""
    assert result.returncode == 0, (
        f"SIPp {scenario} over {transport} failed ({result.returncode}):\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}\n{errors}"
    )


def sip_request(method: str, port: int, *, branch: str, extra: str = "",
                transport: str = "UDP", local_port: int = 5999) -> bytes:
    return (
        f"{method} sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{local_port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:probe@127.0.0.1>;tag=probe1\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: {branch}@probe\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def udp_exchange(port: int, payload: bytes, *, wait: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(wait)
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def status_of(data: bytes | None) -> int | None:
    if not data:
        return None
    match = re.match(rb"SIP/2\.0 (\d{3}) ", data)
    return int(match.group(1)) if match else None


def test_options_over_udp_with_sipp(pbx: PBXProcess, sipp: str, tmp_path: Path) -> None:
    run_sipp(sipp, pbx.sip_port, "options.xml", "u1", tmp_path)


def test_options_over_tcp_with_sipp(pbx: PBXProcess, sipp: str, tmp_path: Path) -> None:
    assert pbx.ports["tcp"] == pbx.ports["udp"], "UDP and TCP share one port"
    run_sipp(sipp, pbx.ports["tcp"], "options.xml", "t1", tmp_path)


def test_startup_logs_one_line_per_socket(pbx: PBXProcess) -> None:
    listening = [line for line in pbx.lines if "listening: SIP" in line]
    assert len(listening) == 2
    assert any("UDP" in line for line in listening)
    assert any("TCP" in line for line in listening)


MALFORMED_ANSWERABLE = [
    # (payload builder, reason fragment expected in the 400)
    (lambda p: sip_request("OPTIONS", p, branch="z9hG4bKbad1").replace(
        b"Call-ID: z9hG4bKbad1@probe\r\n", b""), b"Call-ID"),
    (lambda p: sip_request("OPTIONS", p, branch="z9hG4bKbad2").replace(
        b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS"), b"CSeq"),
    (lambda p: sip_request("OPTIONS", p, branch="z9hG4bKbad3").replace(
        b"Content-Length: 0", b"Content-Length: 50"), b"Content-Length"),
]


@pytest.mark.parametrize("case", range(len(MALFORMED_ANSWERABLE)))
def test_malformed_request_gets_400_and_server_keeps_serving(pbx: PBXProcess, case: int) -> None:
    build, fragment = MALFORMED_ANSWERABLE[case]
    reply = udp_exchange(pbx.sip_port, build(pbx.sip_port))
    assert status_of(reply) == 400, reply
    assert reply is not None
    first_line = reply.split(b"\r\n", 1)[0]
    assert fragment.lower() in first_line.lower(), first_line
    ok = udp_exchange(pbx.sip_port, sip_request("OPTIONS", pbx.sip_port, branch="z9hG4bKok1"))
    assert status_of(ok) == 200


def test_garbage_is_dropped_and_server_keeps_serving(pbx: PBXProcess) -> None:
    for junk in (b"\x00\xff" * 700, b"NOT SIP AT ALL\r\n\r\n", b"SIP/2.0 200\r\n\r\n",
                 os.urandom(1400), b"INVITE\r\n" * 2000):
        assert udp_exchange(pbx.sip_port, junk, wait=0.3) is None
    # A TCP peer sending a broken stream is disconnected; others are unaffected.
    with socket.create_connection(("127.0.0.1", pbx.ports["tcp"]), timeout=3) as conn:
        conn.sendall(b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bKx\r\n\r\n")
        conn.settimeout(3)
        data = conn.recv(65535)
        assert data == b"" or status_of(data) == 400
    ok = udp_exchange(pbx.sip_port, sip_request("OPTIONS", pbx.sip_port, branch="z9hG4bKok2"))
    assert status_of(ok) == 200
    assert pbx.proc.poll() is None


def test_tcp_response_reuses_the_connection(pbx: PBXProcess) -> None:
    port = pbx.ports["tcp"]
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        # The Via names a port nobody listens on: the answer must come back on this socket.
        conn.sendall(sip_request("OPTIONS", port, branch="z9hG4bKtcp1", transport="TCP",
                                 local_port=9))
        conn.settimeout(3)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65535)
            assert chunk, "connection closed without an answer"
            data += chunk
    assert status_of(data) == 200


def test_unsupported_method_gets_501(pbx: PBXProcess) -> None:
    reply = udp_exchange(pbx.sip_port, sip_request("SUBSCRIBE", pbx.sip_port,
                                                   branch="z9hG4bKsub1"))
    assert status_of(reply) == 501


def test_sigterm_drains_and_exits_zero(pbx: PBXProcess) -> None:
    started = time.monotonic()
    code = pbx.stop(signal.SIGTERM)
    assert code == 0
    assert time.monotonic() - started < 5
    pbx.wait_for(r"lifecycle: ready -> draining")
    pbx.wait_for(r"lifecycle: draining -> stopped")


def test_sigint_twice_stops(pbx: PBXProcess) -> None:
    pbx.proc.send_signal(signal.SIGINT)
    pbx.proc.send_signal(signal.SIGINT)
    assert pbx.proc.wait(10) == 0


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("port: 0\napi", "prot: 5060\napi", 1))
    for cmd in (
        [str(TWISTD), "--nodaemon", "--pidfile=", "pbx", "--config", str(config)],
        [sys.executable, "-m", "pbx.cli", "run", "--config", str(config)],
    ):
        result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 78, (cmd, result.stdout, result.stderr)
        assert "sip.prot" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_env_override_of_sip_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env() | {"PBX_SIP__PORT": str(port)}
    process = start_pbx(tmp_path, env=env)
    try:
        assert process.ports == {"udp": port, "tcp": port}
        reply = udp_exchange(port, sip_request("OPTIONS", port, branch="z9hG4bKenv"))
        assert status_of(reply) == 200
    finally:
        assert process.stop() == 0


def test_port_in_use_fails_with_exit_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        env = clean_env() | {"PBX_SIP__PORT": str(port)}
        config = write_config(tmp_path)
        result = subprocess.run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "pbx", "--config", str(config)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot listen" in result.stdout + result.stderr
