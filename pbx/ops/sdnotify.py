"""systemd notification (``sd_notify(3)``) without libsystemd: one datagram per message.

Under ``Type=notify`` systemd waits for ``READY=1`` before it counts the unit started,
and ``STOPPING=1`` tells it a stop is under way (a drain may take ``drain_timeout``).
With ``WatchdogSec=`` set, systemd passes ``WATCHDOG_USEC`` and kills the process unless
``WATCHDOG=1`` arrives in time; we feed it every half period from the reactor, so a
stalled reactor stops feeding it. Nothing is sent when ``$NOTIFY_SOCKET`` is unset
(not under systemd). An address starting with ``@`` is in the Linux abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["SystemdNotifier", "watchdog_interval"]

log = logging.getLogger(__name__)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages (half the period), or None when off.

    ``WATCHDOG_PID``, when set, must be this process (systemd's rule for forked helpers).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


class SystemdNotifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET`` (no-op when it is unset)."""

    def __init__(self, address: str | None = None, *,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = address if address is not None else env.get("NOTIFY_SOCKET") or None
        self.watchdog_every = watchdog_interval(env)
        self.sent: list[str] = []
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def _target(self) -> str | bytes:
        assert self.address
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False when not sent."""
        if not self.enabled:
            return False
        message = "\n".join(lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._target())
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        self.sent.append(message)
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def start_watchdog(self, clock: IReactorTime) -> None:
        """Feed the watchdog every ``WATCHDOG_USEC``/2 from the reactor."""
        if not self.enabled or self.watchdog_every is None or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_every, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
