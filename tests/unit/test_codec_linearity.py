"""The codec stays linear on hostile input (issue 10, "linear-time codec").

No timing asserts (DEVELOPERS rule): each pathological ~60 KB input must parse or fail
with :class:`SIPParseError`, and a generous 2-second alarm (about 1000 times what the
linear code needs here) turns a regression to quadratic behaviour (seconds to minutes
on these sizes) into a failure instead of a hang.  Where the work can be counted
deterministically (the framer's searches), it is.
The linear rewrites are also checked against the old, quadratic, regex formulations on
small inputs: same results, so the speed-up changed no behaviour.
"""

from __future__ import annotations

import itertools
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pbx.sip import sdp
from pbx.sip.errors import SIPParseError
from pbx.sip.headers import (
    NameAddress,
    Via,
    _parse_plain_params,
    _read_quoted,
    _split_outside,
    parse_params,
    split_comma_list,
)
from pbx.sip.message import StreamFramer, _find_header_end, _unfold, _unfold_bytes, parse
from pbx.sip.uri import _NEEDS_QUOTE, URI, _esc, _is_hostname, _parse_uri_params, _unesc

N = 60_000


class Hang(BaseException):
    """Raised by :func:`guard`; a BaseException so the codec's catch-all cannot
    turn it into a SIPParseError."""


@contextmanager
def guard(seconds: float = 2.0) -> Iterator[None]:
    """Fail (instead of hanging) if the block takes more than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"took longer than {seconds} s: quadratic again?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


BASE = {
    "Via": "Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1",
    "To": "To: <sip:bob@example.com>",
    "From": "From: <sip:alice@example.com>;tag=1",
    "Call-ID": "Call-ID: c1",
    "CSeq": "CSeq: 1 INVITE",
    "Contact": "Contact: <sip:alice@192.0.2.1>",
}


def message(*extra: str, replace: dict[str, str] | None = None, length: bool = True) -> bytes:
    lines = ["INVITE sip:bob@example.com SIP/2.0"]
    replace = replace or {}
    lines += [replace.get(name, line) for name, line in BASE.items()]
    lines += extra
    if length:
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handle(data: bytes, datagram: bool = True) -> object:
    """What the PBX does before its abuse guard: parse, then read the lazy views."""
    try:
        msg = parse(data, datagram=datagram)
    except SIPParseError as err:
        assert err.reason
        return err
    for attr in ("vias", "from_", "to", "contacts", "cseq", "call_id", "max_forwards"):
        with suppress(SIPParseError):
            getattr(msg, attr)
    return msg


PATHOLOGICAL = {
    "folded line then spaces": message("X-Fold: a", " b", "X-Pad: " + " " * N + "x"),
    "folded line then tabs": message("X-Fold: a", "\tb", "X-Pad: " + "\t" * N + "x"),
    "fold of blanks": message("X-Fold: a" + " " * (N // 2), " " * (N // 2) + "b"),
    "many continuation lines": message("X-Fold: a", *([" b"] * (N // 4))),
    "blank-only continuation lines": message("X-Fold: a", *([" "] * (N // 3))),
    "spaces before the start line end": (
        b"INVITE sip:bob@example.com SIP/2.0" + b" " * N + b"\r\n " + message()[36:]),
    "semicolons in To": message(replace={"To": "To: <sip:bob@h>" + ";" * N}),
    "params in Via": message(
        replace={"Via": "Via: SIP/2.0/UDP h;branch=z9hG4bK1" + ";x" * (N // 2)}),
    "params with values in From": message(replace={"From": "From: <sip:a@h>" + ";t=1" * (N // 4)}),
    "semicolons in the Request-URI": (
        b"INVITE sip:bob@h" + b";" * N + b" SIP/2.0\r\n" + message()[36:]),
    "commas in Contact": message(replace={"Contact": "Contact: " + "," * N}),
    "Vias on one line": message(
        replace={"Via": "Via: " + ", ".join(["SIP/2.0/UDP h"] * (N // 15))}),
    "escaped quotes in a display name": message(
        replace={"From": 'From: "' + '\\"' * (N // 2) + '" <sip:a@h>;tag=1'}),
    "backslashes in a display name": message(
        replace={"From": 'From: "' + "\\" * N + '" <sip:a@h>;tag=1'}),
    "unterminated quote": message(replace={"To": 'To: "' + "a," * (N // 2)}),
    "many empty quoted strings": message(replace={"Contact": "Contact: " + '"' * N}),
    "quoted param values": message(replace={"To": "To: <sip:b@h>" + ';q="x"' * (N // 6)}),
    "many < in a name-addr": message(replace={"To": "To: " + "<" * N}),
    "many <> pairs": message(replace={"Contact": "Contact: " + "<>," * (N // 3)}),
    "angle brackets never closed": message(
        replace={"Contact": "Contact: " + "<sip:a@h," * (N // 9)}),
    "huge number of headers": message(*(["A: b"] * (N // 6))),
    "huge number of Via lines": message(*(["Via: SIP/2.0/UDP h;branch=z9hG4bKx"] * (N // 40))),
    "long host name": message(replace={"To": "To: <sip:" + "a-" * (N // 2) + "!>"}),
    "long host name of dots": message(replace={"To": "To: <sip:a" + "." * N + ">"}),
    "percent signs in the Request-URI": (
        b"INVITE sip:" + b"%" * N + b"@h SIP/2.0\r\n" + message()[36:]),
    "escaped params in the Request-URI": (
        b"INVITE sip:h" + b";a=%20" * (N // 6) + b" SIP/2.0\r\n" + message()[36:]),
    "escapes between letters in a user": message(
        replace={"To": "To: <sip:" + "%41a" * (N // 4) + "@h>"}),
    "long IPv6 reference": message(replace={"To": "To: <sip:[" + "1:" * (N // 2) + "]>"}),
    "Via: spaces before the params": message(
        replace={"Via": "Via: SIP/2.0/UDP h" + " " * N + "x;branch=1"}),
    "Via: spaces between the tokens": message(
        replace={"Via": "Via: SIP" + " " * N + "/2.0/UDP h"}),
    "Via: long sent-by with colons": message(
        replace={"Via": "Via: SIP/2.0/UDP " + ": " * (N // 2)}),
    "no empty line": message()[:-2] + b"X: " + b" " * N,
    "bare LF lines": message(*(["X: y"] * (N // 6))).replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_message_parses_or_fails_cleanly(name: str) -> None:
    data = PATHOLOGICAL[name]
    assert len(data) <= 65535
    with guard():
        handle(data)
        handle(data, datagram=False)


@pytest.mark.parametrize("name", ["folded line then spaces", "fold of blanks",
                                  "blank-only continuation lines", "huge number of headers"])
def test_pathological_stream_frames_in_one_piece_and_in_small_chunks(name: str) -> None:
    data = PATHOLOGICAL[name]
    with guard():
        whole = StreamFramer().feed(data)
        framer = StreamFramer()
        chunked: list[bytes] = []
        for i in range(0, len(data), 7):
            chunked += framer.feed(data[i : i + 7])
    assert whole == chunked == [data]
    with guard():
        handle(whole[0], datagram=False)


class CountingBuffer(bytearray):
    """A bytearray that counts the bytes its ``find`` calls may read."""

    read = 0

    def find(self, sub: object, start: int = 0, end: int | None = None) -> int:  # type: ignore[override]
        stop = len(self) if end is None else min(end, len(self))
        self.read += max(0, stop - start)
        return super().find(sub, start, end)  # type: ignore[arg-type]


def test_framer_fed_byte_by_byte_reads_each_byte_a_bounded_number_of_times() -> None:
    data = PATHOLOGICAL["folded line then spaces"]
    framer = StreamFramer()
    framer._buf = buf = CountingBuffer()  # the framer extends it in place
    with guard():
        frames = [f for i in range(len(data)) for f in framer.feed(data[i : i + 1])]
    assert frames == [data]
    assert buf.read <= 8 * len(data)  # each feed looks back at most 3 bytes


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_header_end_search_is_linear_however_many_frames_one_read_holds(line_end: bytes) -> None:
    frame = message().replace(b"\r\n", line_end)
    buf = CountingBuffer(frame * 500)
    pos = 0
    count = 0
    while (found := _find_header_end(buf, pos, 10**9)) is not None:
        head_len, sep_len = found
        pos = head_len + sep_len  # empty bodies: the next frame starts here
        count += 1
    assert count == 500
    assert buf.read <= 3 * len(buf)


def test_framer_many_lf_only_frames_in_one_feed() -> None:
    frame = message().replace(b"\r\n", b"\n")
    data = frame * (65535 // len(frame))
    with guard():
        frames = StreamFramer().feed(data)
    assert frames == [frame] * (65535 // len(frame))


class OldFramer(StreamFramer):
    """The framer's CR/LF handling before the bulk skip: one step per token."""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while buf:
            if buf[0] in (13, 10):
                if buf.startswith(b"\r\n\r\n"):
                    del buf[:4]
                    self.pings += 1
                    self._pending_pings += 1
                    continue
                if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                    break
                del buf[: 2 if buf.startswith(b"\r\n") else 1]
                self._scanned = 0
                continue
            frame = self._next_frame(buf)
            if frame is None:
                break
            out.append(frame)
        return out


crlf_units = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\n\n", b"\r\r"])


@given(st.lists(crlf_units, max_size=80).map(b"".join),
       st.lists(crlf_units, max_size=40).map(b"".join), st.booleans(),
       st.lists(st.integers(0, 400), max_size=4))
def test_bulk_crlf_skipping_matches_the_step_by_step_loop(
        before: bytes, after: bytes, with_message: bool, cuts: list[int]) -> None:
    stream = before + (message() + after if with_message else b"")
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    results = []
    for cls in (OldFramer, StreamFramer):
        framer = cls()
        trace = []
        for a, b in itertools.pairwise(points):
            trace.append((framer.feed(stream[a:b]), framer.pings, framer.take_pings(),
                          framer.buffered))
        results.append(trace)
    assert results[0] == results[1]


@pytest.mark.parametrize("unit", [b"\n", b"\r", b"\r\n", b"\r\n\r\n", b"\n\r", b"\r\n\n"])
def test_long_crlf_runs_are_skipped_in_bulk(unit: bytes) -> None:
    data = unit * (65536 // len(unit))
    framer = StreamFramer()
    with guard():
        assert framer.feed(data) == []
        assert framer.feed(message()) == [message()]
    old = OldFramer()
    old.feed(data)
    assert framer.pings == old.pings


def test_pathological_sdp_bodies() -> None:
    head = "v=0\r\no=a 1 1 IN IP4 192.0.2.1\r\ns=-\r\n"
    bodies = [
        head + "a=x\r\n" * 6000 + "c=IN IP4 192.0.2.1\r\n" + "m=audio 1 RTP/AVP 0\r\n" * 1500,
        head + "a=x\r\n" * 6000 + "m=audio 0 RTP/AVP 0\r\n" * 1500,
        head + "c=IN IP4 0.0.0.0\r\n" + ("a=y\r\n" * 20 + "m=audio 1 RTP/AVP 0\r\n") * 500,
        head + "\r\n" * 30000,
        head + "m=audio 1 RTP/AVP " + "0 " * 30000 + "\r\n",
        head + "a=" + "x" * 60000 + "\r\n",
    ]
    for body in bodies:
        with guard():
            try:
                desc = sdp.parse(body.encode())
            except sdp.SDPError:
                continue
            sdp.is_hold(desc)
            for media in desc.media[:3]:
                sdp.direction(desc, media)
                sdp.codec_names(media)


# -- the linear rewrites behave exactly like the old regexes ---------------------------

OLD_FOLD = re.compile(r"[ \t]*\n[ \t]+")
OLD_FOLD_BYTES = re.compile(rb"[ \t]*\r?\n[ \t]+")
OLD_VIA = re.compile(
    r"[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*/"
    r"[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]++([^; \t](?:[^;]*(?<![ \t]))?)[ \t]*(;.*)?"
)
OLD_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")

wsy = st.text(st.sampled_from(" \t\n\rab:"), max_size=30)
specials = st.text(st.sampled_from(' \t\\"<>,;:=a1'), max_size=30)


@given(wsy)
def test_unfold_matches_the_old_substitution(text: str) -> None:
    text = text.replace("\r", "")
    assert _unfold(text.split("\n")) == OLD_FOLD.sub(" ", text).split("\n")


@given(wsy)
def test_unfold_bytes_matches_the_old_substitution(text: str) -> None:
    data = text.encode()
    assert _unfold_bytes(data.split(b"\n")) == OLD_FOLD_BYTES.sub(b" ", data).split(b"\n")


def _old_split(text: str, sep: str, angle: bool) -> list[str]:
    parts: list[str] = []
    start = i = 0
    n = len(text)
    in_angle = False
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif angle and c == "<":
            in_angle = True
        elif angle and c == ">":
            in_angle = False
        elif c == sep and not in_angle:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _old_read_quoted(text: str) -> tuple[str, int] | None:
    out: list[str] = []
    i, n = 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return None


@given(specials, st.sampled_from([",", ";"]), st.booleans())
def test_split_outside_matches_the_old_scanner(text: str, sep: str, angle: bool) -> None:
    assert _split_outside(text, sep, angle) == _old_split(text, sep, angle)


@given(specials | st.text(max_size=10))
def test_read_quoted_matches_the_old_scanner(text: str) -> None:
    text = '"' + text
    expected = _old_read_quoted(text)
    if expected is None:
        with pytest.raises(SIPParseError):
            _read_quoted(text, 0)
    else:
        assert _read_quoted(text, 0) == expected


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except SIPParseError as err:
        return ("error", err.reason)


@given(st.sampled_from(["SIP/2.0/UDP ", " sip / 2.0 /tcp\t", "SIP/2.0/UDP", "SIP/2.0 UDP ", ""]),
       st.sampled_from(["h", "h:5060", "[::1]:5", "a.b ", "", " h : 1"]),
       st.text(st.sampled_from(" \t;=,/:\n\"ab1"), max_size=20))
def test_via_parse_accepts_exactly_what_the_old_regex_accepted(proto: str, host: str,
                                                               tail: str) -> None:
    text = proto + host + tail
    result = _outcome(Via.parse, text)
    if OLD_VIA.fullmatch(text) is None:
        assert result == ("error", "Invalid Via")
    else:
        assert result != ("error", "Invalid Via")


@given(st.text(st.sampled_from("aZ09_.-!:"), max_size=12))
def test_hostname_check_matches_the_old_regex(host: str) -> None:
    assert _is_hostname(host) == (OLD_HOSTNAME.fullmatch(host) is not None)


@given(st.text(st.sampled_from(";=aB1x.-!\x80"), max_size=40))
def test_bulk_parameter_parsing_matches_the_loop(text: str) -> None:
    # parse_params uses its per-parameter loop below 257 characters
    assert _outcome(_parse_plain_params, text) == _outcome(parse_params, text)


_uri_pieces = st.sampled_from([";", "=", "a", "A", "%41", "%3B", "%3d", "%", "%ff", "%C3%A9",
                               "\udcc3", "é", "%C3", "%e2%82", "%00", "\x00", "😀", "%F0%9F",
                               "%8", " ", "~", "[", "\udfff"])
uri_texts = st.lists(_uri_pieces, max_size=16).map("".join)


@given(uri_texts)
def test_unescape_and_escape_match_urllib(text: str) -> None:
    assert _unesc(text) == unquote(text, errors="surrogateescape")
    for safe in _NEEDS_QUOTE:
        try:
            expected = quote(text, safe=safe, errors="surrogateescape")
        except UnicodeEncodeError:
            with pytest.raises(UnicodeEncodeError):
                _esc(text, safe)
            continue
        assert _esc(text, safe) == expected


def _old_uri_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not name:
            raise SIPParseError("Invalid URI parameter")
        params[unquote(name, errors="surrogateescape").lower()] = (
            unquote(value, errors="surrogateescape") if eq else None)
    return params


@given(uri_texts)
def test_uri_parameters_match_the_old_loop(text: str) -> None:
    new, old = _outcome(_parse_uri_params, text), _outcome(_old_uri_params, text)
    assert new == old
    if isinstance(new, dict):
        assert list(new) == list(old)  # same order too


# -- hypothesis: any repeated unit, at full size, parses or fails cleanly -------------

units = st.text(st.sampled_from(' \t\r\n\\"<>,;:=@[]%a1.'), min_size=1, max_size=4)


@given(units, st.sampled_from(["Via", "To", "From", "Contact", "X-Junk", "Route"]),
       st.sampled_from(["", "a", "<sip:a@h>", '"']))
def test_any_repeated_unit_in_a_header_is_handled_quickly(unit: str, name: str,
                                                          prefix: str) -> None:
    value = prefix + unit * (20_000 // len(unit))
    data = message(replace={name: f"{name}: {value}"}) if name in BASE else message(
        f"{name}: {value}")
    with guard():
        handle(data)
        with suppress(SIPParseError):
            for frame in StreamFramer().feed(data):
                handle(frame, datagram=False)
        for text in (value, f"<sip:a@h>;{value}"):
            for fn in (NameAddress.parse, Via.parse, URI.parse, split_comma_list,
                       parse_params):
                _outcome(fn, text)


def test_long_header_names_are_not_kept_in_the_spelling_cache() -> None:
    """The spelling cache is bounded in size too: 4096 junk 60 KB names would be 0.5 GB."""
    from pbx.sip import headers

    before = len(headers._SPELLING_CACHE)
    for i in range(3):
        name = f"X-{i}-" + "a-" * 20_000
        data = message(f"{name}: v")
        with guard():
            msg = parse(data)
        assert msg.headers.items()[-2][0].startswith(f"X-{i}-A-A-")
    assert len(headers._SPELLING_CACHE) == before
    assert headers.canonical_name("x-my-HEADER--z") == "X-My-Header--Z"
