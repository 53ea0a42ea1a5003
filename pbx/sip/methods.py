"""The request methods this stack knows by name, and bounded metric labels for them.

A method is any token (RFC 3261 §25.1 ``extension-method``), so a peer can invent a new
one with every request.  Counters keyed by the method as received would grow a label
(and a Prometheus time series) per invented name; DESIGN.md asks every label set to
have a cap.  :func:`method_label` folds everything outside the registered methods into
``other``.
"""

from __future__ import annotations

__all__ = ["KNOWN_METHODS", "OTHER", "method_label", "status_label"]

# RFC 3261 (INVITE ACK BYE CANCEL OPTIONS REGISTER), 3262 (PRACK), 6665 (SUBSCRIBE
# NOTIFY), 3903 (PUBLISH), 6086 (INFO), 3515 (REFER), 3428 (MESSAGE), 3311 (UPDATE).
KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
    "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
})
OTHER = "other"
_STATUS_LABELS = {status: str(status) for status in range(100, 700)}


def method_label(method: str) -> str:
    """``method`` when it is a known method (methods are case-sensitive, §7.1), else
    ``other``."""
    return method if method in KNOWN_METHODS else OTHER


def status_label(status: int | str) -> str:
    """A status code as a label: ``"100"``..``"699"`` (RFC 3261 §7.2), else ``other``."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return OTHER
    return _STATUS_LABELS.get(code, OTHER)
