"""Helpers shared by the benchmark scripts that run a real PBX process on loopback.

The scripts are run as ``python scripts/bench_*.py``, which puts this directory on
``sys.path``; they import from here so the process probes exist once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["free_port", "process_cpu", "process_rss_mb"]


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port the kernel just handed out on 127.0.0.1 (free at the time of asking)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mb(pid: int) -> float:
    """Resident memory of the process in MiB (0 when it is gone)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
