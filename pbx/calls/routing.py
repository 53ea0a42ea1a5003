"""The dialplan: which INVITEs may be routed, and to which registered contacts.

Internal extensions are numbers matching a configured regular expression.  A number that
does not match, or matches but names no extension, gets 404; an extension with no live
binding gets 480 (it exists but is not reachable now).  The targets are every registered
contact of the extension, best first, each with the flow it registered over (behind NAT
that flow, not the Contact, is how the phone is reached).

Hop protection runs before anything else costs work: ``Max-Forwards: 0`` gets 483 (RFC
3261 §16.3 step 3) and a request that already passed through this PBX (one of its Via
branches carries our branch prefix, or the loop header names this node) gets 482.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred

from pbx.sip import Binding, Request, SIPParseError

__all__ = ["LOOP_HEADER", "Dialplan", "ExtensionDirectory", "Route", "check_hops"]

LOOP_HEADER = "X-Pbx-Hop"


class ExtensionDirectory(Protocol):
    """Whether an extension exists: the credential lookup answers it already."""

    def credentials(self, username: str) -> Deferred[Any]: ...


class Locator(Protocol):
    def lookup(self, aor: str) -> list[Binding]: ...


@dataclass(slots=True)
class Route:
    """The routing decision: ``status`` 0 with ``targets``, or a final status to answer."""

    number: str
    status: int = 0
    reason: str | None = None
    targets: list[Binding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 0


def check_hops(request: Request, branch_prefix: str, node: str) -> tuple[int, str] | None:
    """483 when Max-Forwards is exhausted, 482 when the request looped through us."""
    try:
        max_forwards = request.max_forwards
    except SIPParseError:
        return (400, "Invalid Max-Forwards")
    if max_forwards is not None and max_forwards <= 0:
        return (483, "Too Many Hops")
    for via in request.headers.getall("Via"):
        if f"branch={branch_prefix}" in via:
            return (482, "Loop Detected")
    hops = request.headers.getall(LOOP_HEADER)
    if node in hops:
        return (482, "Loop Detected")
    return None


class Dialplan:
    """Internal extensions by pattern; targets from the location service."""

    def __init__(self, pattern: str, location: Locator, directory: ExtensionDirectory) -> None:
        self.pattern = re.compile(pattern)
        self.location = location
        self.directory = directory

    def dialled(self, request: Request) -> str | None:
        """The dialled number: the Request-URI's user part (sip/sips/tel)."""
        uri = request.uri
        if uri is None:
            return None
        return uri.user or None

    def matches(self, number: str) -> bool:
        return self.pattern.search(number) is not None

    def route(self, number: str | None) -> Deferred[Route]:
        """Decide where ``number`` goes (asynchronous: existence is a store question)."""
        if not number or not self.matches(number):
            return _now(Route(number or "", 404, "Not Found"))
        d = maybeDeferred(self.directory.credentials, number)
        d.addCallback(self._located, number)
        return d

    def _located(self, credentials: Any, number: str) -> Route:
        if credentials is None:
            return Route(number, 404, "Not Found")
        if not getattr(credentials, "enabled", True):
            return Route(number, 480, "Temporarily Unavailable")
        targets = self.location.lookup(number)
        if not targets:
            return Route(number, 480, "Temporarily Unavailable")
        return Route(number, 0, None, list(targets))


def _now(route: Route) -> Deferred[Route]:
    d: Deferred[Route] = Deferred()
    d.callback(route)
    return d
