"""The terminal wizard, driven like an operator would: through a real pseudo-terminal.

``pty.fork`` gives the child a controlling terminal, so ``getpass`` really turns echo off
and the test can check that typed passwords never reach the screen.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dotenv import dotenv_values

from pbx.config.validation import check_database, validate_file
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "setup_production_env.py"
PG_DSN = os.environ.get("PBX_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TYPED_PASSWORD = "Vb7kQ2mZx9LpR4tW"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PBX_")}
    env["TERM"] = "dumb"
    return env


class Terminal:
    """A tiny expect: the wizard runs on a pty; we read its screen and type answers."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # child: become the wizard
            try:
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, str(SCRIPT), *args], child_env())
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.transcript = ""
        self.pos = 0
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        self.transcript += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")
        return True

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.transcript, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.5)) and self._exited()):
                raise AssertionError(f"did not see {pattern!r}; screen so far:\n"
                                     f"{self.transcript[-3000:]}")

    def answer(self, prompt: str, text: str) -> None:
        self.expect(prompt)
        os.write(self.fd, text.encode() + b"\r")

    def _exited(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while not self._exited():
            self._read(0.2)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"wizard did not exit:\n{self.transcript[-3000:]}")
        while self._read(0.05):
            pass
        os.close(self.fd)
        assert self.status is not None
        return self.status


@pytest.fixture(scope="module")
def postgres() -> str:
    problem = check_database(PG_DSN)
    if problem:
        message = f"PostgreSQL at {PG_DSN} is not reachable: {problem}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return PG_DSN


def run_script(*args: str, cwd: Path, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env or child_env(), stdin=subprocess.DEVNULL)


def test_interactive_session_writes_checked_files(tmp_path: Path, postgres: str) -> None:
    pg = urlsplit(postgres)
    out = tmp_path / "etc"
    term = Terminal(["--output-dir", str(out)], tmp_path)
    term.answer(r"Mode \(production/development\) \[production\]: ", "")
    term.answer(r"Administrator e-mail.*: ", "not-an-email")
    term.expect(r"✗ 'not-an-email' is not an e-mail address")
    term.answer(r"Administrator e-mail.*: ", "ops@acme.test")
    term.answer(r"SIP domain phones register to \[pbx.local\]: ", "pbx.acme.test")
    # Network, first pass: a bad port is refused as typed, then an API/SIP port clash is
    # caught by the PBX rules and the section is asked again.
    term.answer(r"SIP bind address.*\[0.0.0.0\]: ", "")
    term.answer(r"SIP port \(UDP and TCP\) \[5060\]: ", "99999")
    term.expect(r"✗ 99999 is outside 1-65535")
    term.answer(r"SIP port \(UDP and TCP\) \[5060\]: ", "")
    term.answer(r"Address phones reach this PBX at.*: ", "192.0.2.10")
    term.answer(r"RTP port range start \(even\) \[10000\]: ", "")
    term.answer(r"RTP port range end \[20000\]: ", "")
    term.answer(r"Maximum concurrent calls \[100\]: ", "")
    term.answer(r"HTTP API port.*\[8080\]: ", "5060")
    term.expect(r"✗ api.port: api.port 5060 is already used by sip.port")
    term.expect(r"Please answer this section again.")
    term.answer(r"SIP bind address.*: ", "")
    term.answer(r"SIP port.*\[5060\]: ", "")
    term.answer(r"Address phones reach this PBX at.*\[192.0.2.10\]: ", "")
    term.answer(r"RTP port range start.*: ", "")
    term.answer(r"RTP port range end.*: ", "")
    term.answer(r"Maximum concurrent calls.*: ", "")
    term.answer(r"HTTP API port.*\[5060\]: ", "8080")
    # Database: the real PostgreSQL of the test environment.
    term.answer(r"Database \(sqlite/postgresql\) \[sqlite\]: ", "postgresql")
    term.answer(r"PostgreSQL host \[127.0.0.1\]: ", pg.hostname or "127.0.0.1")
    term.answer(r"PostgreSQL port \[5432\]: ", str(pg.port or 5432))
    term.answer(r"Database name \[pbx\]: ", pg.path.lstrip("/"))
    term.answer(r"User \[pbx\]: ", pg.username or "postgres")
    term.answer(r"Password \(hidden; Enter for none\): ", pg.password or "")
    term.answer(r"Test the connection now\? \(Y/n\) \[y\]: ", "")
    term.expect(r"✓ connected")
    # Security: generated token, no TLS, defaults.
    term.answer(r"Generate a new API token\? \(Y/n\) \[y\]: ", "")
    term.answer(r"Enable SIP over TLS.*\[n\]: ", "")
    term.answer(r"FIPS mode.*\[n\]: ", "")
    term.answer(r"Block addresses after repeated failed logins\? \(Y/n\) \[y\]: ", "")
    term.answer(r"Failures before blocking \[10\]: ", "")
    term.answer(r"Seconds an address stays blocked \[600\]: ", "")
    term.answer(r"Rate-limit requests per source address\? \(Y/n\) \[y\]: ", "")
    # Extensions: a weak password is refused, Enter generates one; a duplicate number is
    # refused; a strong typed password is accepted (and never echoed).
    term.answer(r"Extension number: ", "1001")
    term.answer(r"Name for 1001 \(optional\): ", "Reception")
    term.answer(r"Password \(hidden; Enter = generate a strong one\): ", "password1")
    term.expect(r"✗ refused: .*common passwords")
    term.answer(r"Password \(hidden; Enter = generate a strong one\): ", "")
    term.answer(r"Extension number: ", "1001")
    term.expect(r"✗ extension 1001 already exists")
    term.answer(r"Extension number: ", "1002")
    term.answer(r"Name for 1002 \(optional\): ", "")
    term.answer(r"Password \(hidden; Enter = generate a strong one\): ", TYPED_PASSWORD)
    term.answer(r"Extension number: ", "")
    term.expect(r"✓ Configuration is valid")
    term.answer(r"Write the files to .*\? \(Y/n\) \[y\]: ", "")
    token = term.expect(r"API token \(PBX_API__TOKEN\): (\S+)").group(1)
    generated = term.expect(r"extension 1001 password: (\S+)").group(1)
    assert term.wait() == 0, term.transcript

    config, env_file = out / "config.yml", out / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    env = dotenv_values(env_file)
    assert env["PBX_API__TOKEN"] == token
    assert env["PBX_EXT_1001_PASSWORD"] == generated
    assert env["PBX_EXT_1002_PASSWORD"] == TYPED_PASSWORD
    assert TYPED_PASSWORD not in term.transcript  # getpass kept it off the screen
    assert "password1" not in term.transcript
    assert env["PBX_AUTH__SECRET"] not in term.transcript  # not needed by anyone: not shown
    text = config.read_text()
    assert "# Administrator: ops@acme.test" in text
    for secret in (token, generated, TYPED_PASSWORD, env["PBX_AUTH__SECRET"]):
        assert secret not in text
    report = validate_file(config, check_connectivity=True)
    assert report.ok, report.codes()
    assert "DB_SQLITE_IN_PRODUCTION" not in report.codes()


def test_ctrl_d_aborts_without_writing(tmp_path: Path) -> None:
    term = Terminal(["--output-dir", str(tmp_path)], tmp_path)
    term.expect(r"Mode \(production/development\) \[production\]: ")
    os.write(term.fd, b"\x04")  # EOF at the start of a line
    term.expect("Aborted; nothing was written.")
    assert term.wait() == 1
    assert list(tmp_path.iterdir()) == []


def test_non_interactive_writes_and_backs_up(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("old: 1\n")
    (tmp_path / ".env").write_text("PBX_API__TOKEN=old-token\n")
    url = "postgresql://pbx:Xk29dLq8Wm4zQ7@db.acme.test:5432/pbx"
    env = child_env() | {"DB_URL_FOR_TEST": url}
    result = run_script("--non-interactive", "--output-dir", str(tmp_path), "--sip-port", "5070",
                        "--api-port", "8081", "--external-ip", "192.0.2.10", "--domain",
                        "pbx.acme.test", "--database-url-env", "DB_URL_FOR_TEST",
                        "--generate-token", "--extension", "1001:Reception",
                        "--extension", "1002", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Xk29dLq8Wm4zQ7" not in result.stdout + result.stderr
    backups = sorted(p.name for p in tmp_path.glob("*.bak-*"))
    assert [b.split(".bak-")[0] for b in backups] == [".env", "config.yml"]
    dotenv = dotenv_values(tmp_path / ".env")
    assert dotenv["PBX_DATABASE__URL"] == url
    assert set(dotenv) == {"PBX_API__TOKEN", "PBX_AUTH__SECRET", "PBX_DATABASE__URL",
                           "PBX_EXT_1001_PASSWORD", "PBX_EXT_1002_PASSWORD"}
    for name in ("PBX_API__TOKEN", "PBX_EXT_1001_PASSWORD", "PBX_EXT_1002_PASSWORD"):
        assert result.stdout.count(dotenv[name]) == 1  # shown exactly once
    config = (tmp_path / "config.yml").read_text()
    assert "port: 5070" in config and "port: 8081" in config and "Xk29dLq8Wm4zQ7" not in config

    check = run_script("validate", "--config", str(tmp_path / "config.yml"), cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert check.stdout.splitlines()[-1].startswith("✓ Configuration is valid")


def test_non_interactive_refuses_errors(tmp_path: Path) -> None:
    result = run_script("--non-interactive", "--output-dir", str(tmp_path), "--sip-port",
                        "10500", "--generate-token", cwd=tmp_path)
    assert result.returncode == 78
    assert "SERVER_PORT_IN_RTP_RANGE" in result.stdout
    assert "Nothing was written." in result.stderr
    assert list(tmp_path.iterdir()) == []
    # Missing token in production is an error, too.
    result = run_script("--non-interactive", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 78 and "API_TOKEN_MISSING" in result.stdout


def test_bad_flag_values_are_refused_by_the_parser(tmp_path: Path) -> None:
    result = run_script("--non-interactive", "--sip-port", "http", cwd=tmp_path)
    assert result.returncode == 2 and "'http' is not a number" in result.stderr
    result = run_script("--non-interactive", "--extension", "12a", cwd=tmp_path)
    assert result.returncode == 2 and "2-15 digits" in result.stderr


def test_validate_subcommand_reports_errors_as_json(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("sip:\n  port: 8080\n")
    result = run_script("validate", "--json", cwd=tmp_path)
    assert result.returncode == 78
    assert '"code": "SERVER_PORT_COLLISION"' in result.stdout
    (tmp_path / "config.yml").write_text("sip:\n  port: [\n")
    result = run_script("validate", cwd=tmp_path)
    assert result.returncode == 78 and "✗ Configuration has 1 error" in result.stdout
