"""The SIP edge of the real PBX process under attack-shaped traffic (issue 10).

Via steering (responses follow the real source, never ``received``/``rport``/transport
claims), TCP connection floods and slow headers, oversized UDP, and SIP over TLS with
Python's ``ssl`` and an ``openssl``-made certificate.  Every packet stays on loopback;
the "other hosts" an attacker names are loopback addresses we listen on ourselves, so
the test sees whatever the PBX would have sent there.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool

from .conftest import PBXProcess, start_pbx

pytestmark = pytest.mark.integration


def options(port: int, *, via: str, branch: str = "z9hG4bKedge1", extra: str = "",
            call_id: str = "edge@probe") -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: {via};branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:probe@127.0.0.1>;tag=probe1\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def status_of(data: bytes | None) -> int | None:
    match = re.match(rb"SIP/2\.0 (\d{3}) ", data or b"")
    return int(match.group(1)) if match else None


def recv_or_none(sock: socket.socket, wait: float) -> bytes | None:
    sock.settimeout(wait)
    try:
        return sock.recv(65535)
    except (TimeoutError, BlockingIOError):
        return None


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@pytest.fixture
def edge_pbx(tmp_path: Path) -> Iterator[PBXProcess]:
    extra = (
        "sip:\n  host: 127.0.0.1\n  port: 0\n"
        "  tcp:\n    max_connections: 8\n    max_per_source: 4\n"
        "    header_timeout: 1.0\n    idle_timeout: 3.0\n"
        "security:\n  rate_limit:\n    requests_per_second: 500\n    burst: 500\n"
    )
    config = tmp_path / "config.yml"
    config.write_text(
        f"api:\n  host: 127.0.0.1\n  port: 0\ndata_dir: {tmp_path / 'var'}\n"
        "logging:\n  level: INFO\n" + extra, encoding="utf-8")
    process = start_pbx(tmp_path, config=config)
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


# -- Via steering -------------------------------------------------------------------------


def test_received_and_rport_claims_do_not_steer_the_response(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.sip_port
    victim = udp_socket("127.0.0.2")  # the "other host" the attacker names
    victim_port = victim.getsockname()[1]
    with victim, udp_socket() as attacker:
        source_port = attacker.getsockname()[1]
        for n, sent_by in enumerate(("127.0.0.2", "127.0.0.1")):
            via = (f"SIP/2.0/UDP {sent_by}:{victim_port};received=127.0.0.2"
                   f";rport={victim_port}")
            attacker.sendto(options(port, via=via, branch=f"z9hG4bKsteer{n}",
                                    call_id=f"steer{n}@probe"),
                            ("127.0.0.1", port))
            answer = recv_or_none(attacker, 3.0)
            assert status_of(answer) == 200, answer
            assert answer is not None
            # The Via we get back names the real source, not the claim.
            assert b"received=127.0.0.1" in answer
            assert f"rport={source_port}".encode() in answer
        assert recv_or_none(victim, 0.5) is None, "the PBX answered the named host"


def test_udp_request_claiming_tcp_is_answered_over_udp(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.sip_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as target, udp_socket() as attacker:
        target.bind(("127.0.0.3", 0))
        target.listen(4)
        target.settimeout(0.5)
        target_port = target.getsockname()[1]
        for via in (f"SIP/2.0/TCP 127.0.0.3:{target_port}",
                    f"SIP/2.0/TCP 127.0.0.1:{target_port};received=127.0.0.3"):
            attacker.sendto(options(port, via=via, branch=f"z9hG4bK{len(via)}",
                                    call_id=f"tcp{len(via)}@probe"),
                            ("127.0.0.1", port))
            assert status_of(recv_or_none(attacker, 3.0)) == 200
        with pytest.raises(TimeoutError):
            target.accept()  # no connection to the address of the attacker's choice


def test_bad_request_is_answered_to_its_source_only(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.sip_port
    victim = udp_socket("127.0.0.2")
    victim_port = victim.getsockname()[1]
    with victim, udp_socket() as attacker:
        bad = options(port, via=f"SIP/2.0/UDP 127.0.0.2:{victim_port};rport={victim_port}",
                      extra="Max-Forwards: banana\r\n")
        attacker.sendto(bad, ("127.0.0.1", port))
        assert status_of(recv_or_none(attacker, 3.0)) == 400
        assert recv_or_none(victim, 0.5) is None


def test_udp_datagram_above_8_kb_is_read_whole(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.sip_port
    with udp_socket() as sock:
        filler = "x" * 200
        extra = "".join(f"X-Filler-{i}: {filler}\r\n" for i in range(100))  # ~21 KB
        payload = options(port, via="SIP/2.0/UDP 127.0.0.1:5999;rport", extra=extra)
        assert len(payload) > 20_000
        sock.sendto(payload, ("127.0.0.1", port))
        assert status_of(recv_or_none(sock, 3.0)) == 200


# -- TCP limits ---------------------------------------------------------------------------


def tcp_connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def is_closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """True when the PBX closed (EOF or reset) within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(65535) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def tcp_options_answered(sock: socket.socket, port: int, branch: str) -> bool:
    local = sock.getsockname()
    try:
        sock.sendall(options(port, via=f"SIP/2.0/TCP {local[0]}:{local[1]}", branch=branch,
                             call_id=f"{branch}@probe"))
    except OSError:
        return False
    sock.settimeout(3.0)
    data = b""
    try:
        while b"\r\n\r\n" not in data.lstrip(b"\r\n"):  # skip RFC 5626 pongs
            chunk = sock.recv(65535)
            if not chunk:
                return False
            data += chunk
    except (TimeoutError, ConnectionResetError):
        return False
    return status_of(data.lstrip(b"\r\n")) == 200


def test_connections_are_capped_per_source_and_in_total(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.ports["tcp"]
    opened: list[socket.socket] = []
    try:
        for _ in range(6):
            opened.append(tcp_connect(port))
        answered = [tcp_options_answered(s, port, f"z9hG4bKcap{i}")
                    for i, s in enumerate(opened)]
        assert answered == [True] * 4 + [False] * 2, answered
        # Other sources still get in, up to the total cap of 8.
        others = [tcp_connect(port, f"127.0.0.{n}") for n in (5, 6, 7, 8, 9)]
        opened += others
        answered = [tcp_options_answered(s, port, f"z9hG4bKtot{i}")
                    for i, s in enumerate(others)]
        assert answered == [True] * 4 + [False], answered
    finally:
        for sock in opened:
            sock.close()
    edge_pbx.wait_for(r"lifecycle: starting -> ready")  # still up


def test_slow_header_is_cut_off(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.ports["tcp"]
    with tcp_connect(port) as sock:
        sock.sendall(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5")
        began = time.monotonic()
        assert is_closed_by_peer(sock, 8.0)
        assert time.monotonic() - began >= 0.9  # not before the header deadline
    with tcp_connect(port) as sock:  # the listener still serves
        assert tcp_options_answered(sock, port, "z9hG4bKafterslow")


def test_keepalives_hold_an_idle_connection_and_silence_ends_it(
        edge_pbx: PBXProcess) -> None:
    port = edge_pbx.ports["tcp"]
    with tcp_connect(port) as sock:
        for _ in range(10):  # 5 s of RFC 5626 pings: longer than idle_timeout (3 s)
            sock.sendall(b"\r\n\r\n")
            time.sleep(0.5)
        assert tcp_options_answered(sock, port, "z9hG4bKkeep")
        assert is_closed_by_peer(sock, 10.0)


def test_oversized_tcp_frame_closes_only_that_connection(edge_pbx: PBXProcess) -> None:
    port = edge_pbx.ports["tcp"]
    with tcp_connect(port) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"OPTIONS sip:x SIP/2.0\r\nX-Long: " + b"a" * 70_000)
        assert is_closed_by_peer(sock, 5.0)
    with tcp_connect(port) as sock:
        assert tcp_options_answered(sock, port, "z9hG4bKafterbig")


# -- TLS ----------------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=pbx.test", "-days", "2"],
        check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def tls_pbx(tmp_path: Path) -> Iterator[tuple[PBXProcess, Path]]:
    cert, key = make_certificate(tmp_path)
    config = tmp_path / "config.yml"
    config.write_text(
        "sip:\n  host: 127.0.0.1\n  port: 0\n  tls_enabled: true\n  tls_port: 0\n"
        f"  tls_cert: {cert}\n  tls_key: {key}\n"
        f"api:\n  host: 127.0.0.1\n  port: 0\ndata_dir: {tmp_path / 'var'}\n"
        "logging:\n  level: INFO\n", encoding="utf-8")
    process = start_pbx(tmp_path, config=config)
    yield process, cert
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


def tls_client(port: int, cert: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the certificate names pbx.test, we dial 127.0.0.1
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw)


def test_tls_listener_serves_sip_with_the_configured_certificate(
        tls_pbx: tuple[PBXProcess, Path]) -> None:
    pbx, cert = tls_pbx
    assert "tls" in pbx.ports, pbx.lines
    port = pbx.ports["tls"]
    with tls_client(port, cert) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        served = ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True))
        assert served.split() == cert.read_text().split()
        local = sock.getsockname()
        sock.sendall(options(port, via=f"SIP/2.0/TLS {local[0]}:{local[1]}"))
        answer = sock.recv(65535)
        assert status_of(answer) == 200, answer
        assert b"SIP/2.0/TLS" in answer


def test_tls_certificate_reloads_on_sighup(tls_pbx: tuple[PBXProcess, Path],
                                           tmp_path: Path) -> None:
    import signal

    pbx, cert = tls_pbx
    port = pbx.ports["tls"]
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    new_cert, new_key = make_certificate(renewed)
    cert.write_bytes(new_cert.read_bytes())
    (cert.parent / "key.pem").write_bytes(new_key.read_bytes())
    pbx.proc.send_signal(signal.SIGHUP)
    pbx.wait_for(r"TLS certificate reloaded")
    with tls_client(port, new_cert) as sock:
        served = ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True))
        assert served.split() == new_cert.read_text().split()


def test_tls_with_an_unusable_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    from .conftest import TWISTD, clean_env

    cert, _ = make_certificate(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = make_certificate(other)
    config = tmp_path / "config.yml"
    config.write_text(
        "sip:\n  host: 127.0.0.1\n  port: 0\n  tls_enabled: true\n  tls_port: 0\n"
        f"  tls_cert: {cert}\n  tls_key: {other_key}\n"
        f"api:\n  host: 127.0.0.1\n  port: 0\ndata_dir: {tmp_path / 'var'}\n",
        encoding="utf-8")
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "pbx", "--config", str(config)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "tls" in (result.stdout + result.stderr).lower()
