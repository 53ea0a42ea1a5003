"""What the ops plane reads, stated as small Protocols, and the one adapter that reads it.

The ops plane never reaches into other packages' internals: it sees the PBX through
:class:`ServiceView`, which takes the objects :class:`pbx.service.PBXService` exposes
(lifecycle, store, transport, transactions, registrar, guard, location) and looks up the
optional ones (``b2bua``, ``media``) *at read time* with ``getattr``, so calls and QoS
light up as soon as the calls layer attaches itself to the service, without any change
here. Anything a Protocol lists is all the ops plane relies on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

__all__ = [
    "CallControl",
    "LifecycleView",
    "ServiceView",
    "StoreView",
]


class LifecycleView(Protocol):
    """The lifecycle machine (``pbx.lifecycle.Lifecycle``)."""

    state: str
    entered_at: float
    drain_timeout: float

    @property
    def ready(self) -> bool: ...

    @property
    def finished(self) -> bool: ...

    def may_fire(self, trigger: str) -> bool: ...

    def fire(self, trigger: str) -> Any: ...

    def work_finished(self) -> None: ...

    def subscribe(self, listener: Callable[[str, str], None]) -> None: ...


class StoreView(Protocol):
    """The parts of ``pbx.store.Store`` the ops plane uses."""

    kind: str

    @property
    def state(self) -> str: ...

    def ping(self) -> Deferred[float]: ...

    def list_extensions(self) -> Deferred[list[Any]]: ...

    def get_extension(self, number: str) -> Deferred[Any]: ...

    def update_extension(self, number: str, **fields: Any) -> Deferred[bool]: ...

    def remove_extension(self, number: str) -> Deferred[bool]: ...

    def list_cdr(self, *, since: float | None = None, until: float | None = None,
                 extension: str | None = None, limit: int = 100,
                 offset: int = 0) -> Deferred[list[dict[str, Any]]]: ...


class StatsView(Protocol):
    """Anything with counters: ``registrar.stats``, ``guard.stats``."""

    def as_dict(self) -> Mapping[str, Any]: ...


@runtime_checkable
class CallControl(Protocol):
    """What the calls layer (B2BUA) is expected to offer; every member is optional.

    ``calls``: mapping call id -> call; ``active_calls``: int (or a callable returning
    one); ``hangup_all(reason)``; a hangup of one call by id (``hangup(call_id)`` or
    ``hangup_call(call_id)``). A call may offer ``as_dict()``/``summary()`` and its media
    session (``media``/``session``/``rtp``) ``summary()`` for QoS.
    """

    calls: Mapping[str, Any]


_CALL_FIELDS = ("call_id", "caller", "callee", "state", "direction", "start_time",
                "answer_time", "duration")


class ServiceView:
    """Read-only (plus drain and hangup) access to a running PBX for the ops plane."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.settings = service.settings
        self.lifecycle: LifecycleView = service.lifecycle
        self.store: StoreView = service.store
        self.transport: Any = service.transport
        self.transactions: Any = service.transactions
        self.registrar: Any = service.registrar
        self.guard: Any = service.guard
        self.location: Any = service.location
        self.node: str = getattr(service, "node", "")

    # -- optional layers, looked up at read time -------------------------------------
    @property
    def b2bua(self) -> Any | None:
        return getattr(self.service, "b2bua", None)

    def active_calls(self) -> int:
        b2bua = self.b2bua
        if b2bua is None:
            return 0
        value = getattr(b2bua, "active_calls", None)
        if callable(value):
            value = value()
        if value is None:
            calls = getattr(b2bua, "calls", None)
            return len(calls) if calls is not None else 0
        return int(value)

    def calls(self) -> list[dict[str, Any]]:
        """The calls up now, each as a JSON-able dict (empty without a calls layer)."""
        b2bua = self.b2bua
        calls = getattr(b2bua, "calls", None) if b2bua is not None else None
        if not calls:
            return []
        items: Iterable[tuple[str, Any]] = (calls.items() if isinstance(calls, Mapping)
                                            else ((getattr(c, "call_id", ""), c) for c in calls))
        return [describe_call(call_id, call) for call_id, call in items]

    def qos(self) -> list[dict[str, Any]]:
        """Per-call QoS of the calls up now, from their media sessions' ``summary()``."""
        b2bua = self.b2bua
        hook = getattr(b2bua, "qos", None) if b2bua is not None else None
        if callable(hook):
            return list(hook())
        calls = getattr(b2bua, "calls", None) if b2bua is not None else None
        if not calls or not isinstance(calls, Mapping):
            return []
        out = []
        for call_id, call in calls.items():
            session = next((getattr(call, name) for name in ("media", "session", "rtp")
                            if getattr(call, name, None) is not None), None)
            summary = getattr(session, "summary", None)
            if callable(summary):
                out.append({"call_id": str(call_id), "qos": summary()})
        return out

    def hangup(self, call_id: str, reason: str) -> bool | None:
        """Hang one call up; None when there is no calls layer, False when unknown."""
        b2bua = self.b2bua
        if b2bua is None:
            return None
        calls = getattr(b2bua, "calls", None)
        if isinstance(calls, Mapping) and call_id not in calls:
            # also accept the SIP Call-ID of the caller's leg
            call_id = next((key for key, info in ((k, describe_call(k, c))
                                                  for k, c in calls.items())
                            if info.get("call_id") == call_id), None) or ""
            if not call_id:
                return False
        for name in ("hangup", "hangup_call"):
            method = getattr(b2bua, name, None)
            if callable(method):
                try:
                    result = method(call_id, reason=reason)
                except TypeError:
                    result = method(call_id)
                return result is not False
        return None

    # -- SIP ----------------------------------------------------------------------------
    def sip_sockets(self) -> list[dict[str, Any]]:
        """The SIP sockets open now: ``SIPTransport.sockets_up()`` asks the port objects,
        so a closed socket drops out (``listening`` alone is only what was bound)."""
        up = getattr(self.transport, "sockets_up", None)
        entries = up() if callable(up) else getattr(self.transport, "listening", ())
        return [{"transport": t, "host": h, "port": p} for t, h, p in entries]

    def registered_extensions(self) -> int:
        return int(getattr(self.location, "registered_aors", 0))

    def binding_count(self) -> int:
        return int(getattr(self.location, "binding_count", 0))

    def forget_bindings(self, number: str) -> int:
        """Drop an extension's bindings from memory (its rows go with the extension)."""
        remove = getattr(self.location, "remove_aor", None)
        aors = getattr(self.location, "aors", None)
        if not callable(remove) or not callable(aors):
            return 0
        pattern = re.compile(rf"^(?:sips?:)?{re.escape(number)}(?:@|$)", re.IGNORECASE)
        return sum(remove(aor) for aor in aors() if pattern.match(aor))

    def registered_numbers(self) -> dict[str, int]:
        """Bindings per extension number, from the in-memory location service."""
        aors = getattr(self.location, "aors", None)
        lookup = getattr(self.location, "lookup", None)
        out: dict[str, int] = {}
        if not callable(aors) or not callable(lookup):
            return out
        for aor in aors():
            user = aor.split(":", 1)[-1].split("@", 1)[0]
            out[user] = out.get(user, 0) + len(lookup(aor))
        return out


def describe_call(call_id: str, call: Any) -> dict[str, Any]:
    """A call as JSON: its own ``as_dict()``/``summary()`` when it has one."""
    for name in ("as_dict", "summary"):
        method = getattr(call, name, None)
        if callable(method):
            data = dict(method())
            data.setdefault("call_id", str(call_id))
            return data
    data = {"call_id": str(call_id)}
    for name in _CALL_FIELDS[1:]:
        value = getattr(call, name, None)
        if value is not None and not callable(value):
            data[name] = value if isinstance(value, int | float | bool) else str(value)
    return data
