"""install_calls: the service's one-line hook-up of the B2BUA (handlers, drain, port)."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock

from pbx.calls.wiring import advertised_host, install_calls
from pbx.lifecycle import Lifecycle
from pbx.sip import DigestAuthenticator, LocationService, SIPEndpoint, TransactionManager
from tests.unit.test_calls_support import FakeCDR, RecordingSender


def service(clock: Clock) -> SimpleNamespace:
    lifecycle = Lifecycle(clock, drain_timeout=5)
    endpoint = SIPEndpoint(is_ready=lambda: lifecycle.ready)
    settings = SimpleNamespace(
        sip=SimpleNamespace(host="127.0.0.1", port=0, external_ip=None, user_agent="PBX",
                            domain="pbx.test"),
        calls=SimpleNamespace(max_calls=3, ring_timeout=9.0, media_timeout=20.0,
                              dialplan_pattern=r"^1\d{3}$"),
        rtp=SimpleNamespace(port_min=40000, port_max=40100, codecs=["PCMU", "PCMA"]),
        lifecycle=SimpleNamespace(retry_after=11))
    return SimpleNamespace(
        settings=settings, reactor=clock, lifecycle=lifecycle, endpoint=endpoint,
        transactions=TransactionManager(RecordingSender(clock), endpoint, clock),
        location=LocationService(clock), credentials=None, store=FakeCDR(), node="n1",
        registrar=SimpleNamespace(authenticator=DigestAuthenticator("pbx.test")),
        guard=None, transport=SimpleNamespace(listening=[("udp", "127.0.0.1", 45678),
                                                         ("tcp", "127.0.0.1", 45678)]))


def test_install_registers_handlers_and_hooks_the_lifecycle() -> None:
    clock = Clock()
    svc = service(clock)
    b2bua = install_calls(svc)
    for method in ("INVITE", "BYE", "CANCEL", "INFO", "OPTIONS"):
        assert method in svc.endpoint.handlers
    assert svc.endpoint.ack_handler == b2bua.handle_ack
    assert (b2bua.max_calls, b2bua.ring_timeout, b2bua.retry_after) == (3, 9.0, 11)
    assert b2bua.dialplan.matches("1234") and not b2bua.dialplan.matches("99")
    svc.lifecycle.fire("started")
    assert b2bua.local_port == 45678  # the bound port, known only once listening
    assert svc.store.interrupted_calls == ["n1"]  # open CDRs of a crash are closed
    # A drain waits for calls: the lifecycle asks the B2BUA.
    b2bua.calls["x"] = object()  # type: ignore[assignment]
    assert svc.lifecycle.begin_drain()
    assert svc.lifecycle.state == "draining"
    del b2bua.calls["x"]
    svc.lifecycle.work_finished()
    assert svc.lifecycle.state == "stopped"


def test_advertised_host() -> None:
    assert advertised_host("0.0.0.0", "203.0.113.5") == "203.0.113.5"
    assert advertised_host("10.1.2.3", None) == "10.1.2.3"
    assert advertised_host("0.0.0.0", None) not in ("0.0.0.0", "")
