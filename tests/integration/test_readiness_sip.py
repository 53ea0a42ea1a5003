"""OPTIONS follows the lifecycle: 503 + Retry-After while not ready, 200 when ready.

The PBX service runs in-process on the real reactor (pytest-twisted) so the test can hold
it in `starting` and `draining`; SIPp is the real peer asking.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, utils

from pbx.config import load_settings
from pbx.service import PBXService

from .conftest import SCENARIOS, write_config

pytestmark = pytest.mark.integration


def sipp_args(port: int, scenario: str, transport: str, tmp: Path) -> list[str]:
    return [
        f"127.0.0.1:{port}", "-sf", str(SCENARIOS / scenario), "-m", "1", "-t", transport,
        "-i", "127.0.0.1", "-nostdin", "-timeout", "10", "-timeout_error",
        "-recv_timeout", "4000", "-error_file", str(tmp / "err.log"),
    ]


@pytest_twisted.inlineCallbacks
def test_options_503_while_starting_and_draining(sipp: str, tmp_path: Path):
    settings = load_settings(write_config(tmp_path), env_file=None)
    service = PBXService(settings, reactor)
    in_flight = [1]
    service.active_work = lambda: in_flight[0]  # a call holds the drain open
    service.lifecycle.active_work = service.active_work
    # Bind, but stay in `starting` (what a node looks like before its store is up).
    (_, _, port), _ = service.transport.listen("127.0.0.1", 0)
    try:
        for transport in ("u1", "t1"):
            out, err, code = yield utils.getProcessOutputAndValue(
                sipp, sipp_args(port, "options_503.xml", transport, tmp_path), path=str(tmp_path))
            assert code == 0, (transport, out[-1500:], err[-1500:])

        service.lifecycle.fire("started")
        out, err, code = yield utils.getProcessOutputAndValue(
            sipp, sipp_args(port, "options.xml", "u1", tmp_path), path=str(tmp_path))
        assert code == 0, (out[-1500:], err[-1500:])

        service.lifecycle.begin_drain()
        assert service.lifecycle.state == "draining"
        for transport in ("u1", "t1"):
            out, err, code = yield utils.getProcessOutputAndValue(
                sipp, sipp_args(port, "options_503.xml", transport, tmp_path),
                path=str(tmp_path))
            assert code == 0, (transport, out[-1500:], err[-1500:])

        service.lifecycle.fire("cancel_drain")
        out, err, code = yield utils.getProcessOutputAndValue(
            sipp, sipp_args(port, "options.xml", "t1", tmp_path), path=str(tmp_path))
        assert code == 0, (out[-1500:], err[-1500:])
    finally:
        service.transactions.close()
        service.transport.stop_listening()
