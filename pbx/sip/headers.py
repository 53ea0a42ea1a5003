"""SIP header container and the structured header values the core needs.

Header values are kept as *strings* exactly as received (whitespace-trimmed,
folding collapsed to one space); structured views (:class:`Via`,
:class:`NameAddress`, :class:`CSeq`) are parsed only on demand.  That keeps
parsing and re-serialising a message cheap and lossless.

Header names are canonicalised on insertion: compact forms become the full name
(``i`` -> ``Call-ID``), known names get their RFC spelling (``cseq`` -> ``CSeq``,
``www-authenticate`` -> ``WWW-Authenticate``) and *unknown* names are title-cased
per ``-`` segment (``x-my-HEADER`` -> ``X-My-Header``).  Header names are
case-insensitive, so this loses nothing and makes equality case-insensitive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pbx.sip.errors import SIPParseError
from pbx.sip.uri import URI, format_hostport, parse_hostport

__all__ = [
    "COMPACT_FORMS",
    "CSeq",
    "Headers",
    "NameAddress",
    "Via",
    "canonical_name",
    "format_params",
    "is_token",
    "parse_params",
    "quote_string",
    "split_comma_list",
    "unquote_string",
]

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_BAD_VALUE_RE = re.compile(r'[ \t",]')  # not allowed in an unquoted parameter value

COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
    "f": "From", "t": "To", "v": "Via", "k": "Supported", "s": "Subject",
    "c": "Content-Type", "o": "Event", "u": "Allow-Events", "r": "Refer-To",
    "b": "Referred-By", "x": "Session-Expires", "a": "Accept-Contact",
    "j": "Reject-Contact", "d": "Request-Disposition", "y": "Identity", "n": "Identity-Info",
}

_KNOWN_NAMES = (
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Accept-Resource-Priority",
    "Alert-Info", "Allow", "Allow-Events", "Authentication-Info", "Authorization", "Call-ID",
    "Call-Info", "Contact", "Content-Disposition", "Content-Encoding", "Content-Language",
    "Content-Length", "Content-Type", "CSeq", "Date", "Diversion", "Error-Info", "Event",
    "Expires", "Flow-Timer", "From", "Geolocation", "History-Info", "Identity",
    "Identity-Info", "In-Reply-To", "Info-Package", "Join", "Max-Breadth", "Max-Forwards",
    "MIME-Version", "Min-Expires", "Min-SE", "Organization", "P-Asserted-Identity",
    "P-Access-Network-Info", "P-Called-Party-ID", "P-Charging-Vector", "P-Preferred-Identity",
    "Path", "Priority", "Privacy", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Require", "RAck", "Reason", "Record-Route", "Recv-Info", "Refer-Sub", "Refer-To",
    "Referred-By", "Reject-Contact", "Remote-Party-ID", "Replaces", "Reply-To",
    "Request-Disposition", "Require", "Resource-Priority", "Retry-After", "Route", "RSeq",
    "Security-Client", "Security-Server", "Security-Verify", "Server", "Service-Route",
    "Session-Expires", "SIP-ETag", "SIP-If-Match", "Subject", "Subscription-State",
    "Supported", "Target-Dialog", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
    "Warning", "WWW-Authenticate",
)

# lower-case name -> canonical name; compact forms included.
_CANONICAL: dict[str, str] = {n.lower(): n for n in _KNOWN_NAMES}
_CANONICAL.update(COMPACT_FORMS)
# exact spelling seen on the wire -> canonical name (hot-path cache, bounded).
_SPELLING_CACHE: dict[str, str] = dict(_CANONICAL)
_SPELLING_CACHE.update({n: n for n in _KNOWN_NAMES})
_SPELLING_CACHE.update({n.upper(): n for n in _KNOWN_NAMES})
_SPELLING_CACHE_MAX = 4096
_SPELLING_NAME_MAX = 64  # longer spellings are canonicalised every time, not cached

# Headers whose grammar is a comma-separated list (RFC 3261 §7.3.1); getall() splits them.
LIST_HEADERS = frozenset({
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Call-Info", "Contact", "Content-Encoding", "Content-Language",
    "Diversion", "Error-Info", "History-Info", "In-Reply-To", "P-Asserted-Identity",
    "P-Preferred-Identity", "Path", "Proxy-Require", "Reason", "Record-Route", "Reject-Contact",
    "Request-Disposition", "Require", "Route", "Security-Client", "Security-Server",
    "Security-Verify", "Service-Route", "Supported", "Unsupported", "Via", "Warning",
})


def is_token(text: str) -> bool:
    """RFC 3261 ``token``: method names, header names, parameter names."""
    return _TOKEN_RE.fullmatch(text) is not None


def canonical_name(name: str) -> str:
    """Canonical spelling of a header name; raises :class:`SIPParseError` if not a token."""
    cached = _SPELLING_CACHE.get(name)
    if cached is not None:
        return cached
    stripped = name.strip(" \t")
    if _TOKEN_RE.fullmatch(stripped) is None:
        raise SIPParseError("Invalid header name")
    lower = stripped.lower()
    canon = _CANONICAL.get(lower)
    if canon is None:
        # tokens are ASCII, so capitalize() is exactly "upper-case the first letter"
        canon = "-".join(map(str.capitalize, lower.split("-")))
    # Bounded in count *and* size: a 60 KB header name from the wire is not kept.
    if len(_SPELLING_CACHE) < _SPELLING_CACHE_MAX and len(name) <= _SPELLING_NAME_MAX:
        _SPELLING_CACHE[name] = canon
    return canon


# -- quoted strings, lists, parameters ---------------------------------------------


def quote_string(text: str) -> str:
    """Make an RFC 3261 quoted-string; CR and LF cannot be represented and are refused."""
    if "\r" in text or "\n" in text:
        raise ValueError("CR/LF cannot appear in a quoted string")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Linear-time building blocks (RFC 3261 §25.1 quoted-string / quoted-pair).  Every
# alternative starts with a different character and every repetition is possessive,
# so the engine never backtracks: each pattern reads a character at most twice.
_QUOTED = r'"(?:[^"\\]++|\\.)*+"'
_QUOTED_RE = re.compile(_QUOTED, re.S)
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.S)
# Runs of text up to the next separator *outside* quoted strings (and <...>).
_RUNS = {
    (";", False): re.compile(rf'(?:[^";]++|{_QUOTED})*+', re.S),
    (",", False): re.compile(rf'(?:[^",]++|{_QUOTED})*+', re.S),
    (";", True): re.compile(rf'(?:[^"<;]++|{_QUOTED}|<(?:[^">]++|{_QUOTED})*+>)*+', re.S),
    (",", True): re.compile(rf'(?:[^"<,]++|{_QUOTED}|<(?:[^">]++|{_QUOTED})*+>)*+', re.S),
}


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Read the quoted-string at ``text[start] == '"'``; returns (unescaped, index after).

    RFC 3261 §25.1 ``quoted-string``/``quoted-pair``, matched by one possessive
    pattern and unescaped with three ``str.replace``: linear however many escapes.
    """
    m = _QUOTED_RE.match(text, start)
    if m is None:
        raise SIPParseError("Unterminated quoted string")
    end = m.end()
    body = text[start + 1 : end - 1]
    if "\\" in body:
        if "\x00" in body:  # cannot use NUL as the placeholder below (rare: slower)
            body = _QUOTED_PAIR_RE.sub(r"\1", body)
        else:
            # In a well-formed body each run of backslashes pairs up from its left
            # end, exactly as str.replace scans: escaped backslashes first, then
            # every remaining backslash escapes the character after it.
            body = body.replace("\\\\", "\x00").replace("\\", "").replace("\x00", "\\")
    return body, end


def unquote_string(text: str) -> str:
    """Inverse of :func:`quote_string`; text that is not quoted is returned unchanged."""
    text = text.strip(" \t")
    if not text.startswith('"'):
        return text
    value, end = _read_quoted(text, 0)
    if end != len(text):
        raise SIPParseError("Invalid quoted string")
    return value


def _split_outside(text: str, sep: str, angle: bool) -> list[str]:
    """Split on ``sep`` except inside quoted strings (and ``<...>`` when ``angle``).

    One possessive-regex match per part (see ``_RUNS``), so the cost is linear in
    ``len(text)`` however many quotes, escapes or brackets it holds.  An
    unterminated quote, or a ``<`` that is never closed, runs to the end of the
    text: the rest is one part.
    """
    run = _RUNS[sep, angle]
    parts: list[str] = []
    start = 0
    n = len(text)
    while True:
        j = run.match(text, start).end()  # type: ignore[union-attr]  # always matches
        if j >= n or text[j] != sep:  # the end, or an unterminated quote or "<"
            break
        parts.append(text[start:j])
        start = j + 1
    parts.append(text[start:])
    return parts


def split_comma_list(value: str) -> list[str]:
    """Split a list-valued header on commas outside quotes and ``<...>``; drop empty items."""
    if '"' in value or "<" in value:
        raw = _split_outside(value, ",", True)
    elif "," in value:
        raw = value.split(",")
    else:
        value = value.strip(" \t")
        return [value] if value else []
    return [s for s in (p.strip(" \t") for p in raw) if s]


def parse_params(text: str) -> dict[str, str | None]:
    """Parse header parameters ``;name=value;flag`` (leading ``;`` optional).

    Names are lower-cased; values are kept verbatim (a quoted-string keeps its
    quotes, see :func:`unquote_string`), so formatting them back is lossless.
    """
    params: dict[str, str | None] = {}
    if not text:
        return params
    if len(text) > 256 and not ('"' in text or " " in text or "\t" in text or "," in text):
        return _parse_plain_params(text)
    parts = _split_outside(text, ";", False) if '"' in text else text.split(";")
    for raw in parts:
        part = raw.strip(" \t")
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.rstrip(" \t")
        if _TOKEN_RE.fullmatch(name) is None:
            raise SIPParseError("Invalid header parameter")
        if eq:
            value = value.lstrip(" \t")
            if value.startswith('"'):
                _, end = _read_quoted(value, 0)
                if end != len(value):
                    raise SIPParseError("Invalid header parameter")
            elif _BAD_VALUE_RE.search(value) is not None:
                raise SIPParseError("Invalid header parameter")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def _parse_plain_params(text: str) -> dict[str, str | None]:
    """:func:`parse_params` for long text without quotes, LWS or commas.

    Same result, but the per-parameter work is a few list comprehensions and one
    token match over all names joined, instead of a Python loop with a regex match
    per name: thousands of ``;x`` cost no more than an ordinary header line each.
    """
    raw = [p for p in text.split(";") if p]
    if not raw:
        return {}
    values: list[str | None] | None = None
    if "=" in text:
        pairs = [p.partition("=") for p in raw]
        names = [p[0] for p in pairs]
        values = [v if eq else None for _, eq, v in pairs]
    else:
        names = raw
    if "" in names or _TOKEN_RE.fullmatch("".join(names)) is None:
        raise SIPParseError("Invalid header parameter")
    lowered = ";".join(names).lower().split(";")  # tokens are ASCII: no new ";"
    if values is None:
        return dict.fromkeys(lowered)
    return dict(zip(lowered, values, strict=True))


def format_params(params: dict[str, str | None]) -> str:
    """Inverse of :func:`parse_params` (with the leading ``;``)."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


# -- Headers container ---------------------------------------------------------------


def _check_value(value: str) -> str:
    value = value.strip(" \t")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("header values must not contain CR, LF or NUL")
    return value


class Headers:
    """Ordered, case-insensitive multi-map of header lines.

    Each entry is one header *line* ``(canonical_name, value)``; :meth:`getall`
    additionally splits comma-separated values of list headers.  ``_ver`` is bumped
    on every mutation so messages can cache parsed views cheaply.
    """

    __slots__ = ("_items", "_ver")

    def __init__(self, items: Iterable[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        self._ver = 0
        if items is not None:
            for name, value in items:
                self.add(name, value)

    @classmethod
    def _from_canonical(cls, items: list[tuple[str, str]]) -> Headers:
        """Adopt an already-canonical item list (the parser's fast path)."""
        h = cls.__new__(cls)
        h._items = items
        h._ver = 0
        return h

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value; for list headers the first comma-separated item."""
        name = canonical_name(name)
        for n, v in self._items:
            if n == name:
                if name in LIST_HEADERS and ("," in v or not v):
                    parts = split_comma_list(v)
                    if not parts:
                        continue
                    return parts[0]
                return v
        return default

    def getall(self, name: str) -> list[str]:
        """All values in order; list headers are split into their items."""
        name = canonical_name(name)
        values = [v for n, v in self._items if n == name]
        if name in LIST_HEADERS:
            out: list[str] = []
            for v in values:
                out.extend(split_comma_list(v))
            return out
        return values

    def set(self, name: str, value: str) -> None:
        """Replace all lines of ``name`` by one line, at the position of the first."""
        name = canonical_name(name)
        value = _check_value(value)
        items = self._items
        pos = next((i for i, (n, _) in enumerate(items) if n == name), len(items))
        self._items = [it for it in items if it[0] != name]
        self._items.insert(pos, (name, value))
        self._ver += 1

    def add(self, name: str, value: str, first: bool = False) -> None:
        """Append a line; ``first=True`` puts it before the other lines of that name
        (or at the very top when there are none), as a proxy does with its Via."""
        name = canonical_name(name)
        value = _check_value(value)
        items = self._items
        if first:
            pos = next((i for i, (n, _) in enumerate(items) if n == name), 0)
            items.insert(pos, (name, value))
        else:
            items.append((name, value))
        self._ver += 1

    def remove(self, name: str) -> int:
        """Remove every line of ``name``; returns how many were removed."""
        name = canonical_name(name)
        before = len(self._items)
        self._items = [it for it in self._items if it[0] != name]
        removed = before - len(self._items)
        if removed:
            self._ver += 1
        return removed

    def items(self) -> list[tuple[str, str]]:
        """A copy of the ``(canonical_name, value)`` lines in order."""
        return list(self._items)

    def names(self) -> list[str]:
        """Distinct canonical names in first-appearance order."""
        return list(dict.fromkeys(n for n, _ in self._items))

    def copy(self) -> Headers:
        return Headers._from_canonical(list(self._items))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            name = canonical_name(name)
        except SIPParseError:
            return False
        return any(n == name for n, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# -- structured values ------------------------------------------------------------------


@dataclass(slots=True)
class Via:
    """One Via entry (RFC 3261 §20.42, RFC 3581 rport).

    ``params`` values are strings, or ``None`` for a valueless parameter, so
    ``'rport' in via.params`` tells whether rport was requested and
    ``via.params['rport'] = '5060'`` fills it in.
    """

    protocol: str = "SIP/2.0"
    transport: str = "UDP"
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        """``sent-protocol LWS sent-by *( SEMI via-params )`` (RFC 3261 §25.1).

        Cut with ``partition`` at the first ``;`` and the first two ``/`` (none can
        occur earlier: tokens and sent-by exclude ``;``, tokens exclude ``/``), so
        the cost is linear in the text whatever its whitespace.
        """
        head, semi, ptext = text.partition(";")
        name, _, rest = head.partition("/")
        version, slash2, rest = rest.partition("/")
        rest = rest.lstrip(" \t")
        cut = rest.find(" ")
        if "\t" in rest:
            tab = rest.find("\t")
            cut = tab if cut < 0 or tab < cut else cut
        if cut < 0:
            cut = len(rest)
        transport = rest[:cut]
        sent_by = rest[cut:].strip(" \t")
        name = name.strip(" \t")
        version = version.strip(" \t")
        # One token match over the three joined (each must also be non-empty).
        if (not slash2 or not sent_by or not name or not version or not transport
                or "\n" in ptext or _TOKEN_RE.fullmatch(name + version + transport) is None):
            raise SIPParseError("Invalid Via")
        ptext = semi + ptext
        if " " in sent_by or "\t" in sent_by:  # LWS is only allowed around the colon
            head, colon, tail = sent_by.rpartition(":")
            if colon:
                sent_by = head.rstrip(" \t") + ":" + tail.lstrip(" \t")
        host, port = parse_hostport(sent_by)
        return cls(f"{name.upper()}/{version}", transport.upper(), host, port,
                   parse_params(ptext) if ptext else {})

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The filled-in rport as an int; ``None`` if absent or requested without a value."""
        value = self.params.get("rport")
        if value and value.isascii() and value.isdigit():
            return int(value)
        return None

    @property
    def rport_requested(self) -> bool:
        return "rport" in self.params

    def __str__(self) -> str:
        return (f"{self.protocol}/{self.transport} {format_hostport(self.host, self.port)}"
                f"{format_params(self.params)}")


@dataclass(slots=True)
class NameAddress:
    """``name-addr`` / ``addr-spec`` with header parameters (From, To, Contact, Route...).

    ``uri`` is ``None`` only for the Contact wildcard ``*`` (see :attr:`is_wildcard`).
    In the addr-spec form without ``<>`` everything after the first ``;`` is a header
    parameter, not a URI parameter (RFC 3261 §20.10).  ``str()`` always uses ``<>``.
    """

    display_name: str | None = None
    uri: URI | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def wildcard(cls) -> NameAddress:
        return cls(None, None)

    @property
    def is_wildcard(self) -> bool:
        return self.uri is None

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @classmethod
    def parse(cls, text: str) -> NameAddress:
        s = text.strip(" \t")
        if s == "*":
            return cls(None, None)
        display: str | None = None
        if s.startswith('"'):
            display, end = _read_quoted(s, 0)
            rest = s[end:].lstrip(" \t")
            if not rest.startswith("<"):
                raise SIPParseError("Invalid name-addr")
        else:
            lt = s.find("<")
            if lt < 0:
                uri_text, semi, ptext = s.partition(";")
                return cls(None, URI.parse(uri_text.rstrip(" \t")),
                           parse_params(ptext) if semi else {})
            display = " ".join(s[:lt].split()) or None
            if display is not None and any(c in display for c in '"<>'):
                raise SIPParseError("Invalid display name")
            rest = s[lt:]
        gt = rest.find(">")
        if gt < 0:
            raise SIPParseError("Invalid name-addr")
        uri = URI.parse(rest[1:gt].strip(" \t"))
        ptext = rest[gt + 1 :].lstrip(" \t")
        if ptext and not ptext.startswith(";"):
            raise SIPParseError("Invalid name-addr")
        return cls(display, uri, parse_params(ptext) if ptext else {})

    def __str__(self) -> str:
        if self.uri is None:
            return "*"
        out = f"<{self.uri}>"
        if self.display_name is not None:
            out = quote_string(self.display_name) + " " + out
        return out + format_params(self.params) if self.params else out


@dataclass(slots=True)
class CSeq:
    """``CSeq: 4711 INVITE``; the sequence number is below 2**31 (RFC 3261 §8.1.1.5)."""

    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2:
            raise SIPParseError("Invalid CSeq")
        num, method = parts
        if not (num.isascii() and num.isdigit()) or len(num) > 10 or not is_token(method):
            raise SIPParseError("Invalid CSeq")
        seq = int(num)
        if seq >= 2**31:
            raise SIPParseError("Invalid CSeq")
        return cls(seq, method)

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"
