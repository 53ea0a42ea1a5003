"""Call detail records: one durable row per call attempt.

Why two writes for an answered call: the row is inserted ``open`` when the call is
answered, so a crash mid-call leaves a row behind that the next start marks
``interrupted`` (:meth:`CDRWriter.recover`) instead of losing the call.  The final write
(``closed``, with end time, duration, disposition, cause, side and QoS) updates that row;
a call that was never answered is inserted once, ``closed``.  The update is chained after
the insert so the two can never be reordered, whatever the store's concurrency.

The store (``pbx.store``) implements :class:`CDRSink`; ``pbx.calls`` never imports it.
Store failures are logged and never reach the call: losing a CDR must not drop a call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed

__all__ = [
    "ANSWERED",
    "BUSY",
    "CANCELLED",
    "CONGESTION",
    "FAILED",
    "NO_ANSWER",
    "CDRSink",
    "CDRWriter",
    "CallRecord",
    "disposition_for_status",
]

log = logging.getLogger(__name__)

ANSWERED = "ANSWERED"
NO_ANSWER = "NO ANSWER"
BUSY = "BUSY"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
CONGESTION = "CONGESTION"


class CDRSink(Protocol):
    """Where CDRs go (``pbx.store.Store`` has exactly these methods)."""

    def add_cdr(self, record: Mapping[str, Any]) -> Deferred[int]: ...

    def update_cdr(self, call_id: str, fields: Mapping[str, Any]) -> Deferred[int]: ...

    def mark_open_cdrs_interrupted(self, node: str | None) -> Deferred[int]: ...


def disposition_for_status(status: int) -> str:
    """The disposition of a call that failed with a final ``status`` towards the caller."""
    if status in (486, 600, 603):
        return BUSY
    if status in (408, 480):
        return NO_ANSWER
    if status == 487:
        return CANCELLED
    if status == 503:
        return CONGESTION
    return FAILED


@dataclass(slots=True)
class CallRecord:
    """The CDR of one call attempt, filled in as the call progresses."""

    call_id: str
    caller: str
    callee: str
    start_time: float
    node: str | None = None
    answer_time: float | None = None
    end_time: float | None = None
    disposition: str = FAILED
    hangup_cause: str | None = None
    hangup_side: str | None = None   # caller | callee | pbx
    qos: Any = None
    state: str = "open"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Seconds from the INVITE to the end (0 while the call is up)."""
        return max(0.0, (self.end_time or self.start_time) - self.start_time)

    @property
    def billsec(self) -> float:
        """Seconds from the answer to the end: what is billed."""
        if self.answer_time is None or self.end_time is None:
            return 0.0
        return max(0.0, self.end_time - self.answer_time)

    def as_row(self) -> dict[str, Any]:
        """The store's column names (``pbx.store.CDR_COLUMNS`` without ``id``)."""
        return {
            "call_id": self.call_id, "caller": self.caller, "callee": self.callee,
            "start_time": self.start_time, "answer_time": self.answer_time,
            "end_time": self.end_time, "duration": round(self.duration, 3),
            "billsec": round(self.billsec, 3), "disposition": self.disposition,
            "hangup_cause": self.hangup_cause, "hangup_side": self.hangup_side,
            "qos": self.qos, "node": self.node, "state": self.state,
        }


class CDRWriter:
    """Writes :class:`CallRecord` s to a :class:`CDRSink` (open at answer, closed at end)."""

    def __init__(self, sink: CDRSink | None, *, node: str | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.node = node
        self.wall = wall
        self._opened: dict[str, Deferred[Any]] = {}
        self.written = 0
        self.failures = 0

    def new_record(self, call_id: str, caller: str, callee: str) -> CallRecord:
        return CallRecord(call_id, caller, callee, self.wall(), node=self.node)

    def answered(self, record: CallRecord) -> Deferred[Any]:
        """Insert the ``open`` row (the crash-proof trace of a call that is up)."""
        if record.answer_time is None:
            record.answer_time = self.wall()
        record.state = "open"
        record.disposition = ANSWERED
        d = self._call("add_cdr", record.as_row())
        self._opened[record.call_id] = d
        return d

    def finished(self, record: CallRecord) -> Deferred[Any]:
        """Write the final ``closed`` record: an update of the open row, or one insert."""
        if record.end_time is None:
            record.end_time = self.wall()
        record.state = "closed"
        row = record.as_row()
        opened = self._opened.pop(record.call_id, None)
        if opened is None:
            return self._call("add_cdr", row)
        fields = {k: v for k, v in row.items() if k != "call_id"}
        done: Deferred[Any] = Deferred()
        opened.addBoth(lambda _: self._call("update_cdr", record.call_id, fields)
                       .addBoth(done.callback))
        return done

    def recover(self) -> Deferred[Any]:
        """At start-up: this node's ``open`` rows (a crash) become ``interrupted``."""
        if self.sink is None:
            return succeed(0)
        d = maybeDeferred(self.sink.mark_open_cdrs_interrupted, self.node)
        d.addErrback(self._failed, "mark_open_cdrs_interrupted")
        return d

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        if self.sink is None:
            return succeed(None)
        d = maybeDeferred(getattr(self.sink, method), *args)
        d.addCallback(self._written)
        d.addErrback(self._failed, method)
        return d

    def _written(self, result: Any) -> Any:
        self.written += 1
        return result

    def _failed(self, failure: Any, method: str) -> None:
        self.failures += 1
        log.error("CDR %s failed: %s", method, failure.getErrorMessage())
        return None
