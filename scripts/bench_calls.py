#!/usr/bin/env python3
"""Call benchmarks of one PBX process (``twistd -n pbx`` on loopback), driven by SIPp.

1. **Call setup rate** (``setup``): a SIPp UAS registered as extension 2002 answers every
   INVITE at once; a SIPp UAC (extension 2001, digest-authenticated: INVITE, 407, ACK,
   INVITE, 100, 200, ACK, BYE after ``--call-seconds``) places calls through the PBX at
   increasing rates for ``--seconds`` each.  A step is clean when every call succeeded on
   both SIPp sides; retransmissions are reported (a sign of a late PBX).  Reported: the
   highest clean rate, the PBX's CPU (per cent of one core and µs per call) and its CDRs.
2. **Concurrent relayed calls** (``media``): N calls held up at once, each streaming G.711
   µ-law (payload type 0, 20 ms, 50 packets/s) from the UAC (SIPp ``rtp_stream``) to the
   PBX, relayed to the UAS, echoed (SIPp ``-rtp_echo``) and relayed back.  Once all N are
   up, the PBX's own QoS (``GET /api/qos``) is sampled twice ``--hold`` seconds apart:
   loss = lost / expected packets over that window, per direction (``b_to_a`` is the echo,
   so it also shows what the PBX lost on the way out), packet rates and the PBX's CPU.
   Datagrams the kernel dropped for a full receive buffer (``/proc/net/udp``) are counted
   per owner (the PBX's relay ports, SIPp's one echo socket, SIPp's stream sockets, which
   never read what comes back) to tell whose loss it is.  A level passes when every call
   succeeded, ~50 packets/s flowed each way, and the PBX's share of the loss (the gaps
   minus the echo socket's own kernel drops) is < 0.1 %; the raw loss is shown as well.

    scripts/bench_calls.py [--only setup|media] [--rates 50,100,200,300,400]
                           [--seconds 10] [--levels 100,250,500] [--hold 10] [--json]
                           [--profile FILE] [--keep]

Only loopback traffic; every SIPp run is bounded by a call count and timeouts, and every
process started here is stopped by its pid.
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
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import free_port, process_cpu, process_rss_mb

ROOT = Path(__file__).resolve().parent.parent
REGISTER = ROOT / "tests" / "integration" / "scenarios" / "register.xml"
TWISTD = Path(sys.executable).with_name("twistd")
CALLER, CALLEE = "2001", "2002"
RTP_MIN, RTP_MAX = 10000, 19999  # the PBX's relay ports
UAC_MEDIA_BASE = 22000            # SIPp rtp_stream binds one port (pair) per call from here
PACKETS_PER_SECOND = 50

# The callee: answers at once (no 180), then waits for the PBX's ACK and BYE.
UAS_XML = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench-uas">
  <recv request="INVITE" crlf="true"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=- 2 2 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv request="ACK" crlf="true"/>
  <recv request="BYE"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <!-- answers a retransmitted BYE (the PBX did not get our 200) like a real phone -->
  <timewait milliseconds="4000"/>
</scenario>
"""

# The caller: digest-authenticated INVITE; optional RTP stream; BYE after -d ms.
UAC_XML = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench-uac">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      From: "Caller" <sip:[field0]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=- 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio {port} RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="407" auth="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      Max-Forwards: 70
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 1 ACK
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      From: "Caller" <sip:[field0]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
      To: <sip:[service]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 2 INVITE
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      [field1]
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=- 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio {port} RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 2 ACK
      Content-Length: 0

    ]]>
  </send>
  {media}
  <pause/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 3 BYE
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


# -- processes ----------------------------------------------------------------------------
def udp_drops() -> dict[int, int]:
    """Datagrams the kernel dropped per local UDP port (receive buffer full), all sockets."""
    drops: dict[int, int] = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        drops[port] = drops.get(port, 0) + int(fields[-1])
    return drops


def drops_by_owner(before: dict[int, int], after: dict[int, int],
                   echo_port: int) -> dict[str, int]:
    """Kernel drops between two readings: at the PBX's relay, SIPp's echo, SIPp's streams."""
    out = {"pbx": 0, "uas_echo": 0, "uac_streams": 0}
    for port, count in after.items():
        delta = count - before.get(port, 0)
        if delta <= 0:
            continue
        if RTP_MIN <= port <= RTP_MAX:
            out["pbx"] += delta
        elif port in (echo_port, echo_port + 2):
            out["uas_echo"] += delta
        elif UAC_MEDIA_BASE <= port < UAC_MEDIA_BASE + 8000:
            out["uac_streams"] += delta
    return out


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class PBX:
    proc: subprocess.Popen[bytes]
    log: Path
    sip_port: int
    api_port: int
    token: str
    db: Path

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def active_calls(self) -> int:
        return int(self.api("/api/calls")["active_calls"])

    def wait_idle(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        active = self.active_calls()
        while active and time.monotonic() < deadline:
            time.sleep(0.5)
            active = self.active_calls()
        return active

    def cdr_counts(self, since: float) -> dict[str, int]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute("SELECT disposition, count(*) FROM cdr WHERE start_time >= ? "
                              "GROUP BY disposition", (since,)).fetchall()
        return {str(k): int(v) for k, v in rows}


def start_pbx(workdir: Path, env: dict[str, str], profile: str | None) -> PBX:
    data = workdir / "var"
    config = workdir / "config.yml"
    config.write_text(
        "sip:\n  host: 127.0.0.1\n  port: 0\n"
        "api:\n  host: 127.0.0.1\n  port: 0\n  rate_limit: 1000\n  rate_burst: 1000\n"
        f"data_dir: {data}\n"
        "logging:\n  level: INFO\n"
        # SIPp answers only MD5 challenges and takes the first one offered.
        "auth:\n  algorithms: [MD5, SHA-256]\n"
        "security:\n  trusted_networks: [127.0.0.0/8]\n"
        "calls:\n  max_calls: 2000\n  ring_timeout: 30\n  media_timeout: 120\n"
        f"rtp:\n  port_min: {RTP_MIN}\n  port_max: {RTP_MAX}\n  codecs: [PCMU, PCMA]\n"
        "extensions:\n"
        f"  - {{number: '{CALLER}', name: Caller, password_env: PBX_EXT_{CALLER}_PASSWORD}}\n"
        f"  - {{number: '{CALLEE}', name: Callee, password_env: PBX_EXT_{CALLEE}_PASSWORD}}\n",
        encoding="utf-8")
    extra = ([f"--profile={profile}", "--profiler=cprofile", "--savestats"]
             if profile else [])
    log = workdir / "pbx.log"
    proc = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", *extra, "pbx", "--config", str(config)],
        cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "starting -> ready" in text:
            sip = re.search(r"listening: SIP UDP on [\d.]+:(\d+)", text)
            api = re.search(r"listening: API HTTP on [\d.]+:(\d+)", text)
            if sip and api:
                return PBX(proc, log, int(sip.group(1)), int(api.group(1)),
                           env["PBX_API__TOKEN"], data / "pbx.sqlite3")
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop(proc)
    raise SystemExit("PBX did not become ready:\n" + log.read_text(errors="replace")[-3000:])


# -- SIPp ---------------------------------------------------------------------------------
def last_stats(path: Path) -> dict[str, int]:
    """The cumulative counters of the last row of a SIPp statistics CSV."""
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open(encoding="ascii", errors="replace"), delimiter=";"))
    if not rows:
        return {}
    out = {}
    for name, raw in rows[-1].items():
        match = re.match(r"\s*(\d+)", raw or "")
        if name and match:
            out[name] = int(match.group(1))
    return out


class Phones:
    """The scenario files, the callee's registration and SIPp command lines."""

    def __init__(self, sipp: str, pbx: PBX, workdir: Path, passwords: dict[str, str]):
        self.sipp = sipp
        self.pbx = pbx
        self.workdir = workdir
        self.uas_port = free_port()
        (workdir / "uas.xml").write_text(UAS_XML, encoding="ascii")
        (workdir / "uac.xml").write_text(
            UAC_XML.replace("{port}", "[media_port]").replace("{media}", ""), encoding="ascii")
        audio = workdir / "tone.ulaw"
        audio.write_bytes(ulaw_tone(1000.0, 1.0))
        (workdir / "uac_media.xml").write_text(
            UAC_XML.replace("{port}", "[rtpstream_audio_port]").replace(
                "{media}", f'<nop><action><exec rtp_stream="{audio},-1,0"/></action></nop>'),
            encoding="ascii")
        self.csv = {}
        for number, password in passwords.items():
            path = workdir / f"{number}.csv"
            path.write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                            f"password={password}]\n", encoding="ascii")
            self.csv[number] = path
        result = subprocess.run(
            [sipp, f"127.0.0.1:{pbx.sip_port}", "-sf", str(REGISTER), "-m", "1",
             "-inf", str(self.csv[CALLEE]), "-p", str(self.uas_port), "-key", "expires",
             "3600", "-i", "127.0.0.1", "-nostdin", "-timeout", "20", "-timeout_error"],
            cwd=workdir, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SystemExit(f"the callee did not register: {result.stdout[-2000:]}")

    def uas(self, name: str, limit: int, *extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.sipp, f"127.0.0.1:{self.pbx.sip_port}", "-sf", str(self.workdir / "uas.xml"),
             "-p", str(self.uas_port), "-i", "127.0.0.1", "-nostdin", "-l", str(limit),
             "-t", "u1", "-trace_stat", "-stf", str(self.workdir / f"{name}_uas.csv"),
             "-fd", "1", *extra],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def uac(self, name: str, scenario: str, rate: float, total: int, duration_ms: int,
            *extra: str) -> list[str]:
        return [
            self.sipp, f"127.0.0.1:{self.pbx.sip_port}", "-sf", str(self.workdir / scenario),
            "-inf", str(self.csv[CALLER]), "-s", CALLEE,
            "-auth_uri", f"{CALLEE}@127.0.0.1:{self.pbx.sip_port}",
            "-r", f"{rate:g}", "-rp", "1000", "-m", str(total), "-l", str(total),
            "-d", str(duration_ms), "-t", "u1", "-p", str(free_port()), "-i", "127.0.0.1",
            "-nostdin", "-recv_timeout", "15000", "-timeout", str(int(total / rate) + 120),
            "-trace_stat", "-stf", str(self.workdir / f"{name}_uac.csv"), "-fd", "1", *extra]


def ulaw_tone(freq: float, seconds: float) -> bytes:
    """G.711 µ-law bytes of a sine (any payload relays the same; a tone is easy to check)."""
    import math

    out = bytearray()
    for n in range(int(8000 * seconds)):
        sample = int(8000 * math.sin(2 * math.pi * freq * n / 8000))
        sign = 0x80 if sample < 0 else 0
        magnitude = min(abs(sample) + 132, 32635)
        exponent = max(0, magnitude.bit_length() - 8)
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
        out.append(~(sign | (exponent << 4) | mantissa) & 0xFF)
    return bytes(out)


# -- benchmark 1: call setups per second --------------------------------------------------
@dataclass
class SetupStep:
    rate: int
    attempted: int
    succeeded: int
    failed: int
    uas_failed: int
    retransmissions: int
    uas_retransmissions: int
    seconds: float
    cpu_percent: float
    cpu_us_per_call: float
    rss_mb: float
    leftover_calls: int = 0
    sip_kernel_drops: int = 0
    cdr: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return (self.failed == 0 and self.uas_failed == 0 and self.leftover_calls == 0
                and self.succeeded == self.attempted)


def setup_step(phones: Phones, rate: int, seconds: float, call_ms: int) -> SetupStep:
    pbx = phones.pbx
    total = max(1, int(rate * seconds))
    name = f"setup_{rate}"
    uas = phones.uas(name, max(rate * (call_ms // 1000 + 10), 200))
    time.sleep(0.5)
    since = time.time()
    drops0 = udp_drops().get(pbx.sip_port, 0)
    cpu0, wall0 = process_cpu(pbx.proc.pid), time.monotonic()
    try:
        subprocess.run(phones.uac(name, "uac.xml", rate, total, call_ms), cwd=phones.workdir,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=seconds * 4 + 180)
        elapsed = time.monotonic() - wall0
        cpu = process_cpu(pbx.proc.pid) - cpu0
        sip_drops = udp_drops().get(pbx.sip_port, 0) - drops0
        leftover = pbx.wait_idle()
        time.sleep(1.5)  # the UAS's last stats row
    finally:
        stop(uas)
    uac_stats = last_stats(phones.workdir / f"{name}_uac.csv")
    uas_stats = last_stats(phones.workdir / f"{name}_uas.csv")
    return SetupStep(
        rate=rate, attempted=total, succeeded=uac_stats.get("SuccessfulCall(C)", 0),
        failed=uac_stats.get("FailedCall(C)", 0), uas_failed=uas_stats.get("FailedCall(C)", 0),
        retransmissions=uac_stats.get("Retransmissions(C)", 0),
        uas_retransmissions=uas_stats.get("Retransmissions(C)", 0), seconds=round(elapsed, 2),
        cpu_percent=round(100 * cpu / elapsed, 1), cpu_us_per_call=round(cpu / total * 1e6),
        rss_mb=round(process_rss_mb(pbx.proc.pid), 1), leftover_calls=leftover,
        sip_kernel_drops=sip_drops,
        cdr=pbx.cdr_counts(since))


# -- benchmark 2: concurrent relayed calls ------------------------------------------------
@dataclass
class MediaLevel:
    calls: int
    up: int
    succeeded: int
    failed: int
    window_seconds: float
    a_to_b_pps: float
    b_to_a_pps: float
    a_to_b_loss_pct: float
    b_to_a_loss_pct: float
    a_to_b_lost: int
    b_to_a_lost: int
    pbx_loss_pct: float
    stale_calls: int
    dropped: int
    kernel_drops: dict[str, int]
    cpu_percent: float
    rss_mb: float
    mos_min: float | None
    cdr: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """All calls up and ended well, the offered 50 packets/s each way actually flowed,
        and the PBX lost < 0.1 %: the echo's losses at SIPp's own socket are not its."""
        nominal = 0.98 * PACKETS_PER_SECOND
        return (self.failed == 0 and self.succeeded == self.calls and self.up == self.calls
                and self.a_to_b_pps >= nominal and self.b_to_a_pps >= nominal
                and self.pbx_loss_pct < 0.1)


def call_ids(pbx: PBX) -> set[str]:
    return {str(call.get("call_id")) for call in pbx.api("/api/qos")["calls"]}


def qos_totals(pbx: PBX, ignore: set[str]) -> dict[str, Any]:
    """QoS summed over the calls up now, except ``ignore`` (calls of an earlier run)."""
    calls = [c for c in pbx.api("/api/qos")["calls"] if str(c.get("call_id")) not in ignore]
    totals: dict[str, Any] = {"calls": len(calls), "dropped": 0, "mos": []}
    for direction in ("a_to_b", "b_to_a"):
        totals[direction] = {"packets": 0, "lost": 0}
    for call in calls:
        qos = call.get("qos") or {}
        for direction in ("a_to_b", "b_to_a"):
            stats = qos.get(direction) or {}
            totals[direction]["packets"] += int(stats.get("packets") or 0)
            totals[direction]["lost"] += int(stats.get("lost") or 0)
            totals["dropped"] += int(stats.get("dropped") or 0)
        if qos.get("mos") is not None:
            totals["mos"].append(float(qos["mos"]))
    return totals


def media_level(phones: Phones, calls: int, ramp_rate: float, hold: float) -> MediaLevel:
    pbx = phones.pbx
    name = f"media_{calls}"
    ramp = calls / ramp_rate
    duration_ms = int((ramp + hold + 8) * 1000)
    stale = call_ids(pbx)  # calls an earlier run left behind in the PBX, if any
    echo_port = free_port()
    uas = phones.uas(name, calls + 50, "-rtp_echo", "-mp", str(echo_port))
    time.sleep(0.5)
    since = time.time()
    uac = subprocess.Popen(
        phones.uac(name, "uac_media.xml", ramp_rate, calls, duration_ms,
                   "-mp", str(UAC_MEDIA_BASE)),
        cwd=phones.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + ramp + 20
        up = pbx.active_calls() - len(stale)
        while up < calls and time.monotonic() < deadline and uac.poll() is None:
            time.sleep(0.5)
            up = pbx.active_calls() - len(stale)
        time.sleep(2.0)  # every stream running
        first = qos_totals(pbx, stale)
        drops0 = udp_drops()
        cpu0, wall0 = process_cpu(pbx.proc.pid), time.monotonic()
        time.sleep(hold)
        drops = drops_by_owner(drops0, udp_drops(), echo_port)
        second = qos_totals(pbx, stale)
        window = time.monotonic() - wall0
        cpu = process_cpu(pbx.proc.pid) - cpu0
        rss = process_rss_mb(pbx.proc.pid)
        uac.wait(duration_ms / 1000 + ramp + 180)
        pbx.wait_idle()
        time.sleep(1.5)
    finally:
        stop(uac)
        stop(uas)
    uac_stats = last_stats(phones.workdir / f"{name}_uac.csv")
    rates, losses, lost, expected = {}, {}, {}, {}
    for direction in ("a_to_b", "b_to_a"):
        packets = second[direction]["packets"] - first[direction]["packets"]
        missing = second[direction]["lost"] - first[direction]["lost"]
        rates[direction] = round(packets / window / max(1, first["calls"]), 2)
        losses[direction] = round(100 * missing / (packets + missing), 4) if packets else 100.0
        lost[direction] = missing
        expected[direction] = packets + missing
    # Gaps in the echo (b_to_a) are the PBX's (not forwarded, or dropped at its sockets)
    # or SIPp's (its single echo socket overflowing, counted by the kernel).
    pbx_lost = lost["a_to_b"] + max(0, lost["b_to_a"] - drops["uas_echo"])
    total = expected["a_to_b"] + expected["b_to_a"]
    pbx_loss = round(100 * max(pbx_lost, drops["pbx"]) / total, 4) if total else 100.0
    return MediaLevel(
        calls=calls, up=min(first["calls"], second["calls"]),
        succeeded=uac_stats.get("SuccessfulCall(C)", 0),
        failed=uac_stats.get("FailedCall(C)", 0), window_seconds=round(window, 2),
        a_to_b_pps=rates["a_to_b"], b_to_a_pps=rates["b_to_a"],
        a_to_b_loss_pct=losses["a_to_b"], b_to_a_loss_pct=losses["b_to_a"],
        a_to_b_lost=lost["a_to_b"], b_to_a_lost=lost["b_to_a"], pbx_loss_pct=pbx_loss,
        stale_calls=len(stale),
        dropped=second["dropped"] - first["dropped"], kernel_drops=drops,
        cpu_percent=round(100 * cpu / window, 1), rss_mb=round(rss, 1),
        mos_min=min(second["mos"]) if second["mos"] else None, cdr=pbx.cdr_counts(since))


# -- main ---------------------------------------------------------------------------------
def integers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def phone_environment() -> tuple[dict[str, str], dict[str, str]]:
    """Fresh passwords for the two bench extensions, and the PBX's environment (no
    inherited ``PBX_*``, the passwords and an API token)."""
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBX_")}
    env |= {f"PBX_EXT_{n}_PASSWORD": p for n, p in passwords.items()}
    env["PBX_API__TOKEN"] = secrets.token_hex(16)
    return passwords, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["setup", "media"])
    parser.add_argument("--rates", type=integers, default=integers("50,100,200,300,400"),
                        help="call setup rates (calls/s), one step each")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of a rate step")
    parser.add_argument("--call-seconds", type=float, default=1.0,
                        help="how long each call of the setup benchmark stays up")
    parser.add_argument("--levels", type=integers, default=integers("100,250,500"),
                        help="numbers of concurrent relayed calls, one run each")
    parser.add_argument("--ramp-rate", type=float, default=50.0,
                        help="calls/s at which a media level's calls are placed")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds over which loss and CPU are measured, all calls up")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every step even after one that is not clean")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the PBX under cProfile and save the stats to FILE")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    sipp = shutil.which("sipp")
    if sipp is None:
        print("sipp is not installed (Debian package sip-tester)", file=sys.stderr)
        return 1
    say = (lambda *a: None) if args.json else print
    workdir = Path(tempfile.mkdtemp(prefix="bench_calls_"))
    passwords, env = phone_environment()
    profile = str(Path(args.profile).resolve()) if args.profile else None
    pbx = start_pbx(workdir, env, profile)
    result: dict[str, Any] = {"pbx_pid": pbx.proc.pid, "cpus": os.cpu_count()}
    try:
        phones = Phones(sipp, pbx, workdir, passwords)
        if args.only in (None, "setup"):
            say(f"call setups: INVITE/407/ACK/INVITE/200/ACK, BYE after {args.call_seconds:g}"
                f" s, {args.seconds:g} s per rate")
            steps = []
            for rate in args.rates:
                step = setup_step(phones, rate, args.seconds, int(args.call_seconds * 1000))
                steps.append(step)
                say(f"  {rate:>5} calls/s offered: {step.succeeded}/{step.attempted} ok, "
                    f"{step.failed} failed (UAS {step.uas_failed}), retransmissions "
                    f"{step.retransmissions} caller / {step.uas_retransmissions} callee, "
                    f"PBX CPU {step.cpu_percent:.0f}% of a core "
                    f"({step.cpu_us_per_call} µs/call), SIP datagrams dropped by the kernel "
                    f"{step.sip_kernel_drops}, RSS {step.rss_mb:.0f} MB, CDR {step.cdr}"
                    + (f", {step.leftover_calls} calls still up 60 s later"
                       if step.leftover_calls else ""))
                if not step.clean and not args.keep_going:
                    break
            clean = [s for s in steps if s.clean]
            best = max(clean, key=lambda s: s.rate) if clean else None
            result["setup"] = {"sustained_rate": best.rate if best else 0,
                               "steps": [asdict(s) | {"clean": s.clean} for s in steps]}
            say(f"call setups: sustained {best.rate if best else 0} calls/s with zero failed "
                f"calls (target >= 300)")
        if args.only in (None, "media"):
            say(f"relayed G.711 calls: {PACKETS_PER_SECOND} packets/s each way per call, loss "
                f"over {args.hold:g} s with all calls up")
            levels = []
            for calls in args.levels:
                level = media_level(phones, calls, args.ramp_rate, args.hold)
                levels.append(level)
                say(f"  {calls:>5} calls: {level.up} up, {level.succeeded} ok / {level.failed} "
                    f"failed; per call {level.a_to_b_pps:.1f} pps caller->callee, "
                    f"{level.b_to_a_pps:.1f} pps echo; loss {level.a_to_b_loss_pct:.3f}% / "
                    f"{level.b_to_a_loss_pct:.3f}% ({level.a_to_b_lost}/{level.b_to_a_lost} "
                    f"packets; PBX's share {level.pbx_loss_pct:.3f}%), latch-dropped "
                    f"{level.dropped}, kernel drops "
                    f"{level.kernel_drops}, MOS min {level.mos_min}, PBX CPU "
                    f"{level.cpu_percent:.0f}% of a core, RSS {level.rss_mb:.0f} MB")
                if not level.clean and not args.keep_going:
                    break
            clean_levels = [lv for lv in levels if lv.clean]
            top = max(clean_levels, key=lambda lv: lv.calls) if clean_levels else None
            result["media"] = {"sustained_calls": top.calls if top else 0,
                               "levels": [asdict(lv) | {"clean": lv.clean} for lv in levels]}
            say(f"relayed calls: sustained {top.calls if top else 0} concurrent calls with "
                f"loss < 0.1% at the PBX (target >= 500)")
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
