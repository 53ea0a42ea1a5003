"""Per-stream QoS: loss from sequence numbers (with wrap), RFC 3550 jitter, MOS."""

from __future__ import annotations

import struct

import pytest

from pbx.media import StreamQoS, estimate_mos


def rtp(seq: int, ts: int, pt: int = 0, ssrc: int = 0x1234, payload: bytes = b"\0" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def feed(qos: StreamQoS, seqs: list[int], start_ts: int = 0) -> None:
    for i, seq in enumerate(seqs):
        qos.update(rtp(seq, start_ts + seq * 160), i * 0.02)


def test_clean_stream_has_no_loss_and_no_jitter() -> None:
    qos = StreamQoS()
    feed(qos, list(range(500)))
    snap = qos.snapshot()
    assert (snap["received"], snap["lost"], snap["loss_pct"], snap["jitter_ms"]) == (500, 0, 0, 0)
    assert snap["mos"] == estimate_mos(0.0, 0.0) > 4.3


def test_gaps_count_as_loss() -> None:
    qos = StreamQoS()
    feed(qos, [s for s in range(100) if s % 10 != 3])  # 10 of 100 missing
    assert qos.lost == 10
    assert qos.loss_pct == pytest.approx(10.0)


def test_sequence_wrap_extends_the_counter_instead_of_losing_65536() -> None:
    qos = StreamQoS()
    feed(qos, [(65500 + i) & 0xFFFF for i in range(100)])
    assert (qos.received, qos.lost, qos.cycles) == (100, 0, 65536)
    feed(qos, [(65500 + i) & 0xFFFF for i in range(101, 200)])  # one lost after the wrap
    assert qos.lost == 1


def test_reordered_and_duplicate_packets_do_not_count_as_loss() -> None:
    qos = StreamQoS()
    feed(qos, [0, 1, 3, 2, 4, 4, 5])
    assert qos.lost == 0
    assert qos.max_seq == 5


def test_new_ssrc_and_big_jump_start_new_epochs_keeping_earlier_loss() -> None:
    qos = StreamQoS()
    feed(qos, [0, 1, 3])  # one lost
    for i, seq in enumerate([9000, 9001, 9002]):
        qos.update(rtp(seq, seq * 160, ssrc=0x99), 1 + i * 0.02)
    assert qos.lost == 1 and qos.restarts == 1
    for i, seq in enumerate([40000, 40002]):  # same SSRC, a jump: restart, then 1 lost
        qos.update(rtp(seq, seq * 160, ssrc=0x99), 2 + i * 0.02)
    assert qos.restarts == 2 and qos.lost == 2


def test_jitter_follows_the_rfc3550_estimator() -> None:
    qos = StreamQoS()
    # Timestamps every 20 ms, arrivals alternating 0 and 10 ms late: |D| = 80 units each.
    expected = 0.0
    for i in range(200):
        qos.update(rtp(i, i * 160), i * 0.02 + (0.01 if i % 2 else 0.0))
        if i:
            expected += (80 - expected) / 16
    assert qos.jitter == pytest.approx(expected)
    assert qos.jitter_ms == pytest.approx(expected / 8)  # 8 units per ms at 8 kHz


def test_jitter_survives_a_timestamp_wrap() -> None:
    qos = StreamQoS()
    for i in range(100):
        qos.update(rtp(i, 0xFFFFFFFF - 5000 + i * 160), i * 0.02)
    assert qos.jitter == pytest.approx(0.0, abs=1e-6)


def test_telephone_events_are_excluded_from_jitter_but_not_from_loss() -> None:
    qos = StreamQoS(event_pt=101)
    for i in range(50):  # a held digit: same timestamp, 20 ms apart
        qos.update(rtp(i, 1000, pt=101, payload=b"\x05\x0a\x00\xa0"), i * 0.02)
    assert qos.jitter == 0.0 and qos.received == 50 and qos.lost == 0
    plain = StreamQoS()
    for i in range(50):
        plain.update(rtp(i, 1000, pt=101), i * 0.02)
    assert plain.jitter > 0


def test_invalid_and_rtcp_mux_packets_are_not_media() -> None:
    qos = StreamQoS()
    qos.update(b"\x80\x00\x00", 0.0)                 # too short
    qos.update(rtp(1, 1)[:0] + b"\x40" + rtp(1, 1)[1:], 0.0)  # RTP version 1
    qos.update(struct.pack("!BBH", 0x81, 200, 6) + b"\0" * 24, 0.0)  # RTCP SR
    assert (qos.invalid, qos.received) == (2, 0)
    assert qos.snapshot()["mos"] is None


def test_mos_degrades_with_loss_and_jitter() -> None:
    clean = estimate_mos(0.0, 0.0)
    assert 4.3 < clean <= 4.5
    assert estimate_mos(1.0, 0.0) < clean
    assert estimate_mos(5.0, 0.0) < estimate_mos(1.0, 0.0)
    assert estimate_mos(0.0, 100.0) < estimate_mos(0.0, 10.0) < clean
    assert estimate_mos(50.0, 0.0) == 1.0
