"""RFC 3261 §8.2.2 checks of the real PBX on the wire: 420 Bad Extension with
Unsupported (§8.2.2.3) and 482 Loop Detected for a merged request (§8.2.2.2)."""

from __future__ import annotations

import socket

import pytest

from pbx.sip import Response, parse

from .conftest import PBXProcess

pytestmark = pytest.mark.integration


def options(port: int, *, branch: str, call_id: str, local_port: int,
            extra: str = "") -> bytes:
    return (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:probe@127.0.0.1>;tag=conformance1\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 7 OPTIONS\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def exchange(sock: socket.socket, port: int, payload: bytes) -> Response:
    sock.sendto(payload, ("127.0.0.1", port))
    data = sock.recv(65535)
    response = parse(data)
    assert isinstance(response, Response), data
    return response


def test_unknown_require_gets_420_with_unsupported(pbx: PBXProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        local = sock.getsockname()[1]
        response = exchange(sock, pbx.sip_port, options(
            pbx.sip_port, branch="z9hG4bKreq420", call_id="req420@probe", local_port=local,
            extra="Require: x-no-such-extension, another-one\r\n"))
    assert response.status == 420
    assert response.headers.getall("Unsupported") == ["x-no-such-extension", "another-one"]


def test_a_merged_request_gets_482(pbx: PBXProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        local = sock.getsockname()[1]
        first = exchange(sock, pbx.sip_port, options(
            pbx.sip_port, branch="z9hG4bKmerge1", call_id="merge@probe", local_port=local))
        # The same request (From tag, Call-ID, CSeq) forked upstream: another branch.
        second = exchange(sock, pbx.sip_port, options(
            pbx.sip_port, branch="z9hG4bKmerge2", call_id="merge@probe", local_port=local))
    assert first.status == 200
    assert second.status == 482
    assert second.top_via.branch == "z9hG4bKmerge2"
