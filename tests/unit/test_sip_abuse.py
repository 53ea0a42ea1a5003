"""SourceGuard: per-source token bucket, brute-force blocking, trust, bounded memory."""

from __future__ import annotations

import pytest

from pbx.config.security import SecuritySettings
from pbx.sip.abuse import (
    BruteForcePolicy,
    RateLimitPolicy,
    SecurityPolicy,
    SourceGuard,
    Verdict,
)

ATTACKER = "203.0.113.9"
PHONE = "192.0.2.20"


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def guard(now: Now, *, rate: float = 10.0, burst: int = 5, max_failures: int = 3,
          window: float = 60.0, block_time: float = 600.0, action: str = "reject",
          trusted: tuple[str, ...] = (), **kw: int) -> SourceGuard:
    policy = SecurityPolicy(trusted, BruteForcePolicy(True, max_failures, window, block_time,
                                                      action), RateLimitPolicy(True, rate, burst))
    return SourceGuard(policy, now=now, **kw)


def test_burst_is_allowed_then_rate_limited() -> None:
    now = Now()
    g = guard(now)
    assert [g.check(PHONE) for _ in range(5)] == [Verdict.ALLOW] * 5
    assert g.check(PHONE) is Verdict.RATE_LIMITED
    assert g.stats.rate_limited == 1


def test_tokens_refill_at_the_sustained_rate() -> None:
    now = Now()
    g = guard(now, rate=10.0, burst=5)
    for _ in range(5):
        g.check(PHONE)
    assert g.check(PHONE) is Verdict.RATE_LIMITED
    now.t += 0.1  # one token
    assert g.check(PHONE) is Verdict.ALLOW
    assert g.check(PHONE) is Verdict.RATE_LIMITED
    now.t += 100  # refills to burst, not beyond
    assert [g.check(PHONE) for _ in range(6)].count(Verdict.ALLOW) == 5


def test_sources_have_separate_buckets() -> None:
    now = Now()
    g = guard(now, burst=1)
    assert g.check(ATTACKER) is Verdict.ALLOW
    assert g.check(ATTACKER) is Verdict.RATE_LIMITED
    assert g.check(PHONE) is Verdict.ALLOW


def test_retry_after_says_when_a_token_is_back() -> None:
    now = Now()
    g = guard(now, rate=0.5, burst=1)
    g.check(PHONE)
    assert g.check(PHONE) is Verdict.RATE_LIMITED
    assert g.retry_after(PHONE) == 2


def test_failures_within_the_window_block_the_source() -> None:
    now = Now()
    g = guard(now, max_failures=3)
    assert g.record_failure(ATTACKER) is False
    assert g.record_failure(ATTACKER) is False
    assert g.record_failure(ATTACKER) is True
    assert g.check(ATTACKER) is Verdict.REJECT
    assert g.check(PHONE) is Verdict.ALLOW
    stats = g.stats
    assert (stats.auth_failures, stats.blocks_started, stats.currently_blocked,
            stats.blocked_requests) == (3, 1, 1, 1)


def test_failures_spread_over_more_than_the_window_do_not_block() -> None:
    now = Now()
    g = guard(now, max_failures=3, window=60)
    for _ in range(10):
        assert g.record_failure(ATTACKER) is False
        now.t += 31
    assert g.check(ATTACKER) is Verdict.ALLOW


def test_drop_action() -> None:
    now = Now()
    g = guard(now, max_failures=1, action="drop")
    g.record_failure(ATTACKER)
    assert g.check(ATTACKER) is Verdict.DROP


def test_block_ends_after_block_time() -> None:
    now = Now()
    g = guard(now, max_failures=1, block_time=600)
    g.record_failure(ATTACKER)
    now.t += 599
    assert g.check(ATTACKER) is Verdict.REJECT
    assert g.retry_after(ATTACKER) == 1
    now.t += 1
    assert g.check(ATTACKER) is Verdict.ALLOW
    assert g.stats.currently_blocked == 0


def test_success_forgives_earlier_failures_of_the_same_account() -> None:
    now = Now()
    g = guard(now, max_failures=3)
    g.record_failure(PHONE, "1001")
    g.record_failure(PHONE, "1001")
    g.record_success(PHONE, "1001")
    assert g.record_failure(PHONE, "1001") is False
    assert g.check(PHONE) is Verdict.ALLOW


def test_trusted_networks_are_exempt_from_limits_and_blocks() -> None:
    """Exempt from rate limits and source blocks; their failures still count (for
    account lock-outs, see test_sip_bruteforce.py)."""
    now = Now()
    g = guard(now, burst=1, max_failures=1, trusted=("10.0.0.0/8", "2001:db8::/32"))
    for host in ("10.1.2.3", "2001:db8::5"):
        assert all(g.check(host) is Verdict.ALLOW for _ in range(50))
        assert g.record_failure(host, "1001") is False
        assert g.check(host) is Verdict.ALLOW
    assert g.stats.auth_failures == 2 and g.stats.blocks_started == 0
    assert g.check("11.0.0.1") is Verdict.ALLOW
    assert g.check("11.0.0.1") is Verdict.RATE_LIMITED


def test_admin_block_and_unblock() -> None:
    now = Now()
    g = guard(now)
    g.block(ATTACKER, 30)
    assert g.is_blocked(ATTACKER)
    assert g.blocked_sources() == {ATTACKER: pytest.approx(30)}
    assert g.unblock(ATTACKER) is True
    assert g.check(ATTACKER) is Verdict.ALLOW


def test_disabled_features_allow_everything() -> None:
    now = Now()
    policy = SecurityPolicy((), BruteForcePolicy(enabled=False, max_failures=1),
                            RateLimitPolicy(enabled=False, burst=1))
    g = SourceGuard(policy, now=now)
    assert g.record_failure(ATTACKER) is False
    assert all(g.check(ATTACKER) is Verdict.ALLOW for _ in range(100))
    assert g.stats.auth_failures == 1  # still counted for metrics


def test_memory_is_bounded_under_a_spoofed_source_flood() -> None:
    now = Now()
    g = guard(now, burst=1, max_failures=2, max_sources=100)
    for i in range(10_000):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        g.check(host)
        g.record_failure(host)
    assert g.tracked_sources <= 100
    assert len(g._failures) <= 100 and len(g._blocked) <= 100
    # a recently seen source keeps its state
    assert g.check("10.0.39.15") is Verdict.RATE_LIMITED


def test_policy_from_config_settings() -> None:
    settings = SecuritySettings.model_validate({
        "trusted_networks": ["127.0.0.0/8"],
        "brute_force": {"max_failures": 4, "window": 30, "block_time": 90, "action": "drop"},
        "rate_limit": {"requests_per_second": 7, "burst": 9},
    })
    policy = SecurityPolicy.from_settings(settings)
    assert policy == SecurityPolicy(("127.0.0.0/8",), BruteForcePolicy(True, 4, 30.0, 90.0,
                                                                       "drop"),
                                    RateLimitPolicy(True, 7.0, 9))
