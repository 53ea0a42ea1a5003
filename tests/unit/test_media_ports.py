"""RTP port allocator: even/odd pairs, exhaustion, release exactly once, late reuse.

Randomness of the order is tested in test_media_learning_ports.py."""

from __future__ import annotations

import pytest

from pbx.media import PortAllocator, PortError, PortsExhausted


def test_hands_out_even_ports_whose_rtcp_pair_fits_the_range() -> None:
    alloc = PortAllocator(10001, 10010)  # odd start rounds up; 10010 cannot be RTP
    assert alloc.capacity == 4
    ports = [alloc.allocate() for _ in range(4)]
    assert sorted(ports) == [10002, 10004, 10006, 10008]  # random order
    assert all(p % 2 == 0 and p + 1 <= 10010 for p in ports)
    assert (alloc.in_use, alloc.allocated_total, alloc.calls_capacity()) == (4, 4, 2)


def test_exhaustion_raises_and_release_makes_room() -> None:
    alloc = PortAllocator(20000, 20003)
    first, second = alloc.allocate(), alloc.allocate()
    with pytest.raises(PortsExhausted):
        alloc.allocate()
    alloc.release(first)
    assert alloc.allocate() == first
    assert alloc.is_allocated(second)


def test_double_release_raises_and_is_counted() -> None:
    alloc = PortAllocator(20000, 20010)
    port = alloc.allocate()
    alloc.release(port)
    with pytest.raises(PortError):
        alloc.release(port)
    with pytest.raises(PortError):
        alloc.release(20004)  # never allocated
    assert (alloc.released_total, alloc.release_errors, alloc.in_use) == (1, 2, 0)


def test_released_ports_are_reused_last() -> None:
    alloc = PortAllocator(20000, 20007)  # 20000, 20002, 20004, 20006
    port = alloc.allocate()
    alloc.release(port)
    again = [alloc.allocate() for _ in range(4)]  # quarantined: handed out last
    assert again[-1] == port and sorted(again) == [20000, 20002, 20004, 20006]


@pytest.mark.parametrize(("lo", "hi"), [(20000, 20000), (20001, 20002), (0, 10), (65534, 70000)])
def test_ranges_without_a_pair_are_refused(lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        PortAllocator(lo, hi)
