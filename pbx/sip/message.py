"""SIP messages: parsing, canonical serialisation, responses, stream framing.

Sans-IO: nothing here touches sockets.  ``parse()`` splits the header block
eagerly but cheaply and leaves Via/From/To/URI parsing to the lazy accessors, so
the common receive path (parse, hand to the transaction layer, re-serialise)
stays in the tens of microseconds.

Canonical serialisation (``to_bytes``): start line, one ``Name: value`` line per
stored header line with the canonical name, CRLF line ends, and a
``Content-Length`` equal to ``len(body)`` written *last* (any stored
Content-Length line is ignored on output and in equality), then the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pbx.sip.errors import SIPParseError
from pbx.sip.headers import (
    _SPELLING_CACHE,
    CSeq,
    Headers,
    NameAddress,
    Via,
    _check_value,
    canonical_name,
    is_token,
    split_comma_list,
)
from pbx.sip.uri import URI

__all__ = [
    "MAX_MESSAGE_SIZE",
    "REASON_PHRASES",
    "Request",
    "Response",
    "SIPMessage",
    "StreamFramer",
    "make_response",
    "parse",
]

MAX_MESSAGE_SIZE = 65535
SIP_VERSION = "SIP/2.0"

REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated",
    200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 433: "Anonymity Disallowed",
    436: "Bad Identity-Info", 437: "Unsupported Certificate", 438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support", 440: "Max-Breadth Exceeded",
    469: "Bad Info Package", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 580: "Precondition Failure",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable", 607: "Unwanted",
}
_CLASS_REASONS = {1: "Trying", 2: "OK", 3: "Redirection", 4: "Client Error",
                  5: "Server Error", 6: "Global Failure"}

_REQUEST_MANDATORY = ("Via", "To", "From", "Call-ID", "CSeq")
_RESPONSE_MANDATORY = ("Via", "To", "From", "Call-ID", "CSeq")
# Headers that may appear at most once; also tracked for mandatory checks.
_SINGLE = frozenset({"To", "From", "Call-ID", "CSeq", "Max-Forwards", "Content-Length"})
_TRACKED = _SINGLE | {"Via"}

T = TypeVar("T")


class SIPMessage:
    """Common part of requests and responses.

    Accessors (``vias``, ``from_``, ``to`` ...) parse on first use and cache the
    result until ``headers`` is mutated (or replaced).  The returned objects are
    shared with the cache: copy them before editing, and write changes back with
    ``headers.set(...)`` (which invalidates the cache).  Accessors raise
    :class:`SIPParseError` when a header is missing or malformed.
    """

    __slots__ = ("_cache", "body", "headers", "version")
    is_request: bool = False

    headers: Headers
    body: bytes
    version: str

    def __init__(self, headers: Headers | Iterable[tuple[str, str]] | None = None,
                 body: bytes = b"", version: str = SIP_VERSION) -> None:
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.headers = headers
        self.body = bytes(body)
        self.version = version
        self._cache: tuple[Headers, int, dict[str, Any]] | None = None

    # -- cached structured views ------------------------------------------------------
    def _cached(self, key: str, build: Callable[[], T]) -> T:
        h = self.headers
        cache = self._cache
        if cache is None or cache[0] is not h or cache[1] != h._ver:
            cache = self._cache = (h, h._ver, {})
        store = cache[2]
        try:
            return store[key]  # type: ignore[no-any-return]
        except KeyError:
            value = store[key] = build()
            return value

    def _peek(self, key: str) -> Any:
        """The cached view ``key`` if it is cached and current, else None (no parsing)."""
        cache = self._cache
        h = self.headers
        if cache is None or cache[0] is not h or cache[1] != h._ver:
            return None
        return cache[2].get(key)

    def replace_top_via(self, via: Via) -> None:
        """Rewrite the top Via (a transport stamping ``received``/``rport``).

        Only the first Via value changes: later values keep their text and position.
        The other cached views stay valid and the new top Via is cached as given, so
        the stamp costs no re-parse.  ``via`` is shared with the cache: do not edit it.
        """
        vias = self._cached("vias", lambda: [Via.parse(v) for v in self.headers.getall("Via")])
        if not vias:
            raise SIPParseError("Missing Via")
        h = self.headers
        cache = self._cache
        assert cache is not None
        items = h._items
        for i, (name, value) in enumerate(items):
            if name == "Via":
                new = [("Via", str(via))]
                if "," in value:  # several Vias on one line: keep the others as lines
                    new += [("Via", v) for v in split_comma_list(value)[1:]]
                items[i : i + 1] = new
                break
        h._ver += 1
        store = cache[2]
        store["vias"] = [via, *vias[1:]]
        self._cache = (h, h._ver, store)

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SIPParseError(f"Missing {name}")
        return value

    @property
    def call_id(self) -> str:
        return self._required("Call-ID")

    @property
    def cseq(self) -> CSeq:
        return self._cached("cseq", lambda: CSeq.parse(self._required("CSeq")))

    @property
    def vias(self) -> list[Via]:
        """All Via entries, top first (a fresh list; the Via objects are cached)."""
        return list(self._cached(
            "vias", lambda: [Via.parse(v) for v in self.headers.getall("Via")]))

    @property
    def top_via(self) -> Via:
        vias = self._cached("vias", lambda: [Via.parse(v) for v in self.headers.getall("Via")])
        if not vias:
            raise SIPParseError("Missing Via")
        return vias[0]

    @property
    def from_(self) -> NameAddress:
        return self._cached("from", lambda: NameAddress.parse(self._required("From")))

    @property
    def to(self) -> NameAddress:
        return self._cached("to", lambda: NameAddress.parse(self._required("To")))

    @property
    def contacts(self) -> list[NameAddress]:
        return list(self._cached(
            "contacts", lambda: [NameAddress.parse(v) for v in self.headers.getall("Contact")]))

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or len(value) > 10 or int(value) > 255:
            raise SIPParseError("Invalid Max-Forwards")
        return int(value)

    @property
    def content_length(self) -> int:
        """Always ``len(body)``: serialisation derives Content-Length from the body."""
        return len(self.body)

    # -- serialisation --------------------------------------------------------------------
    def _start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        lines = [self._start_line()]
        lines += [f"{n}: {v}" for n, v in self.headers._items if n != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}\r\n\r\n")
        return "\r\n".join(lines).encode("utf-8") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def _comparable(self) -> tuple[Any, ...]:
        return (self._start_line(), self.version,
                [it for it in self.headers._items if it[0] != "Content-Length"], self.body)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, SIPMessage)
        return self._comparable() == other._comparable()

    __hash__ = None  # type: ignore[assignment]


class Request(SIPMessage):
    """A SIP request.  ``uri`` is ``None`` only in a parse error's ``partial``."""

    __slots__ = ("method", "uri")
    is_request = True

    def __init__(self, method: str, uri: URI, headers: Headers | Iterable[tuple[str, str]]
                 | None = None, body: bytes = b"", version: str = SIP_VERSION) -> None:
        super().__init__(headers, body, version)
        self.method = method
        self.uri = uri

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(SIPMessage):
    """A SIP response."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str | None = None,
                 headers: Headers | Iterable[tuple[str, str]] | None = None,
                 body: bytes = b"", version: str = SIP_VERSION) -> None:
        super().__init__(headers, body, version)
        self.status = status
        self.reason = default_reason(status) if reason is None else reason

    @property
    def method(self) -> str:
        """The method of the request this answers (from CSeq)."""
        return self.cseq.method

    def _start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def default_reason(status: int) -> str:
    """Reason phrase for ``status``: the RFC phrase or a generic one for its class."""
    return REASON_PHRASES.get(status) or _CLASS_REASONS.get(status // 100, "Unknown")


# -- parsing ---------------------------------------------------------------------------


def parse(data: bytes, *, datagram: bool = True,
          max_size: int = MAX_MESSAGE_SIZE) -> Request | Response:
    """Parse one SIP message; raises :class:`SIPParseError` and nothing else.

    ``datagram=True`` (UDP): a body longer than Content-Length is truncated, a
    missing Content-Length means "the rest of the datagram".  ``datagram=False``
    (a frame from :class:`StreamFramer`): Content-Length is mandatory and exact.
    Leading CRLFs (keep-alives) are skipped.  Mandatory headers: Via, To, From,
    Call-ID, CSeq (Max-Forwards may be absent); CSeq's method must match.
    """
    try:
        return _parse(data, datagram, max_size)
    except SIPParseError:
        raise
    except Exception as exc:  # defensive: any bug becomes a clean parse error
        raise SIPParseError("Malformed message") from exc


def _parse(data: bytes, datagram: bool, max_size: int) -> Request | Response:
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise SIPParseError("Message is not bytes")
        data = bytes(data)
    if len(data) > max_size:
        raise SIPParseError("Message too large", status=513)
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
    if not data:
        raise SIPParseError("Empty message")
    body: bytes | None
    sep = data.find(b"\r\n\r\n")
    if sep >= 0:
        head = data[:sep]
        body = data[sep + 4 :]
    else:
        sep = data.find(b"\n\n")
        if sep >= 0:
            head = data[:sep].rstrip(b"\r")
            body = data[sep + 2 :]
        else:
            head = data
            body = None  # reported once the headers are known (for a useful partial)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SIPParseError("Invalid UTF-8 in headers") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            raise SIPParseError("Bare CR in headers")
    if "\x00" in text:
        raise SIPParseError("NUL in headers")
    if body is None:
        text = text.rstrip("\n")
    lines = text.split("\n")
    if "\n " in text or "\n\t" in text:
        # Unfold continuation lines (RFC 3261 §7.3.1); the start line is kept apart
        # so a first header line starting with LWS stays an error.
        lines[1:] = _unfold(lines[1:])
    start = lines[0]

    # -- start line
    method = ""
    uri: URI | None = None
    status = 0
    reason = ""
    if start[:4].upper() == "SIP/":
        parts = start.split(" ", 2)
        if len(parts) < 2:
            raise SIPParseError("Malformed status line")
        if parts[0].upper() != SIP_VERSION:
            raise SIPParseError("Unsupported SIP version")
        code = parts[1]
        if len(code) != 3 or not (code.isascii() and code.isdigit()) or code[0] not in "123456":
            raise SIPParseError("Invalid status code")
        status = int(code)
        reason = parts[2] if len(parts) == 3 else ""
        is_request = False
    else:
        parts = start.split(" ")
        if len(parts) != 3:
            raise SIPParseError("Malformed request line")
        method, uri_text, version = parts
        if not is_token(method):
            raise SIPParseError("Invalid method")
        is_request = True
        try:
            if version.upper() != SIP_VERSION:
                raise SIPParseError("Unsupported SIP version", status=505)
            try:
                uri = URI.parse(uri_text)
            except SIPParseError as err:
                status = 416 if err.reason == "Unsupported URI scheme" else 400
                raise SIPParseError(err.reason if status == 416 else "Invalid Request-URI",
                                    status=status) from None
        except SIPParseError as err:
            err.partial = _partial_request(method, uri, lines)
            raise

    try:
        return _parse_rest(lines, body, datagram, is_request, method, uri, status, reason)
    except SIPParseError as err:
        if is_request:
            err.partial = _partial_request(method, uri, lines)
        raise


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines onto the line they continue (RFC 3261 §7.3.1).

    ``LWS = [*WSP CRLF] 1*WSP``: the line break, the blanks before it and the blanks
    after it become one SP.  Every character is looked at a bounded number of times
    and each logical line is joined once, so this is linear whatever the input; the
    regex ``[ \\t]*\\n[ \\t]+`` it replaces restarts ``[ \\t]*`` at every blank of a
    long run and was quadratic.  The output is what that substitution produced,
    including for a continuation line made only of blanks: its blanks are consumed
    by the fold before it, so the next fold does not strip the SP written there.
    ``lines[0]`` is never a continuation (nothing precedes it).
    """
    out: list[str] = []
    parts: list[str] = []  # the pieces of the logical line being joined
    seg = lines[0]  # its last physical line, leading blanks already removed
    for line in lines[1:]:
        if line[:1] == " " or line[:1] == "\t":
            parts.append(seg.rstrip(" \t"))
            parts.append(" ")
            seg = line.lstrip(" \t")
            continue
        if parts:
            parts.append(seg)
            seg = "".join(parts)
            parts = []
        out.append(seg)
        seg = line
    if parts:
        parts.append(seg)
        seg = "".join(parts)
    out.append(seg)
    return out


def _parse_rest(lines: list[str], body: bytes | None, datagram: bool, is_request: bool,
                method: str, uri: URI | None, status: int, reason: str) -> Request | Response:
    items: list[tuple[str, str]] = []
    append = items.append
    spelling = _SPELLING_CACHE
    seen: set[str] = set()
    for i in range(1, len(lines)):
        line = lines[i]
        if not line:
            raise SIPParseError("Malformed header line")
        if line[0] == " " or line[0] == "\t":  # continuation without a header to continue
            raise SIPParseError("Malformed header line")
        name, colon, value = line.partition(":")
        if not colon:
            raise SIPParseError("Malformed header line")
        canon = spelling.get(name)
        if canon is None:
            canon = canonical_name(name)
        if canon in _TRACKED:
            if canon in seen and canon in _SINGLE:
                raise SIPParseError(f"Duplicate {canon}")
            seen.add(canon)
        append((canon, value.strip(" \t")))

    for name in _REQUEST_MANDATORY if is_request else _RESPONSE_MANDATORY:
        if name not in seen:
            raise SIPParseError(f"Missing {name}")
    headers = Headers._from_canonical(items)
    cseq_text = max_fwd = cl_text = ""
    for name, value in items:
        if name == "CSeq":
            cseq_text = value
        elif name == "Max-Forwards":
            max_fwd = value
        elif name == "Content-Length":
            cl_text = value
    cseq = CSeq.parse(cseq_text)
    if is_request and cseq.method != method:
        raise SIPParseError("CSeq method does not match")
    if "Max-Forwards" in seen and (
        not (max_fwd.isascii() and max_fwd.isdigit()) or len(max_fwd) > 10 or int(max_fwd) > 255
    ):
        raise SIPParseError("Invalid Max-Forwards")
    if body is None:
        raise SIPParseError("Missing empty line after headers")
    if "Content-Length" in seen:
        if not (cl_text.isascii() and cl_text.isdigit()) or len(cl_text) > 10:
            raise SIPParseError("Invalid Content-Length")
        length = int(cl_text)
        if len(body) < length:
            raise SIPParseError("Body shorter than Content-Length")
        if len(body) > length:
            if not datagram:
                raise SIPParseError("Body longer than Content-Length")
            body = body[:length]
    elif not datagram:
        raise SIPParseError("Missing Content-Length")

    msg: Request | Response
    if is_request:
        assert uri is not None
        msg = Request(method, uri, headers, body)
    else:
        msg = Response(status, reason, headers, body)
    msg._cache = (headers, 0, {"cseq": cseq})
    return msg


def _partial_request(method: str, uri: URI | None, lines: list[str]) -> Request:
    """Best-effort request for answering a 400: keeps the well-formed header lines."""
    items: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        try:
            items.append((canonical_name(name), value.strip(" \t")))
        except SIPParseError:
            continue
    return Request(method, uri, Headers._from_canonical(items))  # type: ignore[arg-type]


# -- responses ---------------------------------------------------------------------------


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None,
                  extra: Iterable[tuple[str, str]] = ()) -> Response:
    """Build a response per RFC 3261 §8.2.6.

    Copies every Via line (in order), From, To, Call-ID and CSeq (and Timestamp for
    a 100).  ``to_tag`` is added to To unless To already carries a tag.  ``extra``
    header lines are appended (cheaper than adding them one by one afterwards, and the
    response keeps the request's parsed Vias, which the transport needs to route it).
    """
    src = request.headers._items
    items: list[tuple[str, str]] = [it for it in src if it[0] == "Via"]
    for wanted in ("From", "To", "Call-ID", "CSeq"):
        for name, value in src:
            if name == wanted:
                if name == "To" and to_tag:
                    value = _with_tag(request, value, to_tag)
                items.append((name, value))
                break
    if status == 100:
        items += [it for it in src if it[0] == "Timestamp"]
    for name, value in extra:
        items.append((canonical_name(name), _check_value(value)))
    response = Response(status, reason, Headers._from_canonical(items))
    vias = request._peek("vias")
    if vias is not None:
        # Same Via lines, so the same parsed values (shared, as the cache documents).
        response._cache = (response.headers, 0, {"vias": vias})
    return response


def _with_tag(request: Request, to_value: str, tag: str) -> str:
    to = request._peek("to")
    if to is None:
        if "tag" not in to_value.lower():
            return f"{to_value};tag={tag}"  # no tag parameter can be there
        try:
            to = NameAddress.parse(to_value)
        except SIPParseError:
            return to_value
    if to.tag is not None:
        return to_value
    return f"{to_value};tag={tag}"


# -- stream framing ------------------------------------------------------------------------


class StreamFramer:
    """Cut a TCP/TLS byte stream into messages (RFC 3261 §18.3, RFC 5626 §3.5.1).

    ``feed()`` returns the complete message blobs (pass each to
    ``parse(blob, datagram=False)``).  CRLFs between messages are skipped; each
    double-CRLF "ping" increments :attr:`pings` and the pending count returned by
    :meth:`take_pings`, for which the transport should send one CRLF "pong".
    Raises :class:`SIPParseError` when the header block exceeds ``max_size``, the
    whole message would, or Content-Length is missing or invalid; the stream cannot
    be re-synchronised then, so the connection should be closed.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self.pings = 0
        self._pending_pings = 0
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for the header terminator
        self._frame_len: int | None = None  # total size of the frame at the buffer head

    def take_pings(self) -> int:
        """Pings seen since the last call (answer each with ``b"\\r\\n"``)."""
        n, self._pending_pings = self._pending_pings, 0
        return n

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def message_pending(self) -> bool:
        """A message has begun and is not complete (keep-alive CRLFs do not count): what
        a transport's header deadline measures."""
        buf = self._buf
        return bool(buf) and buf[0] not in (13, 10)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while buf:
            if buf[0] in (13, 10):
                if len(buf) > 64:  # a long run of CR/LF: skip it in bulk, not byte by byte
                    skip, pings = _crlf_prefix(buf)
                    if skip:
                        del buf[:skip]
                        self.pings += pings
                        self._pending_pings += pings
                        self._scanned = 0
                        continue
                if buf.startswith(b"\r\n\r\n"):
                    del buf[:4]
                    self.pings += 1
                    self._pending_pings += 1
                    continue
                if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                    break  # maybe the start of a ping: wait for more
                del buf[: 2 if buf.startswith(b"\r\n") else 1]
                self._scanned = 0
                continue
            frame = self._next_frame(buf)
            if frame is None:
                break
            out.append(frame)
        return out

    def _next_frame(self, buf: bytearray) -> bytes | None:
        total = self._frame_len
        if total is None:
            total = self._measure(buf)
            if total is None:
                return None
        if len(buf) < total:
            self._frame_len = total  # waiting for the body: don't re-read the headers
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        self._scanned = 0
        self._frame_len = None
        return frame

    def _measure(self, buf: bytearray) -> int | None:
        """Size of the message at the head of ``buf`` once its header block is complete."""
        start = max(0, self._scanned - 3)
        n = len(buf)
        found: tuple[int, int] | None
        if n - start <= 256 and n <= self.max_size:
            # A small increment (the usual case, and a slow-loris peer's): the two
            # finds cover it at once, without the windowed search's overhead.
            crlf = buf.find(b"\r\n\r\n", start)
            lf = buf.find(b"\n\n", start, crlf + 1 if crlf >= 0 else n)
            found = (lf, 2) if lf >= 0 else (crlf, 4) if crlf >= 0 else None
        else:
            found = _find_header_end(buf, start, self.max_size)
        if found is None:
            if len(buf) > self.max_size:
                raise SIPParseError("Message too large", status=513)
            self._scanned = len(buf)
            return None
        head_len, sep_len = found
        if head_len > self.max_size:
            raise SIPParseError("Message too large", status=513)
        length = _stream_content_length(bytes(buf[:head_len]))
        total = head_len + sep_len + length
        if total > self.max_size:
            raise SIPParseError("Message too large", status=513)
        return total


_CRLF_RUN = re.compile(rb"[\r\n]*")


def _crlf_prefix(buf: bytearray) -> tuple[int, int]:
    """How much of the CR/LF run at the head of ``buf`` the byte-by-byte loop in
    :meth:`StreamFramer.feed` would consume outright, and how many pings it holds.

    That loop takes ``CRLFCRLF`` (a ping, RFC 5626 §3.5.1), else ``CRLF``, else one
    byte, and waits when fewer than 4 bytes that could start a ping are left.  Its
    pings are exactly the non-overlapping ``CRLFCRLF`` that ``bytes.count`` finds
    scanning from a token boundary (a CRLF step never skips a CR that could start
    one), so the run is consumed with a few C-level calls.  A run that reaches the
    end of the buffer is cut at a token boundary at least 4 bytes before the end
    and the loop does the tail: two equal bytes in a row never sit inside one token
    (tokens alternate CR and LF), so the byte after the last such pair starts a
    token, and from there the run alternates and tokens are 4 bytes (1 + 4 when it
    starts with LF).  Linear, instead of a Python iteration per byte.
    """
    run_end = _CRLF_RUN.match(buf).end()  # type: ignore[union-attr]  # always matches
    if run_end < len(buf):
        end = run_end  # a message follows: the whole run goes
    else:
        limit = run_end - 4
        if limit <= 0:
            return 0, 0
        pair = max(buf.rfind(b"\n\n", 0, limit + 1), buf.rfind(b"\r\r", 0, limit + 1))
        sync = pair + 1 if pair >= 0 else 0
        phase = sync if buf[sync] == 13 else sync + 1
        end = phase + (limit - phase) // 4 * 4 if limit >= phase else sync
    return end, buf.count(b"\r\n\r\n", 0, end)


def _find_header_end(buf: bytearray, start: int, max_size: int) -> tuple[int, int] | None:
    """First CRLFCRLF or LFLF at or after ``start``: (header length, separator length).

    Linear in what it reads, however many frames ``buf`` holds: it searches windows
    of doubling size for both separators, so it never reads much past the first
    one (searching the whole buffer for CRLFCRLF when a frame ends in LFLF, once
    per frame, was quadratic in the number of frames in one read).  Nothing is
    searched beyond ``max_size``: a longer header block is refused anyway.
    """
    n = min(len(buf), max_size + 4)
    pos = start
    window = 256  # about a small SIP header block; doubles for longer ones
    while pos < n:
        stop = min(n, pos + window)
        # separators *starting* in [pos, stop); they may end up to 3 bytes later
        crlf = buf.find(b"\r\n\r\n", pos, stop + 3)
        lf = buf.find(b"\n\n", pos, (crlf if crlf >= 0 else stop) + 1)
        if lf >= 0:
            return lf, 2
        if crlf >= 0:
            return crlf, 4
        pos = stop
        window *= 2
    return None


def _unfold_bytes(lines: list[bytes]) -> list[bytes]:
    """:func:`_unfold` for raw header lines that may still end in CR.

    The fold ``[ \t]*\r?\n[ \t]+`` also takes the CR of the CRLF: one trailing CR
    is dropped before the blanks are, exactly as that pattern matched.
    """
    out: list[bytes] = []
    parts: list[bytes] = []
    seg = lines[0]
    for line in lines[1:]:
        if line[:1] == b" " or line[:1] == b"\t":
            parts.append((seg[:-1] if seg[-1:] == b"\r" else seg).rstrip(b" \t"))
            parts.append(b" ")
            seg = line.lstrip(b" \t")
            continue
        if parts:
            parts.append(seg)
            seg = b"".join(parts)
            parts = []
        out.append(seg)
        seg = line
    if parts:
        parts.append(seg)
        seg = b"".join(parts)
    out.append(seg)
    return out


def _stream_content_length(head: bytes) -> int:
    """Content-Length from a raw header block (the stream framer cannot parse fully yet).

    Folding (RFC 3261 §7.3.1) is undone first, over the whole block as the framer
    always has (a first header line starting with LWS continues the start line).
    """
    lines = head.split(b"\n")
    if b"\n " in head or b"\n\t" in head:
        lines = _unfold_bytes(lines)
    value: int | None = None
    for raw in lines[1:]:
        name, colon, rest = raw.partition(b":")
        if not colon or name[:1] in (b" ", b"\t"):
            continue
        lname = name.strip(b" \t").lower()
        if lname != b"content-length" and lname != b"l":
            continue
        text = rest.strip(b" \t\r")
        if not text.isdigit() or len(text) > 10:
            raise SIPParseError("Invalid Content-Length")
        n = int(text)
        if value is not None and n != value:
            raise SIPParseError("Invalid Content-Length")
        value = n
    if value is None:
        raise SIPParseError("Missing Content-Length")
    return value
