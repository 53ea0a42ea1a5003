"""HTTP hardening for the ops plane: headers on every response, rate limiting on /api/.

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
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web import http, server

__all__ = ["SECURITY_HEADERS", "OpsRequest", "OpsSite", "TokenBucketLimiter"]

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
        limiter: TokenBucketLimiter | None = getattr(site, "limiter", None)
        if limiter is not None and self.path.startswith(b"/api/"):
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
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limiter = limiter
        self.on_rate_limited = on_rate_limited

    def log(self, request: Any) -> None:
        """No access log: probes every few seconds would drown the PBX's own log."""
