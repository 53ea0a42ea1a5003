"""``/ready`` reasons proven by breaking the component of the real PBX process.

SQLite made unwritable: the test holds an exclusive lock on the PBX's database from a
second connection (``BEGIN EXCLUSIVE``). Tests run as root, where ``chmod`` does not stop
writes; a held lock does, and it is a real failure mode (a backup or an ``sqlite3`` shell
left in a transaction). ``SELECT 1`` still passes under that lock, the heartbeat write
does not: ``/ready`` must answer 503 with the database reason, then 200 once released.
"""

from __future__ import annotations

import http.client
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import PBXProcess, start_pbx

pytestmark = pytest.mark.integration

API_RE = re.compile(r"listening: API HTTP on \S+:(\d+)")


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _poll(port: int, path: str, done: Callable[[int, str], bool],
          timeout: float = 25.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _get(port, path)
        if done(status, body) or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


@pytest.fixture
def real_pbx(tmp_path: Path) -> Iterator[PBXProcess]:
    process = start_pbx(tmp_path)
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


def test_ready_fails_while_the_sqlite_database_is_locked_and_recovers(
        real_pbx: PBXProcess, tmp_path: Path) -> None:
    api = int(API_RE.search(real_pbx.wait_for(API_RE.pattern)).group(1))  # type: ignore[union-attr]
    database = tmp_path / "var" / "pbx.sqlite3"
    assert database.exists()
    assert _get(api, "/ready")[0] == 200
    assert _get(api, "/api/health/detailed")[0] == 200  # waits for a heartbeat write

    locker = sqlite3.connect(str(database), isolation_level=None, timeout=5)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        assert locker.execute("SELECT count(*) FROM health_heartbeat").fetchone()[0] >= 1
        status, body = _poll(api, "/ready?verbose", lambda s, _: s == 503)
        assert status == 503, body
        assert "database ping failed: database locked" in body

        status, text = _get(api, "/api/health/detailed")
        assert status == 503
        checks = json.loads(text)["readiness"]["checks"]
        assert checks["database"]["status"] == "unhealthy"
        assert checks["database"]["error"] == "database locked"
        assert "SQLite:" not in text  # the driver's own words need the token
        assert "node" not in checks["pbx_core"]  # nor the host name
        locker.execute("ROLLBACK")
    finally:
        locker.close()

    status, body = _poll(api, "/ready?verbose", lambda s, _: s == 200)
    assert status == 200, body
    assert "database connected" in body


def test_detailed_health_is_full_only_with_the_token(tmp_path: Path) -> None:
    """Host names need the token; a wrong token is a counted 401, not a redacted 200."""
    import json
    import urllib.error
    import urllib.request

    from .conftest import clean_env

    token = "t" * 40
    env = clean_env() | {"PBX_API__TOKEN": token}
    pbx = start_pbx(tmp_path, env=env)
    try:
        line = pbx.wait_for(r"listening: API HTTP on \S+:(\d+)")
        port = int(line.rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}/api/health/detailed"

        def get(headers: dict[str, str]) -> tuple[int, dict[str, object]]:
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        def node(report: dict[str, object]) -> object:
            checks = report.get("readiness", {}).get("checks", {})  # type: ignore[union-attr]
            core = checks.get("pbx_core", {})
            return core.get("node")  # type: ignore[union-attr]

        status, anonymous = get({})
        assert status == 200 and node(anonymous) is None, anonymous
        status, full = get({"Authorization": f"Bearer {token}"})
        assert status == 200 and node(full), full
        status, wrong = get({"Authorization": "Bearer nope"})
        assert status == 401 and "readiness" not in wrong
    finally:
        assert pbx.stop() == 0
