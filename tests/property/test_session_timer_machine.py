"""Hypothesis stateful test of the RFC 4028 session timer of one leg on a Clock.

Random refreshes (either role, any interval >= 10), failed refreshes (retryable or
fatal) and clock advances.  Invariants: the session never expires before the deadline
of the last refresh (interval - min(32, interval/3), §10) unless a refresh was answered
408/481/nothing; it always has expired once that deadline passed; as refresher a
refresh request goes out by half the interval; as watcher we never send one.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock

from pbx.calls.session_timer import Negotiated, SessionTimer, expiry_delay, refresh_delay


class TimerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.sent: list[float] = []
        self.expired_at: float | None = None
        self.timer = SessionTimer(self.clock, send_refresh=lambda _n: self.sent.append(
            self.clock.seconds()), on_expired=self._expired, retry_delay=2.0)
        self.deadline: float | None = None
        self.refreshed_at = 0.0
        self.terms: Negotiated | None = None
        self.fatal = False

    def _expired(self, _cause: str) -> None:
        self.expired_at = self.clock.seconds()

    @precondition(lambda self: self.expired_at is None)
    @rule(interval=st.integers(10, 4000), we_refresh=st.booleans(), as_uac=st.booleans())
    def refreshed(self, interval: int, we_refresh: bool, as_uac: bool) -> None:
        we_are = "uac" if as_uac else "uas"
        other = "uas" if as_uac else "uac"
        self.terms = Negotiated(interval, we_are if we_refresh else other, we_are, True)
        self.timer.refreshed(self.terms)
        now = self.clock.seconds()
        self.deadline = now + expiry_delay(interval)
        self.refreshed_at = now
        self.sent_before = len(self.sent)

    @precondition(lambda self: self.expired_at is None and self.terms is not None
                  and self.terms.we_refresh)
    @rule(status=st.sampled_from([None, 408, 481, 491, 500, 503]))
    def refresh_failed(self, status: int | None) -> None:
        self.timer.refresh_failed(status)
        if status in (None, 408, 481):
            self.fatal = True
            assert self.expired_at == self.clock.seconds()

    @rule(seconds=st.floats(0.01, 2000))
    def advance(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.getDelayedCalls():
            due = min(c.getTime() for c in self.clock.getDelayedCalls())
            if due > end:
                break
            self.clock.advance(max(0.0, due - self.clock.seconds()))
        self.clock.advance(max(0.0, end - self.clock.seconds()))

    @invariant()
    def expiry_only_at_the_deadline(self) -> None:
        if self.expired_at is not None and not self.fatal:
            assert self.deadline is not None
            assert self.expired_at >= self.deadline - 1e-3  # time_left is in ms
        if self.deadline is not None and self.clock.seconds() >= self.deadline + 1e-3:
            assert self.expired_at is not None

    @invariant()
    def refresher_sends_by_half_the_interval(self) -> None:
        terms = self.terms
        if terms is None or self.expired_at is not None:
            return
        now = self.clock.seconds()
        since = [t for t in self.sent if t >= self.refreshed_at]
        if not terms.we_refresh:
            assert len(self.sent) == self.sent_before
        elif now >= self.refreshed_at + refresh_delay(terms.interval) + 1e-6:
            assert since


TestSessionTimer = TimerMachine.TestCase
TestSessionTimer.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
