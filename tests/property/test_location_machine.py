"""The location service agrees with a plain dictionary through registrations, removals,
time passing, failed saves and restarts.

Invariant: after any sequence of steps, ``lookup(aor)`` returns exactly the bindings the
model holds that have not expired, with the most recent spelling of each contact and its
expiry time, and a restart (flush, new service over the same store, load) loses nothing
that was live.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from pbx.sip.location import Binding, LocationService

AORS = ["1001", "1002"]
# Contact spellings and the identity RFC 3261 §19.1.4 gives them (written out by hand so
# the model does not reuse the implementation's comparison).
CONTACTS = {
    "sip:a@h": "a",
    "SIP:a@H": "a",
    "sip:a@h;transport=udp": "a-udp",
    "sip:a@h;transport=UDP": "a-udp",
    "sip:b@h": "b",
    "sip:b@h:5060": "b-5060",
    "sip:B@h": "B",
}


class Store:
    """Persistence fake that survives restarts; fails the next ``fail_next`` saves."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail_next = 0

    def load_bindings(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([dict(r) for r in self.rows.values()])

    def save_bindings(self, upserts: list[dict[str, Any]],
                      deletes: list[tuple[str, str]]) -> Deferred[None]:
        if self.fail_next:
            self.fail_next -= 1
            return fail(OSError("unavailable"))
        for key in deletes:
            self.rows.pop(key, None)
        for row in upserts:
            self.rows[(row["aor"], row["contact"])] = dict(row)
        return succeed(None)


class LocationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.wall = 1_000_000.0
        self.store = Store()
        self.loc = self._new_service()
        self.cseq = 0
        # aor -> identity -> (spelling, expires_at)
        self.model: dict[str, dict[str, tuple[str, float]]] = {}

    def _new_service(self) -> LocationService:
        loc = LocationService(self.clock, self.store, sweep_interval=7.0, flush_interval=0.5,
                              wall_clock=lambda: self.wall)
        loc.start()
        return loc

    @rule(aor=st.sampled_from(AORS), contact=st.sampled_from(sorted(CONTACTS)),
          expires=st.integers(1, 100))
    def register(self, aor: str, contact: str, expires: int) -> None:
        self.cseq += 1
        self.loc.apply(aor, [Binding(aor, contact, self.wall + expires, cseq=self.cseq,
                                     updated_at=self.wall)])
        self.model.setdefault(aor, {})[CONTACTS[contact]] = (contact, self.wall + expires)

    @rule(aor=st.sampled_from(AORS), contact=st.sampled_from(sorted(CONTACTS)))
    def unregister(self, aor: str, contact: str) -> None:
        self.loc.apply(aor, removes=[contact])
        self.model.get(aor, {}).pop(CONTACTS[contact], None)

    @rule(seconds=st.floats(0.1, 40.0))
    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.clock.advance(seconds)

    @rule()
    def fail_next_save(self) -> None:
        self.store.fail_next = min(self.store.fail_next + 1, 3)

    @rule()
    def restart(self) -> None:
        """Clean stop (retrying the final flush until it lands), then a new process."""
        for _ in range(5):  # the store fails at most 3 saves in a row
            outcome: list[Any] = []
            self.loc.stop().addBoth(outcome.append)
            if outcome == [None]:
                break
        else:
            raise AssertionError("flush never succeeded")
        assert self.loc.pending_changes == 0
        self.loc = self._new_service()
        restored: list[Any] = []
        self.loc.load().addBoth(restored.append)
        assert isinstance(restored[0], int)

    @invariant()
    def lookups_match_the_model(self) -> None:
        for aor in AORS:
            want = {ident: (spelling, exp) for ident, (spelling, exp)
                    in self.model.get(aor, {}).items() if exp > self.wall}
            got = {CONTACTS[b.contact]: (b.contact, b.expires_at)
                   for b in self.loc.lookup(aor)}
            assert got == want
            assert len(self.loc.lookup(aor)) == len(want)

    @invariant()
    def counts_cover_live_bindings(self) -> None:
        live = sum(len(self.loc.lookup(aor)) for aor in AORS)
        assert self.loc.binding_count >= live
        assert self.loc.binding_count == sum(1 for _ in self.loc.all_bindings())

    def teardown(self) -> None:
        self.loc.stop().addErrback(lambda _: None)


TestLocationMachine = LocationMachine.TestCase
