"""RFC 3262 reliable provisional responses, terminated by the B2BUA on each leg.

The B2BUA is the UAC toward the callee and the UAS toward the caller, so reliability is
never relayed end to end: each leg runs its own RSeq space and PRACKs.

* :class:`PrackTracker` (we are UAC, §4): decides for each 18x from the callee whether
  it is reliable, new and in order (then we PRACK it with ``RAck: rseq cseq method``),
  or a retransmission / out-of-order copy that must be discarded.  One RSeq counter per
  early dialog (a forking proxy behind the callee's Contact may create several).
* :class:`ReliableProvisionals` (we are UAS, §3) implements
  ``statecharts/reliable_provisional.yaml``.  What the chart does not show, kept here as
  data: the RSeq counter (first value random in 1..2**31-1, then +1), the FIFO of
  provisionals waiting behind the one in flight (bounded; a final response drops it),
  and the 2xx held back while a provisional is in flight (§3 requires it for one with
  SDP; we do it for all), released by its PRACK or failed by the 64*T1 give-up.

Everything here is sans-IO: responses go out through a ``send`` callable and time
through the model's ``clock`` (``IReactorTime``), so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IReactorTime

from pbx.sip import Request, Response, SIPParseError
from pbx.statechart_timers import TimedChartModel

__all__ = [
    "OPTION_TAG",
    "RSEQ_MAX",
    "PrackTracker",
    "RAck",
    "ReliableProvisionals",
    "Verdict",
    "has_option",
    "is_reliable",
    "parse_rseq",
    "wants_reliable",
]

log = logging.getLogger(__name__)

OPTION_TAG = "100rel"
RSEQ_MAX = 2**32 - 1          # §7.1: RSeq is a 32-bit unsigned integer
RSEQ_INITIAL_MAX = 2**31 - 1  # §3: the first value lies in 1..2**31-1
MAX_EARLY_DIALOGS = 16        # per INVITE: a cap on the tracker's table
MAX_QUEUED = 8                # reliable provisionals waiting behind the one in flight


def has_option(message: Request | Response, header: str, tag: str = OPTION_TAG) -> bool:
    """Whether ``header`` (Require / Supported) of ``message`` lists option ``tag``.

    Option tags are compared case-insensitively (RFC 3261 §19.2); the compact form of
    Supported (``k``) is canonicalised by the header table.
    """
    folded = tag.lower()
    return any(value.strip().lower() == folded for value in message.headers.getall(header))


def parse_rseq(value: str | None) -> int | None:
    """RSeq (§7.1): ``1*DIGIT`` in 1..2**32-1, else None."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    number = int(text)
    return number if 1 <= number <= RSEQ_MAX else None


@dataclass(frozen=True, slots=True)
class RAck:
    """RAck (§7.2): the RSeq and the CSeq (number and method) of the PRACKed response."""

    rseq: int
    cseq: int
    method: str

    @classmethod
    def parse(cls, value: str | None) -> RAck | None:
        """``response-num LWS CSeq-num LWS Method``; None when malformed."""
        if value is None:
            return None
        parts = value.split()
        if len(parts) != 3:
            return None
        rseq = parse_rseq(parts[0])
        if rseq is None or not parts[1].isdigit() or len(parts[1]) > 10:
            return None
        cseq = int(parts[1])
        method = parts[2]
        if not method.isalpha() or cseq > RSEQ_MAX:
            return None
        return cls(rseq, cseq, method.upper())

    @classmethod
    def of(cls, response: Response) -> RAck:
        """The RAck that acknowledges ``response`` (raises SIPParseError)."""
        rseq = parse_rseq(response.headers.get("RSeq"))
        if rseq is None:
            raise SIPParseError("response without a valid RSeq")
        cseq = response.cseq
        return cls(rseq, cseq.seq, cseq.method)

    def __str__(self) -> str:
        return f"{self.rseq} {self.cseq} {self.method}"


def is_reliable(response: Response) -> bool:
    """A 101-199 with ``Require: 100rel`` (§4: the UAC must PRACK it).  100 never is."""
    return 100 < response.status < 200 and has_option(response, "Require")


def wants_reliable(invite: Request, has_sdp: bool) -> bool:
    """Whether we send this provisional to the caller reliably (§3).

    ``Require: 100rel`` in its INVITE obliges us.  With only ``Supported: 100rel`` we
    choose to for a provisional that carries SDP (the early answer must not be lost,
    or early media never flows), and not for a bare 180 (no gain, a PRACK per ring).
    """
    if has_option(invite, "Require"):
        return True
    return has_sdp and has_option(invite, "Supported")


class Verdict(Enum):
    """What the UAC does with a provisional response (§4)."""

    UNRELIABLE = "unreliable"  # an ordinary 1xx: process, no PRACK
    PRACK = "prack"            # reliable, new and in order: process and PRACK it
    DISCARD = "discard"        # retransmission, out of order or malformed: drop it


class PrackTracker:
    """The UAC's per-INVITE RSeq bookkeeping (§4), one counter per early dialog."""

    __slots__ = ("_last", "finished")

    def __init__(self) -> None:
        self._last: dict[str, int] = {}   # To tag -> RSeq of the last in-order response
        self.finished = False

    def receive(self, response: Response) -> Verdict:
        """Classify ``response``; on PRACK the counter advances (PRACK it with
        :meth:`RAck.of`)."""
        if not is_reliable(response):
            return Verdict.UNRELIABLE
        if self.finished:
            return Verdict.DISCARD  # §4: kept until the final response only
        rseq = parse_rseq(response.headers.get("RSeq"))
        try:
            tag = response.to.tag
        except SIPParseError:
            tag = None
        if rseq is None or not tag:
            log.info("reliable %d without RSeq or To tag dropped", response.status)
            return Verdict.DISCARD
        last = self._last.get(tag)
        if last is None:
            if len(self._last) >= MAX_EARLY_DIALOGS:
                return Verdict.DISCARD
        elif rseq != last + 1:
            # rseq <= last: a retransmission (§4 MUST discard); > last + 1: out of
            # order (MUST NOT PRACK; we do not cache it).
            return Verdict.DISCARD
        self._last[tag] = rseq
        return Verdict.PRACK

    def last_rseq(self, tag: str) -> int | None:
        return self._last.get(tag)

    def final_received(self) -> None:
        """The INVITE got its final response: the counters are no longer needed."""
        self.finished = True
        self._last.clear()


@dataclass(slots=True)
class _Provisional:
    response: Response
    rseq: int = 0


class ReliableProvisionals(TimedChartModel):
    """Our reliable 18x to one INVITE (``statecharts/reliable_provisional.yaml``)."""

    chart_name = "reliable_provisional"

    def __init__(self, clock: IReactorTime, send: Callable[[Response], None], *,
                 t1: float = 0.5, reliable_transport: bool = False,
                 on_give_up: Callable[[], None] | None = None,
                 initial_rseq: int | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.T1 = t1
        self.reliable = reliable_transport
        self._send = send
        self._on_give_up = on_give_up
        self._next_rseq = (initial_rseq if initial_rseq is not None
                           else secrets.randbelow(RSEQ_INITIAL_MAX) + 1)
        self._in_flight: _Provisional | None = None
        self._queue: deque[_Provisional] = deque()
        self._held: Callable[[], None] | None = None
        self.sent = 0
        self.retransmissions = 0
        self.start_timers()

    # -- the leg's interface -------------------------------------------------------------
    def provisional(self, response: Response) -> None:
        """Send ``response`` (a 101-199) reliably: now, or after the one in flight."""
        if self.is_final:
            return
        item = _Provisional(response)
        if self.state == "idle":
            self.fire("send", item)
            return
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()  # the oldest waiting one is stale news by now
        self._queue.append(item)

    def prack(self, request: Request) -> bool:
        """A PRACK arrived: True when its RAck names the provisional in flight (answer
        it 2xx); False means 481 (§3: no unacknowledged provisional matches)."""
        rack = RAck.parse(request.headers.get("RAck"))
        if rack is None:
            return False
        return bool(self.fire("prack", rack))

    def matches(self, request: Request) -> bool:
        """Whether :meth:`prack` would accept ``request`` (answer its 200 first: the
        PRACK may release a held 2xx, which must not overtake the PRACK's 200)."""
        rack = RAck.parse(request.headers.get("RAck"))
        return (rack is not None and self.state in ("awaiting_prack", "closed")
                and self.rack_matches(rack))

    def may_send_final(self, success: bool) -> bool:
        """Whether a final response may go now.  §3: a 2xx must wait while the
        provisional in flight carries SDP; we let a 2xx wait for any provisional in
        flight (§3 allows it), so the caller always sees PRACK's 200 before the INVITE's
        and never a 2xx overtaking its PRACK.  A failure goes at once."""
        return not (success and self._in_flight is not None
                    and self.state == "awaiting_prack")

    def hold_final(self, release: Callable[[], None]) -> None:
        """Run ``release`` (send the 2xx) once the provisional in flight is PRACKed;
        a give-up drops it (``on_give_up`` answers the INVITE instead)."""
        self._held = release

    def close(self) -> None:
        """A final response went out (or the call ended): stop retransmitting.  The
        provisional in flight is kept: its PRACK may still come (and gets 200)."""
        self._queue.clear()
        self._held = None
        self.fire("close")

    @property
    def outstanding(self) -> int:
        """The provisional in flight (0 or 1) plus those queued."""
        return (self._in_flight is not None) + len(self._queue)

    # -- chart callbacks ------------------------------------------------------------------
    def transmit(self, item: _Provisional) -> None:
        item.rseq = self._next_rseq
        self._next_rseq = min(self._next_rseq + 1, RSEQ_MAX)
        headers = item.response.headers
        if not has_option(item.response, "Require"):
            headers.add("Require", OPTION_TAG)
        headers.set("RSeq", str(item.rseq))
        self._in_flight = item
        self.sent += 1
        self._send(item.response)

    def retransmit_response(self, *_: Any) -> None:
        item = self._in_flight
        if item is not None:
            self.retransmissions += 1
            self._send(item.response)

    def rack_matches(self, rack: RAck) -> bool:
        item = self._in_flight
        if item is None:
            return False
        cseq = item.response.cseq
        return (rack.rseq == item.rseq and rack.cseq == cseq.seq
                and rack.method == cseq.method)

    def forget_in_flight(self, *_: Any) -> None:
        self._in_flight = None

    def acknowledged(self, _rack: RAck) -> None:
        self._in_flight = None
        held, self._held = self._held, None
        if held is not None:
            self._queue.clear()  # superseded by the final response going out now
            held()
            return
        if self._queue:
            self.fire("send", self._queue.popleft())

    def notify_give_up(self, *_: Any) -> None:
        self._queue.clear()
        self._held = None
        callback = self._on_give_up
        if callback is not None:
            callback()
