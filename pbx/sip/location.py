"""The location service: where each address-of-record can be reached (RFC 3261 §10).

Theory of operation
-------------------
Bindings live in memory (``aor -> contact key -> Binding``) because lookups and
registrations are on the hot path; the store is written *behind*: every change marks
``(aor, contact)`` dirty (an upsert or a delete, later changes to the same binding
replacing earlier ones), and one timer per ``flush_interval`` sends everything dirty in
ONE ``save_bindings`` call.  A failed save puts its changes back (unless they were
changed again meanwhile) and is retried with a bounded backoff; :meth:`flush` forces a
save (a clean stop calls it through :meth:`stop`).  At start-up :meth:`load` restores
the bindings, dropping those already expired (and deleting them from the store).

Expiry is wall-clock time (``expires_at`` is unix epoch seconds, shared with the
store and other nodes); timers run on the injected reactor clock.  Lookups never return
an expired binding; the sweeper (every ``sweep_interval``) removes them from memory and
the store.

Contact comparison (RFC 3261 §19.1.4), see :func:`contact_key`: scheme and host are
case-insensitive, user and password case-sensitive, escapes are decoded, a port is
compared as written (an omitted port differs from ``:5060``), parameter names are
case-insensitive and values compared case-insensitively, parameter order does not
matter.  One deliberate simplification: a URI parameter present in only one of two
URIs makes them *different* (the RFC ignores most such parameters); devices refresh with
the contact they registered, so this only matters for contrived cases, and being
strict never merges two devices into one binding.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from pbx.sip.errors import SIPParseError
from pbx.sip.uri import URI

__all__ = ["Binding", "BindingPersistence", "LocationService", "contact_key"]

log = logging.getLogger(__name__)

ContactKey = tuple[Any, ...]


@dataclass(slots=True)
class Binding:
    """One registered contact of an AOR; the fields are the store's row columns."""

    aor: str
    contact: str
    expires_at: float
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    transport: str = "udp"
    source_host: str = ""
    source_port: int = 0
    user_agent: str | None = None
    instance_id: str | None = None
    reg_id: int | None = None
    node: str = ""
    updated_at: float = 0.0

    def as_row(self) -> dict[str, Any]:
        return {
            "aor": self.aor, "contact": self.contact, "expires_at": self.expires_at,
            "q": self.q, "call_id": self.call_id, "cseq": self.cseq,
            "transport": self.transport, "source_host": self.source_host,
            "source_port": self.source_port, "user_agent": self.user_agent,
            "instance_id": self.instance_id, "reg_id": self.reg_id, "node": self.node,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_row(cls, row: Any) -> Binding:
        """Build from a mapping (a store row); missing optional columns take defaults."""
        reg_id = row.get("reg_id")
        return cls(
            str(row["aor"]), str(row["contact"]), float(row["expires_at"]),
            float(row.get("q", 1.0) if row.get("q") is not None else 1.0),
            str(row.get("call_id") or ""), int(row.get("cseq") or 0),
            str(row.get("transport") or "udp"), str(row.get("source_host") or ""),
            int(row.get("source_port") or 0), row.get("user_agent"),
            row.get("instance_id"), int(reg_id) if reg_id is not None else None,
            str(row.get("node") or ""), float(row.get("updated_at") or 0.0),
        )

    def remaining(self, now: float) -> int:
        """Whole seconds left, rounded to nearest, at least 1 while unexpired (for the
        ``expires`` parameter of a 200 OK)."""
        left = self.expires_at - now
        return 0 if left <= 0 else max(1, int(left + 0.5))


class BindingPersistence(Protocol):
    """What the store offers the location service."""

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]:
        """Every stored binding row."""
        ...

    def save_bindings(self, upserts: list[dict[str, Any]],
                      deletes: list[tuple[str, str]]) -> Deferred[None]:
        """Insert-or-replace ``upserts`` (keyed by aor + contact) and delete the
        ``(aor, contact)`` pairs, ideally in one transaction."""
        ...


@functools.lru_cache(maxsize=65536)
def contact_key(contact: str) -> ContactKey:
    """The identity of a contact URI for binding comparison (RFC 3261 §19.1.4, with the
    simplification described in the module docstring).  Cached: devices refresh with
    the same text."""
    try:
        uri = URI.parse(contact)
    except SIPParseError:
        return ("raw", contact)
    params = tuple(sorted((k, v.lower() if v is not None else None)
                          for k, v in uri.params.items())) if uri.params else ()
    headers = tuple(sorted((k.lower(), v) for k, v in uri.headers.items())) \
        if uri.headers else ()
    return (uri.scheme, uri.user, uri.password, uri.host, uri.port, params, headers)


class LocationService:
    """In-memory bindings with write-behind persistence and an expiry sweeper."""

    def __init__(self, clock: IReactorTime, persistence: BindingPersistence | None = None, *,
                 sweep_interval: float = 5.0, flush_interval: float = 0.2,
                 wall_clock: Callable[[], float] = time.time,
                 max_retry_delay: float = 10.0) -> None:
        self.clock = clock
        self.persistence = persistence
        self.sweep_interval = sweep_interval
        self.flush_interval = flush_interval
        self.wall_clock = wall_clock
        self.max_retry_delay = max_retry_delay
        self._aors: dict[str, dict[ContactKey, Binding]] = {}
        self._count = 0
        # (aor, contact text) -> binding to upsert, or None to delete
        self._dirty: dict[tuple[str, str], Binding | None] = {}
        self._flush_call: IDelayedCall | None = None
        self._saving = False
        self._after_save: list[Deferred[None]] = []
        self._failures_in_row = 0
        self._sweeper: LoopingCall | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.expired_total = 0

    # -- queries ------------------------------------------------------------------------
    def lookup(self, aor: str) -> list[Binding]:
        """Unexpired bindings of ``aor``, highest q first, then most recently updated."""
        contacts = self._aors.get(aor)
        if not contacts:
            return []
        now = self.wall_clock()
        live = [b for b in contacts.values() if b.expires_at > now]
        if len(live) > 1:
            live.sort(key=_preference)
        return live

    def get(self, aor: str, contact: str) -> Binding | None:
        """The unexpired binding of ``aor`` whose contact matches ``contact``."""
        contacts = self._aors.get(aor)
        if not contacts:
            return None
        binding = contacts.get(contact_key(contact))
        if binding is None or binding.expires_at <= self.wall_clock():
            return None
        return binding

    def aors(self) -> list[str]:
        """AORs with at least one binding in memory (expired ones go at the next sweep)."""
        return list(self._aors)

    def all_bindings(self) -> Iterator[Binding]:
        """Every binding in memory, expired or not (admin views, tests)."""
        for contacts in self._aors.values():
            yield from contacts.values()

    @property
    def registered_aors(self) -> int:
        """AORs with bindings (exact after each sweep; may include ones expiring since)."""
        return len(self._aors)

    @property
    def binding_count(self) -> int:
        """Bindings held (exact after each sweep; may include ones expiring since)."""
        return self._count

    @property
    def pending_changes(self) -> int:
        """Changes not yet written to the store."""
        return len(self._dirty)

    # -- updates --------------------------------------------------------------------------
    def apply(self, aor: str, upserts: Iterable[Binding] = (),
              removes: Iterable[str] = ()) -> None:
        """Remove the contacts in ``removes``, then add or replace ``upserts``.

        A binding replaces the one with an equivalent contact (:func:`contact_key`); if
        the text differs, the old row is deleted from the store and the new one written.
        """
        contacts = self._aors.get(aor)
        if contacts is None:
            contacts = {}
        for contact in removes:
            old = contacts.pop(contact_key(contact), None)
            if old is not None:
                self._count -= 1
                self._mark(aor, old.contact, None)
        for binding in upserts:
            key = contact_key(binding.contact)
            old = contacts.get(key)
            if old is None:
                self._count += 1
            elif old.contact != binding.contact:
                self._mark(aor, old.contact, None)
            contacts[key] = binding
            self._mark(aor, binding.contact, binding)
        if contacts:
            self._aors[aor] = contacts
        else:
            self._aors.pop(aor, None)

    def remove_aor(self, aor: str) -> int:
        """Remove every binding of ``aor`` (extension deleted); returns how many."""
        contacts = self._aors.pop(aor, None)
        if not contacts:
            return 0
        for binding in contacts.values():
            self._mark(aor, binding.contact, None)
        self._count -= len(contacts)
        return len(contacts)

    def sweep(self) -> int:
        """Drop expired bindings from memory and the store; returns how many."""
        now = self.wall_clock()
        removed = 0
        for aor in list(self._aors):
            contacts = self._aors[aor]
            expired = [k for k, b in contacts.items() if b.expires_at <= now]
            for key in expired:
                self._mark(aor, contacts.pop(key).contact, None)
            removed += len(expired)
            if not contacts:
                del self._aors[aor]
        self._count -= removed
        self.expired_total += removed
        return removed

    # -- persistence ------------------------------------------------------------------------
    def _mark(self, aor: str, contact: str, binding: Binding | None) -> None:
        self._dirty[(aor, contact)] = binding
        if self.persistence is not None and self._flush_call is None and not self._saving:
            self._flush_call = self.clock.callLater(self.flush_interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_call = None
        self.flush().addErrback(self._log_flush_failure)

    @staticmethod
    def _log_flush_failure(failure: Failure) -> None:
        log.warning("saving bindings failed (will retry): %s", failure.getErrorMessage())

    def flush(self) -> Deferred[None]:
        """Write every pending change now; fires when written, errbacks if the save fails
        (the changes are kept and retried).  While a save is running, waits for it and
        then saves what is still pending."""
        if self.persistence is None:
            self._dirty.clear()
            return succeed(None)
        if self._saving:
            waiter: Deferred[None] = Deferred()
            self._after_save.append(waiter)
            return waiter
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._dirty:
            return succeed(None)
        batch = self._dirty
        self._dirty = {}
        upserts = [b.as_row() for b in batch.values() if b is not None]
        deletes = [key for key, b in batch.items() if b is None]
        self._saving = True
        result: Deferred[None] = Deferred()
        saved = maybeDeferred(self.persistence.save_bindings, upserts, deletes)

        def done(outcome: Any) -> None:
            self._saving = False
            if isinstance(outcome, Failure):
                self.flush_failures += 1
                self._failures_in_row += 1
                for key, binding in batch.items():  # newer changes win
                    self._dirty.setdefault(key, binding)
                delay = min(self.flush_interval * 2 ** self._failures_in_row,
                            self.max_retry_delay)
            else:
                self.flushes += 1
                self._failures_in_row = 0
                delay = self.flush_interval
            if self._dirty and self._flush_call is None:
                self._flush_call = self.clock.callLater(delay, self._timed_flush)
            waiters, self._after_save = self._after_save, []
            for waiter in waiters:
                self.flush().chainDeferred(waiter)
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(None)

        saved.addBoth(done)
        return result

    def load(self) -> Deferred[int]:
        """Restore bindings from the store; expired rows are dropped (and deleted).

        Fires with the number of live bindings restored.
        """
        if self.persistence is None:
            return succeed(0)
        return maybeDeferred(self.persistence.load_bindings).addCallback(self._restore)

    def _restore(self, rows: list[dict[str, Any]]) -> int:
        now = self.wall_clock()
        restored = 0
        for row in rows:
            try:
                binding = Binding.from_row(row)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring an unreadable binding row: %s", exc)
                continue
            if binding.expires_at <= now:
                self._mark(binding.aor, binding.contact, None)
                continue
            contacts = self._aors.setdefault(binding.aor, {})
            key = contact_key(binding.contact)
            old = contacts.get(key)
            if old is None:
                self._count += 1
                restored += 1
            elif old.updated_at > binding.updated_at:
                continue
            contacts[key] = binding
        return restored

    # -- service ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the expiry sweeper (idempotent)."""
        if self._sweeper is None or not self._sweeper.running:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(self.sweep_interval, now=False)

    def stop(self) -> Deferred[None]:
        """Stop the sweeper and write everything pending (clean shutdown)."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        return self.flush()


def _preference(binding: Binding) -> tuple[float, float]:
    return (-binding.q, -binding.updated_at)
