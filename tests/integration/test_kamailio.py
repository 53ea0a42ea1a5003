"""Drain behind a real SIP load balancer: Kamailio's dispatcher in front of two PBX nodes.

Two ``twistd -n pbx`` nodes (own SIP/API ports and RTP ranges) share one PostgreSQL
schema (extensions, CDRs) and one digest secret; Kamailio runs
``docs/deploy/kamailio/dispatcher.cfg`` on loopback, probing both with OPTIONS every
second.  A SIPp caller sends a steady load (5 calls/s, 2 s each) through Kamailio; one
node gets SIGTERM mid-run.  No call may fail: the draining node answers new INVITEs and
OPTIONS with 503, Kamailio fails over and marks it inactive, its established calls end
normally (in-dialog requests follow the dialog's node), and it exits 0.  Every call has a
closed CDR in the shared database.

Limitation (documented in dispatcher.cfg too): each node keeps registrations in memory,
so the SIPp callee registers with *both* nodes directly (REGISTER to each node's own
port); either node can then route calls to it.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import require_tool

from .conftest import ROOT, SCENARIOS, PBXProcess, clean_env, free_port, start_pbx, write_config
from .store_fixtures import PG_DSN, pg_admin, require_postgres
from .test_drain import TOKEN, api_base, http, sip_transaction, status_of, wait_connected

pytestmark = pytest.mark.integration

KAMAILIO_CFG = ROOT / "docs" / "deploy" / "kamailio" / "dispatcher.cfg"
CALLER, CALLEE = "2201", "2202"
RATE, CALL_MS = 5, 2000
CALLS = 65              # 13 s of load at 5 calls/s
DRAIN_AFTER = 5.0       # seconds into the run when node A gets SIGTERM
RTP_BASE = random.randrange(48000, 52000, 800)   # node A; node B +400 (100 calls each)


@dataclass
class Node:
    name: str
    pbx: PBXProcess
    tmp: Path

    @property
    def port(self) -> int:
        return self.pbx.sip_port


def start_node(tmp: Path, name: str, url: str, rtp_base: int, passwords: dict[str, str],
               secret: str) -> Node:
    directory = tmp / name
    directory.mkdir()
    lines = [
        "auth:", "  algorithms: [MD5, SHA-256]",   # SIPp answers MD5 only
        "security:", "  rate_limit:", "    requests_per_second: 2000", "    burst: 4000",
        "calls:", "  ring_timeout: 5", "  media_timeout: 60", "  max_calls: 100",
        "rtp:", f"  port_min: {rtp_base}", f"  port_max: {rtp_base + 399}",
        "lifecycle:", "  drain_timeout: 20",
        "database:", f"  url: '{url}'",
        "extensions:",
    ]
    # Both nodes accept each other's nonces (shared secret, from the environment).
    env = clean_env() | {"PBX_AUTH__SECRET": secret}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'User {number}', password_env: {var}}}")
        env[var] = password
    config = write_config(directory, extra="\n".join(lines) + "\n")
    return Node(name, start_pbx(directory, env=env, config=config), directory)


class Kamailio:
    """``kamailio -DD -E`` on loopback with the shipped dispatcher.cfg."""

    def __init__(self, tool: str, tmp: Path, ports: list[int]) -> None:
        self.port = free_port()
        ds_list = tmp / "dispatcher.list"
        ds_list.write_text("".join(f"1 sip:127.0.0.1:{port} 0 0\n" for port in ports),
                           encoding="ascii")
        rundir = tmp / "kamailio-run"
        rundir.mkdir()
        self.log = tmp / "kamailio.log"
        self.cmd = [tool, "-f", str(KAMAILIO_CFG), "-DD", "-E", "-Y", str(rundir),
                    "-m", "64", "-M", "8", "-A", f"LISTEN=udp:127.0.0.1:{self.port}",
                    "-A", f'DS_LIST_FILE="{ds_list}"', "-A", "DS_PING_INTERVAL=1",
                    "-A", "CHILDREN=2"]
        check = subprocess.run([*self.cmd[:3], "-c", *self.cmd[3:]], capture_output=True,
                               text=True, timeout=30, cwd=tmp)
        assert check.returncode == 0, check.stderr[-3000:]
        self._out = self.log.open("w")
        # Its own session: the workers it forks are ended with it (by its group id).
        self.proc = subprocess.Popen(self.cmd, cwd=tmp, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_answering()

    def _wait_answering(self, timeout: float = 10.0) -> None:
        """Until an OPTIONS to the balancer itself gets its own 200."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.2)
            local = sock.getsockname()[1]
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.text()[-3000:]
                branch = "z9hG4bK" + secrets.token_hex(8)
                sock.sendto((f"OPTIONS sip:127.0.0.1:{self.port} SIP/2.0\r\n"
                             f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch={branch}\r\n"
                             f"From: <sip:probe@127.0.0.1>;tag={branch[-8:]}\r\n"
                             f"To: <sip:127.0.0.1:{self.port}>\r\nCall-ID: {branch}\r\n"
                             "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                             "Content-Length: 0\r\n\r\n").encode(),
                            ("127.0.0.1", self.port))
                try:
                    if sock.recv(65535).startswith(b"SIP/2.0 200"):
                        return
                except TimeoutError:
                    continue
        raise AssertionError("kamailio does not answer:\n" + self.text()[-3000:])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds until a log line matches ``pattern``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if re.search(pattern, self.text()):
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"kamailio never logged {pattern!r}:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            pass
        else:  # a worker outlived the main process
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._out.close()


def sipp_cmd(sipp: str, port: int, scenario: str, tmp: Path, *extra: str) -> list[str]:
    return [sipp, f"127.0.0.1:{port}", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1",
            "-nostdin", "-timeout", "60", "-timeout_error", "-trace_err",
            "-error_file", str(tmp / f"{scenario}.errors"), *extra]


def sipp_report(proc_out: str, tmp: Path, scenario: str) -> str:
    errors = tmp / f"{scenario}.errors"
    return proc_out[-2000:] + "\n" + (errors.read_text()[-2000:] if errors.exists() else "")


def counts(out: str) -> tuple[int, int]:
    ok = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", out)
    return (int(ok.group(1)) if ok else -1, int(failed.group(1)) if failed else -1)


def invites_by_node(message_log: Path) -> list[tuple[float, int]]:
    """(arrival time, PBX node SIP port) of each INVITE the callee received, from
    SIPp's -trace_msg log (the node's own Via is the top one)."""
    text = message_log.read_text(errors="replace")
    found = []
    for block in text.split("----------------------------------------------- ")[1:]:
        header, _, rest = block.partition("\n")
        if "message received" not in rest.split("\n", 1)[0]:
            continue
        message = rest.split("\n", 2)[-1].lstrip("\n")
        if not message.startswith("INVITE "):
            continue
        via = re.search(r"^Via: SIP/2\.0/UDP [\d.]+:(\d+)", message, re.M)
        assert via is not None, message[:300]
        stamp = datetime.strptime(header.strip(), "%Y-%m-%d %H:%M:%S.%f")  # local time
        found.append((stamp.timestamp(), int(via.group(1))))
    return found


def test_drain_behind_kamailio_loses_no_call(sipp: str, tmp_path: Path) -> None:
    kamailio_bin = require_tool("kamailio", "kamailio")
    require_postgres()
    schema = "pbx_test_" + secrets.token_hex(4)
    pg_admin(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_DSN else "?"
    url = f"{PG_DSN}{sep}options=-csearch_path%3D{schema}"
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    secret = secrets.token_hex(16)
    nodes: list[Node] = []
    procs: list[subprocess.Popen[str]] = []
    kamailio: Kamailio | None = None
    try:
        # One after the other: the first one creates the shared schema.
        nodes.append(start_node(tmp_path, "a", url, RTP_BASE, passwords, secret))
        nodes.append(start_node(tmp_path, "b", url, RTP_BASE + 400, passwords, secret))
        node_a, node_b = nodes
        kamailio = Kamailio(kamailio_bin, tmp_path, [n.port for n in nodes])

        csv = {}
        for number, password in passwords.items():
            csv[number] = tmp_path / f"{number}.csv"
            csv[number].write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                                   f"password={password}]\n", encoding="ascii")
        # The callee registers with each node directly (registrations live in memory).
        uas_port = free_port()
        for node in nodes:
            result = subprocess.run(
                sipp_cmd(sipp, node.port, "register.xml", tmp_path, "-m", "1", "-inf",
                         str(csv[CALLEE]), "-p", str(uas_port), "-key", "expires", "600"),
                capture_output=True, text=True, timeout=30, cwd=tmp_path)
            assert result.returncode == 0, sipp_report(result.stdout, tmp_path,
                                                       "register.xml")
        # The caller registers through Kamailio: REGISTER is balanced too.
        result = subprocess.run(
            sipp_cmd(sipp, kamailio.port, "register.xml", tmp_path, "-m", "1", "-inf",
                     str(csv[CALLER]), "-p", str(free_port()), "-key", "expires", "600"),
            capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 0, (sipp_report(result.stdout, tmp_path, "register.xml")
                                        + kamailio.text()[-3000:])

        uas_log = tmp_path / "uas_messages.log"
        uas = subprocess.Popen(
            sipp_cmd(sipp, node_a.port, "uas_answer.xml", tmp_path, "-m", str(CALLS),
                     "-p", str(uas_port), "-mp", str(free_port()), "-trace_msg",
                     "-message_file", str(uas_log)),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(uas)
        uac_log = tmp_path / "uac_messages.log"
        uac = subprocess.Popen(
            sipp_cmd(sipp, kamailio.port, "drain_uac_lb.xml", tmp_path, "-m", str(CALLS),
                     "-r", str(RATE), "-d", str(CALL_MS), "-inf", str(csv[CALLER]),
                     "-s", CALLEE, "-p", str(free_port()), "-mp", str(free_port()),
                     "-auth_uri", f"{CALLEE}@127.0.0.1:{kamailio.port}",
                     "-trace_msg", "-message_file", str(uac_log)),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(uac)

        time.sleep(DRAIN_AFTER)
        assert uac.poll() is None, "the load ended before the drain"
        drained_at = time.time()
        node_a.pbx.proc.send_signal(signal.SIGTERM)
        # Node A's calls are 2 s long: it finishes them and exits 0 well within the run.
        assert node_a.pbx.proc.wait(12) == 0, "\n".join(node_a.pbx.lines[-30:])
        a_exit = time.time() - drained_at
        assert uac.poll() is None, "node A was expected to exit while the load still ran"

        uac_out, _ = uac.communicate(timeout=40)
        uas_out, _ = uas.communicate(timeout=15)
        k_log = kamailio.text()
        assert uac.returncode == 0, (sipp_report(uac_out, tmp_path, "drain_uac_lb.xml")
                                     + k_log[-3000:])
        assert counts(uac_out) == (CALLS, 0), uac_out[-2000:]
        assert uas.returncode == 0, sipp_report(uas_out, tmp_path, "uas_answer.xml")
        assert counts(uas_out) == (CALLS, 0), uas_out[-2000:]

        # Who took which call: before the drain both nodes, after it only node B.
        arrivals = invites_by_node(uas_log)
        assert len(arrivals) == CALLS
        before = [port for at, port in arrivals if at < drained_at]
        after = [port for at, port in arrivals if at > drained_at + 0.5]
        assert before.count(node_a.port) > 0 and before.count(node_b.port) > 0, arrivals
        assert after.count(node_a.port) == 0, f"node A took calls while draining: {arrivals}"
        assert after.count(node_b.port) >= RATE * 4, arrivals
        assert a_exit < 6.0
        # Kamailio marked node A down (a 503 to an INVITE or to its OPTIONS probe), never B.
        down = [line for line in k_log.splitlines() if "node DOWN" in line]
        assert any(f"=sip:127.0.0.1:{node_a.port} " in line + " " for line in down), down
        assert not any(f"=sip:127.0.0.1:{node_b.port} " in line + " " for line in down), down

        assert node_b.pbx.stop() == 0
        rows = pg_admin("SELECT state, disposition, count(*) FROM cdr "
                        "GROUP BY state, disposition", schema=schema)
        assert rows == [("closed", "ANSWERED", CALLS)], rows

        # RFC 3261 §12.1.1: the PBX (the dialog's UAS) must copy Record-Route into its
        # 2xx, so the caller's ACK and BYE carry the route set through Kamailio.
        ok_with_rr = re.findall(r"SIP/2\.0 200 OK\n(?:(?!\n\n).)*?^Record-Route:",
                                uac_log.read_text(errors="replace"), re.M | re.S)
        assert ok_with_rr, "the 2xx to INVITE must carry the request's Record-Route"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if kamailio is not None:
            kamailio.stop()
        for node in nodes:
            if node.pbx.proc.poll() is None:
                node.pbx.proc.kill()
                node.pbx.proc.wait(5)
        pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_options_probes_take_a_draining_node_out_and_back(sipp: str, tmp_path: Path) -> None:
    """The dispatcher's OPTIONS probes alone (no INVITE fails over here) mark a draining
    node inactive and, once the drain is cancelled, active again."""
    kamailio_bin = require_tool("kamailio", "kamailio")
    passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
    token = TOKEN  # what test_drain's API helpers send
    lines = ["auth:", "  algorithms: [MD5, SHA-256]",
             "calls:", "  media_timeout: 60", "  max_calls: 10",
             "rtp:", f"  port_min: {RTP_BASE}", f"  port_max: {RTP_BASE + 99}",
             "extensions:"]
    env = clean_env() | {"PBX_API__TOKEN": token}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'User {number}', password_env: {var}}}")
        env[var] = password
    pbx = start_pbx(tmp_path, env=env, extra="\n".join(lines) + "\n")
    procs: list[subprocess.Popen[str]] = []
    kamailio: Kamailio | None = None
    try:
        api = api_base(pbx)
        kamailio = Kamailio(kamailio_bin, tmp_path, [pbx.sip_port])
        node = f"sip:127.0.0.1:{pbx.sip_port}"
        # Through Kamailio to the node: a new INVITE is challenged by the PBX.
        assert status_of(sip_transaction(kamailio.port, "INVITE")) == 407
        # One call straight to the node holds its drain open.
        csv = {}
        for number, password in passwords.items():
            csv[number] = tmp_path / f"{number}.csv"
            csv[number].write_text(f"SEQUENTIAL\n{number};[authentication username={number} "
                                   f"password={password}]\n", encoding="ascii")
        uas_port = free_port()
        result = subprocess.run(
            sipp_cmd(sipp, pbx.sip_port, "register.xml", tmp_path, "-m", "1", "-inf",
                     str(csv[CALLEE]), "-p", str(uas_port), "-key", "expires", "600"),
            capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 0, sipp_report(result.stdout, tmp_path, "register.xml")
        procs.append(subprocess.Popen(
            sipp_cmd(sipp, pbx.sip_port, "uas_answer.xml", tmp_path, "-m", "1",
                     "-p", str(uas_port), "-mp", str(free_port())),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        procs.append(subprocess.Popen(
            sipp_cmd(sipp, pbx.sip_port, "uac_call.xml", tmp_path, "-m", "1", "-d", "30000",
                     "-inf", str(csv[CALLER]), "-s", CALLEE, "-p", str(free_port()),
                     "-mp", str(free_port()), "-auth_uri", f"{CALLEE}@127.0.0.1:{pbx.sip_port}"),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        wait_connected(api, 1)

        assert http("POST", f"{api}/api/admin/drain", token=token)[0] == 202
        # Probed every second: the 503 to OPTIONS takes the node out of the set ...
        assert kamailio.wait_for(rf"node DOWN .*={re.escape(node)}\b", 5) < 4
        reply = sip_transaction(kamailio.port, "INVITE")
        assert status_of(reply) == 503 and "No PBX Node Available" in reply["status"], reply
        assert "dispatch: INVITE" not in kamailio.text().split("node DOWN")[-1]
        # ... and 200s bring it back once the drain is cancelled (two good probes).
        assert http("POST", f"{api}/api/admin/drain/cancel", token=token)[0] == 200
        assert kamailio.wait_for(rf"node UP .*={re.escape(node)}\b", 6) < 5
        assert status_of(sip_transaction(kamailio.port, "INVITE")) == 407
        assert pbx.proc.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if kamailio is not None:
            kamailio.stop()
        if pbx.proc.poll() is None:
            pbx.proc.kill()
            pbx.proc.wait(5)
