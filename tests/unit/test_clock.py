"""Monotonic scheduling for the real reactor (pbx.clock): a wall-clock step back must not
stall timers.  The real reactor runs in a subprocess whose ``time.time`` is a fake wall
clock, replaced before Twisted is imported (Twisted binds ``time.time`` at import)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pbx.clock import install_monotonic_clock, is_monotonic, monotonic_epoch

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import os, sys, threading, time

    real_time = time.time
    step = [0.0]
    time.time = lambda: real_time() + step[0]   # the fake wall clock

    from twisted.internet import reactor

    if sys.argv[1] == "monotonic":
        from pbx.clock import install_monotonic_clock
        install_monotonic_clock(reactor)

    def watchdog():  # the reactor is stalled: nothing it schedules would report it
        print("STALLED", flush=True)
        os._exit(3)

    guard = threading.Timer(float(sys.argv[2]), watchdog)
    guard.daemon = True
    guard.start()

    def step_back():
        step[0] = -3600.0  # NTP or an operator steps the wall clock back one hour

    def fired():
        print("FIRED", flush=True)
        reactor.stop()

    reactor.callLater(0.3, fired)       # scheduled before the step: due 0.3 s later
    reactor.callLater(0.05, step_back)
    reactor.run()
    guard.cancel()
""")


def _run_child(mode: str, watchdog: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(watchdog)], cwd=ROOT,
                          text=True,
                          capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_a_call_later_fires_after_the_wall_clock_steps_back_one_hour() -> None:
    result = _run_child("monotonic", 30.0)  # generous: a loaded box may be slow
    assert result.stdout.strip() == "FIRED", result.stderr


def test_without_the_monotonic_clock_the_same_call_stalls() -> None:
    """The control: proves the child really steps the clock the reactor schedules on."""
    result = _run_child("wall", 3.0)  # the stall it shows is an hour long
    assert result.returncode == 3 and "STALLED" in result.stdout, result.stderr


class _Reactor:
    @staticmethod
    def seconds() -> float:
        return 0.0


def test_install_is_idempotent_and_starts_at_unix_time() -> None:
    import time

    reactor = _Reactor()
    assert not is_monotonic(reactor)
    clock = install_monotonic_clock(reactor)
    assert is_monotonic(reactor) and reactor.seconds is clock
    assert install_monotonic_clock(reactor) is clock
    assert abs(clock() - time.time()) < 5.0  # still reads as epoch seconds
    first = monotonic_epoch()
    assert first() <= first()
