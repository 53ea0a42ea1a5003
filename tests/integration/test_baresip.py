"""Two baresip phones call each other through the real PBX (``twistd -n pbx``).

Each baresip runs with its own config directory, registers to the PBX as an extension
with digest authentication, plays a tone from a WAV file (``aufile``) and records what it
decodes (``sndfile``).  The caller dials the callee through ``ctrl_tcp`` (netstring
JSON), the callee answers by itself (``answermode=auto``), and after a few seconds the
caller hangs up.  Checked: the callee heard the caller's 1 kHz tone and the caller heard
the callee's 440 Hz tone (so audio went both ways through the PBX's relay, not silence),
and the PBX wrote one ANSWERED CDR with RTP packets counted in both directions.

baresip 1.0 (libre 1.1) computes only MD5 digests, and it gives up ("Register: Function
not implemented") as soon as a challenge offers any other algorithm, even when an MD5
challenge comes first: the PBX here offers MD5 alone.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool

from .conftest import PBXProcess, clean_env, start_pbx, write_config
from .test_sip_edge import make_certificate

pytestmark = pytest.mark.integration

CALLER, CALLEE = "3001", "3002"
RATE = 8000
CALLER_TONE, CALLEE_TONE = 1000.0, 440.0
TALK_SECONDS = 3.0
# Media port ranges away from the ephemeral range (32768+) and from each other; random
# so that concurrent test runs rarely meet (both the PBX and baresip skip busy ports).
PBX_RTP_BASE = random.randrange(20000, 29000, 200)
PHONE_RTP_BASE = random.randrange(10000, 19000, 1000)


# -- audio helpers ------------------------------------------------------------------------
def write_tone(path: Path, freq: float, seconds: float, amplitude: float = 0.5) -> None:
    """A mono 16-bit PCM WAV at 8 kHz holding a sine of ``freq`` Hz."""
    count = int(RATE * seconds)
    peak = int(32767 * amplitude)
    samples = (int(peak * math.sin(2 * math.pi * freq * n / RATE)) for n in range(count))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))


def read_wav(path: Path) -> tuple[int, list[int]]:
    """Sample rate and the first channel's 16-bit samples of a PCM WAV."""
    with wave.open(str(path), "rb") as src:
        assert src.getsampwidth() == 2, f"{path}: {src.getsampwidth() * 8}-bit samples"
        channels, rate = src.getnchannels(), src.getframerate()
        raw = src.readframes(src.getnframes())
    samples = list(struct.unpack(f"<{len(raw) // 2}h", raw))
    return rate, samples[::channels]


def rms(samples: list[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


def loudest_window(samples: list[int], size: int) -> list[int]:
    """The ``size``-sample window (stepped by half a window) with the most energy."""
    if len(samples) <= size:
        return samples
    best, best_energy = 0, -1.0
    for start in range(0, len(samples) - size + 1, size // 2):
        energy = rms(samples[start:start + size])
        if energy > best_energy:
            best, best_energy = start, energy
    return samples[best:best + size]


def dominant_frequency(samples: list[int], rate: int, step: float = 10.0) -> float:
    """The frequency (``step`` Hz grid, 50 Hz to Nyquist) with the most DFT power."""
    mean = sum(samples) / len(samples)
    centred = [s - mean for s in samples]
    best_freq, best_power = 0.0, -1.0
    freq = 50.0
    while freq < rate / 2:
        # Goertzel: the power of one DFT bin in one pass.
        coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
        s1 = s2 = 0.0
        for x in centred:
            s1, s2 = x + coeff * s1 - s2, s1
        power = s1 * s1 + s2 * s2 - coeff * s1 * s2
        if power > best_power:
            best_freq, best_power = freq, power
        freq += step
    return best_freq


def test_audio_helpers_find_the_tone(tmp_path: Path) -> None:
    """The analysis used below tells a tone from another tone and from silence."""
    path = tmp_path / "tone.wav"
    write_tone(path, 1000.0, 0.5)
    rate, samples = read_wav(path)
    assert rate == RATE and len(samples) == 4000
    assert abs(dominant_frequency(samples[:2000], rate) - 1000.0) <= 10.0
    assert rms(samples) > 10000
    write_tone(path, 440.0, 0.5, amplitude=0.1)
    _, samples = read_wav(path)
    assert abs(dominant_frequency(samples[:2000], rate) - 440.0) <= 10.0
    assert rms(samples) < 3000
    assert abs(dominant_frequency(samples[:2000], rate) - 1000.0) > 500.0
    quiet = [0] * 1000 + samples[:800] + [0] * 1000
    assert rms(quiet[:1000]) == 0.0
    assert rms(loudest_window(quiet, 400)) > 2000


# -- baresip ------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A loopback port free for both UDP and TCP (baresip listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free loopback port for both UDP and TCP")


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class Baresip:
    """One baresip process, its config directory, and a ctrl_tcp connection to it."""

    def __init__(self, binary: str, directory: Path, number: str, password: str,
                 pbx_port: int, tone: float, offset: int, transport: str = "udp") -> None:
        self.directory = directory
        self.number = number
        self.records = directory / "records"
        self.records.mkdir(parents=True)
        self.ctrl_port = free_tcp_port()
        self.sip_port = free_port_pair()
        source = directory / "tone.wav"
        write_tone(source, tone, 10.0)
        modules = Path(binary).resolve().parent.parent / "lib" / "baresip" / "modules"
        rtp_ports = f"{PHONE_RTP_BASE + offset}-{PHONE_RTP_BASE + offset + 499}"
        # Only the modules needed: no sound card (aubridge is a player nobody reads;
        # the sndfile filter records what is decoded), no NAT helpers, no video.
        (directory / "config").write_text(
            "poll_method\t\tepoll\n"
            f"sip_listen\t\t127.0.0.1:{self.sip_port}\n"
            "net_interface\t\t127.0.0.1\n"
            "call_local_timeout\t20\n"
            "call_max_calls\t\t2\n"
            f"audio_source\t\taufile,{source}\n"
            f"audio_player\t\taubridge,sink-{number}\n"
            "audio_alert\t\taubridge,alert\n"
            f"ausrc_srate\t\t{RATE}\n"
            f"auplay_srate\t\t{RATE}\n"
            "ausrc_channels\t\t1\n"
            "auplay_channels\t\t1\n"
            f"rtp_ports\t\t{rtp_ports}\n"
            "rtp_timeout\t\t0\n"
            f"module_path\t\t{modules}\n"
            "module\t\t\tg711.so\n"
            "module\t\t\tsndfile.so\n"
            "module\t\t\taufile.so\n"
            "module\t\t\taubridge.so\n"
            "module_tmp\t\taccount.so\n"
            "module_app\t\tmenu.so\n"
            "module_app\t\tctrl_tcp.so\n"
            f"ctrl_tcp_listen\t\t127.0.0.1:{self.ctrl_port}\n"
            f"snd_path\t\t{self.records}\n",
            encoding="ascii")
        (directory / "accounts").write_text(
            f"<sip:{number}@127.0.0.1:{pbx_port};transport={transport}>;auth_pass={password}"
            ";answermode=auto;regint=600;audio_codecs=PCMU,PCMA\n",
            encoding="ascii")
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [binary, "-4", "-v", "-f", str(directory)], cwd=directory,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read_output, daemon=True).start()
        # Connect only once it listens: connecting to a loopback port nobody listens on
        # can end in a TCP self-connect that then holds the port.
        self.wait(lambda: self.logged("ctrl_tcp: TCP socket listening"), "ctrl_tcp listener")
        self.sock = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=5)
        threading.Thread(target=self._read_ctrl, daemon=True).start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip())

    def logged(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def _read_ctrl(self) -> None:
        buffer = b""
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b":" in buffer:
                head, _, rest = buffer.partition(b":")
                size = int(head)
                if len(rest) < size + 1:
                    break
                message = json.loads(rest[:size])
                buffer = rest[size + 1:]
                (self.events if message.get("event") else self.responses).append(message)

    def command(self, command: str, params: str = "") -> None:
        token = secrets.token_hex(4)
        self.sock.sendall(netstring(json.dumps(
            {"command": command, "params": params, "token": token}).encode()))
        self.wait(lambda: any(r.get("token") == token for r in self.responses),
                  f"a response to {command!r}")

    def wait_registered(self) -> None:
        # The registration may finish before ctrl_tcp is connected (its REGISTER_OK
        # event is then missed): baresip also logs "NUMBER@HOST: {0/UDP/v4} 200 OK".
        self.wait(lambda: any(e.get("type") == "REGISTER_OK" for e in self.events)
                  or any(self.number in line and " 200 OK " in line for line in self.lines),
                  "registration")

    def wait_event(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found.extend(e for e in self.events if e.get("type") == kind)
            return bool(found)

        self.wait(seen, f"event {kind}", timeout)
        return found[0]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"baresip {self.number}: no {what}; events "
                                     f"{[e.get('type') for e in self.events]}\n"
                                     f"{self.output()}")
            time.sleep(0.05)

    def recording(self) -> Path:
        """The WAV of decoded (received) audio written by the sndfile filter."""
        files = sorted(self.records.glob("*-dec.wav"))
        assert files, f"baresip {self.number} recorded nothing: " \
                      f"{sorted(p.name for p in self.records.iterdir())}\n{self.output()}"
        return files[-1]

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.sock.sendall(netstring(json.dumps(
                    {"command": "quit", "params": "", "token": "quit"}).encode()))
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def baresip() -> str:
    return require_tool("baresip", "baresip-core")


def pbx_config(passwords: dict[str, str], algorithms: str) -> tuple[str, dict[str, str]]:
    lines = [
        "auth:", f"  algorithms: [{algorithms}]",
        "security:", "  trusted_networks: [127.0.0.0/8]",
        "calls:", "  ring_timeout: 10", "  media_timeout: 30", "  max_calls: 10",
        "rtp:", f"  port_min: {PBX_RTP_BASE}", f"  port_max: {PBX_RTP_BASE + 199}",
        "  codecs: [PCMU, PCMA]",
        "extensions:",
    ]
    env = {}
    for number, password in passwords.items():
        var = f"PBX_EXT_{number}_PASSWORD"
        lines.append(f"  - {{number: '{number}', name: 'Phone {number}', password_env: {var}}}")
        env[var] = password
    return "\n".join(lines) + "\n", env


def read_cdrs(tmp: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp / "var" / "pbx.sqlite3") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM cdr ORDER BY id")]
    for row in rows:
        if isinstance(row.get("qos"), str):
            row["qos"] = json.loads(row["qos"])
    return rows


class Phones:
    """The PBX and baresip phones started in one directory, all stopped by ``close``."""

    def __init__(self, binary: str, tmp: Path, algorithms: str, transport: str = "udp"
                 ) -> None:
        self.binary = binary
        self.tmp = tmp
        self.transport = transport
        self.passwords = {CALLER: secrets.token_hex(8), CALLEE: secrets.token_hex(8)}
        extra, env = pbx_config(self.passwords, algorithms)
        config = write_config(tmp)
        if transport == "tls":
            cert, key = make_certificate(tmp)
            text = config.read_text(encoding="utf-8").replace(
                "sip:\n", f"sip:\n  tls_enabled: true\n  tls_port: 0\n"
                           f"  tls_cert: {cert}\n  tls_key: {key}\n", 1)
            config.write_text(text, encoding="utf-8")
        config.write_text(config.read_text(encoding="utf-8") + extra, encoding="utf-8")
        self.pbx: PBXProcess = start_pbx(tmp, env=clean_env() | env, config=config)
        self.phones: list[Baresip] = []

    def phone(self, number: str, tone: float) -> Baresip:
        port = self.pbx.ports["tls"] if self.transport == "tls" else self.pbx.sip_port
        phone = Baresip(self.binary, self.tmp / f"baresip-{number}", number,
                        self.passwords[number], port, tone,
                        offset=500 * len(self.phones), transport=self.transport)
        self.phones.append(phone)
        return phone

    def close(self) -> None:
        for phone in self.phones:
            phone.stop()
        self.phones.clear()


@pytest.fixture
def phones(baresip: str, tmp_path: Path) -> Iterator[Callable[..., Phones]]:
    started: list[Phones] = []

    def start(algorithms: str, transport: str = "udp") -> Phones:
        setup = Phones(baresip, tmp_path, algorithms, transport)
        started.append(setup)
        return setup

    yield start
    for setup in started:
        setup.close()
        if setup.pbx.proc.poll() is None:
            setup.pbx.proc.kill()
            setup.pbx.proc.wait(5)


def check_tone(path: Path, expected: float, who: str) -> None:
    rate, samples = read_wav(path)
    assert len(samples) >= rate, f"{who}: only {len(samples)} samples recorded in {path}"
    window = loudest_window(samples, rate // 2)
    level = rms(window)
    # The source tone is at half scale (RMS ≈ 11,600); G.711 keeps it within a few %.
    assert level > 3000, f"{who}: recorded audio is (near) silence, RMS {level:.0f}"
    freq = dominant_frequency(window, rate)
    assert abs(freq - expected) <= 30.0, f"{who}: dominant frequency {freq} Hz, " \
                                         f"expected {expected} Hz"
    # A second of the call (not just one window) carries the tone.
    loud = sum(1 for start in range(0, len(samples) - rate // 10, rate // 10)
               if rms(samples[start:start + rate // 10]) > 3000)
    assert loud >= 10, f"{who}: only {loud} loud 100 ms blocks in {len(samples)} samples"


def talk(setup: Phones, uri: str) -> None:
    """Both phones register, the caller dials ``uri``, they talk, the caller hangs up;
    then the PBX stops cleanly and each side must have heard the other's tone."""
    try:
        caller = setup.phone(CALLER, CALLER_TONE)
        callee = setup.phone(CALLEE, CALLEE_TONE)
        caller.wait_registered()
        callee.wait_registered()
        caller.command("dial", uri)
        caller.wait_event("CALL_ESTABLISHED")
        callee.wait_event("CALL_ESTABLISHED")
        time.sleep(TALK_SECONDS)
        caller.command("hangup")
        callee.wait_event("CALL_CLOSED")
        caller.wait_event("CALL_CLOSED")
    finally:
        setup.close()
        assert setup.pbx.stop() == 0
    check_tone(callee.recording(), CALLER_TONE, f"callee {CALLEE}")
    check_tone(caller.recording(), CALLEE_TONE, f"caller {CALLER}")


def test_two_baresip_phones_talk_through_the_pbx(phones: Callable[..., Phones],
                                                 tmp_path: Path) -> None:
    setup = phones("MD5")
    talk(setup, f"sip:{CALLEE}@127.0.0.1:{setup.pbx.sip_port}")
    rows = read_cdrs(tmp_path)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["caller"], row["callee"], row["disposition"]) == (CALLER, CALLEE, "ANSWERED")
    assert row["hangup_side"] == "caller", row
    assert TALK_SECONDS - 0.5 <= float(row["billsec"]) <= TALK_SECONDS + 5, row
    qos = row["qos"]
    # 20 ms G.711 packets: ~50 per second each way for the talk time.
    for direction in ("a_to_b", "b_to_a"):
        assert qos[direction]["packets"] >= 40 * TALK_SECONDS, (direction, qos)
        assert qos[direction]["loss_pct"] < 5, (direction, qos)


def test_two_baresip_phones_talk_over_sip_tls(phones: Callable[..., Phones],
                                              tmp_path: Path) -> None:
    """Both phones register over TLS; the PBX reaches the callee on the connection its
    REGISTER came on (a TLS flow in the location service), and audio flows both ways."""
    setup = phones("MD5", "tls")
    talk(setup, f"sip:{CALLEE}@127.0.0.1:{setup.pbx.ports['tls']};transport=tls")
    rows = read_cdrs(tmp_path)
    assert [(r["caller"], r["callee"], r["disposition"]) for r in rows] == [
        (CALLER, CALLEE, "ANSWERED")]
