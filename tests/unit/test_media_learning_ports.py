"""Random RTP port pairs (issue 11.1): unpredictable, still even/odd, bounded, reusable."""

from __future__ import annotations

import random

import pytest

from pbx.media import PortAllocator, PortsExhausted


def test_the_first_call_is_not_at_port_min() -> None:
    firsts = {PortAllocator(10000, 20000).allocate() for _ in range(20)}
    assert 10000 not in firsts or len(firsts) > 1
    assert len(firsts) > 10  # 20 fresh allocators rarely agree (5,000 pairs)


def test_pairs_are_even_rtp_and_odd_rtcp_inside_the_range() -> None:
    alloc = PortAllocator(10001, 10999, rng=random.Random(7))
    ports = [alloc.allocate() for _ in range(alloc.capacity)]
    assert len(set(ports)) == alloc.capacity == 499
    assert all(p % 2 == 0 and p >= 10001 and p + 1 <= 10999 for p in ports)
    assert ports != sorted(ports)


def test_exhaustion_then_release_makes_room_and_nothing_is_lost() -> None:
    alloc = PortAllocator(20000, 20019, rng=random.Random(3))  # 10 pairs
    ports = [alloc.allocate() for _ in range(10)]
    with pytest.raises(PortsExhausted):
        alloc.allocate()
    for port in ports[:4]:
        alloc.release(port)
    again = {alloc.allocate() for _ in range(4)}
    assert again == set(ports[:4]) and alloc.available == 0 and alloc.in_use == 10


def test_a_released_pair_waits_in_quarantine() -> None:
    alloc = PortAllocator(20000, 20399, rng=random.Random(1))  # 200 pairs, quarantine 50
    port = alloc.allocate()
    alloc.release(port)
    following = [alloc.allocate() for _ in range(150)]
    assert port not in following  # 199 others come first while it is quarantined


def test_the_pool_stays_consistent_under_churn() -> None:
    rng = random.Random(11)
    alloc = PortAllocator(30000, 30199, rng=random.Random(5))
    held: list[int] = []
    for _ in range(5000):
        if held and (rng.random() < 0.5 or alloc.available == 0):
            alloc.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(alloc.allocate())
        assert alloc.in_use + alloc.available == alloc.capacity
    assert len(set(held)) == len(held)
