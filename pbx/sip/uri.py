"""SIP/SIPS (RFC 3261 §19.1) and tel (RFC 3966) URIs.

Design notes:

* ``user``, ``password``, parameter names/values and URI header names/values are
  stored *unescaped* (``%41`` -> ``A``); :func:`str` re-escapes exactly the
  characters the grammar does not allow in that position.  The one loss is the
  distinction between a reserved character and its escape (``;`` vs ``%3B`` in
  the user part), which RFC 3261 §19.1.4 treats as different but no deployed
  dialplan relies on.  Escapes that do not decode to valid UTF-8 survive via
  ``surrogateescape`` and are re-emitted byte for byte.
* ``host`` is lower-cased; IPv6 references are stored *without* brackets and in
  compressed form (``"[2001:DB8:0::1]"`` -> ``"2001:db8::1"``), so ``host`` can be
  handed straight to socket APIs.  Brackets are added back on output.
* Parameter names are lower-cased (they are case-insensitive); a parameter
  without ``=`` has the value ``None``.  Duplicate parameters keep the last value.
* tel URIs keep the number in ``user`` and have ``host == ""``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from pbx.sip.errors import SIPParseError

__all__ = ["URI", "format_hostport", "parse_hostport"]

_UNRESERVED = "-_.!~*'()"
_USER_SAFE = _UNRESERVED + "&=+$,;?/"
_PASSWORD_SAFE = _UNRESERVED + "&=+$,"
_PARAM_SAFE = _UNRESERVED + "[]/:&+$"
_HEADER_SAFE = _UNRESERVED + "[]/?:+$"
_TEL_SAFE = _UNRESERVED + "&=+$,/:[]"

_NEEDS_QUOTE = {
    safe: re.compile("[^A-Za-z0-9" + re.escape(safe) + "]")
    for safe in (_USER_SAFE, _PASSWORD_SAFE, _PARAM_SAFE, _HEADER_SAFE, _TEL_SAFE)
}
# One character class, so ``fullmatch`` cannot backtrack; the first/last character
# rules of the hostname grammar are checked separately (see _is_hostname).
_HOST_CHARS_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


# Runs of characters that need escaping (one character class, no backtracking).
_NEEDS_QUOTE_RUN = {
    safe: re.compile("[^A-Za-z0-9" + re.escape(safe) + "]+")
    for safe in (_USER_SAFE, _PASSWORD_SAFE, _PARAM_SAFE, _HEADER_SAFE, _TEL_SAFE)
}
# Runs of escapes; each item is fixed-width, so a failed item just ends the run.
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEXBYTE = {(a + b).encode(): bytes([int(a + b, 16)])
            for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}


def _quote_run(m: re.Match[str]) -> str:
    return "%" + m.group().encode("utf-8", "surrogateescape").hex("%").upper()


def _unquote_run(m: re.Match[str]) -> str:
    return bytes.fromhex(m.group().replace("%", "")).decode("utf-8", "surrogateescape")


def _esc(text: str, safe: str) -> str:
    """Percent-encode what ``safe`` does not allow (RFC 3261 §25.1 ``escaped``).

    Same output as ``urllib.parse.quote(text, safe, errors="surrogateescape")``, but
    one substitution per run of unsafe characters instead of a Python call per byte.
    A no-op for plain text (the hot path).
    """
    if _NEEDS_QUOTE[safe].search(text) is None:
        return text
    return _NEEDS_QUOTE_RUN[safe].sub(_quote_run, text)


def _unesc(text: str) -> str:
    """Decode ``%XX`` escapes as UTF-8 (``surrogateescape`` for invalid bytes).

    Same output as ``urllib.parse.unquote(text, errors="surrogateescape")``, which
    raises and catches a KeyError per bare ``%``: here the text is split on ``%``
    once and every piece costs one dict lookup, then the bytes are decoded at once.
    (A literal character always ends a UTF-8 sequence, so decoding everything in one
    go equals unquote's decoding of each ASCII stretch on its own.)  Text holding
    surrogates (never decoded wire text) takes a per-run substitution instead.
    """
    if "%" not in text:
        return text
    if text.isascii():
        data = text.encode("ascii")
    elif _SURROGATE.search(text) is None:
        data = text.encode("utf-8")
    else:
        return _ESCAPE_RUN.sub(_unquote_run, text)
    parts = data.split(b"%")
    hexbyte = _HEXBYTE
    out = [parts[0]]
    out += [b"%" + p if (h := hexbyte.get(p[:2])) is None else h + p[2:] for p in parts[1:]]
    return b"".join(out).decode("utf-8", "surrogateescape")


def _is_hostname(host: str) -> bool:
    """RFC 3261 §25.1 ``hostname`` (plus ``_``, as deployed) or an IPv4 address.

    ``alnum *( alnum / "_" / "." / "-" ) [alnum / "_"] ["."]``, checked without a
    backtracking pattern: the body is one character class, the ends are tested
    directly.  An optional final dot (a fully qualified name) is allowed once.
    """
    if _HOST_CHARS_RE.fullmatch(host) is None:
        return False
    core = host[:-1] if host[-1] == "." else host
    # the charset is alnum plus "-._": the ends just exclude the non-alnum ones
    return bool(core) and core[0] not in "-._" and core[-1] not in "-."


def parse_hostport(text: str) -> tuple[str, int | None]:
    """Parse ``host[:port]`` (IPv6 in brackets); returns the canonical host and port."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise SIPParseError("Invalid IPv6 reference")
        host = _canonical_ipv6(text[1:close])
        rest = text[close + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise SIPParseError("Invalid host")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.partition(":")
        if not _is_hostname(host):
            raise SIPParseError("Invalid host")
        host = host.lower()
        if not colon:
            return host, None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise SIPParseError("Invalid port")
    port = int(port_text)
    if port > 65535:
        raise SIPParseError("Invalid port")
    return host, port


def _canonical_ipv6(text: str) -> str:
    # The longest IPv6 text form (with an embedded IPv4 quad) is 45 characters.
    if not text or len(text) > 45 or ":" not in text or not _IPV6_CHARS.issuperset(text):
        raise SIPParseError("Invalid IPv6 reference")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise SIPParseError("Invalid IPv6 reference") from None


def format_hostport(host: str, port: int | None) -> str:
    """Inverse of :func:`parse_hostport`: brackets IPv6 hosts."""
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def _parse_uri_params(text: str) -> dict[str, str | None]:
    """``*( ";" uri-parameter )`` (RFC 3261 §19.1.1); names lower-cased, values unescaped.

    Many escaped parameters are unescaped in one :func:`_unesc` over their text
    joined with NUL, which no piece contains and no escape but ``%00`` decodes to,
    so 10,000 ``;a=%20`` cost about what one long parameter does.
    """
    triples = [p.partition("=") for p in text.split(";") if p]
    if not all(name for name, _, _ in triples):
        raise SIPParseError("Invalid URI parameter")
    if "%" not in text:
        return {name.lower(): value if eq else None for name, eq, value in triples}
    if len(triples) > 4 and "\x00" not in text and "%00" not in text:
        flat = _unesc("\x00".join([x for name, _, value in triples for x in (name, value)]))
        pieces = flat.split("\x00")
        return {name.lower(): value if eq else None
                for name, value, (_, eq, _) in zip(pieces[0::2], pieces[1::2], triples,
                                                   strict=True)}
    return {_unesc(name).lower(): _unesc(value) if eq else None for name, eq, value in triples}


def _format_uri_params(params: dict[str, str | None]) -> str:
    out = []
    for name, value in params.items():
        if value is None:
            out.append(";" + _esc(name, _PARAM_SAFE))
        else:
            out.append(f";{_esc(name, _PARAM_SAFE)}={_esc(value, _PARAM_SAFE)}")
    return "".join(out)


@dataclass(slots=True)
class URI:
    """A parsed sip:, sips: or tel: URI.  Mutable; ``str()`` gives the canonical form."""

    scheme: str = "sip"
    user: str | None = None
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    password: str | None = None

    @classmethod
    def parse(cls, text: str) -> URI:
        """Parse ``text``; raises :class:`SIPParseError` (never anything else)."""
        try:
            return _parse_uri(text)
        except SIPParseError:
            raise
        except Exception as exc:  # defensive: the codec promises one error type
            raise SIPParseError("Invalid URI") from exc

    @property
    def transport(self) -> str | None:
        """Value of the ``transport`` parameter, lower-cased (routing uses it often)."""
        value = self.params.get("transport")
        return value.lower() if value else None

    def copy(self) -> URI:
        """A deep-enough copy: dicts are copied so the copy can be edited freely."""
        return URI(self.scheme, self.user, self.host, self.port, dict(self.params),
                   dict(self.headers), self.password)

    def __str__(self) -> str:
        scheme = self.scheme
        if scheme == "tel":
            return "tel:" + _esc(self.user or "", _TEL_SAFE) + _format_uri_params(self.params)
        out = scheme + ":"
        if self.user is not None:
            out += _esc(self.user, _USER_SAFE)
            if self.password is not None:
                out += ":" + _esc(self.password, _PASSWORD_SAFE)
            out += "@"
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        out += host if self.port is None else f"{host}:{self.port}"
        if self.params:
            out += _format_uri_params(self.params)
        if self.headers:
            out += "?" + "&".join(
                f"{_esc(k, _HEADER_SAFE)}={_esc(v, _HEADER_SAFE)}" for k, v in self.headers.items()
            )
        return out


def _parse_uri(text: str) -> URI:
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or not rest:
        raise SIPParseError("Invalid URI")
    if scheme == "sip" or scheme == "sips":
        pass
    elif scheme == "tel":
        number, _, ptext = rest.partition(";")
        if not number or any(c in number for c in " \t<>\"@?"):
            raise SIPParseError("Invalid tel URI")
        return URI("tel", _unesc(number), "", None, _parse_uri_params(ptext))
    else:
        raise SIPParseError("Unsupported URI scheme")
    if " " in rest or "\t" in rest:
        raise SIPParseError("Invalid URI")
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        user_text, pcolon, pass_text = userinfo.partition(":")
        if not user_text:
            raise SIPParseError("Invalid URI user")
        user = _unesc(user_text)
        if pcolon:
            password = _unesc(pass_text)
    headers: dict[str, str] = {}
    q = rest.find("?")
    if q >= 0:
        for part in rest[q + 1 :].split("&"):
            if not part:
                continue
            hname, _, hvalue = part.partition("=")
            if not hname:
                raise SIPParseError("Invalid URI header")
            headers[_unesc(hname)] = _unesc(hvalue)
        rest = rest[:q]
    semi = rest.find(";")
    params: dict[str, str | None] = {}
    if semi >= 0:
        params = _parse_uri_params(rest[semi + 1 :])
        rest = rest[:semi]
    host, port = parse_hostport(rest)
    return URI(scheme, user, host, port, params, headers, password)
