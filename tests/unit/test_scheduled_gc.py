"""ScheduledGC's policy (young collections every tick, a full one on memory growth or
as a rare backstop), its pause recorder and the ``pbx_gc_*`` metrics.

Only which collections run is asserted, never how long they take: the pause figures
come from scripts/bench_memory.py and the metrics of a running PBX.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from pbx.ops.metrics import PBXCollector
from pbx.service import GCPauses, ScheduledGC, resident_bytes

MB = 1 << 20


class Memory:
    """A resident size the test sets."""

    def __init__(self) -> None:
        self.value = 100 * MB

    def __call__(self) -> int:
        return self.value


@pytest.fixture
def scheduled() -> Iterator[tuple[ScheduledGC, Clock, Memory]]:
    enabled = gc.isenabled()
    clock, memory = Clock(), Memory()
    sched = ScheduledGC(clock, full_interval=600.0, min_full_interval=60.0,
                        full_growth=64 * MB, memory=memory)
    sched.start()
    try:
        yield sched, clock, memory
    finally:
        sched.stop()
        assert gc.isenabled() == enabled
        assert sched.pauses not in gc.callbacks


def ticks(clock: Clock, seconds: int) -> None:
    for _ in range(seconds):
        clock.advance(1.0)


def test_young_collections_every_tick_and_no_full_one_while_memory_is_flat(
        scheduled: tuple[ScheduledGC, Clock, Memory]) -> None:
    sched, clock, memory = scheduled
    assert not gc.isenabled()
    ticks(clock, 300)
    memory.value += 10 * MB  # calls come and go: growth below the threshold
    ticks(clock, 200)
    assert sched.full_collections == 0
    assert sched.pauses.collections[1] >= 500
    assert sched.pauses.collections[2] == 0


def test_growth_brings_a_full_collection_forward_but_not_more_than_once_a_minute(
        scheduled: tuple[ScheduledGC, Clock, Memory]) -> None:
    sched, clock, memory = scheduled
    memory.value += 64 * MB
    ticks(clock, 59)
    assert sched.full_collections == 0  # not within min_full_interval of the start
    ticks(clock, 1)
    assert sched.full_collections == 1 and sched.pauses.collections[2] == 1
    ticks(clock, 120)  # the new size is the baseline: no growth since
    assert sched.full_collections == 1
    memory.value += 100 * MB  # something makes cycles fast
    ticks(clock, 1)
    assert sched.full_collections == 2  # the baseline moved with the collection
    memory.value += 100 * MB  # < half of the 264 MB baseline: a bigger heap, not garbage
    ticks(clock, 120)
    assert sched.full_collections == 2
    memory.value += 50 * MB  # now half of it
    ticks(clock, 1)
    assert sched.full_collections == 3
    memory.value += 250 * MB
    ticks(clock, 59)
    assert sched.full_collections == 3  # a minute apart at most
    ticks(clock, 1)
    assert sched.full_collections == 4


def test_the_backstop_runs_a_full_collection_every_full_interval(
        scheduled: tuple[ScheduledGC, Clock, Memory]) -> None:
    sched, clock, _memory = scheduled
    ticks(clock, 599)
    assert sched.full_collections == 0
    ticks(clock, 1)
    assert sched.full_collections == 1
    ticks(clock, 600)
    assert sched.full_collections == 2


def test_pauses_are_recorded_per_generation_and_exported() -> None:
    pauses = GCPauses()
    pauses.install()
    pauses.install()  # once only
    try:
        assert gc.callbacks.count(pauses) == 1
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert pauses not in gc.callbacks
    assert pauses.collections[0] == 1 and pauses.collections[2] == 1
    assert pauses.max_pause[2] > 0.0 and pauses.pause_total[2] >= pauses.max_pause[2]
    view = SimpleNamespace(service=SimpleNamespace(gc=SimpleNamespace(pauses=pauses)))
    families = {f.name: f for f in PBXCollector(view, None)._gc()}  # type: ignore[arg-type]
    largest = {s.labels["generation"]: s.value
               for s in families["pbx_gc_max_pause_seconds"].samples}
    assert largest == {"0": pauses.max_pause[0], "1": 0.0, "2": pauses.max_pause[2]}
    assert {"pbx_gc_collections", "pbx_gc_collected_objects", "pbx_gc_pause_seconds"} \
        <= set(families)
    # Without a managed GC the series are there, and zero.
    bare = {f.name: f for f in PBXCollector(SimpleNamespace(), None)._gc()}  # type: ignore[arg-type]
    assert [s.value for s in bare["pbx_gc_max_pause_seconds"].samples] == [0.0, 0.0, 0.0]


def test_resident_bytes_is_the_processes_size() -> None:
    assert 1 * MB < resident_bytes() < 64 * 1024 * MB


def test_growth_waits_for_a_quiet_moment_but_the_backstop_does_not() -> None:
    enabled = gc.isenabled()
    clock, memory = Clock(), Memory()
    busy = [True]
    sched = ScheduledGC(clock, full_interval=600.0, min_full_interval=60.0,
                        full_growth=64 * MB, memory=memory, quiet=lambda: not busy[0])
    sched.start()
    try:
        memory.value += 200 * MB  # a load peak: the live heap grows
        ticks(clock, 300)
        assert sched.full_collections == 0  # not in the middle of the peak
        busy[0] = False
        ticks(clock, 1)
        assert sched.full_collections == 1  # the peak is over: collect now, cheaply
        busy[0] = True
        memory.value += 400 * MB
        ticks(clock, 600)
        assert sched.full_collections == 2  # the hourly-style backstop runs regardless
    finally:
        sched.stop()
        assert gc.isenabled() == enabled
