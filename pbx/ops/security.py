"""HTTP hardening for the ops plane: headers on every response, rate limiting on /api/.

Before anything routes, limits or authenticates a request its path is normalised
(:func:`normalize_path`): ``//api/status`` or ``/x/../api/status`` must not reach the
admin API while skipping the ``/api/`` rate limit, and an encoded slash is refused
outright rather than guessed at. Failed bearer-token attempts lock a client address out
for a while (:class:`AuthFailureLimiter`), and a body is capped while it is read
(Twisted otherwise buffers all of it before the handler can look).

Both live in :class:`OpsRequest`, the Site's request class, rather than in the route
handlers, so no response can escape them: Klein's 404/405 pages, a 500 after an
unexpected exception, a 429, a HEAD, a probe — every one passes through
``Request.write`` (``finish()`` writes an empty body when nothing was written), where the
headers are applied once. Twisted's ``Server: TwistedWeb/<version>`` is replaced by a
bare ``pbx`` so the response does not advertise a version to scanners.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web import http, server

from pbx.ops.admin_api import MAX_BODY

__all__ = ["SECURITY_HEADERS", "AuthFailureLimiter", "OpsRequest", "OpsSite",
           "TokenBucketLimiter", "normalize_path"]

SECURITY_HEADERS: dict[bytes, bytes] = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": b"default-src 'none'; frame-ancestors 'none'",
    b"Referrer-Policy": b"no-referrer",
    b"Permissions-Policy": b"camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    b"Cache-Control": b"no-store",
    b"Cross-Origin-Resource-Policy": b"same-origin",
}
SERVER_NAME = b"pbx"


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Percent-escapes that would change the path's structure once a router decodes them.
_FORBIDDEN_ESCAPES = re.compile(rb"%(2f|5c|00)", re.IGNORECASE)


def normalize_path(path: bytes) -> bytes | None:
    """The canonical form of a request path, or None when it must be refused (400).

    Escapes of unreserved characters are decoded (``/%61pi`` is ``/api``: Twisted
    decodes segments for the router, so the prefix checks must see the same thing),
    repeated slashes collapse, ``.`` and ``..`` segments are resolved (``..`` above the
    root is refused). An encoded ``/``, ``\\`` or NUL is refused: it would make a
    segment the router and the limiter could disagree about.
    """
    if not path.startswith(b"/") or _FORBIDDEN_ESCAPES.search(path):
        return None

    def unescape(match: re.Match[bytes]) -> bytes:
        char = int(match[1], 16)
        return bytes([char]) if char in _UNRESERVED else match[0].upper()

    decoded = re.sub(rb"%([0-9A-Fa-f]{2})", unescape, path)
    segments: list[bytes] = []
    for segment in decoded.split(b"/")[1:]:
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    trailing = decoded.endswith(b"/") or decoded.endswith(b"/.") or decoded.endswith(b"/..")
    out = b"/" + b"/".join(segments)
    return out + b"/" if trailing and segments else out


class AuthFailureLimiter:
    """Locks a client address out after ``max_failures`` bad tokens in ``window`` s.

    While locked out (``lockout`` s) *every* /api/ request from that address is refused
    with 429, a correct token too: otherwise a guesser would still learn which guess was
    right. Successful requests never count. The table is bounded like the token buckets.
    """

    def __init__(self, max_failures: int = 10, window: float = 60.0, lockout: float = 300.0,
                 *, max_clients: int = 10_000,
                 now: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or window <= 0 or lockout <= 0:
            raise ValueError("max_failures must be >= 1, window and lockout > 0")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_clients = max_clients
        self.now = now
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: OrderedDict[str, float] = OrderedDict()

    def failed(self, client: str) -> None:
        """Record one failed attempt; the ``max_failures``-th in the window locks out."""
        now = self.now()
        stamps = self._failures.pop(client, None) or deque()
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        stamps.append(now)
        if len(stamps) >= self.max_failures:
            self._locked.pop(client, None)
            self._locked[client] = now + self.lockout
            stamps.clear()
            if len(self._locked) > self.max_clients:
                self._locked.popitem(last=False)
        else:
            self._failures[client] = stamps
            if len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def blocked(self, client: str) -> float:
        """0 when ``client`` may try, else the seconds its lockout still lasts."""
        until = self._locked.get(client)
        if until is None:
            return 0.0
        left = until - self.now()
        if left <= 0:
            del self._locked[client]
            return 0.0
        return left


class TokenBucketLimiter:
    """Per-client token buckets: ``rate`` requests/s sustained, ``burst`` at once.

    The table is an LRU bounded by ``max_clients`` so a flood from many addresses costs
    bounded memory (the oldest idle clients are forgotten, i.e. start with a full bucket).
    """

    def __init__(self, rate: float = 10.0, burst: int = 40, *, max_clients: int = 10_000,
                 now: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.now = now
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0 when the request may go on, else seconds until a token is available."""
        now = self.now()
        tokens, stamp = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            wait, tokens = 0.0, tokens - 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class OpsRequest(server.Request):
    """A request that always carries the security headers and honours the rate limit."""

    _ops_headers_done = False
    _ops_bad_path = False
    _ops_too_large = False
    _ops_body_bytes = 0

    def _max_body(self) -> int:
        return int(getattr(self.channel.site, "max_body", MAX_BODY))

    def gotLength(self, length: int | None) -> None:
        """Refuse by Content-Length before reading a byte of the body."""
        super().gotLength(length)
        if length is not None and length > self._max_body():
            self._ops_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        """Cap the body while it arrives (chunked bodies have no Content-Length): past
        the limit the rest is counted and dropped, never buffered."""
        self._ops_body_bytes += len(data)
        if self._ops_body_bytes > self._max_body():
            self._ops_too_large = True
        if not self._ops_too_large:
            super().handleContentChunk(data)

    def process(self) -> None:
        """Normalise the path before Twisted derives the router's segments from it."""
        normal = normalize_path(self.path)
        if normal is None:
            self._ops_bad_path = True
        else:
            self.path = normal
        super().process()

    def _apply_security_headers(self) -> None:
        if self._ops_headers_done:
            return
        self._ops_headers_done = True
        for name, value in SECURITY_HEADERS.items():
            if not self.responseHeaders.hasHeader(name):
                self.responseHeaders.setRawHeaders(name, [value])
        self.responseHeaders.setRawHeaders(b"Server", [SERVER_NAME])

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._apply_security_headers()
        super().write(data)

    def render(self, resrc: Any) -> None:
        site = self.channel.site
        if self._ops_bad_path:
            self._json_error(400, "malformed request path (encoded slash or '..' above "
                                  "the root)")
            return
        if self._ops_too_large:
            self._json_error(413, f"body larger than {self._max_body()} bytes")
            return
        is_api = self.path.startswith(b"/api/") or self.path == b"/api"
        auth_limiter: AuthFailureLimiter | None = getattr(site, "auth_limiter", None)
        if auth_limiter is not None and is_api:
            locked = auth_limiter.blocked(self.getClientAddress().host or "")
            if locked > 0:
                retry = max(1, math.ceil(locked))
                self.setHeader(b"Retry-After", str(retry).encode())
                self._json_error(429, "too many failed bearer-token attempts: retry "
                                      f"after {retry}s")
                return
        limiter: TokenBucketLimiter | None = getattr(site, "limiter", None)
        if limiter is not None and is_api:
            wait = limiter.take(self.getClientAddress().host or "")
            if wait > 0:
                on_limited = getattr(site, "on_rate_limited", None)
                if on_limited is not None:
                    on_limited()
                retry = max(1, math.ceil(wait))
                self.setHeader(b"Retry-After", str(retry).encode())
                self._json_error(429,
                                 f"rate limit exceeded: retry after {retry}s")
                return
        super().render(resrc)

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        """An unexpected error: log it, answer a JSON 500 without a traceback."""
        self._log.failure("ops HTTP request failed", failure=reason)
        if not self.startedWriting:
            self._json_error(http.INTERNAL_SERVER_ERROR, "internal error (logged)")
        elif not self.finished:
            self.finish()

    def _json_error(self, code: int, message: str) -> None:
        body = json.dumps({"error": message, "status": code}).encode()
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"Content-Length", str(len(body)).encode())
        self.write(body)
        self.finish()


class OpsSite(server.Site):
    """A Site using :class:`OpsRequest`; ``limiter`` guards paths under /api/."""

    requestFactory = OpsRequest
    displayTracebacks = False

    def __init__(self, resource: Any, *, limiter: TokenBucketLimiter | None = None,
                 on_rate_limited: Callable[[], None] | None = None,
                 auth_limiter: AuthFailureLimiter | None = None,
                 max_body: int = MAX_BODY, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limiter = limiter
        self.on_rate_limited = on_rate_limited
        self.auth_limiter = auth_limiter
        self.max_body = max_body

    def log(self, request: Any) -> None:
        """No access log: probes every few seconds would drown the PBX's own log."""
