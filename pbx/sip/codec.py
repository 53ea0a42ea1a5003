"""One import for the whole sans-IO SIP codec (RFC 3261 syntax layer)."""

from __future__ import annotations

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import (
    COMPACT_FORMS,
    CSeq,
    Headers,
    NameAddress,
    Via,
    canonical_name,
    format_params,
    parse_params,
    quote_string,
    split_comma_list,
    unquote_string,
)
from pbx.sip.message import (
    MAX_MESSAGE_SIZE,
    REASON_PHRASES,
    Request,
    Response,
    SIPMessage,
    StreamFramer,
    default_reason,
    make_response,
    parse,
)
from pbx.sip.uri import URI

__all__ = [
    "COMPACT_FORMS",
    "MAX_MESSAGE_SIZE",
    "REASON_PHRASES",
    "URI",
    "CSeq",
    "Headers",
    "NameAddress",
    "Request",
    "Response",
    "SIPMessage",
    "SIPParseError",
    "StreamFramer",
    "Via",
    "canonical_name",
    "default_reason",
    "format_params",
    "make_response",
    "parse",
    "parse_params",
    "quote_string",
    "split_comma_list",
    "unquote_string",
]
