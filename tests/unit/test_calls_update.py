"""RFC 3311 §5.2: when the B2BUA relays, answers or refuses an UPDATE."""

from __future__ import annotations

from pbx.calls.update import allows_update, decide_update
from pbx.sip import Request, parse


def _msg(allow: str) -> Request:
    msg = parse((
        "INVITE sip:x@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-u\r\n"
        "From: <sip:a@pbx.test>;tag=1\r\nTo: <sip:x@pbx.test>\r\nCall-ID: u@t\r\n"
        f"CSeq: 1 INVITE\r\n{allow}Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


BASE = dict(has_offer=True, early=False, other_allows=True, other_established=True,
            local_offer_pending=False, remote_offer_pending=False)


def test_allows_update() -> None:
    assert allows_update(_msg("Allow: INVITE, ACK, update\r\n"))
    assert not allows_update(_msg("Allow: INVITE, ACK\r\n"))
    assert not allows_update(_msg(""))
    assert not allows_update(None)


def test_offer_relayed_in_a_quiet_confirmed_dialog() -> None:
    assert decide_update(**BASE).relay


def test_glare_is_491() -> None:
    verdict = decide_update(**{**BASE, "local_offer_pending": True})
    assert verdict.status == 491


def test_unanswered_offer_of_the_uac_is_500_with_retry_after() -> None:
    verdict = decide_update(**{**BASE, "remote_offer_pending": True})
    assert verdict.status == 500 and verdict.retry_after is not None
    assert 0 <= verdict.retry_after <= 10


def test_early_offer_needs_the_initial_exchange_complete() -> None:
    assert decide_update(**{**BASE, "early": True, "initial_answered": False}).status == 500
    assert decide_update(**{**BASE, "early": True, "initial_answered": True}).relay


def test_offer_to_a_leg_without_update_support_is_refused() -> None:
    assert decide_update(**{**BASE, "other_allows": False}).status == 500


def test_update_without_sdp_never_conflicts() -> None:
    base = {**BASE, "has_offer": False, "local_offer_pending": True,
            "remote_offer_pending": True}
    assert decide_update(**base).relay
    local = decide_update(**{**base, "other_allows": False})
    assert local.local and not local.relay and local.status is None
