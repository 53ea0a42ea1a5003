"""RFC 3311 UPDATE through the B2BUA: when a received UPDATE may be relayed.

The B2BUA answers an UPDATE on one leg by sending a new UPDATE on the other leg and
relaying that one's answer back (SDP rewritten by the media session).  Whether the
UPDATE may go ahead at all is decided here, from the offer/answer state of the two legs,
per RFC 3311 §5.2:

* an UPDATE with an offer while the receiving side has an offer of its own
  outstanding (ours, unanswered): **491** (glare; the UAC retries after a random delay);
* an UPDATE with an offer while an offer *from* the UAC is still unanswered by us (an
  INVITE or re-INVITE offer in progress, including an initial INVITE whose answer went
  only in an unreliable 18x, RFC 3311 §5.1): **500** with ``Retry-After`` 0-10 s;
* in an early dialog an UPDATE with an offer needs the initial offer/answer complete
  (§5.1: answered in a reliable 18x, PRACKed or not);
* an UPDATE without SDP never conflicts: it only refreshes the dialog (target, session
  timer) and is relayed when the other leg can take it, else answered by us.

The other leg must allow UPDATE (its Allow, RFC 3311 §4: a UA must not send UPDATE to
a peer that did not indicate support); when it does not, an offer cannot be relayed in
an early dialog (**500**), and in a confirmed one the leg answers with 500/Retry-After
too rather than turning the UPDATE into a re-INVITE (which would change glare rules
for the other side).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from pbx.sip import Request, Response

__all__ = ["UpdateVerdict", "allows_update", "decide_update", "retry_after"]


@dataclass(frozen=True, slots=True)
class UpdateVerdict:
    """Relay (``status`` None), answer locally 200 (``local``) or reject."""

    status: int | None = None
    reason: str | None = None
    retry_after: int | None = None
    local: bool = False

    @property
    def relay(self) -> bool:
        return self.status is None and not self.local


RELAY = UpdateVerdict()
LOCAL = UpdateVerdict(local=True)


def retry_after() -> int:
    """RFC 3311 §5.2: Retry-After chosen uniformly between 0 and 10 seconds."""
    return secrets.randbelow(11)


def allows_update(message: Request | Response | None) -> bool:
    """Whether the peer's INVITE/2xx/18x listed UPDATE in Allow (RFC 3311 §4).  A
    message without any Allow says nothing; we then assume it does not."""
    if message is None:
        return False
    return any(value.strip().upper() == "UPDATE" for value in message.headers.getall("Allow"))


def decide_update(*, has_offer: bool, early: bool, other_allows: bool,
                  other_established: bool, local_offer_pending: bool,
                  remote_offer_pending: bool, initial_answered: bool = True) -> UpdateVerdict:
    """The B2BUA's answer to an UPDATE received on a leg (see the module doc).

    ``local_offer_pending``: an offer we sent to this leg is unanswered (a relayed
    re-INVITE or UPDATE in progress toward it).  ``remote_offer_pending``: an offer
    this leg sent is still unanswered by us.  ``initial_answered``: in an early dialog,
    whether the initial offer/answer completed (an answer in a reliable provisional).
    ``other_established``: the other leg exists with a dialog (early or confirmed).
    An unanswered offer from this leg is checked first: relayed, it is also the offer
    outstanding on the other leg, and §5.2 asks 500 for it.
    """
    if not has_offer:
        if other_allows and other_established:
            return RELAY
        return LOCAL
    if remote_offer_pending:
        # First: this leg's own offer, relayed, is what keeps the other leg busy too.
        return UpdateVerdict(500, "Offer Pending", retry_after())
    if local_offer_pending:
        return UpdateVerdict(491, "Request Pending")
    if early and not initial_answered:  # §5.1: answer only in an unreliable 18x
        return UpdateVerdict(500, "Offer Pending", retry_after())
    if not other_allows or not other_established:
        return UpdateVerdict(500, "Cannot Update Now", retry_after())
    return RELAY
