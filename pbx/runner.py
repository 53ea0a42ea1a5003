"""Shared start-up path of ``twistd pbx`` and ``pbx run``.

Configuration errors end the process with exit code 78 (EX_CONFIG) and a message that
names the key; a PBX that failed at runtime exits 1; a clean stop, drained or not, 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from pbx.clock import install_monotonic_clock
from pbx.config import ConfigError, Settings, load_settings
from pbx.config.validation import ValidationReport, render_text, validate
from pbx.logs import configure_logging
from pbx.service import EXIT_CONFIG, EXIT_OK, PBXService, make_service

_current: PBXService | None = None
_pending_warnings: list[str] = []
log = logging.getLogger("pbx")


def load_or_exit(config_path: str | None) -> Settings:
    """Load and validate the configuration, or exit 78 with a readable message.

    Start-up applies the same rules as ``pbx validate-config`` (without connecting to
    the database: the store reports that itself): errors refuse to start, warnings are
    logged once the log is up.
    """
    try:
        settings = load_settings(config_path)
    except ConfigError as err:
        print(f"pbx: configuration error\n{err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    report = ValidationReport(validate(settings), settings.config_file)
    if report.has_errors:
        print(f"pbx: configuration error\n{render_text(report)}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    _pending_warnings[:] = [f"config {f.code} {f.key}: {f.message} (fix: {f.fix})"
                            for f in report.warnings]
    return settings


def build_service(config_path: str | None) -> PBXService:
    """The service both runners start (``twistd -n pbx``, and ``pbx run`` through it).

    The reactor is switched to monotonic scheduling first, before anything is
    scheduled (:mod:`pbx.clock`).
    """
    install_monotonic_clock()
    settings = load_or_exit(config_path)
    configure_logging(settings.logging.level)
    for warning in _pending_warnings:
        log.warning("%s", warning)
    global _current
    _current = make_service(settings)
    atexit.register(_exit_with_service_code)
    return _current


def exit_code() -> int:
    return _current.exit_code if _current is not None else EXIT_OK


def _exit_with_service_code() -> None:
    """twistd always exits 0 after its reactor stops; carry our failure code out."""
    code = exit_code()
    if code != EXIT_OK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
