"""RTP port bookkeeping: even RTP port + the odd RTCP port above it, each pair owned once.

Pure bookkeeping (no sockets): the relay binds what it is given and hands a port back
if binding fails.

Pairs are handed out **at random** from the free pool, not in order: with sequential
ports the first call of the day always gets ``port_min``/``port_min + 2`` and an attacker
who sprays RTP at a guessed port during the learning window of a NAT'd phone hits it
(the hijack that symmetric-RTP latching is exposed to; RFC 3550 §9.1 and RFC 4961 §3
leave the choice of ports to the implementation).  Allocation stays O(1): a random index
into a list of free pairs, swapped with the last one and popped.

A pair just released — whose old peer may still be sending stray packets — first waits
in a FIFO quarantine (a quarter of the range, at most ``QUARANTINE_MAX`` pairs) and only
then rejoins the random pool; when the pool is empty the oldest quarantined pair is used.

Releasing is checked strictly because a double release would give one pair to two
calls: the second release raises :class:`PortError` and is counted.
"""

from __future__ import annotations

import random
from collections import deque

__all__ = ["QUARANTINE_MAX", "PortAllocator", "PortError", "PortsExhausted"]

QUARANTINE_MAX = 1024


class PortError(ValueError):
    """A port was released twice, or released without having been allocated."""


class PortsExhausted(RuntimeError):
    """No free RTP/RTCP pair left in the configured range (the call gets 503/488)."""


class PortAllocator:
    """Hands out random even RTP ports from ``[port_min, port_max]``; ``port + 1`` is RTCP.

    ``rng`` is injectable for tests; by default the OS's entropy seeds it (the ports are
    not a secret, only unpredictable enough that spraying one is not a hit).
    """

    def __init__(self, port_min: int, port_max: int, *,
                 rng: random.Random | None = None) -> None:
        first = port_min + (port_min & 1)  # round up to even
        if port_min < 1 or port_max > 65535 or first + 1 > port_max:
            raise ValueError(f"RTP range {port_min}-{port_max} holds no even/odd port pair")
        self.port_min = port_min
        self.port_max = port_max
        self._pool: list[int] = list(range(first, port_max, 2))
        self.capacity = len(self._pool)
        self._quarantine: deque[int] = deque()
        self._quarantine_max = min(QUARANTINE_MAX, self.capacity // 4)
        self._used: set[int] = set()
        self._rng = rng or random.Random()
        self.allocated_total = 0
        self.released_total = 0
        self.release_errors = 0

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._pool) + len(self._quarantine)

    def allocate(self) -> int:
        """A random even RTP port (its RTCP port is the next one); raises PortsExhausted."""
        pool = self._pool
        if pool:
            index = self._rng.randrange(len(pool))
            port = pool[index]
            pool[index] = pool[-1]
            pool.pop()
        elif self._quarantine:
            port = self._quarantine.popleft()
        else:
            raise PortsExhausted(
                f"all {self.capacity} RTP port pairs of {self.port_min}-{self.port_max} in use")
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
        quarantine = self._quarantine
        quarantine.append(port)
        if len(quarantine) > self._quarantine_max:
            self._pool.append(quarantine.popleft())
        self.released_total += 1

    def is_allocated(self, port: int) -> bool:
        return port in self._used

    def calls_capacity(self) -> int:
        """How many relayed calls (two legs, one pair each) the range can hold."""
        return self.capacity // 2
