"""Per-stream quality: loss from RTP sequence numbers, RFC 3550 jitter, an E-model MOS.

Cost model — this runs once per relayed RTP packet, so it only reads the header fields
it needs with one precompiled ``struct.unpack_from`` (≈90 ns, cheaper than indexing the
bytes one by one) and does integer/float arithmetic on slotted attributes.
Measured by ``scripts/bench_rtp.py --micro``: ≈0.35 µs per packet on this machine
(the whole relay hot path without syscalls ≈0.65 µs), against ≈8 µs for Twisted's
receive + send of the same packet — so QoS is computed on every packet, not sampled.
Everything derived (loss %, jitter in ms, MOS) is computed only when a snapshot is asked.

Loss follows RFC 3550 appendix A.1: ``expected = extended highest seq - base seq + 1``,
``lost = expected - received`` (duplicates can make it negative; it is clamped at 0).
Sequence wrap extends the highest sequence number by 65,536; a new SSRC or a jump of
more than ``MAX_DROPOUT`` starts a new epoch whose counts add to the old ones.

Jitter is the §6.4.1 estimator ``J += (|D(i-1, i)| - J) / 16`` in timestamp units
(D as the difference of relative transit times ``arrival * rate - timestamp``, one float
kept per stream; a 32-bit timestamp wrap between two packets is folded back),
reported in ms through the payload's clock rate (8,000 Hz for G.711 and, per RFC 3551,
for G.722).  RFC 4733 telephone-event packets repeat one timestamp for a whole digit, so
their payload type is excluded from jitter (they still count for loss).
"""

from __future__ import annotations

from struct import Struct
from struct import error as struct_error
from typing import Any

__all__ = ["MAX_DROPOUT", "MAX_MISORDER", "StreamQoS", "estimate_mos"]

MAX_DROPOUT = 3000
MAX_MISORDER = 100
_unpack_header = Struct("!BBHII").unpack_from


def estimate_mos(loss_pct: float, jitter_ms: float, latency_ms: float = 0.0) -> float:
    """A simplified ITU-T G.107 E-model for G.711: R from delay and loss, then MOS.

    Effective latency counts jitter twice (a jitter buffer of that depth) plus 10 ms of
    codec delay; each percent of loss costs 2.5 R.  No network latency is known to a
    relay without parsing RTCP, so callers pass 0 unless they know better.  Gives 4.41
    for a clean stream and 1.0 for an unusable one.
    """
    effective = latency_ms + 2.0 * jitter_ms + 10.0
    # G.107's delay impairment, linearised: gentle up to 160 ms, steep beyond.
    r = 93.2 - effective / 40.0 if effective < 160.0 else 93.2 - (effective - 120.0) / 10.0
    r -= 2.5 * loss_pct
    if r <= 0.0:
        return 1.0
    r = min(r, 100.0)
    return round(1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r), 2)


class StreamQoS:
    """Loss and jitter of one RTP direction, fed by :meth:`update` for every packet."""

    __slots__ = (
        "base_seq",
        "clock_rate",
        "cycles",
        "epoch_start",
        "event_pt",
        "invalid",
        "jitter",
        "lost_prior",
        "max_seq",
        "received",
        "restarts",
        "ssrc",
        "transit",
    )

    def __init__(self, clock_rate: int = 8000, event_pt: int = -1) -> None:
        self.clock_rate = clock_rate
        self.event_pt = event_pt
        self.ssrc = -1
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self.epoch_start = 0
        self.received = 0
        self.lost_prior = 0
        self.restarts = 0
        self.invalid = 0
        self.jitter = 0.0
        self.transit: float | None = None

    def update(self, data: bytes, arrival: float) -> None:
        """Account one packet that arrived at ``arrival`` seconds (any monotonic clock)."""
        try:
            first, second, seq, ts, ssrc = _unpack_header(data)
        except struct_error:
            self.invalid += 1
            return
        if first & 0xC0 != 0x80:
            self.invalid += 1
            return
        pt = second & 0x7F
        if 72 <= pt <= 76:
            return  # RTCP multiplexed on the RTP port (RFC 5761): not a media packet
        if ssrc != self.ssrc:
            self._new_epoch(ssrc, seq)
        else:
            delta = (seq - self.max_seq) & 0xFFFF
            if 0 < delta < MAX_DROPOUT:
                if seq < self.max_seq:
                    self.cycles += 65536
                self.max_seq = seq
            elif delta != 0 and delta <= 0xFFFF - MAX_MISORDER:
                self._new_epoch(ssrc, seq)  # a jump: the sender restarted
            # else: duplicate or a late (reordered) packet, counted as received
        self.received += 1
        if pt != self.event_pt:
            # Relative transit time in timestamp units; D = difference of two of them.
            transit = arrival * self.clock_rate - ts
            previous = self.transit
            self.transit = transit
            if previous is not None:
                d = transit - previous
                if d < 0:
                    d = -d
                if d > 2147483648.0:  # the 32-bit timestamp wrapped between the two
                    d = abs(d - 4294967296.0)
                self.jitter += (d - self.jitter) * 0.0625

    def _new_epoch(self, ssrc: int, seq: int) -> None:
        if self.ssrc >= 0:
            self.lost_prior += self._epoch_lost()
            self.restarts += 1
        self.ssrc = ssrc
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.epoch_start = self.received
        self.transit = None  # timestamps of another source are not comparable

    def _epoch_lost(self) -> int:
        if self.ssrc < 0:
            return 0
        expected = self.cycles + self.max_seq - self.base_seq + 1
        return max(0, expected - (self.received - self.epoch_start))

    @property
    def expected(self) -> int:
        return self.received + self.lost

    @property
    def lost(self) -> int:
        return self.lost_prior + self._epoch_lost()

    @property
    def loss_pct(self) -> float:
        expected = self.expected
        return 100.0 * self.lost / expected if expected else 0.0

    @property
    def jitter_ms(self) -> float:
        return 1000.0 * self.jitter / self.clock_rate if self.clock_rate else 0.0

    def snapshot(self, latency_ms: float = 0.0) -> dict[str, Any]:
        """JSON-able figures (loss, jitter, MOS) for stats, metrics and the CDR."""
        loss = self.loss_pct
        jitter = self.jitter_ms
        return {
            "received": self.received,
            "lost": self.lost,
            "loss_pct": round(loss, 3),
            "jitter_ms": round(jitter, 3),
            "mos": estimate_mos(loss, jitter, latency_ms) if self.received else None,
            "invalid": self.invalid,
        }
