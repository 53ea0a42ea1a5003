#!/usr/bin/env python3
"""Does a PBX give back the memory of its calls?  (issue 11.6: within 5 MB after 10,000)

One PBX process (``twistd -n pbx`` on loopback, as scripts/bench_calls.py starts it),
SIPp as both phones (bench_calls' scenarios: a digest-authenticated caller, a callee
that answers at once; every call gets a relayed media session, no RTP is sent):

1. **warm-up**: ``--warmup`` calls, so that first-use allocations (code paths, caches,
   interned strings, the allocator's arenas, tables sized by a load peak) are made;
   then wait until no call is up and every transaction has expired (Timer J/H/D/M,
   ~32 s) — the RSS then is the *start*;
2. ``--calls`` short calls at ``--rate`` calls/s (BYE after ``--call-ms``);
3. wait again for the calls and their transactions to be gone, then ``--settle`` s —
   the RSS then is the *end*.

Printed: RSS at ready, start, peak during the calls, end, end - start (the figure the
issue bounds), and from ``/metrics`` the collector's view: full collections, unreachable
objects it freed per call (what reference cycles calls leave), the largest pause.
``--rounds N`` repeats step 2-3 to tell growth that continues from a one-off plateau.

    scripts/bench_memory.py [--calls 10000] [--rate 200] [--call-ms 200]
                            [--warmup 1000] [--rounds 1] [--settle 5] [--json] [--keep]

Only loopback traffic; every SIPp run is bounded by a call count and timeouts, and every
process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_calls import (
    PBX,
    Phones,
    last_stats,
    phone_environment,
    start_pbx,
    stop,
)
from benchlib import process_rss_mb

_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$")


def metrics(pbx: PBX) -> dict[str, float]:
    """``name{labels}`` -> value of one scrape of ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{pbx.api_port}/metrics",
                                timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def live_transactions(pbx: PBX) -> int:
    return int(sum(v for k, v in metrics(pbx).items()
                   if k.startswith("pbx_sip_transactions_active{")))


def wait_quiet(pbx: PBX, timeout: float = 120.0) -> tuple[int, int, float]:
    """Until no call is up and no transaction is alive: (calls, transactions, seconds)."""
    start = time.monotonic()
    deadline = start + timeout
    calls, txns = pbx.active_calls(), live_transactions(pbx)
    while (calls or txns) and time.monotonic() < deadline:
        time.sleep(1.0)
        calls, txns = pbx.active_calls(), live_transactions(pbx)
    return calls, txns, time.monotonic() - start


def run_calls(phones: Phones, name: str, total: int, rate: float,
              call_ms: int) -> tuple[dict[str, int], float]:
    """``total`` calls through the PBX; SIPp's counters and the peak RSS seen."""
    pbx = phones.pbx
    uas = phones.uas(name, max(500, int(rate * (call_ms / 1000 + 10))))
    time.sleep(0.5)
    peak = 0.0
    try:
        uac = subprocess.Popen(phones.uac(name, "uac.xml", rate, total, call_ms),
                               cwd=phones.workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + total / rate * 4 + 180
            while uac.poll() is None and time.monotonic() < deadline:
                peak = max(peak, process_rss_mb(pbx.proc.pid))
                time.sleep(0.5)
        finally:
            stop(uac)
        time.sleep(1.5)  # the UAS's last stats row
    finally:
        stop(uas)
    return last_stats(phones.workdir / f"{name}_uac.csv"), peak


def gc_view(before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, Any]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    freed = sum(delta(f'pbx_gc_collected_objects_total{{generation="{g}"}}')
                for g in range(3))
    return {
        "full_collections": int(delta('pbx_gc_collections_total{generation="2"}')),
        "young_collections": int(delta('pbx_gc_collections_total{generation="1"}')),
        "unreachable_freed": int(freed),
        "unreachable_per_call": round(freed / calls, 2) if calls else 0.0,
        "max_pause_ms": {g: round(1000 * after.get(
            f'pbx_gc_max_pause_seconds{{generation="{g}"}}', 0.0), 2) for g in range(3)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0, help="calls/s offered")
    parser.add_argument("--call-ms", type=int, default=200, help="how long each call is up")
    parser.add_argument("--warmup", type=int, default=1000, help="calls before the start")
    parser.add_argument("--rounds", type=int, default=1, help="runs of --calls calls")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the last transaction expired")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    sipp = shutil.which("sipp")
    if sipp is None:
        print("sipp is not installed (Debian package sip-tester)", file=sys.stderr)
        return 1
    say = (lambda *a: None) if args.json else print
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    passwords, env = phone_environment()
    pbx = start_pbx(workdir, env, None)
    result: dict[str, Any] = {"pbx_pid": pbx.proc.pid, "calls": args.calls,
                              "rate": args.rate, "rounds": []}
    try:
        phones = Phones(sipp, pbx, workdir, passwords)
        ready = process_rss_mb(pbx.proc.pid)
        result["rss_ready_mb"] = round(ready, 1)
        say(f"RSS at ready: {ready:.1f} MB")
        if args.warmup:
            stats, _ = run_calls(phones, "warmup", args.warmup, args.rate, args.call_ms)
            calls, txns, waited = wait_quiet(pbx)
            time.sleep(args.settle)
            say(f"warm-up: {stats.get('SuccessfulCall(C)', 0)}/{args.warmup} calls ok, "
                f"quiet after {waited:.0f} s ({calls} calls, {txns} transactions left)")
        start = process_rss_mb(pbx.proc.pid)
        result["rss_start_mb"] = round(start, 1)
        say(f"RSS at start: {start:.1f} MB")
        for n in range(1, args.rounds + 1):
            before = metrics(pbx)
            t0 = time.monotonic()
            stats, peak = run_calls(phones, f"round{n}", args.calls, args.rate, args.call_ms)
            elapsed = time.monotonic() - t0
            calls, txns, waited = wait_quiet(pbx)
            time.sleep(args.settle)
            end = process_rss_mb(pbx.proc.pid)
            view = gc_view(before, metrics(pbx), args.calls)
            row = {"round": n, "succeeded": stats.get("SuccessfulCall(C)", 0),
                   "failed": stats.get("FailedCall(C)", 0), "seconds": round(elapsed, 1),
                   "rss_peak_mb": round(peak, 1), "rss_end_mb": round(end, 1),
                   "growth_mb": round(end - start, 2), "calls_left": calls,
                   "transactions_left": txns, "gc": view}
            result["rounds"].append(row)
            say(f"round {n}: {row['succeeded']}/{args.calls} calls ok ({row['failed']} "
                f"failed) in {elapsed:.0f} s; quiet after {waited:.0f} s ({calls} calls, "
                f"{txns} transactions left); RSS peak "
                f"{peak:.1f} MB, end {end:.1f} MB: {end - start:+.2f} MB from the start "
                f"(target within 5 MB); GC: {view['full_collections']} full / "
                f"{view['young_collections']} young collections, "
                f"{view['unreachable_per_call']} unreachable objects freed per call, "
                f"largest pause {view['max_pause_ms']} ms by generation")
    finally:
        stop(pbx.proc, timeout=60)
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
