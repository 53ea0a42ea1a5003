"""Calls: the B2BUA between extensions, the call machine, the dialplan and CDRs.

This is the package's public face; other packages import only from here.  It depends on
the standard library, Twisted, transitions and the public faces of ``pbx.sip`` (and, in
:mod:`pbx.calls.wiring` only, ``pbx.media``); storage and configuration arrive as plain
arguments and Protocols.
"""

from pbx.calls.b2bua import B2BUA, MediaFactory
from pbx.calls.call import Call, CalleeLeg, CallerLeg, best_final
from pbx.calls.cdr import (
    ANSWERED,
    BUSY,
    CANCELLED,
    CONGESTION,
    FAILED,
    NO_ANSWER,
    CallRecord,
    CDRSink,
    CDRWriter,
    disposition_for_status,
)
from pbx.calls.routing import LOOP_HEADER, Dialplan, ExtensionDirectory, Route, check_hops
from pbx.calls.wiring import advertised_host, install_calls

__all__ = [
    "ANSWERED",
    "B2BUA",
    "BUSY",
    "CANCELLED",
    "CONGESTION",
    "FAILED",
    "LOOP_HEADER",
    "NO_ANSWER",
    "CDRSink",
    "CDRWriter",
    "Call",
    "CallRecord",
    "CalleeLeg",
    "CallerLeg",
    "Dialplan",
    "ExtensionDirectory",
    "MediaFactory",
    "Route",
    "advertised_host",
    "best_final",
    "check_hops",
    "disposition_for_status",
    "install_calls",
]
