"""Per-leg SDP offer/answer state: the ``statecharts/offer_answer.yaml`` model.

What the chart does not show: the SDP itself.  The bodies are rewritten and negotiated
by the call's media session (:mod:`pbx.media.negotiation` decides what a valid answer
is; :meth:`MediaSession.reject_offer` is the rollback), and the B2BUA relays them between
the two legs, so one exchange moves *both* legs' charts: an offer received on one leg
(``receive_offer``) is sent on the other (``send_offer``), and so on back.  Which SIP
message carries an offer or an answer (INVITE, 18x, 2xx, ACK; RFC 3261 §13.2.1) is the
call's and the B2BUA's knowledge; this object only says where each leg stands, which is
what glare detection (491) and the late-offer ACK need.

The model holds no reference to its leg or call (no cycle to collect).
"""

from __future__ import annotations

from pbx.statecharts import ChartModel

__all__ = ["OfferAnswer"]


class OfferAnswer(ChartModel):
    """One leg's offer/answer state (RFC 3264 §4, RFC 6337 §3)."""

    chart_name = "offer_answer"

    @property
    def stable(self) -> bool:
        return self.state == "stable"

    @property
    def offer_outstanding(self) -> bool:
        """We sent an offer whose answer has not come (the ACK must carry it)."""
        return self.state == "local_offer"

    @property
    def answer_owed(self) -> bool:
        """The phone's offer still needs our answer (the ACK we send must carry it)."""
        return self.state == "remote_offer"
