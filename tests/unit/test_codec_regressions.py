"""Inputs found by the fuzzing campaign (scripts/fuzz_sip.py), replayed for ever.

Every file in ``tests/fuzz_corpus/regressions/`` is named ``<target>-<what>-<hash>``
(``parse``, ``framer`` or ``sdp``) and must pass the harness's checks for that target:
only :class:`SIPParseError` escapes, round-trips hold, the framer does not depend on how
the stream is split.  Under a generous alarm, so a "slow" finding that comes back fails
instead of hanging.  The seed corpus (``sip/``, ``sdp/``) is replayed the same way.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

CORPUS = Path(__file__).resolve().parent.parent / "fuzz_corpus"
SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "fuzz_sip.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_sip_harness", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    module._import_codec(instrument=False)
    return module


HARNESS = _harness()
CHECKS: dict[str, Callable[[bytes], None]] = HARNESS.CHECKS


class Hang(BaseException):
    """Not an Exception, so the codec's defensive catch-all cannot swallow it."""


@contextmanager
def guard(seconds: float = 5.0) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise Hang(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _cases() -> list[tuple[str, Path]]:
    cases: list[tuple[str, Path]] = []
    for path in sorted((CORPUS / "regressions").glob("*")):
        target = path.name.split("-", 1)[0]
        assert target in CHECKS, f"{path.name}: name must start with parse-, framer- or sdp-"
        cases.append((target, path))
    for path in sorted((CORPUS / "sip").glob("*")):
        cases += [("parse", path), ("framer", path)]
    cases += [("sdp", path) for path in sorted((CORPUS / "sdp").glob("*"))]
    return cases


@pytest.mark.parametrize(("target", "path"), _cases(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_corpus_file_keeps_the_codec_promises(target: str, path: Path) -> None:
    with guard():
        CHECKS[target](path.read_bytes())


def test_seed_corpus_is_small_and_parses() -> None:
    """The seeds must be valid messages (so the fuzzer starts from deep coverage)."""
    from pbx.sip import sdp
    from pbx.sip.message import parse

    files = sorted((CORPUS / "sip").glob("*")) + sorted((CORPUS / "sdp").glob("*"))
    assert files and all(p.stat().st_size < 4096 for p in files)
    for path in sorted((CORPUS / "sip").glob("*")):
        parse(path.read_bytes())
    for path in sorted((CORPUS / "sdp").glob("*")):
        sdp.parse(path.read_bytes())
