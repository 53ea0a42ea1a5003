#!/usr/bin/env python3
"""Coverage-guided fuzzing of the SIP/SDP codec with atheris (issue 10).

Usage::

    python scripts/fuzz_sip.py --minutes N [--target parse|framer|sdp|all] [--corpus DIR]
    python scripts/fuzz_sip.py --replay FILE_OR_DIR... [--target ...]

Targets (each input is checked against the codec's promises):

* ``parse``: ``pbx.sip.message.parse`` in datagram and stream mode.  Only
  :class:`SIPParseError` may escape; a parse error's reason is one line and its
  ``partial`` request can be answered with ``make_response``; a parsed message
  re-serialises to bytes that parse back to an equal message with the same bytes
  (the round-trip the property tests assert), its lazy views raise nothing but
  ``SIPParseError``, and a response can be built for a parsed request.
* ``framer``: the TCP :class:`StreamFramer`, fed the input in one piece, in
  pseudo-random chunks (cut points derived from the input) and, for short inputs,
  byte by byte: every split gives the same frames, pings and leftover, or every
  split fails; each frame goes through the ``parse`` checks in stream mode.
* ``sdp``: ``pbx.sip.sdp.parse``; a parsed body serialises to bytes that parse back
  equal, and the relay helpers (``codec_names``, ``direction``, ``is_hold``,
  ``rewrite_media``) raise nothing but ``SDPError`` and produce a valid body.

Any other exception or a broken invariant is a *crash*: the input is saved under
``<work>/crashes/`` (one file per distinct failure site) and fuzzing continues.  An
input that takes longer than ``--slow-ms`` (50 ms; best of three runs, so a GC pause
or a busy machine is not reported) is saved under ``<work>/slow/``; after the run the
parent re-times it without instrumentation and keeps it only if it is still slow.
Each target runs in its own child process (libFuzzer ends the process when its time
is up); the parent prints and writes ``<work>/summary.json``: minutes run, executions,
corpus size, crashes and slow inputs.  Seeds come from ``tests/fuzz_corpus/`` (never
written to); the growing corpus lives in ``--corpus`` (default ``var/fuzz/<target>``).
Found inputs become regression cases in ``tests/fuzz_corpus/regressions/``, which
``tests/unit/test_codec_regressions.py`` replays.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "tests" / "fuzz_corpus"
TARGETS = ("parse", "framer", "sdp")
SEED_DIRS = {"parse": ("sip",), "framer": ("sip",), "sdp": ("sdp",)}

sys.path.insert(0, str(REPO))


C = SimpleNamespace()  # the codec under test, filled by _import_codec


def _import_codec(instrument: bool) -> None:
    """Import the codec (instrumented for coverage when fuzzing) into globals."""
    ctx: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if instrument:
        import atheris

        ctx = atheris.instrument_imports(include=["pbx"])
    with ctx:
        from pbx.sip import sdp
        from pbx.sip.errors import SIPParseError
        from pbx.sip.message import Request, StreamFramer, make_response, parse
    C.__dict__.update(sdp=sdp, SIPParseError=SIPParseError, Request=Request,
                      StreamFramer=StreamFramer, make_response=make_response, parse=parse)


# -- the checks (also used by --replay and by the regression tests' expectations) ---------

_VIEWS = ("vias", "top_via", "from_", "to", "contacts", "cseq", "call_id", "max_forwards")


def check_parse(data: bytes, datagram: bool = True) -> None:
    """parse() keeps its promises on ``data`` (see the module docstring)."""
    try:
        msg = C.parse(data, datagram=datagram)
    except C.SIPParseError as err:
        assert err.reason and "\r" not in err.reason and "\n" not in err.reason, err.reason
        assert 400 <= err.status <= 699, err.status
        if err.partial is not None:
            assert isinstance(err.partial, C.Request)
            with contextlib.suppress(C.SIPParseError):
                C.make_response(err.partial, err.status, err.reason).to_bytes()
        return
    wire = msg.to_bytes()
    again = C.parse(wire)
    assert again == msg, "re-parsed message differs"
    assert again.to_bytes() == wire, "serialisation is not stable"
    assert C.parse(wire, datagram=False) == msg, "stream-mode parse of the canonical form differs"
    for attr in _VIEWS:
        with contextlib.suppress(C.SIPParseError):
            getattr(msg, attr)
    if isinstance(msg, C.Request):
        with contextlib.suppress(C.SIPParseError):
            C.make_response(msg, 200, to_tag="fz1").to_bytes()


def _frame(data: bytes, chunks: Iterable[bytes], max_size: int) -> tuple[str, object]:
    framer = C.StreamFramer(max_size=max_size)
    frames: list[bytes] = []
    pings = 0
    try:
        for chunk in chunks:
            frames += framer.feed(chunk)
            pings += framer.take_pings()
    except C.SIPParseError as err:
        assert err.reason and "\n" not in err.reason
        return "error", None
    return "ok", (frames, pings, framer.buffered)


def _cuts(data: bytes) -> list[bytes]:
    rnd = random.Random(zlib.crc32(data))
    points = sorted({rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(1, 12))})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def check_framer(data: bytes) -> None:
    """StreamFramer frames ``data`` the same however it is split (see the docstring)."""
    for max_size in (65535, 256 + len(data) % 997):
        whole = _frame(data, [data], max_size)
        chunked = _frame(data, _cuts(data), max_size)
        assert whole[0] == chunked[0], f"split changes the outcome: {whole[0]} vs {chunked[0]}"
        if whole[0] == "ok":
            assert whole == chunked, "split changes the frames"
        if len(data) <= 2048:
            bytewise = _frame(data, (data[i : i + 1] for i in range(len(data))), max_size)
            assert bytewise[0] == whole[0], "byte-by-byte feeding changes the outcome"
            if whole[0] == "ok":
                assert bytewise == whole, "byte-by-byte feeding changes the frames"
        if whole[0] == "ok" and max_size == 65535:
            frames = whole[1][0]  # type: ignore[index]
            for frame in frames:
                check_parse(frame, datagram=False)


def check_sdp(data: bytes) -> None:
    """sdp.parse and the relay helpers keep their promises on ``data``."""
    mod = C.sdp
    try:
        desc = mod.parse(data)
    except mod.SDPError as err:
        assert err.reason and "\n" not in err.reason
        return
    wire = mod.serialize(desc)
    assert mod.parse(wire) == desc, "re-parsed SDP differs"
    assert mod.serialize(mod.parse(wire)) == wire, "SDP serialisation is not stable"
    mod.is_hold(desc)
    origin = mod.Origin("pbx", "1", desc.origin.version + 1, address="192.0.2.1")
    for index, media in enumerate(desc.media[:4]):
        mod.codec_names(media)
        mod.direction(desc, media)
        mod.connection_address(desc, media)
        try:
            out = mod.rewrite_media(desc, index, address="192.0.2.1", port=40000,
                                    origin=origin, codecs=("PCMU", "PCMA", "telephone-event"))
        except mod.SDPError:
            continue
        assert mod.parse(mod.serialize(out)) == out, "rewritten SDP does not round-trip"


CHECKS: dict[str, Callable[[bytes], None]] = {
    "parse": lambda d: (check_parse(d, True), check_parse(d, False))[0],
    "framer": check_framer,
    "sdp": check_sdp,
}


# -- child: one target under atheris ------------------------------------------------------


def _site(exc: BaseException) -> str:
    """Where a failure happened: exception type and the innermost frame in pbx/ or here."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/pbx/" in f.filename] or frames
    last = ours[-1] if ours else None
    where = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
    return f"{type(exc).__name__}@{where}"


def _best_ms(check: Callable[[bytes], None], data: bytes, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            check(data)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def _save(directory: Path, data: bytes, prefix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def run_child(target: str, work: Path, corpus: Path, seconds: int, max_len: int,
              slow_ms: float) -> None:
    import atheris

    _import_codec(instrument=True)
    check = CHECKS[target]
    seen_sites: set[str] = set()
    stats_path = work / f"{target}-stats.json"
    stats = {"target": target, "crashes": [], "slow": [], "execs": 0}

    def one_input(data: bytes) -> None:
        stats["execs"] += 1  # type: ignore[operator]
        t0 = time.perf_counter()
        try:
            check(data)
        except Exception as exc:  # the harness's whole point: anything else is a crash
            site = _site(exc)
            if site not in seen_sites:
                seen_sites.add(site)
                path = _save(work / "crashes", data, f"{target}-crash")
                stats["crashes"].append({"site": site, "file": str(path),  # type: ignore[union-attr]
                                         "error": repr(exc)[:300]})
                print(f"\n*** CRASH {site}: {exc!r:.200} -> {path}", flush=True)
                stats_path.write_text(json.dumps(stats, indent=1))
            return
        elapsed = (time.perf_counter() - t0) * 1e3
        if elapsed > slow_ms:  # confirm: a GC pause or a busy machine is not a finding
            elapsed = min(elapsed, _best_ms(check, data, 2))
        if elapsed > slow_ms:
            path = _save(work / "slow", data, f"{target}-slow")
            stats["slow"].append({"ms": round(elapsed, 1), "file": str(path),  # type: ignore[union-attr]
                                  "bytes": len(data)})
            print(f"\n*** SLOW {elapsed:.0f} ms ({len(data)} B) -> {path}", flush=True)
            stats_path.write_text(json.dumps(stats, indent=1))
        if stats["execs"] % 20000 == 0:  # type: ignore[operator]
            stats_path.write_text(json.dumps(stats, indent=1))

    corpus.mkdir(parents=True, exist_ok=True)
    seed_dirs = [str(SEEDS / d) for d in SEED_DIRS[target] if (SEEDS / d).is_dir()]
    regressions = SEEDS / "regressions"
    if regressions.is_dir():
        seed_dirs.append(str(regressions))
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(corpus), *seed_dirs, f"-max_total_time={seconds}",
            f"-max_len={max_len}", "-timeout=20", "-rss_limit_mb=2048",
            f"-artifact_prefix={work / 'artifacts'}/", "-print_final_stats=1"]
    stats_path.write_text(json.dumps(stats, indent=1))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


# -- parent: run targets, summarise --------------------------------------------------------


def _count(directory: Path) -> int:
    return sum(1 for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0


def _confirm_slow(target: str, found: list[dict[str, object]],
                  slow_ms: float) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Re-time slow candidates without instrumentation (which slows the framer check,
    with its byte-by-byte feeding, by well over 10x); keep only the really slow ones.
    The others are moved to ``slow/instrumented-only/``."""
    if not found:
        return [], []
    if not hasattr(C, "parse"):
        _import_codec(instrument=False)
    slow, unconfirmed = [], []
    for item in found:
        path = Path(str(item["file"]))
        if not path.exists():
            continue
        ms = _best_ms(CHECKS[target], path.read_bytes(), 3)
        if ms > slow_ms:
            slow.append({**item, "ms_uninstrumented": round(ms, 1)})
            continue
        unconfirmed.append(item)
        dest = path.parent / "instrumented-only"
        dest.mkdir(exist_ok=True)
        path.replace(dest / path.name)
    return slow, unconfirmed


def run_campaign(args: argparse.Namespace) -> int:
    targets = list(TARGETS) if args.target == "all" else [args.target]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seconds = max(10, int(args.minutes * 60 / len(targets)))
    summary: dict[str, object] = {"targets": {}}
    bad = 0
    for target in targets:
        corpus = Path(args.corpus) / target if args.corpus else REPO / "var" / "fuzz" / target
        if args.corpus and len(targets) == 1:
            corpus = Path(args.corpus)
        before = _count(corpus)
        cmd = [sys.executable, __file__, "--_child", target, "--work", str(work),
               "--corpus", str(corpus), "--seconds", str(seconds),
               "--max-len", str(args.max_len), "--slow-ms", str(args.slow_ms)]
        print(f"== {target}: {seconds} s, corpus {corpus} ({before} files)", flush=True)
        t0 = time.monotonic()
        log = work / f"{target}.log"
        with log.open("ab") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
        minutes = (time.monotonic() - t0) / 60
        stats_file = work / f"{target}-stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        slow, unconfirmed = _confirm_slow(target, stats.get("slow", []), args.slow_ms)
        row = {"minutes": round(minutes, 1), "rc": rc, "execs": stats.get("execs"),
               "corpus_files": _count(corpus), "corpus_files_before": before,
               "crashes": stats.get("crashes", []), "slow": slow,
               "slow_only_instrumented": len(unconfirmed)}
        summary["targets"][target] = row  # type: ignore[index]
        bad += len(row["crashes"]) + len(row["slow"])  # type: ignore[arg-type]
        print(f"   {minutes:.1f} min, {row['execs']} execs, corpus {row['corpus_files']} files, "
              f"{len(row['crashes'])} crashes, {len(row['slow'])} slow "
              f"(+{len(unconfirmed)} slow only under instrumentation); log {log}", flush=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if bad else 0


def run_replay(args: argparse.Namespace) -> int:
    """Run the checks un-instrumented over files; report failures and slow inputs."""
    _import_codec(instrument=False)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    files: list[Path] = []
    for item in args.replay:
        p = Path(item)
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    bad = 0
    for path in files:
        data = path.read_bytes()
        for target in targets:
            t0 = time.perf_counter()
            try:
                CHECKS[target](data)
            except Exception as exc:
                bad += 1
                print(f"FAIL {target} {path}: {_site(exc)} {exc!r:.200}")
                continue
            ms = (time.perf_counter() - t0) * 1e3
            if ms > args.slow_ms:
                ms = min(ms, _best_ms(CHECKS[target], data, 2))
            if ms > args.slow_ms:
                bad += 1
                print(f"SLOW {target} {path}: {ms:.1f} ms")
    print(f"replayed {len(files)} files x {len(targets)} targets: {bad} problems")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="total fuzzing time")
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--corpus", help="working corpus directory (default var/fuzz/<target>)")
    ap.add_argument("--work", default=str(REPO / "var" / "fuzz" / "work"),
                    help="where crashes/, slow/, logs and summary.json go")
    ap.add_argument("--max-len", type=int, default=8192, help="libFuzzer -max_len")
    ap.add_argument("--slow-ms", type=float, default=50.0)
    ap.add_argument("--replay", nargs="+", metavar="PATH",
                    help="check these files/directories once, without atheris")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=int, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        run_child(args._child, Path(args.work), Path(args.corpus), args.seconds,
                  args.max_len, args.slow_ms)
        return 0
    if args.replay:
        return run_replay(args)
    return run_campaign(args)


if __name__ == "__main__":
    sys.exit(main())
