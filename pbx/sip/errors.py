"""The single error type of the SIP codec.

The parser promises to raise nothing but :class:`SIPParseError`, whatever bytes it is
given, so the transport can turn any failure into a ``400`` (or drop the datagram)
without guessing at exception types.
"""

from __future__ import annotations

from typing import Any


class SIPParseError(ValueError):
    """A SIP message, header or URI could not be parsed.

    Attributes:
        reason: short human phrase, safe to use as a SIP reason phrase
            (no CR/LF), e.g. ``"Missing Call-ID"``.
        status: the response code a server should answer with when the error
            concerns a request: 400 normally, 505 for an unsupported SIP version,
            416 for an unsupported Request-URI scheme, 513 for an oversized message.
        partial: for a *request* whose start line (and as many header lines as
            could be read) parsed, a :class:`pbx.sip.message.Request` holding the
            header lines that were well formed and an empty body, so that
            ``make_response(err.partial, err.status, err.reason)`` can be sent.
            Its ``uri`` is ``None`` if the Request-URI itself was malformed.  The
            partial request is not validated: only use it to build the error
            response.  ``None`` for responses and for unreadable start lines.
    """

    def __init__(self, reason: str, *, status: int = 400, partial: Any = None) -> None:
        reason = " ".join(reason.split()) or "Bad Request"
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.partial = partial

    def __repr__(self) -> str:
        return f"SIPParseError({self.reason!r}, status={self.status})"
