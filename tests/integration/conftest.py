"""Run the real PBX (``twistd -n pbx``) as a subprocess on ephemeral loopback ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
TWISTD = Path(sys.executable).with_name("twistd")
LISTEN_RE = re.compile(r"listening: SIP (UDP|TCP|TLS) on (\S+):(\d+)")


@dataclass
class PBXProcess:
    """A running ``twistd -n pbx`` with its output collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTEN_RE.search(line)
            if match:
                self.ports[match.group(1).lower()] = int(match.group(3))

    def start_reader(self) -> None:
        threading.Thread(target=self._reader, daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            if self.proc.poll() is not None and not any(regex.search(x) for x in self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    @property
    def sip_port(self) -> int:
        return self.ports["udp"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def write_config(directory: Path, *, port: int = 0, extra: str = "") -> Path:
    """A config for a test PBX on loopback; ``extra`` is appended YAML (other sections)."""
    config = directory / "config.yml"
    config.write_text(
        "sip:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "api:\n"
        "  host: 127.0.0.1\n"
        "  port: 0\n"
        f"data_dir: {directory / 'var'}\n"
        "logging:\n"
        "  level: INFO\n" + extra,
        encoding="utf-8",
    )
    return config


def extension_seed(passwords: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``extensions:`` YAML lines seeding each number, and the environment that carries
    its password (``password_env``: secrets never go into config.yml)."""
    lines = ["extensions:"]
    env: dict[str, str] = {}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'User {number}', password_env: {var}}}")
        env[var] = password
    return lines, env


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_pbx(directory: Path, *args: str, env: dict[str, str] | None = None,
              extra: str = "", config: Path | None = None) -> PBXProcess:
    config = config or write_config(directory, extra=extra)
    cmd = [str(TWISTD), "--nodaemon", "--pidfile=", "pbx", "--config", str(config), *args]
    proc = subprocess.Popen(cmd, cwd=directory, env=env or clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pbx = PBXProcess(proc)
    pbx.start_reader()
    pbx.wait_for(r"lifecycle: starting -> ready")
    return pbx


@pytest.fixture
def pbx(tmp_path: Path) -> Iterator[PBXProcess]:
    process = start_pbx(tmp_path)
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
