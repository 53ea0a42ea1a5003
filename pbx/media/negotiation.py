"""Sans-IO SDP offer/answer negotiation for a relay (RFC 3264, RFC 6337).

Pure functions over parsed descriptions (:mod:`pbx.sip.sdp`), no sockets, no state
machine: the media session calls them and keeps the results.  What they guarantee about
an answer the B2BUA relays to an offerer (the properties the hypothesis tests check):

* the answer has exactly the offer's m-lines, in the offer's order (RFC 3264 §6); a
  stream the answerer dropped, declined, or that we do not relay is declined with port 0
  and the offer's formats (§6, §8.2);
* the relayed stream's payload types are a subset of the offer's, with the offer's
  numbers and ``a=rtpmap`` mapping (§6.1), in the order the answerer chose;
* its direction is one §6.1 allows for the offer's (sendonly → recvonly/inactive,
  recvonly → sendonly/inactive, inactive → inactive);
* its transport profile is the offer's: ``RTP/SAVP`` answered with ``RTP/AVP`` (or the
  reverse) is refused, never downgraded (RFC 4568 §7.5: SDES keys ride in ``a=crypto``
  lines, which pass through untouched, so the relay never needs them).

Refusals raise :class:`NegotiationError`, an :class:`~pbx.sip.sdp.SDPError` (488) that
carries the RFC 3261 §20.43 warn-code the response's ``Warning`` header should have.
"""

from __future__ import annotations

from dataclasses import replace

from pbx.sip import sdp as sdplib

__all__ = [
    "WARN_INCOMPATIBLE_FORMAT",
    "WARN_INCOMPATIBLE_TRANSPORT",
    "WARN_MEDIA_NOT_AVAILABLE",
    "NegotiationError",
    "answer_direction",
    "declined",
    "media_direction",
    "negotiated_direction",
    "require_codec",
    "shape_answer",
    "warning_header",
]

WARN_INCOMPATIBLE_TRANSPORT = 302   # RFC 3261 §20.43: transport protocol (profile)
WARN_MEDIA_NOT_AVAILABLE = 304      # no usable media type / codec
WARN_INCOMPATIBLE_FORMAT = 305      # the answer's formats are not the offer's

_WARN_TEXT = {
    WARN_INCOMPATIBLE_TRANSPORT: "Incompatible transport protocol",
    WARN_MEDIA_NOT_AVAILABLE: "Media type not available",
    WARN_INCOMPATIBLE_FORMAT: "Incompatible media format",
}
_NOT_CODECS = frozenset({"TELEPHONE-EVENT", "CN"})
_SENDS = frozenset({"sendrecv", "sendonly"})
_RECEIVES = frozenset({"sendrecv", "recvonly"})


class NegotiationError(sdplib.SDPError):
    """An offer or answer we cannot use; ``warning`` is the §20.43 warn-code."""

    def __init__(self, reason: str, warning: int = WARN_MEDIA_NOT_AVAILABLE) -> None:
        super().__init__(reason)
        self.warning = warning


def warning_header(code: int, agent: str) -> tuple[str, str]:
    """``Warning: 304 host "Media type not available"`` (RFC 3261 §20.43)."""
    return ("Warning", f'{code} {agent} "{_WARN_TEXT.get(code, "Miscellaneous warning")}"')


# -- directions (RFC 3264 §5.1, §6.1) ------------------------------------------------------
def _direction(sends: bool, receives: bool) -> str:
    if sends and receives:
        return "sendrecv"
    if sends:
        return "sendonly"
    return "recvonly" if receives else "inactive"


def media_direction(sdp: sdplib.SessionDescription, media: sdplib.Media) -> str:
    """The stream's direction; an RFC 2543 hold (``c=0.0.0.0``) receives nothing."""
    value = sdplib.direction(sdp, media)
    if sdplib.connection_address(sdp, media) in ("0.0.0.0", "::"):
        return _direction(value in _SENDS, False)
    return value


def answer_direction(offer: str, answer: str) -> str:
    """The answer's direction made one §6.1 allows for ``offer``: the answerer sends only
    what the offerer receives and receives only what the offerer sends."""
    return _direction(answer in _SENDS and offer in _RECEIVES,
                      answer in _RECEIVES and offer in _SENDS)


def negotiated_direction(offer: str, answer: str) -> str:
    """The stream's direction seen from the offerer, from the offer *and* its answer."""
    return _direction(offer in _SENDS and answer in _RECEIVES,
                      offer in _RECEIVES and answer in _SENDS)


# -- formats ------------------------------------------------------------------------------
def require_codec(media: sdplib.Media, allowed: tuple[str, ...]) -> None:
    """Raise 304 when ``media`` offers no codec of ``allowed`` (events and CN alone do
    not make a call)."""
    table = sdplib.rtpmap(media)
    wanted = {name.upper() for name in allowed}
    if not any(pt in table and table[pt][0] in wanted and table[pt][0] not in _NOT_CODECS
               for pt in media.formats):
        raise NegotiationError("no usable codec in the offer", WARN_MEDIA_NOT_AVAILABLE)


def declined(offer: sdplib.Media) -> sdplib.Media:
    """The answer's m-line for an offered stream that is not accepted (RFC 3264 §6:
    port 0, the offer's formats; nothing else is meaningful)."""
    return sdplib.Media(kind=offer.kind, port=0, proto=offer.proto,
                        formats=list(offer.formats) or ["0"])


def _subset(offer: sdplib.Media, answer: sdplib.Media) -> sdplib.Media:
    """The answer's formats that the offer has, under the offer's payload type numbers.

    A format is matched by number when the offer maps that number to the same encoding
    and rate, else by encoding and rate (then renumbered to the offer's number, with its
    ``a=rtpmap``/``a=fmtp`` lines: §6.1 says the answer SHOULD use the offer's numbers,
    and the relay does not rewrite RTP headers).  Unmatched formats go, with their
    lines.  The answerer's order is kept: it is the answerer's preference (§6.1).
    """
    offered = sdplib.rtpmap(offer)
    answered = sdplib.rtpmap(answer)
    by_codec: dict[tuple[str, int], str] = {}
    for pt in offer.formats:
        if pt in offered:
            by_codec.setdefault(offered[pt], pt)
    mapping: dict[str, str] = {}   # answer number -> offer number, formats kept
    for pt in answer.formats:
        codec = answered.get(pt)
        if codec is None or pt in mapping:
            continue
        target = pt if offered.get(pt) == codec else by_codec.get(codec, "")
        if target and target not in mapping.values():
            mapping[pt] = target
    keep = list(mapping.values())
    lines: list[tuple[str, str]] = []
    for kind, value in answer.lines:
        if kind == "a":
            name, sep, rest = value.partition(":")
            if sep and name in ("rtpmap", "fmtp"):
                pt, space, spec = rest.partition(" ")
                if pt not in mapping:
                    continue
                value = f"{name}:{mapping[pt]}{space}{spec}"
        lines.append((kind, value))
    return replace(answer, formats=keep, lines=lines)


def _set_direction(media: sdplib.Media, value: str) -> sdplib.Media:
    lines = [(k, v) for k, v in media.lines if not (k == "a" and v in sdplib.DIRECTIONS)]
    lines.append(("a", value))
    return replace(media, lines=lines)


def shape_answer(offer: sdplib.SessionDescription, answer: sdplib.SessionDescription,
                 index: int) -> sdplib.SessionDescription:
    """``answer`` made a valid RFC 3264 answer to ``offer`` whose stream ``index`` is the
    relayed one; every other stream is declined.  Raises :class:`NegotiationError`."""
    if index >= len(answer.media) or answer.media[index].port == 0:
        raise NegotiationError("the answer rejected the audio stream",
                               WARN_MEDIA_NOT_AVAILABLE)
    offered, got = offer.media[index], answer.media[index]
    if got.proto.upper() != offered.proto.upper():
        raise NegotiationError(f"answer profile {got.proto} for an offer of {offered.proto}",
                               WARN_INCOMPATIBLE_TRANSPORT)
    shaped = _subset(offered, got)
    table = sdplib.rtpmap(shaped)
    if not any(table[pt][0] not in _NOT_CODECS for pt in shaped.formats):
        raise NegotiationError("the answer has no codec of the offer", WARN_INCOMPATIBLE_FORMAT)
    wanted = answer_direction(media_direction(offer, offered), sdplib.direction(answer, got))
    if sdplib.direction(answer, got) != wanted or any(
            k == "a" and v in sdplib.DIRECTIONS for k, v in answer.lines):
        shaped = _set_direction(shaped, wanted)
    out = answer.copy()
    # A session-level direction would override nothing once every stream has its own.
    out.lines = [(k, v) for k, v in out.lines if not (k == "a" and v in sdplib.DIRECTIONS)]
    out.media = [shaped if i == index else declined(m) for i, m in enumerate(offer.media)]
    return out
