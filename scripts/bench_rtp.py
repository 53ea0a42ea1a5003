#!/usr/bin/env python3
"""Benchmark of the RTP relay: N concurrent relayed G.711 calls through ONE relay process.

The relay runs alone in a child process (``--serve``) pinned to one core, with real
:class:`pbx.media.MediaSession` objects (latching, QoS, media-timeout timers included);
this process is the load generator, pinned to the other core.  Each call has two legs;
every leg's endpoint sends 50 packets/s of 172 bytes (12-byte RTP header + 160 bytes of
G.711), so N calls are 100·N packets/s into the relay and 100·N out.  The generator uses
a few sockets (a/b endpoint pairs shared by many calls, as the relay only cares about the
source tuple), spreads each 20 ms tick over 1 ms slots and reads with ``recv_into`` into
one buffer, so it stays far below one core.

For each step it reports packets/s in and out, loss % (generator sent vs received, and
where it was lost), the relay process's CPU % (user+system over the step) and the
generator's.  Target: ≥ 500 calls with loss < 0.1 %.

    .venv/bin/python scripts/bench_rtp.py [--steps 100,250,500,750,1000] [--duration 10]
    .venv/bin/python scripts/bench_rtp.py --micro      # per-packet cost of the hot path
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAYLOAD = b"\xd5" * 160  # PCMA silence
PACKET_SIZE = 172
SOCKET_PAIRS = 4
SLOTS = 20  # 1 ms slots per 20 ms tick


def sdp_for(port: int, host: str = "127.0.0.1") -> bytes:
    return (f"v=0\r\no=gen 1 1 IN IP4 {host}\r\ns=bench\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n").encode()


# -- relay side (child process) -----------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from pbx.media import MediaSession, PortAllocator

    allocator = PortAllocator(args.port_min, args.port_max)
    sessions: list[MediaSession] = []

    def totals() -> dict[str, int]:
        out = {"in": 0, "forwarded": 0, "dropped": 0, "send_errors": 0, "unroutable": 0,
               "lost_seen": 0}
        for s in sessions:
            for leg in s.legs.values():
                rtp = leg.rtp
                out["in"] += rtp.packets
                out["dropped"] += rtp.dropped
                out["send_errors"] += rtp.send_errors
                out["unroutable"] += rtp.unroutable
                out["forwarded"] += rtp.packets - rtp.send_errors - rtp.unroutable
            for qos in s.qos.values():
                out["lost_seen"] += qos.lost
        return out

    class Control(LineReceiver):
        delimiter = b"\n"

        def reply(self, obj: Any) -> None:
            self.sendLine(json.dumps(obj).encode())

        def lineReceived(self, line: bytes) -> None:
            cmd = json.loads(line)
            if cmd["cmd"] == "setup":
                ports = []
                a_ports, b_ports = cmd["a_ports"], cmd["b_ports"]
                for i in range(cmd["calls"]):
                    s = MediaSession(reactor, allocator, "127.0.0.1",
                                     media_timeout=60.0)
                    s.start()
                    s.offer_from_a(sdp_for(a_ports[i % len(a_ports)]))
                    s.answer_from_b(sdp_for(b_ports[i % len(b_ports)]))
                    sessions.append(s)
                    ports.append([s.local_port("a"), s.local_port("b")])
                self.reply({"ports": ports})
            elif cmd["cmd"] == "stats":
                self.reply(totals())
            elif cmd["cmd"] == "teardown":
                result = totals()
                for s in sessions:
                    s.close()
                sessions.clear()
                result["in_use_after_close"] = allocator.in_use
                self.reply(result)
            elif cmd["cmd"] == "quit":
                reactor.callLater(0, reactor.stop)

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Control())
    reactor.run()
    return 0


# -- generator side -------------------------------------------------------------------
class RelayProcess:
    def __init__(self, args: argparse.Namespace) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--port-min", str(args.port_min),
             "--port-max", str(args.port_max)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, **cmd: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Ask the relay to quit and wait for it (kill it only if it does not)."""
        assert self.proc.stdin
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def run_step(relay: RelayProcess, calls: int, duration: float) -> dict[str, Any]:
    a_socks = [open_socket() for _ in range(SOCKET_PAIRS)]
    b_socks = [open_socket() for _ in range(SOCKET_PAIRS)]
    reply = relay.call(cmd="setup", calls=calls,
                       a_ports=[s.getsockname()[1] for s in a_socks],
                       b_ports=[s.getsockname()[1] for s in b_socks])
    # One stream per leg: (sending socket, relay address, ssrc), spread over 20 slots.
    slots: list[list[tuple[Any, tuple[str, int], int]]] = [[] for _ in range(SLOTS)]
    stream = 0
    for i, (port_a, port_b) in enumerate(reply["ports"]):
        pair = i % SOCKET_PAIRS
        for sock, port in ((a_socks[pair], port_a), (b_socks[pair], port_b)):
            slots[stream % SLOTS].append((sock.sendto, ("127.0.0.1", port), stream + 1))
            stream += 1
    all_socks = a_socks + b_socks
    poller = select.epoll()
    by_fd = {s.fileno(): s.recv_into for s in all_socks}
    for s in all_socks:
        poller.register(s.fileno(), select.EPOLLIN)
    buf = bytearray(2048)
    pack = struct.Struct("!BBHII").pack
    received = 0
    sent = 0
    send_errors = 0

    def drain(timeout: float) -> int:
        got = 0
        for fd, _ in poller.poll(timeout):
            recv = by_fd[fd]
            while True:
                try:
                    recv(buf)
                except BlockingIOError:
                    break
                got += 1
        return got

    ticks = int(duration * 50)
    cpu0, gen0, wall0 = relay.cpu(), time.process_time(), time.monotonic()
    start = time.monotonic()
    for tick in range(ticks):
        seq = tick & 0xFFFF
        ts = (tick * 160) & 0xFFFFFFFF
        for slot_index, slot in enumerate(slots):
            due = start + tick * 0.02 + slot_index * 0.001
            while True:
                wait = due - time.monotonic()
                if wait <= 0:
                    break
                received += drain(wait)
            for sendto, addr, ssrc in slot:
                try:
                    sendto(pack(0x80, 8, seq, ts, ssrc) + PAYLOAD, addr)
                    sent += 1
                except OSError:
                    send_errors += 1
        received += drain(0)
    wall = time.monotonic() - wall0
    cpu = relay.cpu() - cpu0
    gen_cpu = time.process_time() - gen0
    settle = time.monotonic() + 0.5
    while time.monotonic() < settle:
        received += drain(0.05)
    relay_totals = relay.call(cmd="teardown")
    poller.close()
    for s in all_socks:
        s.close()
    loss = 100.0 * (sent - received) / sent if sent else 0.0
    return {
        "calls": calls,
        "pps_in": round(sent / wall),
        "pps_out": round(received / wall),
        "sent": sent,
        "received": received,
        "loss_pct": round(loss, 4),
        "relay_in": relay_totals["in"],
        "lost_before_relay": sent - relay_totals["in"] - relay_totals["dropped"],
        "relay_dropped_foreign": relay_totals["dropped"],
        "relay_send_errors": relay_totals["send_errors"],
        "relay_cpu_pct": round(100.0 * cpu / wall, 1),
        # Relay CPU per packet received (receive + learning check + send + QoS): the
        # figure that does not depend on how much CPU other processes leave the relay.
        "relay_us_per_packet": round(1e6 * cpu / relay_totals["in"], 2)
        if relay_totals["in"] else None,
        "generator_cpu_pct": round(100.0 * gen_cpu / wall, 1),
        "generator_send_errors": send_errors,
        "ports_in_use_after_close": relay_totals["in_use_after_close"],
    }


# -- micro benchmark ------------------------------------------------------------------
def micro(n: int) -> None:
    from pbx.media.qos import StreamQoS
    from pbx.media.relay import RelaySocket, RtpSocket

    src, dst = ("127.0.0.1", 40000), ("127.0.0.1", 40002)
    packets = [struct.pack("!BBHII", 0x80, 8, i & 0xFFFF, i * 160, 7) + PAYLOAD
               for i in range(1024)]

    def sink(_data: bytes, _addr: Any) -> None:
        pass

    def make(cls: type, *extra: Any) -> Any:
        a, b = cls(time.monotonic, *extra), cls(time.monotonic, *extra)
        a.peer, b.peer = b, a
        a.src = a.dst = src
        b.src = b.dst = dst
        a.sendto = b.sendto = sink
        return a

    results = {}
    spray = ("127.0.0.66", 40000)  # an attacker's packets at a locked socket (slow path)
    for name, sock, source in (("relay only (RelaySocket)", make(RelaySocket), src),
                               ("relay + QoS (RtpSocket)", make(RtpSocket, StreamQoS()), src),
                               ("foreign source dropped", make(RtpSocket, StreamQoS()),
                                spray)):
        if source is spray:
            sock.packets = 1  # the latched source has spoken: locked
        receive = sock.datagramReceived
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(n):
                receive(packets[i & 1023], source)
            best = min(best, time.perf_counter() - t0)
        results[name] = best / n * 1e9
    qos = StreamQoS()
    update = qos.update
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            update(packets[i & 1023], 0.02 * i)
        best = min(best, time.perf_counter() - t0)
    results["StreamQoS.update alone"] = best / n * 1e9
    for name, ns in results.items():
        print(f"{name:28s} {ns:7.0f} ns/packet (no syscall)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,250,500,750,1000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--port-min", type=int, default=40000)
    parser.add_argument("--port-max", type=int, default=49999)
    parser.add_argument("--relay-core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object per step")
    parser.add_argument("--micro", action="store_true", help="hot-path cost, no sockets")
    parser.add_argument("--n", type=int, default=200_000, help="packets for --micro")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.micro:
        micro(args.n)
        return 0
    relay = RelayProcess(args)
    cores = os.sched_getaffinity(0)
    if {args.relay_core, args.generator_core} <= cores and args.relay_core != args.generator_core:
        os.sched_setaffinity(relay.proc.pid, {args.relay_core})
        os.sched_setaffinity(0, {args.generator_core})
    else:
        print("warning: cannot pin relay and generator to separate cores", file=sys.stderr)
    try:
        if not args.json:
            print(f"{'calls':>6} {'pps in':>8} {'pps out':>8} {'loss %':>8} "
                  f"{'relay CPU %':>11} {'gen CPU %':>9} {'µs/pkt':>7}")
        for calls in (int(x) for x in args.steps.split(",")):
            result = run_step(relay, calls, args.duration)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{calls:>6} {result['pps_in']:>8} {result['pps_out']:>8} "
                      f"{result['loss_pct']:>8.3f} {result['relay_cpu_pct']:>11.1f} "
                      f"{result['generator_cpu_pct']:>9.1f} "
                      f"{result['relay_us_per_packet'] or 0:>7.2f}", flush=True)
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
