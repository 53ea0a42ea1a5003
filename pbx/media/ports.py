"""RTP port bookkeeping: even RTP port + the odd RTCP port above it, each pair owned once.

Pure bookkeeping (no sockets): the relay binds what it is given and hands a port back
if binding fails.  Free pairs are reused FIFO so a port just released — whose old peer
may still be sending stray packets — is the last to be handed out again.

Releasing is checked strictly because a double release would give one pair to two
calls: the second release raises :class:`PortError` and is counted.
"""

from __future__ import annotations

from collections import deque

__all__ = ["PortAllocator", "PortError", "PortsExhausted"]


class PortError(ValueError):
    """A port was released twice, or released without having been allocated."""


class PortsExhausted(RuntimeError):
    """No free RTP/RTCP pair left in the configured range (the call gets 503/488)."""


class PortAllocator:
    """Hands out even RTP ports from ``[port_min, port_max]``; ``port + 1`` is RTCP."""

    def __init__(self, port_min: int, port_max: int) -> None:
        first = port_min + (port_min & 1)  # round up to even
        if port_min < 1 or port_max > 65535 or first + 1 > port_max:
            raise ValueError(f"RTP range {port_min}-{port_max} holds no even/odd port pair")
        self.port_min = port_min
        self.port_max = port_max
        self._free: deque[int] = deque(range(first, port_max, 2))
        self._used: set[int] = set()
        self.capacity = len(self._free)
        self.allocated_total = 0
        self.released_total = 0
        self.release_errors = 0

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """An even RTP port (its RTCP port is the next one); raises PortsExhausted."""
        if not self._free:
            raise PortsExhausted(
                f"all {self.capacity} RTP port pairs of {self.port_min}-{self.port_max} in use")
        port = self._free.popleft()
        self._used.add(port)
        self.allocated_total += 1
        return port

    def release(self, port: int) -> None:
        """Give a pair back; exactly once per allocation (else PortError, counted)."""
        try:
            self._used.remove(port)
        except KeyError:
            self.release_errors += 1
            raise PortError(f"RTP port {port} released but not allocated") from None
        self._free.append(port)
        self.released_total += 1

    def is_allocated(self, port: int) -> bool:
        return port in self._used

    def calls_capacity(self) -> int:
        """How many relayed calls (two legs, one pair each) the range can hold."""
        return self.capacity // 2
