"""Abuse defence: per-source rate limiting, brute-force blocking and account lock-out.

Theory of operation
-------------------
:meth:`SourceGuard.check` is asked once per request that is not part of an existing
dialog, with the source IP address, and answers a :class:`Verdict`:

1. sources in a trusted network (a SIP load balancer, the monitoring host) are always
   ``ALLOW``-ed: they carry many clients, so they are never rate limited or blocked;
2. a blocked source gets ``REJECT`` (answer 403) or ``DROP`` (stay silent) until its
   block ends;
3. otherwise a token bucket per source (``requests_per_second`` sustained, ``burst`` at
   once) answers ``ALLOW`` or ``RATE_LIMITED``.

A *source* is an IPv4 address, or an IPv6 /64 (one subscriber or LAN holds a whole
/64, so counting single IPv6 addresses would give an attacker 2**64 fresh sources).

Failed authentications (:meth:`SourceGuard.record_failure`, RFC 3261 §22) are counted
per source *and* per account (the digest username, whether or not it exists, so that
lock-outs say nothing about which users exist):

* **Source block.** A source with ``max_failures`` failures within ``window`` seconds,
  whatever accounts they were for, is blocked for ``block_time`` seconds.  A successful
  authentication of account A from that source forgives only that source's failures
  *for A*: logging in to one's own extension between guesses at someone else's does
  not reset the count.
* **Account lock-out.** An account with ``max_failures`` failures within ``window``
  seconds, from any sources, is locked for ``block_time`` seconds.  The lock applies to
  the sources that failed for that account (those in the window, and any that fails
  while it is locked), never to a source that authenticated the account successfully
  within ``success_memory`` seconds: an attacker cannot lock a phone out of its own
  address, but a spread of sources (a botnet under the per-source threshold) gets one
  guess per source per lock.  While :meth:`SourceGuard.account_locked` says so, the
  registrar and the B2BUA answer with a plain challenge *without checking the
  credentials*, so a correct guess is indistinguishable from a wrong one.
* **Trusted networks.** Behind a SIP load balancer every client has the balancer's
  address, and what it states about the real client (Via ``received``) cannot be
  checked here, so all trusted networks count as one source for accounts: their
  failures lock the account for requests arriving through them, and a success
  through them neither forgives failures nor exempts from the lock (it may be anyone
  behind the balancer).  This bounds guessing through the balancer to ``max_failures``
  per account per ``window``/``block_time``; the price is that an attacker behind the
  balancer can lock an account for everyone behind it.  Per-client limits belong in
  the balancer (e.g. Kamailio's pike module).

Because failures are only counted for nonces issued to the same source address (see
:mod:`pbx.sip.auth`), a spoofed UDP source cannot get someone else's address blocked or
added to an account's lock.

Memory is bounded: every table (buckets, source failures, blocks, account failures,
locks, recent successes) is an LRU map capped at ``max_sources`` entries, and the
sources held by one lock at :data:`MAX_LOCKED_SOURCES`; overflow only forgets the
oldest entries (a forgotten source starts again like a new one).
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
    "MAX_LOCKED_SOURCES",
    "TRUSTED_SOURCE",
    "BruteForcePolicy",
    "GuardStats",
    "RateLimitPolicy",
    "SecurityPolicy",
    "SourceGuard",
    "Verdict",
    "source_key",
]

TRUSTED_SOURCE = "trusted"
"""The one source every trusted network counts as for account lock-outs."""
MAX_LOCKED_SOURCES = 4096
"""Sources one account lock remembers (the oldest are forgotten beyond this)."""
_MAX_ACCOUNT = 64  # characters of a claimed username kept as a table key

DialogLookup = Callable[[str, str, str], bool]
"""``exists(call_id, to_tag, from_tag)``: is there a dialog this request belongs to?"""


def source_key(host: str) -> str:
    """The source a host counts as: an IPv4 address as is, an IPv6 address as its /64
    (``2001:db8:0:1::/64``), an IPv4-mapped IPv6 address as the IPv4 address."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        try:  # already a key (an admin passing back what blocked_sources() listed)
            net = ipaddress.IPv6Network(host, strict=False)
        except ValueError:
            return host
        return str(net.supernet(new_prefix=64) if net.prefixlen > 64 else net)
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


def _account(account: str | None) -> str:
    return account[:_MAX_ACCOUNT] if account else ""


@dataclass(frozen=True, slots=True)
class BruteForcePolicy:
    """Mirror of ``pbx.config.BruteForceSettings``."""

    enabled: bool = True
    max_failures: int = 10
    window: float = 60.0
    block_time: float = 600.0
    action: str = "reject"  # "reject" (403) or "drop" (silence)
    success_memory: float = 3600.0  # a recent success exempts a source from account locks


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
                             float(bf.block_time), str(bf.action),
                             float(getattr(bf, "success_memory", 3600.0))),
            RateLimitPolicy(bool(rl.enabled), float(rl.requests_per_second), int(rl.burst)),
        )


class Verdict(enum.IntEnum):
    ALLOW = 0
    RATE_LIMITED = 1
    REJECT = 2  # blocked: answer 403 Forbidden
    DROP = 3    # blocked: send nothing


@dataclass(slots=True)
class GuardStats:
    """Counters for metrics (monotonic except the ``currently_*`` gauges)."""

    rate_limited: int = 0
    blocked_requests: int = 0
    auth_failures: int = 0
    blocks_started: int = 0
    currently_blocked: int = 0
    account_lockouts: int = 0     # account locks started
    locked_attempts: int = 0      # authentications refused unchecked by an account lock
    currently_locked_accounts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class _Lock:
    """One account lock: when it ends and which sources it applies to."""

    __slots__ = ("sources", "until")

    def __init__(self, until: float, sources: Iterable[str]) -> None:
        self.until = until
        self.sources: OrderedDict[str, None] = OrderedDict.fromkeys(sources)

    def add(self, key: str) -> None:
        sources = self.sources
        if key in sources:
            sources.move_to_end(key)
            return
        if len(sources) >= MAX_LOCKED_SOURCES:
            sources.popitem(last=False)
        sources[key] = None


def _lru_put(table: OrderedDict[Any, Any], key: Any, value: Any, cap: int) -> None:
    if key in table:
        table.move_to_end(key)
    elif len(table) >= cap:
        table.popitem(last=False)
    table[key] = value


class SourceGuard:
    """Rate limiting, failed-authentication blocking and account lock-out.

    ``now`` is a monotonic clock in seconds (injectable for tests).  ``dialog_exists``
    (settable later: the B2BUA installs its dialog table's) lets the transport exempt
    requests of established dialogs from the rate limit; without it no request is
    exempt for carrying a To tag (RFC 3261 §12.2.2: only a known dialog makes a request
    in-dialog).
    """

    def __init__(self, policy: SecurityPolicy | None = None, *,
                 now: Callable[[], float] = time.monotonic,
                 max_sources: int = 100_000,
                 dialog_exists: DialogLookup | None = None) -> None:
        policy = policy or SecurityPolicy()
        self.policy = policy
        self.now = now
        self.max_sources = max_sources
        self.dialog_exists = dialog_exists
        self._networks = [ipaddress.ip_network(n, strict=False)
                          for n in policy.trusted_networks]
        self._trusted_cache: dict[str, bool] = {}
        self._key_cache: dict[str, str] = {}
        rl = policy.rate_limit
        self._rate_enabled = rl.enabled
        self._rate = rl.requests_per_second
        self._burst = float(rl.burst)
        bf = policy.brute_force
        self._bf_enabled = bf.enabled
        self._max_failures = bf.max_failures
        self._window = bf.window
        self._blocked_verdict = Verdict.DROP if bf.action == "drop" else Verdict.REJECT
        # source -> [tokens, last refill time]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # source -> recent failures (time, account), at most max_failures of them
        self._failures: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        # source -> block end (monotonic seconds)
        self._blocked: OrderedDict[str, float] = OrderedDict()
        # account -> recent failures (time, source), at most max_failures of them
        self._account_failures: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        # account -> lock
        self._locks: OrderedDict[str, _Lock] = OrderedDict()
        # (source, account) -> time of the last successful authentication
        self._successes: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._stats = GuardStats()

    # -- identity -------------------------------------------------------------------------
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

    def source_of(self, host: str) -> str:
        """The key ``host`` is counted under (see :func:`source_key`)."""
        if ":" not in host:
            return host
        key = self._key_cache.get(host)
        if key is None:
            key = source_key(host)
            if len(self._key_cache) >= self.max_sources:
                self._key_cache.clear()
            self._key_cache[host] = key
        return key

    # -- per request ------------------------------------------------------------------------
    def check(self, host: str) -> Verdict:
        """Admission decision for one request from ``host`` outside a known dialog."""
        if self._networks and self.is_trusted(host):
            return Verdict.ALLOW
        now = self.now()
        key = host if ":" not in host else self.source_of(host)
        if self._blocked:
            until = self._blocked.get(key)
            if until is not None:
                if now < until:
                    self._stats.blocked_requests += 1
                    return self._blocked_verdict
                del self._blocked[key]
        if not self._rate_enabled:
            return Verdict.ALLOW
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            buckets[key] = [self._burst - 1.0, now]
            return Verdict.ALLOW
        buckets.move_to_end(key)
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
        key = self.source_of(host)
        until = self._blocked.get(key)
        if until is not None and now < until:
            return max(1, int(until - now + 0.999))
        bucket = self._buckets.get(key)
        if bucket is None or self._rate <= 0:
            return 1
        missing = 1.0 - (bucket[0] + (now - bucket[1]) * self._rate)
        return max(1, int(missing / self._rate + 0.999))

    # -- authentication outcomes ------------------------------------------------------------
    def _counted_key(self, host: str) -> str:
        if self._networks and self.is_trusted(host):
            return TRUSTED_SOURCE
        return self.source_of(host)

    def record_failure(self, host: str, account: str | None = None) -> bool:
        """Count a failed authentication of ``account`` from ``host``; ``True`` when
        this starts a block of the source."""
        key = self._counted_key(host)
        self._stats.auth_failures += 1
        if not self._bf_enabled:
            return False
        now = self.now()
        acct = _account(account)
        self._account_failure(acct, key, now)
        if key == TRUSTED_SOURCE:
            return False  # the balancer carries everyone: never block it
        failures = self._failures.get(key)
        if failures is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            failures = self._failures[key] = deque(maxlen=self._max_failures)
        else:
            self._failures.move_to_end(key)
        failures.append((now, acct))
        if len(failures) < self._max_failures or now - failures[0][0] > self._window:
            return False
        del self._failures[key]
        self._block(key, now + self.policy.brute_force.block_time)
        return True

    def _account_failure(self, acct: str, key: str, now: float) -> None:
        lock = self._locks.get(acct)
        if lock is not None:
            if now < lock.until:
                lock.add(key)  # failed while locked: the lock applies to it too
                return
            del self._locks[acct]
        table = self._account_failures
        failures = table.get(acct)
        if failures is None:
            if len(table) >= self.max_sources:
                table.popitem(last=False)
            failures = table[acct] = deque(maxlen=self._max_failures)
        else:
            table.move_to_end(acct)
        failures.append((now, key))
        if len(failures) < self._max_failures or now - failures[0][0] > self._window:
            return
        del table[acct]
        _lru_put(self._locks, acct, _Lock(now + self.policy.brute_force.block_time,
                                          (k for _, k in failures)), self.max_sources)
        self._stats.account_lockouts += 1

    def record_success(self, host: str, account: str | None = None) -> None:
        """``account`` authenticated from ``host``: forgive that source's failures for
        that account only, and exempt the source from the account's lock for
        ``success_memory`` seconds.  Through a trusted network nothing changes (the
        success may be anyone's behind the balancer)."""
        key = self._counted_key(host)
        if key == TRUSTED_SOURCE:
            return
        acct = _account(account)
        failures = self._failures.get(key)
        if failures:
            kept = [entry for entry in failures if entry[1] != acct]
            if not kept:
                del self._failures[key]
            elif len(kept) != len(failures):
                self._failures[key] = deque(kept, maxlen=self._max_failures)
        by_account = self._account_failures.get(acct)
        if by_account:
            kept = [entry for entry in by_account if entry[1] != key]
            if not kept:
                del self._account_failures[acct]
            elif len(kept) != len(by_account):
                self._account_failures[acct] = deque(kept, maxlen=self._max_failures)
        _lru_put(self._successes, (key, acct), self.now(), self.max_sources)

    def account_locked(self, host: str, account: str | None) -> bool:
        """Must this authentication of ``account`` from ``host`` be refused unchecked?

        ``True`` while the account is locked and the lock applies to the source (it
        failed for the account) and the source has not authenticated the account
        within ``success_memory`` seconds (trusted networks never have that exemption).
        """
        if not self._locks:
            return False
        acct = _account(account)
        lock = self._locks.get(acct)
        if lock is None:
            return False
        now = self.now()
        if now >= lock.until:
            del self._locks[acct]
            return False
        key = self._counted_key(host)
        if key not in lock.sources:
            return False
        if key != TRUSTED_SOURCE:
            last = self._successes.get((key, acct))
            if last is not None and now - last <= self.policy.brute_force.success_memory:
                return False
        self._stats.locked_attempts += 1
        return True

    # -- blocks and locks --------------------------------------------------------------------
    def _block(self, key: str, until: float) -> None:
        blocked = self._blocked
        blocked.pop(key, None)
        if len(blocked) >= self.max_sources:
            blocked.popitem(last=False)
        blocked[key] = until
        self._stats.blocks_started += 1

    def block(self, host: str, seconds: float | None = None) -> None:
        """Block ``host``'s source now (admin action); default length is block_time."""
        length = self.policy.brute_force.block_time if seconds is None else seconds
        self._block(self.source_of(host), self.now() + length)

    def unblock(self, host: str) -> bool:
        """Lift a block (admin action); ``True`` if ``host``'s source was blocked."""
        key = self.source_of(host)
        self._failures.pop(key, None)
        return self._blocked.pop(key, None) is not None

    def unlock_account(self, account: str) -> bool:
        """Lift an account lock (admin action); ``True`` if the account was locked."""
        acct = _account(account)
        self._account_failures.pop(acct, None)
        return self._locks.pop(acct, None) is not None

    def is_blocked(self, host: str) -> bool:
        until = self._blocked.get(self.source_of(host))
        return until is not None and self.now() < until

    def blocked_sources(self) -> dict[str, float]:
        """Currently blocked sources and the seconds left on each block."""
        self._expire()
        now = self.now()
        return {key: until - now for key, until in self._blocked.items()}

    def locked_accounts(self) -> dict[str, float]:
        """Currently locked accounts and the seconds left on each lock."""
        self._expire()
        now = self.now()
        return {acct: lock.until - now for acct, lock in self._locks.items()}

    def _expire(self) -> None:
        now = self.now()
        blocked = self._blocked
        for key in [k for k, until in blocked.items() if until <= now]:
            del blocked[key]
        locks = self._locks
        for acct in [a for a, lock in locks.items() if lock.until <= now]:
            del locks[acct]

    def forget(self, hosts: Iterable[str] | None = None) -> None:
        """Drop all state (``hosts`` None) or the per-source state of some hosts."""
        if hosts is None:
            for table in (self._buckets, self._failures, self._blocked,
                          self._account_failures, self._locks, self._successes):
                table.clear()
            return
        for host in hosts:
            key = self.source_of(host)
            self._buckets.pop(key, None)
            self._failures.pop(key, None)
            self._blocked.pop(key, None)

    # -- metrics -----------------------------------------------------------------------------
    @property
    def stats(self) -> GuardStats:
        """Counters; the ``currently_*`` gauges are recomputed on each read."""
        self._expire()
        self._stats.currently_blocked = len(self._blocked)
        self._stats.currently_locked_accounts = len(self._locks)
        return self._stats

    @property
    def tracked_sources(self) -> int:
        """Entries held in the bucket table (bounded by ``max_sources``)."""
        return len(self._buckets)
