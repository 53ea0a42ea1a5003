"""The UAS core's request checks (RFC 3261 §8.2.2.2 merged requests, §8.2.2.3 Require)
and bounded metric labels for methods and status codes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from pbx.ops.metrics import _split_sip
from pbx.sip import endpoint as endpoint_module
from pbx.sip.endpoint import SIPEndpoint, unsupported_extensions
from pbx.sip.message import Request, Response
from pbx.sip.methods import KNOWN_METHODS, method_label, status_label
from pbx.sip.transactions import Peer, TransactionManager
from tests.unit.test_transactions_support import (
    UDP,
    FakeSender,
    make_request,
    new_branch,
)

OTHER_PATH = Peer("udp", "10.0.0.7", 5060)


def stack(handled: tuple[str, ...] = ("INVITE", "REGISTER", "BYE", "INFO")
          ) -> tuple[Clock, FakeSender, SIPEndpoint, TransactionManager, list[Request]]:
    clock = Clock()
    sender = FakeSender(clock)
    endpoint = SIPEndpoint(is_ready=lambda: True)
    seen: list[Request] = []

    def handler(request: Request, transaction: Any, peer: Peer) -> None:
        seen.append(request)  # a TU still thinking (no answer yet)

    for method in handled:
        endpoint.handlers[method] = handler
    mgr = TransactionManager(sender, endpoint, clock, trying_delay=None)
    return clock, sender, endpoint, mgr, seen


def with_require(request: Request, *values: str) -> Request:
    for value in values:
        request.headers.add("Require", value)
    return request


def statuses(sender: FakeSender) -> list[int]:
    return [m.status for _, m, _ in sender.sent if isinstance(m, Response)]


# -- 420 Bad Extension (§8.2.2.3) ----------------------------------------------------------


def test_unknown_require_tags_get_420_with_unsupported_listing_them() -> None:
    _, sender, _, mgr, seen = stack()
    # (100rel and timer are implemented now, issue 11.4: tags we lack stand in for them)
    request = with_require(make_request("INVITE"), "gruu, foo", "Foo", "path")
    mgr.handle_request(request, UDP)
    (_, response, _), = sender.sent
    assert response.status == 420 and response.reason == "Bad Extension"
    assert response.headers.getall("Unsupported") == ["gruu", "foo", "path"]
    assert response.to.tag
    assert seen == []  # never reached the handler


def test_supported_tags_pass_and_the_list_is_the_single_source(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoint_module, "SUPPORTED_EXTENSIONS", ("100rel", "timer"))
    _, sender, endpoint, mgr, seen = stack()
    mgr.handle_request(with_require(make_request("INVITE"), "100REL", "timer"), UDP)
    assert [r.method for r in seen] == ["INVITE"] and sender.sent == []
    mgr.handle_request(with_require(make_request("INVITE", seq=2), "timer, gruu"), UDP)
    assert sender.sent[-1][1].headers.getall("Unsupported") == ["gruu"]
    assert endpoint.capability_headers()["Supported"] == "100rel, timer"


def test_ack_and_cancel_are_never_refused_for_require() -> None:
    for method in ("ACK", "CANCEL"):
        assert unsupported_extensions(with_require(make_request(method), "foo")) == []
    _, sender, endpoint, mgr, _ = stack()
    endpoint.handlers["CANCEL"] = lambda r, t, p: endpoint.respond(t, r, 200)
    mgr.handle_request(with_require(make_request("CANCEL"), "foo"), UDP)
    assert statuses(sender) == [200]


def test_in_dialog_requests_are_checked_too_and_unknown_methods_get_501_first() -> None:
    _, sender, _, mgr, _ = stack()
    mgr.handle_request(with_require(make_request("BYE", to_tag="x"), "foo"), UDP)
    mgr.handle_request(with_require(make_request("FROB", seq=2), "foo"), UDP)
    assert statuses(sender) == [420, 501]


TAGS = st.sampled_from(["100rel", "timer", "replaces", "gruu", "path", "Timer", "FOO",
                        "norefersub", "x-custom"])


@settings(max_examples=80, deadline=None)
@given(supported=st.lists(TAGS, max_size=4, unique=True),
       required=st.lists(st.lists(TAGS, min_size=1, max_size=3), max_size=3))
def test_420_iff_some_required_tag_is_not_supported(supported: list[str],
                                                    required: list[list[str]]) -> None:
    request = make_request("OPTIONS")
    for line in required:
        request.headers.add("Require", ", ".join(line))
    known = {t.lower() for t in supported}
    unknown = {t.lower() for line in required for t in line} - known
    got = unsupported_extensions(request, tuple(supported))
    assert {t.lower() for t in got} == unknown
    assert len(got) == len(unknown)  # each listed once


# -- 482 Loop Detected (§8.2.2.2) ------------------------------------------------------------


def test_a_merged_request_gets_482_and_the_first_copy_goes_on() -> None:
    _, sender, _, mgr, seen = stack()
    first = make_request("INVITE", branch=new_branch())
    mgr.handle_request(first, UDP)
    copy = make_request("INVITE", branch=new_branch())  # same From tag, Call-ID, CSeq
    mgr.handle_request(copy, OTHER_PATH)
    assert [r.top_via.branch for r in seen] == [first.top_via.branch]
    (_, response, peer), = sender.sent
    assert response.status == 482 and response.top_via.branch == copy.top_via.branch
    assert peer == OTHER_PATH
    assert mgr.stats.merged_requests == 1
    mgr.handle_request(first, UDP)  # a retransmission matches its own transaction
    assert len(seen) == 1 and len(sender.sent) == 1


def test_no_482_for_new_requests_in_dialog_requests_or_after_the_first_ended() -> None:
    clock, sender, _, mgr, seen = stack()
    mgr.handle_request(make_request("REGISTER", seq=1), UDP)
    mgr.handle_request(make_request("REGISTER", seq=2), UDP)        # new CSeq
    mgr.handle_request(make_request("REGISTER", seq=1, from_tag="other"), UDP)
    mgr.handle_request(make_request("BYE", to_tag="t1"), UDP)
    mgr.handle_request(make_request("BYE", to_tag="t1"), UDP)       # has a To tag
    assert len(seen) == 5 and sender.sent == []
    for txn in list(mgr.transactions()):
        txn.respond(make_response_for(txn.request))
    clock.advance(64.0)  # every transaction ended (Timer J, then the deadline timers)
    assert mgr.transactions() == [] and mgr._merge_index == {}
    mgr.handle_request(make_request("REGISTER", seq=1), UDP)
    assert len(seen) == 6 and sender.sent[-1][1].status == 200


def make_response_for(request: Request) -> Response:
    from pbx.sip.message import make_response

    return make_response(request, 200, to_tag="tt")


def test_the_merge_index_is_bounded_by_the_live_server_transactions() -> None:
    clock, _, _, mgr, _ = stack()
    for seq in range(50):
        mgr.handle_request(make_request("INFO", seq=seq), UDP)
    assert len(mgr._merge_index) == 50
    clock.advance(32.0)  # deadline: 500, completed
    clock.advance(32.0)  # Timer J
    assert mgr._merge_index == {} and mgr.transactions() == []


# -- bounded labels ---------------------------------------------------------------------------


def test_method_labels_are_bounded() -> None:
    for method in KNOWN_METHODS:
        assert method_label(method) == method
    for method in ("FROB", "invite", "X" * 40, "123"):
        assert method_label(method) == "other"
    assert status_label(486) == "486" and status_label("200") == "200"
    assert status_label(99) == status_label(700) == status_label("abc") == "other"


def test_metrics_fold_unknown_methods_and_codes_into_other() -> None:
    counter = {"INVITE": 2, "FROB": 3, "BLAH": 4, "200": 5, "999": 1, "1000": 1}
    requests, responses = _split_sip(counter)
    assert requests == {"INVITE": 2, "other": 7}
    assert responses == {"200": 5, "other": 2}
