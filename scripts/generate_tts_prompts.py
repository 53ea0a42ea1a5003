#!/usr/bin/env python3
"""Generate the PBX's voice prompts as 8 kHz mono 16-bit PCM WAV files.

Usage::

    scripts/generate_tts_prompts.py --company NAME [--output-dir DIR] [--config FILE]
                                    [--voice VOICE] [--speed WPM] [--force]

Each prompt of :data:`PROMPTS` is spoken by espeak-ng (Debian package ``espeak-ng``),
which writes 22.05 kHz WAV; the audio is resampled to 8 kHz (the G.711 rate) with
``audioop.ratecv`` and its first-order low-pass (``weightA=weightB=1``), peak-normalised
to -3 dBFS and written atomically as ``<name>.wav``.

Files go to ``--output-dir``, else to ``<data_dir>/prompts/`` where ``data_dir`` comes
from the PBX configuration (``--config``, else ``$PBX_CONFIG``, else ``./config.yml``;
``PBX_DATA_DIR`` overrides it as usual). File names are stable (the keys of
:data:`PROMPTS`). The run is idempotent: ``prompts.json`` in the same directory records
the text, voice and speed of each file, and a prompt whose record matches and whose file
is a valid 8 kHz mono WAV is left untouched (``--force`` regenerates everything).

Exit codes: 0 done, 1 espeak-ng missing or failing (one line on stderr), 78 the PBX
configuration does not load. ``audioop`` is in the standard library up to Python 3.12;
on 3.13 and later the ``audioop-lts`` package provides the same module.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import wave
from pathlib import Path

with warnings.catch_warnings():  # deprecated in 3.11/3.12, gone in 3.13 (audioop-lts)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

RATE = 8000
SAMPLE_WIDTH = 2
PEAK = int(32767 * 10 ** (-3 / 20))  # -3 dBFS
MANIFEST = "prompts.json"
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 78

# name -> text; ``{company}`` is replaced by --company. Names are a stable interface:
# later voice features refer to the files by these names.
PROMPTS: dict[str, str] = {
    "welcome": "Welcome to {company}.",
    "enter_extension": "Please enter the extension number of the person you are calling.",
    "please_hold": "Please hold while we connect your call.",
    "not_available": "The person you are calling is not available.",
    "busy": "The line is busy. Please try again later.",
    "invalid_extension": "The extension you dialled is not valid. Please try again.",
    "all_lines_busy": "All our lines are busy at the moment. Please call again later.",
    "voicemail_greeting": "Please leave your message after the tone. "
                          "Hang up when you have finished.",
    "goodbye": "Thank you for calling {company}. Goodbye.",
}


class PromptError(Exception):
    """A failure reported as one line, exit 1."""


def prompt_texts(company: str) -> dict[str, str]:
    return {name: text.format(company=company) for name, text in PROMPTS.items()}


def clean_company(value: str) -> str:
    name = " ".join("".join(ch if ch.isprintable() else " " for ch in value).split())
    if not name:
        raise argparse.ArgumentTypeError("the company name is empty")
    if len(name) > 100:
        raise argparse.ArgumentTypeError("the company name is longer than 100 characters")
    return name


def find_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise PromptError("espeak-ng is not installed (Debian package espeak-ng: "
                          "apt-get install espeak-ng)")
    return path


def synthesise(espeak: str, text: str, voice: str, speed: int) -> tuple[bytes, int]:
    """espeak-ng's 16-bit mono PCM and its sample rate. Text goes through stdin, so a
    company name cannot be taken for an option."""
    with tempfile.TemporaryDirectory(prefix="pbx-tts-") as tmp:
        out = Path(tmp) / "speech.wav"
        try:
            result = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(out),
                                     "--stdin"], input=text.encode(), capture_output=True,
                                    timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PromptError(f"espeak-ng failed: {exc}") from None
        if result.returncode != 0 or not out.exists():
            why = result.stderr.decode(errors="replace").strip().splitlines()
            raise PromptError(f"espeak-ng failed (exit {result.returncode}): "
                              f"{why[0] if why else 'no output'}")
        with wave.open(str(out), "rb") as wav:
            if wav.getsampwidth() != SAMPLE_WIDTH:
                raise PromptError(f"espeak-ng wrote {8 * wav.getsampwidth()}-bit audio")
            frames = wav.readframes(wav.getnframes())
            if wav.getnchannels() != 1:
                frames = audioop.tomono(frames, SAMPLE_WIDTH, 0.5, 0.5)
            return frames, wav.getframerate()


def to_telephony(frames: bytes, rate: int) -> bytes:
    """Resample to 8 kHz (with ratecv's one-pole low-pass) and normalise to -3 dBFS."""
    if rate != RATE:
        frames, _ = audioop.ratecv(frames, SAMPLE_WIDTH, 1, rate, RATE, None, 1, 1)
    peak = audioop.max(frames, SAMPLE_WIDTH) if frames else 0
    if peak:
        frames = audioop.mul(frames, SAMPLE_WIDTH, PEAK / peak)
    return frames


def wav_bytes(frames: bytes) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(RATE)
        wav.writeframes(frames)
    return buffer.getvalue()


def is_valid_prompt(path: Path) -> bool:
    try:
        with wave.open(str(path), "rb") as wav:
            return (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (
                RATE, 1, SAMPLE_WIDTH) and wav.getnframes() > 0
    except (OSError, EOFError, wave.Error):
        return False


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint(text: str, voice: str, speed: int) -> str:
    return hashlib.sha256(f"{voice}\0{speed}\0{text}".encode()).hexdigest()


def load_manifest(directory: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("prompts", {}) if isinstance(data, dict) else {}


def generate(directory: Path, company: str, *, voice: str = "en-us", speed: int = 150,
             force: bool = False) -> tuple[list[str], list[str]]:
    """Write the prompts; returns (generated, unchanged) names."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(directory)
    espeak: str | None = None
    generated: list[str] = []
    unchanged: list[str] = []
    records: dict[str, dict[str, str]] = {}
    for name, text in prompt_texts(company).items():
        path = directory / f"{name}.wav"
        stamp = fingerprint(text, voice, speed)
        records[name] = {"file": path.name, "text": text, "voice": voice,
                         "speed": str(speed), "sha256": stamp}
        if not force and manifest.get(name, {}).get("sha256") == stamp \
                and is_valid_prompt(path):
            unchanged.append(name)
            continue
        espeak = espeak or find_espeak()
        frames, rate = synthesise(espeak, text, voice, speed)
        write_atomic(path, wav_bytes(to_telephony(frames, rate)))
        generated.append(name)
    if generated or manifest != records:
        body = json.dumps({"rate": RATE, "channels": 1, "sample_width": SAMPLE_WIDTH,
                           "prompts": records}, indent=2, sort_keys=True) + "\n"
        write_atomic(directory / MANIFEST, body.encode())
    return generated, unchanged


def default_directory(config: str | None) -> Path:
    from pbx.config import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as err:
        print(f"generate_tts_prompts: configuration error\n{err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return Path(settings.data_dir) / "prompts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="generate_tts_prompts.py",
        description="Generate the PBX voice prompts (8 kHz mono 16-bit WAV) with espeak-ng.")
    parser.add_argument("--company", required=True, type=clean_company,
                        help="company name spoken in the welcome and goodbye prompts")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write the files (default: <data_dir>/prompts)")
    parser.add_argument("--config", default=None,
                        help="PBX configuration giving data_dir (default: $PBX_CONFIG, "
                             "else ./config.yml)")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice (default en-us)")
    parser.add_argument("--speed", type=int, default=150,
                        help="words per minute (default 150)")
    parser.add_argument("--force", action="store_true",
                        help="regenerate every prompt even when it is up to date")
    args = parser.parse_args(argv)
    if not 80 <= args.speed <= 450:
        parser.error("--speed must be between 80 and 450")
    directory = args.output_dir or default_directory(args.config)
    try:
        generated, unchanged = generate(directory, args.company, voice=args.voice,
                                        speed=args.speed, force=args.force)
    except PromptError as err:
        print(f"generate_tts_prompts: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as err:
        print(f"generate_tts_prompts: cannot write {directory}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"prompts in {directory}: {len(generated)} generated, {len(unchanged)} unchanged")
    for name in generated:
        print(f"  generated {name}.wav")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
