"""Sans-IO SDP (RFC 8866, formerly 4566) and the offer/answer rewriting a relay needs.

The B2BUA never terminates media: it rewrites each side's SDP so the other side sends
RTP to the PBX (RFC 3264 offer/answer), filters codecs and passes the rest through.
That is why the model keeps every line it does not interpret, in order: an attribute we
do not know (``a=ptime``, ``a=fmtp``, ``a=crypto``...) must reach the other side intact.

Canonical form: :func:`serialize` writes ``v=0``, ``o=``, ``s=`` first, then the other
session-level lines and each media section in the order parsed, one ``x=value`` per line
with CRLF.  ``parse(serialize(d)) == d`` for every parsed ``d``.

Errors: :func:`parse` raises nothing but :class:`SDPError` (a
:class:`~pbx.sip.errors.SIPParseError`) whatever bytes it gets; its status is 488 (Not
Acceptable Here), the answer a call gives to an offer it cannot use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from pbx.sip.errors import SIPParseError

__all__ = [
    "DIRECTIONS",
    "STATIC_PAYLOADS",
    "Connection",
    "Media",
    "Origin",
    "SDPError",
    "SessionDescription",
    "codec_names",
    "connection_address",
    "direction",
    "filter_codecs",
    "is_hold",
    "parse",
    "rewrite_media",
    "rtpmap",
    "serialize",
]

MAX_SDP_SIZE = 65_536
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

#: RFC 3551 static payload types: (encoding name, clock rate).  An ``a=rtpmap`` for the
#: same number overrides the table.
STATIC_PAYLOADS: dict[str, tuple[str, int]] = {
    "0": ("PCMU", 8000), "3": ("GSM", 8000), "4": ("G723", 8000), "5": ("DVI4", 8000),
    "6": ("DVI4", 16000), "7": ("LPC", 8000), "8": ("PCMA", 8000), "9": ("G722", 8000),
    "10": ("L16", 44100), "11": ("L16", 44100), "12": ("QCELP", 8000), "13": ("CN", 8000),
    "14": ("MPA", 90000), "15": ("G728", 8000), "16": ("DVI4", 11025),
    "17": ("DVI4", 22050), "18": ("G729", 8000),
}

# ICE attributes name the endpoint's own addresses: forwarding them would let the far
# end bypass the relay, so rewriting drops them (the PBX is the only candidate).
_ICE_ATTRIBUTES = frozenset({"candidate", "remote-candidates", "ice-ufrag", "ice-pwd",
                             "ice-options", "ice-lite", "ice-mismatch", "end-of-candidates"})


class SDPError(SIPParseError):
    """An SDP body is malformed, or nothing usable is left of it (e.g. no common codec)."""

    def __init__(self, reason: str, *, status: int = 488) -> None:
        super().__init__(reason, status=status)


@dataclass(frozen=True, slots=True)
class Origin:
    """The ``o=`` line: who made the description and which version of it this is."""

    username: str
    sess_id: str
    version: int
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def __str__(self) -> str:
        return (f"{self.username} {self.sess_id} {self.version} {self.nettype} "
                f"{self.addrtype} {self.address}")


@dataclass(frozen=True, slots=True)
class Connection:
    """A ``c=`` line (the address part may carry ``/ttl/count`` for multicast)."""

    nettype: str
    addrtype: str
    address: str

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return cls("IN", "IP6" if ":" in address else "IP4", address)

    @property
    def host(self) -> str:
        return self.address.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass(slots=True)
class Media:
    """One media section: the ``m=`` line and its ``i c b k a`` lines in order."""

    kind: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    lines: list[tuple[str, str]] = field(default_factory=list)

    def m_line(self) -> str:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        return " ".join([self.kind, port, self.proto, *self.formats])

    def values(self, kind: str) -> list[str]:
        return [v for k, v in self.lines if k == kind]

    def attributes(self) -> list[tuple[str, str | None]]:
        """``a=`` lines as (name, value); value is None for flags such as ``sendonly``."""
        out: list[tuple[str, str | None]] = []
        for value in self.values("a"):
            name, sep, rest = value.partition(":")
            out.append((name, rest if sep else None))
        return out

    @property
    def connection(self) -> Connection | None:
        found = self.values("c")
        return _parse_connection(found[0]) if found else None

    @property
    def is_rtp(self) -> bool:
        return "RTP/" in self.proto.upper()


@dataclass(slots=True)
class SessionDescription:
    """A parsed SDP body (mutable only through the rewriting helpers, which copy)."""

    origin: Origin
    name: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)

    def values(self, kind: str) -> list[str]:
        return [v for k, v in self.lines if k == kind]

    @property
    def connection(self) -> Connection | None:
        found = self.values("c")
        return _parse_connection(found[0]) if found else None

    def copy(self) -> SessionDescription:
        return replace(self, lines=list(self.lines),
                       media=[replace(m, formats=list(m.formats), lines=list(m.lines))
                              for m in self.media])


# -- parsing --------------------------------------------------------------------------
def parse(body: bytes | str) -> SessionDescription:
    """Parse an SDP body; raises only :class:`SDPError`."""
    if isinstance(body, bytes | bytearray):
        if len(body) > MAX_SDP_SIZE:
            raise SDPError("SDP body too large")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise SDPError("SDP is not UTF-8") from None
    elif isinstance(body, str):
        text = body
    else:
        raise SDPError("SDP must be bytes")
    lines = _split_lines(text)
    if len(lines) < 3 or lines[0] != ("v", "0"):
        raise SDPError("SDP must start with v=0")
    if lines[1][0] != "o" or lines[2][0] != "s":
        raise SDPError("SDP needs o= and s= after v=")
    origin = _parse_origin(lines[1][1])
    sdp = SessionDescription(origin=origin, name=lines[2][1])
    current: Media | None = None
    for kind, value in lines[3:]:
        if kind in "vos" and current is None:
            raise SDPError(f"duplicate {kind}= line")
        if kind == "m":
            current = _parse_m_line(value)
            sdp.media.append(current)
            continue
        if kind == "c":
            _parse_connection(value)  # validate
        if current is None:
            sdp.lines.append((kind, value))
        else:
            if kind not in "icbka":
                raise SDPError(f"{kind}= line not allowed in a media section")
            current.lines.append((kind, value))
    # The session c= is looked up once: per media section it made a body of many
    # session lines and many m= sections quadratic.
    session_c = any(kind == "c" for kind, _ in sdp.lines)
    for media in sdp.media:
        if not session_c and media.port != 0 and not any(k == "c" for k, _ in media.lines):
            raise SDPError("media section without a connection address")
    return sdp


def _split_lines(text: str) -> list[tuple[str, str]]:
    """``type=value`` lines (RFC 8866 §5), CRLF or LF ends, blank lines tolerated.

    Fast path for the usual body (no bare CR, no NUL, every line well formed): a few
    comprehensions instead of a loop with six tests per line.  Anything unusual is
    re-read by the line loop so the error raised is the one for the first bad line.
    """
    if "\x00" not in text:
        plain = text.replace("\r\n", "\n") if "\r" in text else text
        if "\r" not in plain:
            raws = [raw for raw in plain.split("\n") if raw]
            if all(raw[1:2] == "=" and "a" <= raw[0] <= "z" for raw in raws):
                return [(raw[0], raw[2:]) for raw in raws]
    lines: list[tuple[str, str]] = []
    for raw in text.split("\n"):
        if raw.endswith("\r"):
            raw = raw[:-1]
        if not raw:
            continue  # tolerate blank lines; the canonical form has none
        if len(raw) < 2 or raw[1] != "=" or not ("a" <= raw[0] <= "z"):
            raise SDPError(f"malformed SDP line {raw[:40]!r}")
        value = raw[2:]
        if "\r" in value or "\x00" in value:
            raise SDPError("control character in SDP line")
        lines.append((raw[0], value))
    return lines


def _parse_origin(value: str) -> Origin:
    parts = value.split(" ")
    if len(parts) != 6 or not all(parts):
        raise SDPError("malformed o= line")
    if not (parts[1].isascii() and parts[1].isdigit()):
        raise SDPError("o= session id is not a number")
    if not (parts[2].isascii() and parts[2].isdigit()) or len(parts[2]) > 20:
        raise SDPError("o= version is not a number")
    return Origin(parts[0], parts[1], int(parts[2]), parts[3], parts[4], parts[5])


def _parse_connection(value: str) -> Connection:
    parts = value.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SDPError("malformed c= line")
    return Connection(*parts)


def _parse_m_line(value: str) -> Media:
    parts = value.split(" ")
    if len(parts) < 4 or not all(parts):
        raise SDPError("malformed m= line")
    port_text, _, count_text = parts[1].partition("/")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise SDPError("m= port is not a number")
    port = int(port_text)
    if port > 65535:
        raise SDPError("m= port out of range")
    count: int | None = None
    if count_text or "/" in parts[1]:
        if not (count_text.isascii() and count_text.isdigit()) or len(count_text) > 5:
            raise SDPError("m= port count is not a number")
        count = int(count_text)
    return Media(kind=parts[0], port=port, proto=parts[2], formats=parts[3:],
                 port_count=count)


# -- serialising ----------------------------------------------------------------------
def serialize(sdp: SessionDescription) -> bytes:
    """The canonical bytes of a description (CRLF line ends)."""
    out = ["v=0", f"o={sdp.origin}", f"s={sdp.name}"]
    out.extend(f"{k}={v}" for k, v in sdp.lines)
    for media in sdp.media:
        out.append(f"m={media.m_line()}")
        out.extend(f"{k}={v}" for k, v in media.lines)
    return ("\r\n".join(out) + "\r\n").encode("utf-8")


# -- interpretation -------------------------------------------------------------------
def rtpmap(media: Media) -> dict[str, tuple[str, int]]:
    """Payload type -> (ENCODING upper-case, clock rate), static table plus ``a=rtpmap``.

    A malformed ``a=rtpmap`` is ignored (its payload then counts as unknown) rather than
    raised: the parser already accepted the body and callers want a decision, not an error.
    """
    table = {pt: STATIC_PAYLOADS[pt] for pt in media.formats if pt in STATIC_PAYLOADS}
    for name, value in media.attributes():
        if name != "rtpmap" or value is None:
            continue
        pt, _, spec = value.strip().partition(" ")
        encoding, _, rest = spec.strip().partition("/")
        rate_text = rest.partition("/")[0]
        if not encoding or not rate_text.isascii() or not rate_text.isdigit():
            table.pop(pt, None)
            continue
        table[pt] = (encoding.upper(), int(rate_text))
    return table


def codec_names(media: Media) -> list[str]:
    """Encoding names of the media's formats, in preference order (unknown ones skipped)."""
    table = rtpmap(media)
    return [table[pt][0] for pt in media.formats if pt in table]


def filter_codecs(media: Media, allowed: Collection[str]) -> Media:
    """A copy of ``media`` keeping only formats whose encoding is in ``allowed``.

    ``a=rtpmap``/``a=fmtp`` lines of removed payload types go too; every other line
    (direction, ptime, rtcp...) is kept in order.  ``formats`` may end up empty: the
    caller decides whether that rejects the stream.
    """
    wanted = {name.upper() for name in allowed}
    table = rtpmap(media)
    keep = [pt for pt in media.formats if pt in table and table[pt][0] in wanted]
    dropped = set(media.formats) - set(keep)
    lines = []
    for kind, value in media.lines:
        if kind == "a" and dropped:
            name, _, rest = value.partition(":")
            if name in ("rtpmap", "fmtp") and rest.strip().partition(" ")[0] in dropped:
                continue
        lines.append((kind, value))
    return replace(media, formats=keep, lines=lines)


def direction(sdp: SessionDescription, media: Media) -> str:
    """The stream's direction attribute: media level, else session level, else sendrecv."""
    return _media_direction(media) or _session_direction(sdp)


def _media_direction(media: Media) -> str | None:
    for kind, value in media.lines:
        if kind == "a" and value in DIRECTIONS:
            return value
    return None


def _session_direction(sdp: SessionDescription) -> str:
    for kind, value in sdp.lines:
        if kind == "a" and value in DIRECTIONS:
            return value
    return "sendrecv"


def connection_address(sdp: SessionDescription, media: Media) -> str | None:
    """The address the stream's sender wants media at (media ``c=`` over session ``c=``)."""
    conn = media.connection or sdp.connection
    return conn.host if conn is not None else None


def is_hold(sdp: SessionDescription, media: Media | None = None) -> bool:
    """Whether the offer puts the call on hold: sendonly/inactive, or RFC 2543 c=0.0.0.0."""
    streams = [media] if media is not None else [m for m in sdp.media if m.port != 0]
    if not streams:
        return False
    # Session-level values are computed once, not once per stream (linear in the body).
    session_dir = _session_direction(sdp)
    session_conn = sdp.connection
    for stream in streams:
        if (_media_direction(stream) or session_dir) in ("sendonly", "inactive"):
            continue
        conn = stream.connection or session_conn
        if conn is not None and conn.host in ("0.0.0.0", "::"):
            continue
        return False
    return True


def is_ip_address(text: str | None) -> bool:
    if not text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def rewrite_media(
    sdp: SessionDescription,
    index: int,
    *,
    address: str,
    port: int,
    origin: Origin,
    codecs: Iterable[str],
) -> SessionDescription:
    """The description to send to the other side of a relay (RFC 3264 rewriting).

    Stream ``index`` gets our ``address``/``port`` and the codec filter; its ``a=rtcp``
    goes (RTCP is on port+1, the default) and so do ICE attributes.  Every other stream is
    disabled with port 0 (we relay one audio stream) — the m-line count is preserved, as
    offer/answer requires.  An RFC 2543 hold (``c=0.0.0.0``) keeps its null address so the
    other side still sees a hold.  Raises :class:`SDPError` if no codec but
    telephone-event/CN is left.
    """
    out = sdp.copy()
    out.origin = origin
    codecs = tuple(codecs)
    held_null = connection_address(sdp, sdp.media[index]) in ("0.0.0.0", "::")
    ours = str(Connection.for_address(address))
    null = str(Connection.for_address("::" if ":" in address else "0.0.0.0"))
    conn_value = null if held_null else ours
    out.lines = [(k, conn_value if k == "c" else v) for k, v in out.lines
                 if not (k == "a" and v.partition(":")[0] in _ICE_ATTRIBUTES)]
    for i, media in enumerate(out.media):
        if i != index:
            media.port = 0
            media.port_count = None
            media.lines = [(k, v) for k, v in media.lines
                           if not (k == "a" and v.partition(":")[0] in _ICE_ATTRIBUTES)]
            continue
        filtered = filter_codecs(media, codecs)
        table = rtpmap(filtered)
        audio = [pt for pt in filtered.formats
                 if table[pt][0] not in ("TELEPHONE-EVENT", "CN")]
        if not audio:
            raise SDPError("no acceptable codec in the offer")
        filtered.port = port
        filtered.port_count = None
        lines = []
        has_c = False
        for kind, value in filtered.lines:
            if kind == "a":
                name = value.partition(":")[0]
                if name == "rtcp" or name in _ICE_ATTRIBUTES:
                    continue
            if kind == "c":
                value = conn_value
                has_c = True
            lines.append((kind, value))
        if not has_c and not out.values("c"):
            lines.insert(0, ("c", conn_value))
        filtered.lines = lines
        out.media[i] = filtered
    return out
