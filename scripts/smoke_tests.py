#!/usr/bin/env python3
"""Smoke tests of a running PBX over its ops API: ``scripts/smoke_tests.py [BASE_URL]``.

BASE_URL defaults to http://127.0.0.1:8080; the admin token comes from
``$PBX_API__TOKEN``. Tests come in three categories:

- critical: health, liveness, readiness, API status — exit 1 when one fails;
- important: detailed health, metrics, extensions, config — reported, exit 0;
- optional: statistics, QoS — reported, exit 0.

Exit codes: 0 all critical tests passed, 1 a critical test failed, 2 the server cannot
be reached (one line on stderr, no traceback). Standard library only, so it runs on any
host with Python 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 10.0
CATEGORIES = ("critical", "important", "optional")
REQUIRED_METRICS = ("pbx_health", "pbx_uptime_seconds", "pbx_active_calls",
                    "pbx_registered_extensions")


class Unreachable(Exception):
    """The server did not accept a connection at all."""


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Result:
    category: str
    name: str
    ok: bool
    detail: str
    millis: float


class Client:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def get(self, path: str, *, auth: bool = False) -> Response:
        request = urllib.request.Request(self.base + path, method="GET")
        if auth and self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                return Response(resp.status, resp.read(), dict(resp.headers))
        except urllib.error.HTTPError as err:
            return Response(err.code, err.read(), dict(err.headers))
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise Unreachable(str(reason)) from None


class Failed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def _api(client: Client, path: str) -> Response:
    response = client.get(path, auth=True)
    if response.status in (401, 503) and b"PBX_API__TOKEN" in response.body:
        raise Failed("admin API disabled on the server: set PBX_API__TOKEN there")
    if response.status == 401:
        raise Failed("401: set PBX_API__TOKEN to the server's admin token")
    expect(response.status == 200, f"HTTP {response.status}")
    return response


def t_health(c: Client) -> str:
    r = c.get("/health")
    expect(r.status == 200, f"HTTP {r.status}")
    return "200"


def t_live(c: Client) -> str:
    r = c.get("/live")
    expect(r.status == 200, f"HTTP {r.status} (reactor stalled?)")
    return "200"


def t_ready(c: Client) -> str:
    r = c.get("/ready?verbose")
    expect(r.status == 200, f"HTTP {r.status}: "
           + " / ".join(r.body.decode(errors="replace").split("\n")[1:]).strip())
    return "200"


def t_status(c: Client) -> str:
    body = _api(c, "/api/status").json()
    expect(body.get("lifecycle", {}).get("state") == "ready",
           f"lifecycle is {body.get('lifecycle')}")
    return f"{body.get('status')}, node {body.get('node')}, {body.get('active_calls')} calls"


def t_detailed(c: Client) -> str:
    r = c.get("/api/health/detailed")
    body = r.json()
    for key in ("overall_status", "liveness", "readiness", "metrics"):
        expect(key in body, f"missing {key}")
    checks = body["readiness"].get("checks", {})
    for key in ("pbx_core", "database", "sip_server", "system_resources"):
        expect(key in checks, f"missing check {key}")
    expect(body["overall_status"] in ("healthy", "degraded"),
           f"overall_status {body['overall_status']}")
    db = checks["database"]
    return f"{body['overall_status']}, {db.get('type')} {db.get('latency_ms')} ms"


def t_metrics(c: Client) -> str:
    r = c.get("/metrics")
    expect(r.status == 200, f"HTTP {r.status}")
    text = r.body.decode(errors="replace")
    missing = [m for m in REQUIRED_METRICS if f"\n{m} " not in "\n" + text]
    expect(not missing, f"missing {', '.join(missing)}")
    return f"{sum(1 for line in text.splitlines() if line and line[0] != '#')} samples"


def t_extensions(c: Client) -> str:
    body = _api(c, "/api/extensions").json()
    expect(isinstance(body.get("extensions"), list), "no extensions list")
    expect(all("password" not in e for e in body["extensions"]), "a password was returned")
    return f"{body.get('count')} extensions"


def t_config(c: Client) -> str:
    body = _api(c, "/api/config").json()
    expect("sip" in body and "api" in body, "sections missing")
    token = body["api"].get("token")
    expect(token in (None, "***"), "api.token is not redacted")
    return f"mode {body.get('mode')}"


def t_statistics(c: Client) -> str:
    body = _api(c, "/api/statistics").json()
    expect("sip" in body, "no sip section")
    return f"{sum(body['sip'].get('received', {}).values())} SIP messages received"


def t_qos(c: Client) -> str:
    body = _api(c, "/api/qos").json()
    expect(isinstance(body.get("calls"), list), "no calls list")
    return f"{len(body['calls'])} calls with QoS"


TESTS: tuple[tuple[str, str, Callable[[Client], str]], ...] = (
    ("critical", "Health check (/health)", t_health),
    ("critical", "Liveness (/live)", t_live),
    ("critical", "Readiness (/ready)", t_ready),
    ("critical", "API status (/api/status)", t_status),
    ("important", "Detailed health (/api/health/detailed)", t_detailed),
    ("important", "Metrics (/metrics)", t_metrics),
    ("important", "Extensions (/api/extensions)", t_extensions),
    ("important", "Configuration (/api/config)", t_config),
    ("optional", "Statistics (/api/statistics)", t_statistics),
    ("optional", "QoS (/api/qos)", t_qos),
)


def run(base: str, token: str | None) -> list[Result]:
    client = Client(base, token)
    results = []
    for category, name, test in TESTS:
        started = time.perf_counter()
        try:
            detail, ok = test(client), True
        except Unreachable:
            raise
        except Failed as exc:
            detail, ok = str(exc), False
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            detail, ok = f"unexpected answer: {exc}", False
        results.append(Result(category, name, ok, detail,
                              (time.perf_counter() - started) * 1000))
    return results


def report(base: str, results: list[Result]) -> bool:
    print(f"PBX smoke tests against {base}")
    print("=" * 70)
    for category in CATEGORIES:
        print(f"\n{category.upper()} TESTS")
        for r in (r for r in results if r.category == category):
            mark = "PASS" if r.ok else "FAIL"
            print(f"  [{mark}] {r.name}: {r.detail} ({r.millis:.0f} ms)")
    print("\n" + "=" * 70)
    print("SUMMARY")
    for category in CATEGORIES:
        group = [r for r in results if r.category == category]
        passed = sum(r.ok for r in group)
        print(f"  {category.upper()}: {passed}/{len(group)} passed, "
              f"{len(group) - passed} failed")
    total = sum(r.ok for r in results)
    print(f"  TOTAL: {total}/{len(results)} passed")
    print("=" * 70)
    critical_ok = all(r.ok for r in results if r.category == "critical")
    others_ok = all(r.ok for r in results)
    if critical_ok and others_ok:
        print("RESULT: ALL CRITICAL TESTS PASSED - all tests passed, system is operational")
    elif critical_ok:
        print("RESULT: ALL CRITICAL TESTS PASSED - system is operational with warnings")
    else:
        print("RESULT: CRITICAL TESTS FAILED - system is NOT operational")
    return critical_ok


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    base = argv[1] if len(argv) > 1 else DEFAULT_URL
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
        print(f"smoke_tests: {base!r} is not an http(s) URL", file=sys.stderr)
        return 2
    try:
        results = run(base, os.environ.get("PBX_API__TOKEN") or None)
    except Unreachable as exc:
        print(f"smoke_tests: cannot reach the PBX at {base}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if report(base, results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
