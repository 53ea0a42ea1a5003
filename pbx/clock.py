"""Monotonic scheduling for the running PBX's reactor.

Twisted's reactor schedules on ``time.time`` (``ReactorBase.seconds`` is
``twisted.python.runtime.seconds``): ``callLater`` stores ``seconds() + delay``, the
main loop sleeps until the earliest call's time minus ``seconds()`` (``timeout()``)
and runs what ``runUntilCurrent`` finds due at ``seconds()``.  When the wall clock is
stepped back (NTP after a suspend, an operator, a VM restore) every timer waits for
the step on top of its delay: retransmissions, Timer J, registrations' expiry sweeps
and the lifecycle's drain all stall.  DESIGN.md asks all timers to be on a monotonic
clock, and every component here takes its time from the reactor (``IReactorTime``).

:func:`install_monotonic_clock` replaces the reactor's ``seconds`` with
``time.monotonic() + offset``, the offset taken once so that the values start out equal
to the Unix time.  All three uses above go through ``self.seconds()`` (checked against
Twisted 26's ``twisted/internet/base.py``), so scheduling becomes immune to steps,
while timestamps derived from ``reactor.seconds()`` (the store's ``updated_at``, the
lifecycle's ``since``) still read as epoch seconds; after a step they differ from the
wall clock by the step, never go backwards.  Calls scheduled before the switch keep
their times, which the equal start values make correct.  What needs the true wall
clock (CDRs, nonces, persisted binding expiry) already uses ``time.time`` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["install_monotonic_clock", "is_monotonic", "monotonic_epoch"]

_installed: list[Callable[[], float]] = []


def monotonic_epoch() -> Callable[[], float]:
    """A clock that reads as Unix time now and then advances monotonically."""
    monotonic = time.monotonic
    offset = time.time() - monotonic()

    def seconds() -> float:
        return monotonic() + offset

    return seconds


def is_monotonic(reactor: Any) -> bool:
    """Whether :func:`install_monotonic_clock` has been applied to ``reactor``."""
    return getattr(reactor, "seconds", None) in _installed


def install_monotonic_clock(reactor: Any | None = None) -> Callable[[], float]:
    """Make ``reactor`` (default: the global one) schedule on a monotonic clock.

    Idempotent; called by both runners (``pbx run`` and ``twistd -n pbx``) before the
    service is built, i.e. before anything of ours is scheduled.  Returns the clock.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    current = getattr(reactor, "seconds", None)
    if current in _installed:
        return current  # type: ignore[return-value]
    seconds = monotonic_epoch()
    _installed.append(seconds)
    reactor.seconds = seconds
    return seconds
