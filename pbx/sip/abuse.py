"""Per-source abuse defence: rate limiting and brute-force blocking.

Theory of operation
-------------------
:meth:`SourceGuard.check` is asked once per out-of-dialog request with the source IP
address and answers a :class:`Verdict`:

1. sources in a trusted network (a SIP load balancer, the monitoring host) are always
   ``ALLOW``-ed and never counted;
2. a blocked source gets ``REJECT`` (answer 403) or ``DROP`` (stay silent) until its
   block ends;
3. otherwise a token bucket per source (``requests_per_second`` sustained, ``burst`` at
   once) answers ``ALLOW`` or ``RATE_LIMITED``.

:meth:`SourceGuard.record_failure` is told about each failed authentication; a source
with ``max_failures`` failures within ``window`` seconds is blocked for ``block_time``
seconds.  A successful authentication clears the source's failure history.

Memory is bounded: the bucket and failure tables are LRU maps capped at
``max_sources`` entries, so a flood from spoofed addresses only evicts idle sources
(which then start again with a full bucket, the same as a new source).  The block table
is capped too; the oldest blocks end early when it overflows.

Because failures are only counted for nonces issued to the same source address (see
:mod:`pbx.sip.auth`), a spoofed UDP source cannot get someone else's address blocked.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BruteForcePolicy",
    "GuardStats",
    "RateLimitPolicy",
    "SecurityPolicy",
    "SourceGuard",
    "Verdict",
]


@dataclass(frozen=True, slots=True)
class BruteForcePolicy:
    """Mirror of ``pbx.config.BruteForceSettings``."""

    enabled: bool = True
    max_failures: int = 10
    window: float = 60.0
    block_time: float = 600.0
    action: str = "reject"  # "reject" (403) or "drop" (silence)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Mirror of ``pbx.config.RateLimitSettings``."""

    enabled: bool = True
    requests_per_second: float = 20.0
    burst: int = 60


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """Mirror of ``pbx.config.SecuritySettings`` (the parts the guard needs)."""

    trusted_networks: tuple[str, ...] = ()
    brute_force: BruteForcePolicy = field(default_factory=BruteForcePolicy)
    rate_limit: RateLimitPolicy = field(default_factory=RateLimitPolicy)

    @classmethod
    def from_settings(cls, settings: Any) -> SecurityPolicy:
        """Build from any object with the config section's attribute names."""
        bf = settings.brute_force
        rl = settings.rate_limit
        return cls(
            tuple(settings.trusted_networks),
            BruteForcePolicy(bool(bf.enabled), int(bf.max_failures), float(bf.window),
                             float(bf.block_time), str(bf.action)),
            RateLimitPolicy(bool(rl.enabled), float(rl.requests_per_second), int(rl.burst)),
        )


class Verdict(enum.IntEnum):
    ALLOW = 0
    RATE_LIMITED = 1
    REJECT = 2  # blocked: answer 403 Forbidden
    DROP = 3    # blocked: send nothing


@dataclass(slots=True)
class GuardStats:
    """Counters for metrics (monotonic except ``currently_blocked``)."""

    rate_limited: int = 0
    blocked_requests: int = 0
    auth_failures: int = 0
    blocks_started: int = 0
    currently_blocked: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"rate_limited": self.rate_limited, "blocked_requests": self.blocked_requests,
                "auth_failures": self.auth_failures, "blocks_started": self.blocks_started,
                "currently_blocked": self.currently_blocked}


class SourceGuard:
    """Rate limiting and failed-authentication blocking per source IP address.

    ``now`` is a monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, policy: SecurityPolicy | None = None, *,
                 now: Callable[[], float] = time.monotonic,
                 max_sources: int = 100_000) -> None:
        policy = policy or SecurityPolicy()
        self.policy = policy
        self.now = now
        self.max_sources = max_sources
        self._networks = [ipaddress.ip_network(n, strict=False)
                          for n in policy.trusted_networks]
        self._trusted_cache: dict[str, bool] = {}
        rl = policy.rate_limit
        self._rate_enabled = rl.enabled
        self._rate = rl.requests_per_second
        self._burst = float(rl.burst)
        bf = policy.brute_force
        self._bf_enabled = bf.enabled
        self._blocked_verdict = Verdict.DROP if bf.action == "drop" else Verdict.REJECT
        # host -> [tokens, last refill time]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # host -> recent failure times (at most max_failures of them)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # host -> block end (monotonic seconds)
        self._blocked: OrderedDict[str, float] = OrderedDict()
        self._stats = GuardStats()

    # -- trust ----------------------------------------------------------------------------
    def is_trusted(self, host: str) -> bool:
        """Is ``host`` inside a trusted network?  Cached per address (bounded)."""
        if not self._networks:
            return False
        cached = self._trusted_cache.get(host)
        if cached is not None:
            return cached
        try:
            address = ipaddress.ip_address(host)
            trusted = any(address in net for net in self._networks
                          if net.version == address.version)
        except ValueError:
            trusted = False
        if len(self._trusted_cache) >= self.max_sources:
            self._trusted_cache.clear()
        self._trusted_cache[host] = trusted
        return trusted

    # -- per request ------------------------------------------------------------------------
    def check(self, host: str) -> Verdict:
        """Admission decision for one out-of-dialog request from ``host``."""
        if self._networks and self.is_trusted(host):
            return Verdict.ALLOW
        now = self.now()
        if self._blocked:
            until = self._blocked.get(host)
            if until is not None:
                if now < until:
                    self._stats.blocked_requests += 1
                    return self._blocked_verdict
                del self._blocked[host]
        if not self._rate_enabled:
            return Verdict.ALLOW
        buckets = self._buckets
        bucket = buckets.get(host)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            buckets[host] = [self._burst - 1.0, now]
            return Verdict.ALLOW
        buckets.move_to_end(host)
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self._stats.rate_limited += 1
            return Verdict.RATE_LIMITED
        bucket[0] = tokens - 1.0
        return Verdict.ALLOW

    def retry_after(self, host: str) -> int:
        """Whole seconds until ``host`` may send again (for a Retry-After header)."""
        now = self.now()
        until = self._blocked.get(host)
        if until is not None and now < until:
            return max(1, int(until - now + 0.999))
        bucket = self._buckets.get(host)
        if bucket is None or self._rate <= 0:
            return 1
        missing = 1.0 - (bucket[0] + (now - bucket[1]) * self._rate)
        return max(1, int(missing / self._rate + 0.999))

    def record_failure(self, host: str) -> bool:
        """Count a failed authentication; ``True`` when this starts a block."""
        if self._networks and self.is_trusted(host):
            return False
        self._stats.auth_failures += 1
        if not self._bf_enabled:
            return False
        bf = self.policy.brute_force
        now = self.now()
        failures = self._failures.get(host)
        if failures is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            failures = self._failures[host] = deque(maxlen=bf.max_failures)
        else:
            self._failures.move_to_end(host)
        failures.append(now)
        if len(failures) < bf.max_failures or now - failures[0] > bf.window:
            return False
        del self._failures[host]
        self._block(host, now + bf.block_time)
        return True

    def record_success(self, host: str) -> None:
        """A successful authentication forgives earlier failures of ``host``."""
        if self._failures:
            self._failures.pop(host, None)

    # -- blocks ------------------------------------------------------------------------------
    def _block(self, host: str, until: float) -> None:
        blocked = self._blocked
        blocked.pop(host, None)
        if len(blocked) >= self.max_sources:
            blocked.popitem(last=False)
        blocked[host] = until
        self._stats.blocks_started += 1

    def block(self, host: str, seconds: float | None = None) -> None:
        """Block ``host`` now (admin action); default length is the policy's block_time."""
        length = self.policy.brute_force.block_time if seconds is None else seconds
        self._block(host, self.now() + length)

    def unblock(self, host: str) -> bool:
        """Lift a block (admin action); ``True`` if ``host`` was blocked."""
        self._failures.pop(host, None)
        return self._blocked.pop(host, None) is not None

    def is_blocked(self, host: str) -> bool:
        until = self._blocked.get(host)
        return until is not None and self.now() < until

    def blocked_sources(self) -> dict[str, float]:
        """Currently blocked hosts and the seconds left on each block."""
        self._expire_blocks()
        now = self.now()
        return {host: until - now for host, until in self._blocked.items()}

    def _expire_blocks(self) -> None:
        blocked = self._blocked
        now = self.now()
        for host in [h for h, until in blocked.items() if until <= now]:
            del blocked[host]

    def forget(self, hosts: Iterable[str] | None = None) -> None:
        """Drop all state (``hosts`` None) or the state of some hosts (tests, admin)."""
        if hosts is None:
            self._buckets.clear()
            self._failures.clear()
            self._blocked.clear()
            return
        for host in hosts:
            self._buckets.pop(host, None)
            self._failures.pop(host, None)
            self._blocked.pop(host, None)

    # -- metrics -----------------------------------------------------------------------------
    @property
    def stats(self) -> GuardStats:
        """Counters; ``currently_blocked`` is recomputed on each read."""
        self._expire_blocks()
        self._stats.currently_blocked = len(self._blocked)
        return self._stats

    @property
    def tracked_sources(self) -> int:
        """Entries held in the bucket table (bounded by ``max_sources``)."""
        return len(self._buckets)
