"""Hypothesis stateful test of RFC 3264 offer/answer through the media session.

Random sequences of offers (either side, random codecs, directions, RFC 2543 null holds,
extra video/audio m-lines), answers (random directions, codecs the offer had or not,
renumbered payload types, m-lines dropped), rejections, holds and resumes.  Each leg's
offer/answer chart decides what the B2BUA would accept (an offer while either leg is not
stable is glare: 491, nothing reaches the media session).  After every answer the SDP
relayed to the offerer must be a valid answer to what the offerer offered (same m-line
count and order, the relayed stream's payload types a subset of the offer's with the
same numbers and encodings, a direction §6.1 allows), and the session's direction and
hold state must be the ones negotiated by that offer *and* answer; a rejection leaves
them as they were.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pbx.calls.offer_answer import OfferAnswer
from pbx.media import MediaSession, PortAllocator
from pbx.media.negotiation import (
    NegotiationError,
    answer_direction,
    media_direction,
    negotiated_direction,
)
from pbx.sip.sdp import DIRECTIONS, direction, parse, rtpmap
from tests.unit.test_media_session import FakeReactor

HOSTS = {"a": "192.0.2.1", "b": "192.0.2.2"}
# (payload type, rtpmap line or None for a static type)
CODECS = [("0", None), ("8", None), ("9", None), ("18", None),
          ("96", "opus/48000/2"), ("101", "telephone-event/8000")]
RENUMBER = {"101": "100", "96": "97"}

codec_sets = st.lists(st.sampled_from(CODECS), min_size=1, max_size=6, unique=True)
directions = st.sampled_from(DIRECTIONS)
extras = st.lists(st.sampled_from(["video", "audio"]), max_size=2)


def body(side: str, codecs: list[tuple[str, str | None]], dir_: str, *, null: bool = False,
         extra: list[str] | tuple[str, ...] = (), port: int = 4000,
         renumber: bool = False) -> bytes:
    host = HOSTS[side]
    lines = ["v=0", f"o=ep 1 1 IN IP4 {host}", "s=-",
             f"c=IN IP4 {'0.0.0.0' if null else host}", "t=0 0"]
    pts = [RENUMBER.get(pt, pt) if renumber else pt for pt, _ in codecs]
    lines.append(f"m=audio {port} RTP/AVP {' '.join(pts)}")
    for (_pt, spec), pt in zip(codecs, pts, strict=True):
        if spec:
            lines.append(f"a=rtpmap:{pt} {spec}")
    lines.append(f"a={dir_}")
    for i, kind in enumerate(extra):
        lines += [f"m={kind} {port + 2 + 2 * i} RTP/AVP 98", "a=rtpmap:98 H264/90000"]
    return ("\r\n".join(lines) + "\r\n").encode()


class OfferAnswerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.session = MediaSession(FakeReactor(), PortAllocator(30000, 30099),
                                    host="10.0.0.5", advertise="203.0.113.7")
        self.session.start()
        self.oa = {"a": OfferAnswer(), "b": OfferAnswer()}
        self.pending: tuple[str, bytes] | None = None   # (offerer, offer as received)
        self.answered = False
        self.expected_direction: str | None = None

    # -- offers ------------------------------------------------------------------------------
    @rule(side=st.sampled_from("ab"), codecs=codec_sets, dir_=directions, null=st.booleans(),
          extra=extras)
    def offer(self, side: str, codecs: list[tuple[str, str | None]], dir_: str, null: bool,
              extra: list[str]) -> None:
        other = "b" if side == "a" else "a"
        if not (self.oa[side].stable and self.oa[other].stable):
            # Glare: the B2BUA answers 491 and the session never sees the offer.
            assert not self.oa[side].may_fire("receive_offer") or not self.oa[other].stable
            return
        if not self.answered and side == "b":
            side, other = "a", "b"  # the first offer is the caller's INVITE
        sdp = body(side, codecs, dir_, null=null, extra=extra)
        before = (self.session.state, self.session.direction)
        try:
            out = parse(self.session.offer(side, sdp))
        except NegotiationError as exc:
            assert exc.warning == 304
            assert (self.session.state, self.session.direction) == before
            return
        received = parse(sdp)
        assert [m.kind for m in out.media] == [m.kind for m in received.media]
        assert out.media[0].port != 0 and all(m.port == 0 for m in out.media[1:])
        assert set(out.media[0].formats) <= set(received.media[0].formats)
        assert (self.session.state, self.session.direction) == before  # RFC 3264 §8
        self.oa[side].fire("receive_offer")
        self.oa[other].fire("send_offer")
        self.pending = (side, sdp)
        self.sent = out

    # -- answers ---------------------------------------------------------------------------------
    @precondition(lambda self: self.pending is not None)
    @rule(data=st.data(), dir_=directions, drop_extra=st.booleans(), renumber=st.booleans(),
          foreign=st.booleans())
    def answer(self, data: st.DataObject, dir_: str, drop_extra: bool, renumber: bool,
               foreign: bool) -> None:
        assert self.pending is not None
        offerer, offer_sdp = self.pending
        answerer = "b" if offerer == "a" else "a"
        offered = [(pt, spec) for pt, spec in CODECS if pt in self.sent.media[0].formats]
        chosen = data.draw(st.lists(st.sampled_from(offered), min_size=1, unique=True))
        if foreign:
            chosen = [*chosen, ("3", None)]  # GSM: never offered
        extra = () if drop_extra else ["video"] * (len(self.sent.media) - 1)
        sdp = body(answerer, chosen, dir_, extra=extra, port=6000, renumber=renumber)
        before = (self.session.state, self.session.direction)
        try:
            out = parse(self.session.answer(answerer, sdp))
        except NegotiationError as exc:
            assert exc.warning == 305  # only telephone-event left, say
            assert (self.session.state, self.session.direction) == before
            self.reject()
            return
        offer = parse(offer_sdp)
        # RFC 3264 §6: the offer's m-lines, in order; only the relayed one accepted.
        assert [m.kind for m in out.media] == [m.kind for m in offer.media]
        assert out.media[0].port != 0 and all(m.port == 0 for m in out.media[1:])
        # §6.1: a subset of the offer's payload types, with the offer's mapping.
        offer_map, out_map = rtpmap(offer.media[0]), rtpmap(out.media[0])
        assert set(out.media[0].formats) <= set(offer.media[0].formats)
        for pt in out.media[0].formats:
            assert out_map[pt] == offer_map[pt]
        offer_dir = media_direction(offer, offer.media[0])
        out_dir = direction(out, out.media[0])
        assert answer_direction(offer_dir, out_dir) == out_dir  # allowed by the table
        want = negotiated_direction(offer_dir, out_dir)
        assert self.session.direction == want
        assert self.session.state == ("active" if want == "sendrecv" else "on_hold")
        self.oa[offerer].fire("send_answer")
        self.oa[answerer].fire("receive_answer")
        self.pending = None
        self.answered = True
        self.expected_direction = want

    @precondition(lambda self: self.pending is not None and self.answered)
    @rule()
    def reject(self) -> None:
        assert self.pending is not None
        offerer, _ = self.pending
        before = (self.session.state, self.session.direction)
        self.session.reject_offer(offerer)
        assert (self.session.state, self.session.direction) == before
        for model in self.oa.values():
            model.fire("rollback")
        self.pending = None

    @invariant()
    def direction_is_the_negotiated_one(self) -> None:
        if self.answered:
            assert self.session.direction == self.expected_direction
            held = self.expected_direction != "sendrecv"
            assert self.session.state == ("on_hold" if held else "active")
        if self.pending is None:
            assert self.oa["a"].stable and self.oa["b"].stable

    def teardown(self) -> None:
        self.session.close()


OfferAnswerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestOfferAnswer = OfferAnswerMachine.TestCase
