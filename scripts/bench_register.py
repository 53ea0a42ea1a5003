#!/usr/bin/env python3
"""Authenticated REGISTER throughput of one PBX process, driven by SIPp.

Starts the real PBX (`twistd -n pbx`) on loopback with a fresh database (SQLite, or a
private schema in PostgreSQL), creates the extensions, then runs SIPp's digest
registration scenario at increasing rates. Each step must finish with zero failed
registrations and zero retransmissions; the highest such rate is reported.

    scripts/bench_register.py [--backend sqlite|postgresql|both] [--rates 1000,2000,...]
                              [--seconds 5] [--users 2000] [--json]

Only loopback traffic; every SIPp run is bounded by a call count and a timeout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import free_port, process_cpu, process_rss_mb

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "integration" / "scenarios" / "register.xml"
TWISTD = Path(sys.executable).with_name("twistd")
PBX = Path(sys.executable).with_name("pbx")
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Step:
    rate: int
    attempted: int
    succeeded: int
    failed: int
    retransmissions: int
    seconds: float
    cpu_us_per_registration: float = 0.0
    rss_mb: float = 0.0

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.retransmissions == 0 and self.succeeded == self.attempted

    @property
    def achieved(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0


def write_config(workdir: Path, port: int, db_url: str) -> Path:
    config = workdir / "config.yml"
    config.write_text(
        "sip:\n  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "api:\n  host: 127.0.0.1\n  port: 0\n"
        f"data_dir: {workdir / 'var'}\n"
        f"database:\n  url: {db_url}\n"
        "logging:\n  level: INFO\n"
        "security:\n  trusted_networks: [127.0.0.0/8]\n"
        # SIPp 3.6 answers only MD5 challenges and reads the first one offered.
        "auth:\n  algorithms: [MD5]\n",
        encoding="utf-8",
    )
    return config


def create_users(config: Path, count: int, env: dict[str, str], workdir: Path) -> Path:
    """Extensions via the real CLI path (hashes only), and SIPp's CSV of credentials."""
    code = (
        "import sys\n"
        "from twisted.internet import defer, task\n"
        "from pbx.config import load_settings\n"
        "from pbx.admin import add_extension\n"
        "from pbx.store import open_store\n"
        "settings = load_settings(sys.argv[1])\n"
        "users = [line.split(';') for line in open(sys.argv[2]).read().split()]\n"
        "@defer.inlineCallbacks\n"
        "def main(reactor):\n"
        "    store = open_store(settings.database_url, reactor=reactor)\n"
        "    yield store.migrate()\n"
        "    yield store.open()\n"
        "    for number, password in users:\n"
        "        yield add_extension(store, settings, number, password=password)\n"
        "    yield store.close()\n"
        "task.react(main)\n"
    )
    credentials = {str(100000 + i): secrets.token_hex(10) for i in range(count)}
    plain = workdir / "credentials.txt"
    plain.write_text("".join(f"{n};{p}\n" for n, p in credentials.items()), encoding="ascii")
    subprocess.run([sys.executable, "-c", code, str(config), str(plain)], check=True, env=env,
                   cwd=workdir)
    users = workdir / "users.csv"
    with users.open("w", encoding="ascii") as out:
        out.write("SEQUENTIAL\n")
        for number, password in credentials.items():
            out.write(f"{number};[authentication username={number} password={password}]\n")
    return users


def start_pbx(config: Path, env: dict[str, str], workdir: Path,
              profile: str | None = None) -> subprocess.Popen[bytes]:
    extra = ([f"--profile={profile}", "--profiler=cprofile", "--savestats"]
             if profile else [])
    proc = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", *extra, "pbx", "--config", str(config)],
        cwd=workdir, env=env, stdout=(workdir / "pbx.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "starting -> ready" in (workdir / "pbx.log").read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit("PBX did not become ready:\n" + (workdir / "pbx.log").read_text())


def run_step(sipp: str, port: int, users: Path, rate: int, seconds: float,
             workdir: Path, pid: int) -> Step:
    total = max(1, int(rate * seconds))
    stats = workdir / f"stat_{rate}.csv"
    cmd = [
        sipp, f"127.0.0.1:{port}", "-sf", str(SCENARIO), "-inf", str(users),
        "-key", "expires", "3600", "-r", str(rate), "-rp", "1000", "-m", str(total),
        "-l", str(max(rate * 2, 100)), "-t", "u1", "-i", "127.0.0.1", "-nostdin",
        "-timeout", str(int(seconds * 4 + 20)), "-timeout_error",
        "-trace_stat", "-stf", str(stats), "-fd", "1",
    ]
    started = time.monotonic()
    cpu_before = process_cpu(pid)
    subprocess.run(cmd, cwd=workdir, capture_output=True, timeout=seconds * 4 + 60)
    elapsed = time.monotonic() - started
    cpu = process_cpu(pid) - cpu_before
    rss = process_rss_mb(pid)
    rows = list(csv.DictReader(stats.open(encoding="ascii"), delimiter=";"))
    last = rows[-1] if rows else {}

    def value(name: str) -> int:
        raw = last.get(name, "0") or "0"
        match = re.match(r"\d+", raw.strip())
        return int(match.group()) if match else 0

    return Step(rate=rate, attempted=total, succeeded=value("SuccessfulCall(C)"),
                failed=value("FailedCall(C)"), retransmissions=value("Retransmissions(C)"),
                seconds=elapsed, cpu_us_per_registration=cpu / total * 1e6, rss_mb=rss)


def bench_backend(backend: str, args: argparse.Namespace, sipp: str) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_register_{backend}_"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_")}
    schema = None
    if backend == "sqlite":
        db_url = f"sqlite:///{workdir / 'var' / 'bench.sqlite3'}"
    else:
        import psycopg2

        dsn = os.environ.get("PBX_TEST_POSTGRES_DSN", DEFAULT_DSN)
        schema = "pbx_bench_" + secrets.token_hex(4)
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in dsn else "?"
        db_url = f"{dsn}{sep}options=-csearch_path%3D{schema}"
    port = free_port()
    config = write_config(workdir, port, db_url)
    users = create_users(config, args.users, env, workdir)
    profile = str(Path(args.profile).resolve()) if args.profile else None
    proc = start_pbx(config, env, workdir, profile)
    steps: list[Step] = []
    spy = None
    if args.py_spy:
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
             "--format", "raw", "--rate", "250", "--nonblocking", "--output",
             str(Path(args.py_spy).resolve())], stdout=subprocess.DEVNULL)
    try:
        for rate in args.rates:
            step = run_step(sipp, port, users, rate, args.seconds, workdir, proc.pid)
            steps.append(step)
            if not args.json:
                print(f"  {backend:<10} {rate:>6}/s offered: {step.succeeded}/{step.attempted} ok, "
                      f"{step.failed} failed, {step.retransmissions} retransmissions, "
                      f"{step.achieved:,.0f}/s achieved, "
                      f"{step.cpu_us_per_registration:.0f} µs PBX CPU/registration, "
                      f"RSS {step.rss_mb:.0f} MB")
            if not step.clean and not args.keep_going:
                break
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if schema is not None:
            import psycopg2

            dsn = os.environ.get("PBX_TEST_POSTGRES_DSN", DEFAULT_DSN)
            with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA {schema} CASCADE")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    clean = [s for s in steps if s.clean]
    best = max(clean, key=lambda s: s.rate) if clean else None
    return {
        "backend": backend,
        "sustained_rate": best.rate if best else 0,
        "achieved_rate": round(best.achieved) if best else 0,
        "steps": [s.__dict__ | {"clean": s.clean} for s in steps],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rates", default="500,1000,1500,2000,2500,3000",
                        type=lambda text: [int(x) for x in text.split(",")])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="duration of each rate step")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every rate step even after one that is not clean")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="sample the PBX with py-spy (pip install py-spy) into FILE, "
                             "as collapsed stacks")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the PBX under cProfile and save the stats to FILE")
    args = parser.parse_args(argv)
    sipp = shutil.which("sipp")
    if sipp is None:
        print("sipp is not installed (Debian package sip-tester)", file=sys.stderr)
        return 1
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        if not args.json:
            print(f"{backend}: authenticated registrations (REGISTER/401/REGISTER/200)")
        result = bench_backend(backend, args, sipp)
        results.append(result)
        if not args.json:
            print(f"{backend}: sustained {result['sustained_rate']} registrations/s with zero "
                  f"failures and zero retransmissions")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
