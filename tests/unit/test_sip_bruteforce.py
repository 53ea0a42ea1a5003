"""Brute force cannot be laundered: per-source and per-account failure counting.

The rules (pbx.sip.abuse): failures count per source (IPv4 address, IPv6 /64) and per
account; a success forgives only its own account's failures from its own source; an
account with too many failures is locked for the sources that failed, never for a
source that authenticated it recently; behind trusted networks the account lock still
applies (to everyone behind them).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbx.sip import abuse
from pbx.sip.abuse import (
    TRUSTED_SOURCE,
    BruteForcePolicy,
    RateLimitPolicy,
    SecurityPolicy,
    SourceGuard,
    Verdict,
    source_key,
)

from .test_sip_registrar import PHONE, Peer, Setup, register

ATTACKER = "203.0.113.9"
OTHER = "198.51.100.4"
LB = "10.0.0.5"


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(now: Now, *, max_failures: int = 3, window: float = 60.0,
         block_time: float = 600.0, success_memory: float = 3600.0,
         trusted: tuple[str, ...] = (), **kw: int) -> SourceGuard:
    policy = SecurityPolicy(trusted, BruteForcePolicy(True, max_failures, window, block_time,
                                                      "reject", success_memory),
                            RateLimitPolicy(enabled=False))
    return SourceGuard(policy, now=now, **kw)


def attempt(g: SourceGuard, host: str, account: str, correct: bool) -> str:
    """What the registrar does with one authenticated attempt."""
    if g.check(host) is not Verdict.ALLOW:
        return "refused"
    if g.account_locked(host, account):
        return "locked"
    if correct:
        g.record_success(host, account)
        return "ok"
    g.record_failure(host, account)
    return "failed"


# -- sources ------------------------------------------------------------------------------


def test_source_keys_ipv4_per_address_ipv6_per_64() -> None:
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2::/64") == "2001:db8:1:2::/64"
    assert source_key("not-an-address") == "not-an-address"


def test_an_ipv6_64_is_one_source() -> None:
    now = Now()
    g = make(now, max_failures=3)
    for i in range(3):
        g.record_failure(f"2001:db8:5:6::{i + 1}", f"10{i}")
    assert g.check("2001:db8:5:6::abcd") is Verdict.REJECT
    assert g.check("2001:db8:5:7::1") is Verdict.ALLOW
    assert g.blocked_sources() == {"2001:db8:5:6::/64": pytest.approx(600)}
    assert g.unblock("2001:db8:5:6::42") is True
    assert g.check("2001:db8:5:6::1") is Verdict.ALLOW


# -- laundering ----------------------------------------------------------------------------


def test_own_account_successes_do_not_launder_guesses() -> None:
    """The measured attack: guesses at 1002 interleaved with logins to one's own 1001."""
    now = Now()
    g = make(now, max_failures=3)
    for _ in range(2):
        assert attempt(g, ATTACKER, "1002", correct=False) == "failed"
        assert attempt(g, ATTACKER, "1001", correct=True) == "ok"
    assert attempt(g, ATTACKER, "1002", correct=False) == "failed"
    assert g.check(ATTACKER) is Verdict.REJECT


def test_guesses_spread_over_accounts_block_the_source() -> None:
    now = Now()
    g = make(now, max_failures=3)
    for account in ("1002", "1003", "1004"):
        g.record_failure(ATTACKER, account)
    assert g.check(ATTACKER) is Verdict.REJECT


def test_success_forgives_only_its_own_account() -> None:
    now = Now()
    g = make(now, max_failures=3)
    g.record_failure(OTHER, "1001")  # a typo on one's own account ...
    g.record_failure(OTHER, "1002")
    g.record_success(OTHER, "1001")  # ... forgiven by the right password
    assert g.record_failure(OTHER, "1002") is False  # 2 failures for 1002 left
    assert g.record_failure(OTHER, "1003") is True


# -- account lock-out ------------------------------------------------------------------------


def test_distributed_guessing_locks_the_account_for_the_sources_that_failed() -> None:
    now = Now()
    g = make(now, max_failures=3)
    bots = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    for bot in bots:  # one guess each: no source reaches the per-source threshold
        assert attempt(g, bot, "1002", correct=False) == "failed"
    assert g.stats.account_lockouts == 1 and g.stats.blocks_started == 0
    assert all(attempt(g, bot, "1002", correct=True) == "locked" for bot in bots)
    assert attempt(g, bots[0], "1003", correct=False) == "failed"  # other accounts: open
    newcomer = "198.18.0.4"  # its first guess is checked; after a failure it is locked too
    assert attempt(g, newcomer, "1002", correct=False) == "failed"
    assert attempt(g, newcomer, "1002", correct=True) == "locked"
    assert g.stats.locked_attempts == 4
    now.t += 600
    assert attempt(g, bots[1], "1002", correct=True) == "ok"
    assert g.stats.currently_locked_accounts == 0


def test_a_lock_never_applies_to_the_phone_that_owns_the_account() -> None:
    now = Now()
    g = make(now, max_failures=3)
    assert attempt(g, OTHER, "1002", correct=True) == "ok"  # the phone registered
    now.t += 100
    for bot in ("198.18.0.1", "198.18.0.2", "198.18.0.3"):
        attempt(g, bot, "1002", correct=False)
    assert g.locked_accounts() == {"1002": pytest.approx(600)}
    assert attempt(g, OTHER, "1002", correct=True) == "ok"
    # even after a typo of its own while locked, a recent success keeps it exempt
    assert attempt(g, OTHER, "1002", correct=False) == "failed"
    assert attempt(g, OTHER, "1002", correct=True) == "ok"
    # a phone that never failed is not in the lock either
    assert attempt(g, "192.0.2.77", "1002", correct=True) == "ok"


def test_the_success_exemption_expires() -> None:
    now = Now()
    g = make(now, max_failures=2, success_memory=100)
    g.record_success(OTHER, "1002")
    now.t += 101
    g.record_failure(OTHER, "1002")
    g.record_failure(ATTACKER, "1002")
    assert g.account_locked(OTHER, "1002")


def test_admin_can_unlock_an_account() -> None:
    now = Now()
    g = make(now, max_failures=1)
    g.record_failure(ATTACKER, "1002")
    assert g.account_locked(ATTACKER, "1002")
    assert g.unlock_account("1002") is True
    assert not g.account_locked(ATTACKER, "1002")
    assert g.unlock_account("1002") is False


# -- trusted networks ---------------------------------------------------------------------


def test_behind_a_trusted_balancer_the_account_is_locked_not_the_balancer() -> None:
    now = Now()
    g = make(now, max_failures=3, trusted=("10.0.0.0/24",))
    for _ in range(2):
        assert attempt(g, LB, "1002", correct=False) == "failed"
        assert attempt(g, LB, "1002", correct=True) == "ok"  # the phone, via the LB
    assert attempt(g, LB, "1002", correct=False) == "failed"
    # the successes through the LB forgave nothing: the account is locked behind it
    assert attempt(g, LB, "1002", correct=True) == "locked"
    assert attempt(g, "10.0.0.6", "1002", correct=True) == "locked"  # any trusted node
    assert attempt(g, LB, "1003", correct=True) == "ok"
    assert g.check(LB) is Verdict.ALLOW and not g.is_blocked(LB)
    assert g.stats.blocks_started == 0
    # a phone outside the trusted networks is not locked out by what came through them
    assert attempt(g, OTHER, "1002", correct=True) == "ok"
    now.t += 600
    assert attempt(g, LB, "1002", correct=True) == "ok"


def test_trusted_failures_form_one_source_for_the_account_lock() -> None:
    now = Now()
    g = make(now, max_failures=2, trusted=("10.0.0.0/24",))
    g.record_failure("10.0.0.1", "1002")
    g.record_failure("10.0.0.2", "1002")
    assert TRUSTED_SOURCE in g._locks["1002"].sources


# -- memory -------------------------------------------------------------------------------


def test_every_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abuse, "MAX_LOCKED_SOURCES", 50)
    now = Now()
    g = make(now, max_failures=2, max_sources=100)
    for i in range(5000):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        g.record_failure(host, "1002")
        g.record_failure(host, f"user{i}")
        g.record_success(host, f"own{i}")
        g.account_locked(host, "1002")
    for table in (g._failures, g._blocked, g._account_failures, g._locks, g._successes):
        assert len(table) <= 100
    assert len(g._locks["1002"].sources) <= 50
    long_name = "x" * 10_000
    g.record_failure(ATTACKER, long_name)
    assert all(len(k) <= 64 for k in g._account_failures)


def test_stats_include_account_counters() -> None:
    now = Now()
    g = make(now, max_failures=1)
    g.record_failure(ATTACKER, "1002")
    g.account_locked(ATTACKER, "1002")
    stats = g.stats.as_dict()
    assert stats["account_lockouts"] == 1
    assert stats["locked_attempts"] == 1
    assert stats["currently_locked_accounts"] == 1


# -- the registrar applies the lock -------------------------------------------------------


def test_registrar_answers_a_locked_account_with_an_unchecked_challenge() -> None:
    s = Setup(security=SecurityPolicy(brute_force=BruteForcePolicy(max_failures=3),
                                      rate_limit=RateLimitPolicy(enabled=False)))
    bots = [Peer("udp", f"198.18.0.{i}", 5060) for i in range(1, 4)]
    for i, bot in enumerate(bots):
        assert s.register(register(call_id=f"b{i}"), peer=bot,
                          password="wrong").status == 401
    assert s.guard.stats.account_lockouts == 1
    # the right password from a bot that failed: a plain 401, the response not checked
    answer = s.register(register(call_id="b9"), peer=bots[0])
    assert answer.status == 401 and "stale" not in str(answer.headers.get("WWW-Authenticate"))
    assert s.registrar.stats.locked_out == 1
    assert s.registrar.stats.auth_failures == 3  # unchecked attempts are not failures
    # the phone itself (never failed) registers
    assert s.register(register(call_id="p1"), peer=PHONE).status == 200


# -- the invariants, for random interleavings ----------------------------------------------


@dataclass(frozen=True)
class Op:
    dt: float
    actor: int      # 0..2: attacker sources; 3: the phone
    kind: str       # attackers: "guess" or "own"; the phone always logs in correctly
    target: int     # which account an attacker guesses


ATTACKERS = ["203.0.113.1", "203.0.113.2", "2001:db8:bad::1"]
PHONE_HOST = "192.0.2.50"
PHONE_ACCOUNT = "2001"
GUESSED = ["2001", "2002", "9999"]  # the phone's account, another one, an unknown one

ops = st.builds(Op, st.sampled_from([0.0, 0.5, 3.0, 15.0, 45.0, 200.0]),
                st.integers(0, 3), st.sampled_from(["guess", "guess", "own"]),
                st.integers(0, 2))


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=80), st.integers(2, 5), st.booleans())
def test_brute_force_rules_hold_for_any_interleaving(operations: list[Op], max_failures: int,
                                                     phone_first: bool) -> None:
    now = Now()
    window, block_time = 60.0, 300.0
    g = make(now, max_failures=max_failures, window=window, block_time=block_time)
    failed: dict[int, list[float]] = {i: [] for i in range(len(ATTACKERS))}
    block_until: dict[int, float] = {}
    if phone_first:
        assert attempt(g, PHONE_HOST, PHONE_ACCOUNT, True) == "ok"
    for op in operations:
        now.t += op.dt
        if op.actor == 3:
            # Invariant 2: the phone, right password, own address: never refused.
            assert attempt(g, PHONE_HOST, PHONE_ACCOUNT, True) == "ok"
            continue
        host = ATTACKERS[op.actor]
        own = f"10{op.actor}"  # the attacker's own extension
        if op.kind == "own":
            outcome = attempt(g, host, own, True)
        else:
            outcome = attempt(g, host, GUESSED[op.target], False)
        if outcome == "refused":
            assert now.t < block_until.get(op.actor, -1.0)
        if outcome == "failed":
            times = failed[op.actor]
            times.append(now.t)
            # Invariant 1: max_failures checked wrong guesses within the window block
            # the source, however many successes of its own account came between.
            recent = times[-max_failures:]
            if len(recent) == max_failures and recent[-1] - recent[0] <= window \
                    and recent[0] >= block_until.get(op.actor, -1.0):
                block_until[op.actor] = now.t + block_time
                times.clear()
        for actor, until in block_until.items():
            if now.t < until:
                assert g.check(ATTACKERS[actor]) is not Verdict.ALLOW
