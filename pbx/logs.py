"""Route stdlib ``logging`` into Twisted's log system.

Our modules log with ``logging`` (cheap when a level is off); ``twistd`` owns the output
(stdout with ``-n``, a file otherwise), so each record is handed to ``twisted.logger``.
"""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


class TwistedLogHandler(logging.Handler):
    """A logging handler that emits each record as a Twisted log event."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text = f"{text}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            level = _LEVELS.get(record.levelno, LogLevel.info)
            Logger(namespace=record.name).emit(level, "{text}", text=text)
        except Exception:
            self.handleError(record)


def configure_logging(level: str) -> None:
    """Install the bridge once, at the configured level."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(isinstance(h, TwistedLogHandler) for h in root.handlers):
        root.addHandler(TwistedLogHandler())
    # transitions narrates every callback at INFO; our own state-change lines suffice.
    logging.getLogger("transitions").setLevel(logging.WARNING)
