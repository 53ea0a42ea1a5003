"""RFC 4028 session timers: header codecs, UAS/UAC negotiation, 422, and the per-leg
chart driven by a Clock (refresh at half the interval, BYE at interval - min(32, SE/3))."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from pbx.calls.session_timer import (
    Negotiated,
    SessionExpires,
    SessionTimer,
    TimerPolicy,
    expiry_delay,
    negotiate_uac,
    negotiate_uas,
    parse_min_se,
    refresh_delay,
    retry_after_422,
    uac_request_headers,
)
from pbx.sip import Request, Response, parse

POLICY = TimerPolicy(enabled=True, expires=1800, min_se=90)


def request(extra: str = "") -> Request:
    msg = parse((
        "INVITE sip:1002@pbx.test SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-a\r\n"
        "From: <sip:1001@pbx.test>;tag=a\r\nTo: <sip:1002@pbx.test>\r\nCall-ID: c@t\r\n"
        f"CSeq: 1 INVITE\r\nContact: <sip:1001@192.0.2.10>\r\n{extra}"
        "Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def response(extra: str = "", status: int = 200) -> Response:
    msg = parse((
        f"SIP/2.0 {status} OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-b\r\n"
        "From: <sip:1001@pbx.test>;tag=a\r\nTo: <sip:1002@pbx.test>;tag=b\r\nCall-ID: c@t\r\n"
        f"CSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Response)
    return msg


@pytest.mark.parametrize(("text", "value"), [
    ("1800", SessionExpires(1800)),
    ("1800;refresher=uac", SessionExpires(1800, "uac")),
    (" 90 ; Refresher = UAS ;x=1", SessionExpires(90, "uas")),
    ("600;refresher=proxy", SessionExpires(600)),
    ("0", None), ("abc", None), ("", None), (None, None)])
def test_session_expires_parse(text: str | None, value: SessionExpires | None) -> None:
    assert SessionExpires.parse(text) == value


def test_session_expires_format_and_compact_form() -> None:
    assert str(SessionExpires(90, "uas")) == "90;refresher=uas"
    assert str(SessionExpires(90)) == "90"
    assert SessionExpires.of(request("x: 300;refresher=uac\r\n")) == SessionExpires(300, "uac")
    assert parse_min_se("120;foo=bar") == 120
    assert parse_min_se("x") is None


def test_deadlines() -> None:
    assert refresh_delay(1800) == 900
    assert expiry_delay(1800) == 1768            # min(32, 600) = 32
    assert expiry_delay(90) == 60                # min(32, 30) = 30
    assert expiry_delay(12) == 8


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="min_se"):
        TimerPolicy(expires=60, min_se=90)


# -- UAS (§9) --------------------------------------------------------------------------------

def test_uas_422_when_too_small_and_uac_supports() -> None:
    decision = negotiate_uas(request("Supported: timer\r\nSession-Expires: 60\r\n"), POLICY)
    assert decision.reject and decision.reject_min_se == 90


def test_uas_raises_too_small_interval_when_uac_does_not_support() -> None:
    decision = negotiate_uas(request("Session-Expires: 60\r\n"), POLICY)
    assert not decision.reject
    assert decision.negotiated == Negotiated(90, "uas", "uas", False, 90)


def test_uas_keeps_the_requested_refresher() -> None:
    got = negotiate_uas(request("Supported: timer\r\nSession-Expires: 300;refresher=uas\r\n"),
                        POLICY).negotiated
    assert got is not None and got.interval == 300 and got.refresher == "uas"
    assert got.we_refresh
    assert got.response_headers() == [("Session-Expires", "300;refresher=uas"),
                                      ("Require", "timer")]


def test_uas_no_refresher_means_the_supporting_uac_refreshes() -> None:
    got = negotiate_uas(request("Supported: timer\r\nSession-Expires: 300\r\n"),
                        POLICY).negotiated
    assert got is not None and got.refresher == "uac" and not got.we_refresh


def test_uas_lowers_a_long_interval_but_not_below_request_min_se() -> None:
    got = negotiate_uas(request("Supported: timer\r\nSession-Expires: 7200\r\n"), POLICY)
    assert got.negotiated is not None and got.negotiated.interval == 1800
    got = negotiate_uas(request(
        "Supported: timer\r\nSession-Expires: 7200\r\nMin-SE: 3600\r\n"), POLICY)
    assert got.negotiated is not None and got.negotiated.interval == 3600


def test_uas_imposes_a_timer_when_enabled_and_none_asked() -> None:
    got = negotiate_uas(request(), POLICY).negotiated
    assert got == Negotiated(1800, "uas", "uas", False, 90)
    assert got.response_headers() == [("Session-Expires", "1800;refresher=uas")]
    got = negotiate_uas(request("Supported: timer\r\n"), POLICY).negotiated
    assert got is not None and got.refresher == "uac"


def test_uas_disabled_imposes_nothing_but_honours_a_request() -> None:
    off = TimerPolicy(enabled=False)
    assert negotiate_uas(request("Supported: timer\r\n"), off).negotiated is None
    got = negotiate_uas(request("Require: timer\r\nSession-Expires: 600\r\n"), off)
    assert got.negotiated is not None and got.negotiated.interval == 600


# -- UAC (§7) --------------------------------------------------------------------------------

def test_uac_request_headers() -> None:
    assert uac_request_headers(POLICY) == [("Supported", "timer"), ("Session-Expires", "1800"),
                                           ("Min-SE", "90")]
    assert uac_request_headers(POLICY, 600, 600) == [
        ("Supported", "timer"), ("Session-Expires", "600"), ("Min-SE", "600")]
    assert uac_request_headers(TimerPolicy(enabled=False)) == [("Supported", "timer")]


def test_uac_retry_after_422() -> None:
    assert retry_after_422(response("Min-SE: 3600\r\n", 422), POLICY) == 3600
    assert retry_after_422(response("Min-SE: 3600\r\n", 422), POLICY, tried=3600) is None
    assert retry_after_422(response("", 422), POLICY) is None
    assert retry_after_422(response("Min-SE: 999999\r\n", 422), POLICY) is None


def test_uac_negotiation_from_2xx() -> None:
    got = negotiate_uac(response("Session-Expires: 600;refresher=uas\r\nRequire: timer\r\n"),
                        POLICY)
    assert got is not None and got.interval == 600 and not got.we_refresh
    got = negotiate_uac(response("Session-Expires: 600;refresher=uac\r\n"), POLICY)
    assert got is not None and got.we_refresh
    got = negotiate_uac(response(), POLICY)       # no timer in the 2xx: we keep ours
    assert got is not None and got.we_refresh and got.interval == 1800
    assert negotiate_uac(response(), TimerPolicy(enabled=False)) is None


# -- the chart ------------------------------------------------------------------------------

class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.refreshes: list[float] = []
        self.expired: list[tuple[float, str]] = []
        self.timer = SessionTimer(self.clock, send_refresh=self.refresh,
                                  on_expired=self.expire, retry_delay=2.0)

    def refresh(self, _n: Negotiated) -> None:
        self.refreshes.append(self.clock.seconds())

    def expire(self, cause: str) -> None:
        self.expired.append((self.clock.seconds(), cause))


def test_refresher_refreshes_at_half_and_restarts_on_each_2xx() -> None:
    h = Harness()
    n = Negotiated(90, "uas", "uas", True)
    h.timer.refreshed(n)
    assert h.timer.state == "refresher"
    h.clock.advance(45)
    assert h.refreshes == [45]
    h.clock.advance(5)
    h.timer.refreshed(n)            # the refresh's 2xx
    h.clock.advance(45)
    assert h.refreshes == [45, 95]
    assert h.expired == []


def test_refresher_expires_when_refreshes_are_not_answered() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(90, "uac", "uac", True))
    h.clock.advance(45)
    h.clock.advance(14.9)
    assert h.refreshes == [45] and h.expired == []
    h.clock.advance(0.2)
    assert h.expired == [(60.1, "Session Timer Expired")]
    assert h.timer.state == "expired"


def test_refresh_failure_408_or_481_ends_the_session() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(90, "uac", "uac", True))
    h.clock.advance(45)
    h.timer.refresh_failed(481)
    assert h.timer.state == "expired" and "481" in h.expired[0][1]


def test_refresh_failure_491_is_retried_before_the_deadline() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(90, "uac", "uac", True))
    h.clock.advance(45)
    h.timer.refresh_failed(491)
    h.clock.advance(2)
    assert h.refreshes == [45, 47]
    h.timer.refreshed(Negotiated(90, "uac", "uac", True))
    h.clock.advance(40)
    assert h.expired == []


def test_watcher_byes_at_interval_minus_min_32_third() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(1800, "uac", "uas", True))
    assert h.timer.state == "watcher"
    h.clock.advance(1000)
    h.timer.refreshed(Negotiated(1800, "uac", "uas", True))  # the peer's refresh
    h.clock.advance(1767)
    assert h.expired == []
    h.clock.advance(1)
    assert h.expired == [(2768, "Session Timer Expired")]
    assert h.refreshes == []


def test_role_change_restarts_timers() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(90, "uac", "uas", True))
    h.clock.advance(50)
    h.timer.refreshed(Negotiated(90, "uas", "uas", True))  # now we refresh
    assert h.timer.state == "refresher"
    h.clock.advance(45)
    assert h.refreshes == [95]
    h.timer.refreshed(Negotiated(90, "uac", "uas", True))
    assert h.timer.state == "watcher"
    h.clock.advance(59)
    assert h.expired == []


def test_stop_cancels_everything() -> None:
    h = Harness()
    h.timer.refreshed(Negotiated(90, "uac", "uac", True))
    h.timer.stop()
    h.clock.advance(1000)
    assert h.refreshes == [] and h.expired == [] and h.timer.state == "stopped"
    assert not h.clock.getDelayedCalls()


def test_roles_flip_with_the_refresh_transaction() -> None:
    # Callee leg: we sent the INVITE (uac) and the callee refreshes (uas).
    n = Negotiated(600, "uas", "uac", True)
    assert not n.we_refresh
    # The callee's refresh re-INVITE: it is now the UAC and still the refresher.
    as_uas = n.for_role("uas")
    assert as_uas.refresher == "uac" and not as_uas.we_refresh
    assert n.response_headers()[0] == ("Session-Expires", "600;refresher=uac")
    ours = Negotiated(600, "uas", "uas", True)   # caller leg, we refresh
    assert ours.refresh_headers()[0] == ("Session-Expires", "600;refresher=uac")
