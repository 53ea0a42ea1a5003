"""RFC 4028 session timers, negotiated and kept by the B2BUA on each leg.

The B2BUA is the UAS of the caller's INVITE and the UAC of each fork's, so each leg has
its own interval and refresher.  This module holds:

* header codecs: ``Session-Expires: delta-seconds[;refresher=uac|uas]`` (§4, compact
  ``x``) and ``Min-SE: delta-seconds`` (§5);
* the negotiations, as pure functions: :func:`negotiate_uas` (§9: accept, lower to our
  policy, or 422 with our Min-SE) and :func:`negotiate_uac` (§7.2: what the callee's 2xx
  decided), :func:`uac_request_headers` / :func:`retry_after_422` (§7.1, §7.4);
* the per-leg timer :class:`SessionTimer`, implementing ``statecharts/session_timer.yaml``.
  What the chart does not show: the interval values its timers read (``refresh_in``:
  half the interval, §10; ``time_left``: until the interval minus min(32, interval/3),
  §10), recomputed when a refresh is recorded, and the retry delay after a refresh that
  failed without ending the dialog.

Refresher roles are kept in the peer's terms (``uac``/``uas`` of the dialog-creating
INVITE): on the caller leg we are the UAS, on a callee leg the UAC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from pbx.calls.reliable import has_option
from pbx.sip import Request, Response
from pbx.statechart_timers import TimedChartModel

__all__ = [
    "EXPIRED_CAUSE",
    "OPTION_TAG",
    "RFC_MIN_SE",
    "Negotiated",
    "SessionExpires",
    "SessionTimer",
    "TimerPolicy",
    "UasDecision",
    "expiry_delay",
    "negotiate_uac",
    "negotiate_uas",
    "parse_min_se",
    "refresh_delay",
    "retry_after_422",
    "uac_request_headers",
]

log = logging.getLogger(__name__)

OPTION_TAG = "timer"
RFC_MIN_SE = 90                 # §4/§5: the smallest interval a UA may insist on
MAX_INTERVAL = 2**32 - 1        # delta-seconds is 32 bits (RFC 3261 §25.1)
EXPIRED_CAUSE = "Session Timer Expired"
EXPIRED_REASON = 'SIP;cause=408;text="Session Timer Expired"'
REFRESH_RETRY = 4.0             # after a 491/500 to our refresh (RFC 3261 §14.1: 2.1-4 s)


def _delta(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_INTERVAL else None


@dataclass(frozen=True, slots=True)
class SessionExpires:
    """A Session-Expires value: interval in seconds and the refresher, if named."""

    interval: int
    refresher: str | None = None   # "uac" | "uas" | None

    @classmethod
    def parse(cls, value: str | None) -> SessionExpires | None:
        """``delta-seconds *(SEMI se-params)``; an unknown refresher value is ignored
        (generic parameters are allowed, §4), a malformed interval gives None."""
        if value is None:
            return None
        head, *params = value.split(";")
        interval = _delta(head)
        if interval is None:
            return None
        refresher = None
        for param in params:
            name, _, arg = param.partition("=")
            if name.strip().lower() == "refresher" and arg.strip().lower() in ("uac", "uas"):
                refresher = arg.strip().lower()
        return cls(interval, refresher)

    @classmethod
    def of(cls, message: Request | Response) -> SessionExpires | None:
        return cls.parse(message.headers.get("Session-Expires"))

    def __str__(self) -> str:
        return f"{self.interval};refresher={self.refresher}" if self.refresher \
            else str(self.interval)


def parse_min_se(value: str | None) -> int | None:
    """Min-SE (§5): ``delta-seconds *(SEMI generic-param)``."""
    if value is None:
        return None
    return _delta(value.split(";", 1)[0])


def refresh_delay(interval: float) -> float:
    """§10: the refresher refreshes at half the interval (RECOMMENDED)."""
    return interval / 2


def expiry_delay(interval: float) -> float:
    """§10: without a refresh the other side sends BYE at the interval minus
    min(32, interval/3), before the session really expires."""
    return interval - min(32.0, interval / 3)


@dataclass(frozen=True, slots=True)
class TimerPolicy:
    """Our session timer settings (``calls.session_timer``)."""

    enabled: bool = True
    expires: int = 1800
    min_se: int = RFC_MIN_SE

    def __post_init__(self) -> None:
        if self.min_se < 1 or self.expires < self.min_se:
            raise ValueError("session timer: need 1 <= min_se <= expires")


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The session timer agreed on one leg."""

    interval: int
    refresher: str          # "uac" | "uas", of that leg's dialog-creating INVITE
    we_are: str             # our role on that leg: "uac" (callee leg) | "uas" (caller leg)
    peer_supports: bool     # the peer listed "timer" (it knows it may have to refresh)
    min_se: int = RFC_MIN_SE

    @property
    def we_refresh(self) -> bool:
        return self.refresher == self.we_are

    def for_role(self, we_are: str) -> Negotiated:
        """The same agreement seen from a transaction where we are ``we_are``: the
        refresher parameter names a role of the refresh transaction (§7.4, §9), so it
        flips when the other side sends the next refresh."""
        if we_are == self.we_are:
            return self
        other = "uas" if we_are == "uac" else "uac"
        return Negotiated(self.interval, we_are if self.we_refresh else other, we_are,
                          self.peer_supports, self.min_se)

    def response_headers(self) -> list[tuple[str, str]]:
        """Headers of our 2xx when we are the UAS (§9): Session-Expires with the
        refresher, and Require: timer when the peer supports it (it must know)."""
        own = self.for_role("uas")
        headers = [("Session-Expires", f"{own.interval};refresher={own.refresher}")]
        if own.peer_supports:
            headers.append(("Require", OPTION_TAG))
        return headers

    def refresh_headers(self) -> list[tuple[str, str]]:
        """Headers of a refresh (re-INVITE/UPDATE) we send as UAC (§7.4, §10): the same
        interval and refresher, and our Min-SE."""
        own = self.for_role("uac")
        return [("Session-Expires", f"{own.interval};refresher={own.refresher}"),
                ("Min-SE", str(own.min_se)), ("Supported", OPTION_TAG)]


@dataclass(frozen=True, slots=True)
class UasDecision:
    """:func:`negotiate_uas`'s answer: reject with 422 (``min_se`` set), or accept with
    ``negotiated`` (None: no session timer on this leg)."""

    negotiated: Negotiated | None = None
    reject_min_se: int | None = None

    @property
    def reject(self) -> bool:
        return self.reject_min_se is not None


def negotiate_uas(request: Request, policy: TimerPolicy) -> UasDecision:
    """§9: we are the UAS of ``request`` (an INVITE, re-INVITE or UPDATE).

    * Session-Expires below our Min-SE: 422 with our Min-SE when the UAC supports the
      extension; otherwise (a proxy inserted it, the UAC would not understand 422) the
      interval is raised to our minimum and we refresh ourselves.
    * Above our ``expires``: lowered to it, but never below the request's Min-SE (§9).
    * None in the request: when enabled we impose ours (at least the request's Min-SE).
    * Refresher: the request's choice when the UAC supports timer; absent, the UAC
      refreshes when it supports timer (its refreshes prove it is alive), else we do
      (§9 then requires refresher=uas and no Require: timer).
    * Disabled: a request that asks for a session timer still gets one (a UA that
      requires it must not be refused), we just never impose one.
    """
    supports = has_option(request, "Supported", OPTION_TAG) or has_option(
        request, "Require", OPTION_TAG)
    asked = SessionExpires.of(request)
    floor = max(policy.min_se, parse_min_se(request.headers.get("Min-SE")) or 0)
    if asked is None:
        if not policy.enabled:
            return UasDecision()
        interval = max(policy.expires, floor)
        refresher = "uac" if supports else "uas"
        return UasDecision(Negotiated(interval, refresher, "uas", supports, policy.min_se))
    if asked.interval < policy.min_se:
        if supports:
            return UasDecision(reject_min_se=policy.min_se)
        return UasDecision(Negotiated(policy.min_se, "uas", "uas", False, policy.min_se))
    interval = asked.interval
    if policy.enabled and interval > policy.expires:
        interval = max(policy.expires, floor)
    # §9: a UAC without the extension cannot refresh, so the refresher is us.
    refresher = (asked.refresher or "uac") if supports else "uas"
    return UasDecision(Negotiated(interval, refresher, "uas", supports, policy.min_se))


def uac_request_headers(policy: TimerPolicy, interval: int | None = None,
                        min_se: int | None = None) -> list[tuple[str, str]]:
    """Headers of our INVITE to a callee (§7.1): Supported: timer always (we can be
    either role), Session-Expires and Min-SE when enabled.  No refresher parameter: the
    UAS chooses (§7.1 allows it), so phones that insist on refreshing themselves may."""
    headers = [("Supported", OPTION_TAG)]
    if policy.enabled:
        own_min = max(policy.min_se, min_se or 0)
        headers.append(("Session-Expires", str(max(interval or policy.expires, own_min))))
        headers.append(("Min-SE", str(own_min)))
    return headers


def retry_after_422(response: Response, policy: TimerPolicy,
                    tried: int | None = None) -> int | None:
    """§7.4: a 422 names the UAS's Min-SE; retry with at least that (once: None when
    the new value would not be larger than what we tried, or when it is absurd)."""
    wanted = parse_min_se(response.headers.get("Min-SE"))
    if wanted is None:
        return None
    previous = tried if tried is not None else policy.expires
    if wanted <= previous and tried is not None:
        return None
    value = max(wanted, policy.min_se)
    return value if value <= max(policy.expires, 86400) else None


def negotiate_uac(response: Response, policy: TimerPolicy) -> Negotiated | None:
    """§7.2: the callee's 2xx to our INVITE (or the answer to our refresh).

    With Session-Expires the interval and refresher are what it says; a missing
    refresher means we refresh (§7.2: the UAC then is the refresher).  Without it the
    UAS did not use the extension: when enabled we keep a timer with ourselves as
    refresher (our refreshes find a dead callee), else there is none (§7.2).
    """
    answered = SessionExpires.of(response)
    supports = has_option(response, "Supported", OPTION_TAG) or has_option(
        response, "Require", OPTION_TAG)
    if answered is None:
        if not policy.enabled:
            return None
        return Negotiated(policy.expires, "uac", "uac", supports, policy.min_se)
    return Negotiated(answered.interval, answered.refresher or "uac", "uac", supports,
                      policy.min_se)


class SessionTimer(TimedChartModel):
    """One leg's session timer (``statecharts/session_timer.yaml``).

    ``send_refresh`` is called when we must refresh; ``on_expired(cause)`` when the
    session is dead (no refresh in time, or our refresh got 408/481/no answer).
    """

    chart_name = "session_timer"

    def __init__(self, clock: IReactorTime, *, send_refresh: Callable[[Negotiated], None],
                 on_expired: Callable[[str], None],
                 retry_delay: float = REFRESH_RETRY) -> None:
        super().__init__()
        self.clock = clock
        self._send_refresh = send_refresh
        self._on_expired = on_expired
        self.retry_delay = retry_delay
        self.current: Negotiated | None = None
        self.refresh_in = 0.0
        self.expires_at = 0.0
        self.cause = EXPIRED_CAUSE
        self.refreshes_sent = 0
        self.refreshes_seen = 0
        self.start_timers()

    @property
    def time_left(self) -> float:
        """Until the deadline, in whole milliseconds: timers with equal delays share one
        reactor call (pbx.statechart_timers), and a refresh armed at once has exactly
        ``expiry_delay(interval)`` left, not that plus float noise of the clock."""
        return max(0.0, round(self.expires_at - self.clock.seconds(), 3))

    # -- the leg's interface ----------------------------------------------------------
    def refreshed(self, negotiated: Negotiated) -> None:
        """A 2xx to a session refresh (or to the INVITE) agreed ``negotiated`` now."""
        if self.is_final:
            return
        self.current = negotiated
        self.refresh_in = refresh_delay(negotiated.interval)
        self.expires_at = self.clock.seconds() + expiry_delay(negotiated.interval)
        self.refreshes_seen += 1
        self.fire("refreshed")

    def refresh_failed(self, status: int | None) -> None:
        """Our refresh failed: 408/481/None (no answer) end the session (§10); anything
        else is retried after ``retry_delay`` while the deadline allows."""
        if self.is_final:
            return
        if status is None or status in (408, 481):
            self.cause = f"{EXPIRED_CAUSE} ({status or 'no answer'} to refresh)"
            self.fire("lost")
            return
        self.refresh_in = max(0.5, min(self.retry_delay, self.time_left / 2))
        self.fire("refresh_failed")

    def stop(self) -> None:
        self.fire("stop")

    # -- chart callbacks -----------------------------------------------------------------
    def we_refresh(self, *_: Any) -> bool:
        return self.current is not None and self.current.we_refresh

    def send_refresh(self, *_: Any) -> None:
        current = self.current
        if current is None:
            return
        self.refreshes_sent += 1
        self._send_refresh(current)

    def session_expired(self, *_: Any) -> None:
        log.info("session timer expired (%s)", self.cause)
        self._on_expired(self.cause)
