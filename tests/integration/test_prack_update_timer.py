"""100rel, UPDATE and session timers through the real PBX (issue 11.4) with scripted phones.

The phones are :class:`~tests.integration.sipua.Phone` with a few more behaviours
(subclassed here): a callee that sends its 180 reliably and wants a PRACK, a caller that
requires 100rel and PRACKs the PBX's reliable 18x, UPDATE with SDP in a confirmed dialog,
and session timers with a test-only short interval (``min_se: 10`` is allowed by the
configuration with a validator warning; RFC 4028 wants >= 90).  Assertions are on what
each phone received and on the CDR, never on timings.
"""

from __future__ import annotations

import random
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import PBXProcess, clean_env, extension_seed, start_pbx
from .sipua import Message, Net, Phone

pytestmark = pytest.mark.integration

CALLER, CALLEE = "3101", "3102"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE"


class ExtPhone(Phone):
    """A phone that speaks 100rel, UPDATE and session timers the way a test asks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[Message] = []
        self.reliable_18x = False         # as callee: send the 180 reliably
        self.answer_headers: list[tuple[str, str]] = []   # extra on our 200 to INVITE
        self.rseq = 4000
        self.pracked: set[str] = set()
        self.local_cseq_seen: set[str] = set()
        net = self.net
        net.background.append(self._prack_reliable)

    # -- UAS side ----------------------------------------------------------------------
    def _reply_ex(self, request: Message, status: int, reason: str, body: bytes = b"",
                  extra: list[tuple[str, str]] | None = None) -> None:
        to = request.get("To")
        if ";tag=" not in to:
            to += f";tag={self.tags['local']}"
        headers = [*(("Via", v) for v in request.getall("Via")), ("From", request.get("From")),
                   ("To", to), ("Call-ID", request.get("Call-ID")), ("CSeq", request.get("CSeq")),
                   ("Contact", f"<sip:{self.number}@{self.private_host}:{self.sip_port}>"),
                   ("Allow", ALLOW), *(extra or [])]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        self.send(Message(f"SIP/2.0 {status} {reason}", headers, body))

    def _request(self, request: Message) -> None:
        method = request.start.split()[0]
        self.requests.append(request)
        if method == "INVITE" and self.invite is None:
            self.invite = request
            self._learn_sdp(request.body)
            if self.reliable_18x:
                self._reply_ex(request, 180, "Ringing", extra=[
                    ("Require", "100rel"), ("RSeq", str(self.rseq))])
            else:
                self._reply_ex(request, 180, "Ringing")
            self.net.later(getattr(self, "ring", 0.0), self._answer)
        elif method == "INVITE":
            self._reply_ex(request, 200, "OK", self.sdp(), self._timer_echo(request))
        elif method == "UPDATE":
            body = self.sdp() if request.body else b""
            self._reply_ex(request, 200, "OK", body, self._timer_echo(request))
        elif method in ("PRACK", "BYE", "OPTIONS", "INFO", "CANCEL"):
            self._reply_ex(request, 200, "OK")
        elif method == "ACK":
            self.acked = True

    @staticmethod
    def _timer_echo(request: Message) -> list[tuple[str, str]]:
        se = request.get("Session-Expires")
        return [("Session-Expires", se), ("Require", "timer")] if se else []

    def _answer(self) -> None:
        assert self.invite is not None
        self.answered = True
        self._reply_ex(self.invite, 200, "OK", self.sdp(), self.answer_headers)

    # -- UAC side ----------------------------------------------------------------------
    def _prack_reliable(self) -> None:
        """PRACK every reliable 18x to our INVITE once (RFC 3262 §4)."""
        for message in list(self.inbox):
            if not message.is_response or not 100 < message.status < 200:
                continue
            rseq = message.get("RSeq")
            if "100rel" not in message.get("Require").lower() or not rseq:
                continue
            if rseq in self.pracked:
                continue
            self.pracked.add(rseq)
            contact = re.search(r"<([^>]+)>", message.get("Contact"))
            uri = contact.group(1) if contact else f"sip:{self.pbx[0]}:{self.pbx[1]}"
            self.cseq += 1
            cseq = message.get("CSeq").split()
            prack = self._request_msg("PRACK", uri, to=message.get("To"),
                                      extra=[("RAck", f"{rseq} {cseq[0]} {cseq[1]}")])
            self.send(prack)

    def call_with(self, number: str, extra: list[tuple[str, str]],
                  timeout: float = 30.0) -> Message:
        """INVITE ``number`` with extra headers; returns the final response (2xx ACKed)."""
        self.call_id = secrets.token_hex(8)
        self.cseq += 1
        uri = f"sip:{number}@{self.pbx[0]}:{self.pbx[1]}"
        to = f"<sip:{number}@{self.pbx[0]}>"
        final = self._transact(lambda auth: self._request_msg(
            "INVITE", uri, to=to, body=self.sdp(),
            extra=[("Allow", ALLOW), *extra, *auth]), "INVITE", timeout)
        if final.status != 200:
            return final
        self._learn_sdp(final.body)
        self.tags["remote_to"] = final.get("To")
        contact = re.search(r"<([^>]+)>", final.get("Contact"))
        self.dialog_uri = contact.group(1) if contact else uri
        self.send(self._request_msg("ACK", self.dialog_uri, to=final.get("To"),
                                    cseq=int(final.get("CSeq").split()[0])))
        return final

    def update(self, body: bytes) -> Message:
        self.cseq += 1
        self.inbox.clear()
        self.send(self._request_msg("UPDATE", self.dialog_uri, to=self.tags["remote_to"],
                                    body=body))
        return self._final("UPDATE", 10.0)

    def received(self, method: str) -> list[Message]:
        return [r for r in self.requests if r.start.split()[0] == method]


@pytest.fixture
def pbx_setup(tmp_path: Path) -> Iterator[tuple[PBXProcess, dict[str, str], Path]]:
    base = random.randrange(40000, 49000, 200)
    passwords = {n: secrets.token_urlsafe(12) for n in (CALLER, CALLEE)}
    lines = ["auth:", "  algorithms: [MD5]",
             "calls:", "  ring_timeout: 20", "  media_timeout: 60", "  max_calls: 10",
             "  session_timer:", "    enabled: true", "    expires: 12", "    min_se: 10",
             "rtp:", f"  port_min: {base}", f"  port_max: {base + 39}"]
    seed, seeded_env = extension_seed(passwords)
    lines += seed
    env = clean_env() | seeded_env
    pbx = start_pbx(tmp_path, env=env, extra="\n".join(lines) + "\n")
    yield pbx, passwords, tmp_path
    if pbx.proc.poll() is None:
        pbx.proc.kill()
        pbx.proc.wait(5)


def _phones(pbx: PBXProcess, passwords: dict[str, str]) -> tuple[Net, ExtPhone, ExtPhone]:
    net = Net()
    address = ("127.0.0.1", pbx.sip_port)
    caller = ExtPhone(net, CALLER, passwords[CALLER], address,
                      private_host="127.0.0.1", public_host="127.0.0.1")
    callee = ExtPhone(net, CALLEE, passwords[CALLEE], address,
                      private_host="127.0.0.1", public_host="127.0.0.1")
    caller.register()
    callee.register()
    return net, caller, callee


def _cdrs(tmp: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp / "var" / "pbx.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM cdr ORDER BY id")]


def test_100rel_both_legs(pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    """Callee's reliable 180 is PRACKed by the PBX; the caller requiring 100rel gets a
    reliable 180 (RSeq, Require: 100rel), PRACKs it, and the call connects."""
    pbx, passwords, _tmp = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    callee.reliable_18x = True
    callee.answer_after(1.0)
    final = caller.call_with(CALLEE, [("Require", "100rel"), ("Supported", "100rel")])
    assert final.status == 200, final.start
    invite = callee.invite
    assert invite is not None and "100rel" in invite.get("Supported")
    pracks = callee.received("PRACK")
    assert len(pracks) == 1 and pracks[0].get("RAck").split() == ["4000", "1", "INVITE"]
    assert caller.pracked, "the caller got no reliable provisional"
    net.run(1.0)
    caller.bye()
    caller.close()
    callee.close()


def test_update_with_sdp_is_relayed(pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    pbx, passwords, _tmp = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    callee.answer_after(0.2)
    assert caller.call_with(CALLEE, []).status == 200
    net.run(5.0, until=lambda: callee.acked)
    before = caller.remote_rtp
    final = caller.update(caller.sdp().replace(b"a=sendrecv", b"a=sendonly"))
    assert final.status == 200, final.start
    assert b"m=audio" in final.body
    updates = callee.received("UPDATE")
    assert updates and b"a=sendonly" in updates[-1].body
    assert before is not None
    caller.bye()
    caller.close()
    callee.close()


def test_pbx_refreshes_the_callee(pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    """The callee's 2xx makes the PBX the refresher (refresher=uac, we are its UAC): it
    sends UPDATE with Session-Expires at half the interval; the call stays up."""
    pbx, passwords, tmp = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    callee.answer_headers = [("Session-Expires", "12;refresher=uac"), ("Require", "timer")]
    callee.answer_after(0.2)
    final = caller.call_with(CALLEE, [("Supported", "timer"),
                                      ("Session-Expires", "12;refresher=uas")])
    assert final.status == 200
    assert final.get("Session-Expires").startswith("12;refresher=uas")
    assert callee.invite is not None and callee.invite.get("Session-Expires") == "12"
    net.run(20.0, until=lambda: len(callee.received("UPDATE")) >= 2
            and len(caller.received("UPDATE")) >= 2)
    assert len(callee.received("UPDATE")) >= 2, "the PBX did not refresh the callee"
    assert callee.received("UPDATE")[0].get("Session-Expires").startswith("12")
    assert len(caller.received("UPDATE")) >= 2, "the PBX did not refresh the caller"
    assert not callee.received("BYE") and not caller.received("BYE")
    caller.bye()
    net.run(2.0)
    rows = _cdrs(tmp)
    assert rows[-1]["hangup_cause"] != "Session Timer Expired"
    caller.close()
    callee.close()


def test_missed_refresh_tears_the_call_down(
        pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    """The caller takes the refresher role and never refreshes: the PBX BYEs both legs
    before the session expires, and the CDR says why."""
    pbx, passwords, tmp = pbx_setup
    net, caller, callee = _phones(pbx, passwords)
    callee.answer_after(0.2)
    final = caller.call_with(CALLEE, [("Supported", "timer"),
                                      ("Session-Expires", "12;refresher=uac")])
    assert final.status == 200
    assert final.get("Session-Expires") == "12;refresher=uac"
    assert "timer" in final.get("Require")
    net.run(30.0, until=lambda: bool(caller.received("BYE") and callee.received("BYE")))
    assert caller.received("BYE") and callee.received("BYE")
    assert "Session Timer Expired" in caller.received("BYE")[0].get("Reason")

    def recorded() -> bool:
        rows = _cdrs(tmp)
        return bool(rows) and rows[-1]["hangup_cause"] == "Session Timer Expired"

    net.run(5.0, until=recorded)
    assert _cdrs(tmp)[-1]["hangup_cause"] == "Session Timer Expired"
    caller.close()
    callee.close()


def test_session_interval_too_small_gets_422(
        pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    pbx, passwords, _tmp = pbx_setup
    _net, caller, callee = _phones(pbx, passwords)
    final = caller.call_with(CALLEE, [("Supported", "timer"), ("Session-Expires", "5")])
    assert final.status == 422
    assert final.get("Min-SE") == "10"
    caller.close()
    callee.close()


class EarlyCallee(ExtPhone):
    """A callee that answers the INVITE's offer in a reliable 183 (RFC 3262), so the
    initial offer/answer completes in the early dialog, and only sends its 200 when
    told (:meth:`answer_now`)."""

    def _request(self, request: Message) -> None:
        if request.start.split()[0] == "INVITE" and self.invite is None:
            self.requests.append(request)
            self.invite = request
            self._learn_sdp(request.body)
            self._reply_ex(request, 183, "Session Progress", self.sdp(), extra=[
                ("Require", "100rel"), ("RSeq", str(self.rseq))])
            return
        super()._request(request)

    def answer_now(self) -> None:
        if not self.answered:
            self._answer()


class EarlyUpdater(ExtPhone):
    """A caller that sends one UPDATE with ``early_sdp`` in its early dialog, once the
    PBX's reliable 183 with the answer has been PRACKed (RFC 3311 §5.1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.early_sdp = b""
        self.early_update: Message | None = None
        self.net.background.append(self._update_early)

    def _update_early(self) -> None:
        if self.early_update is not None or not self.early_sdp:
            return
        early = next((m for m in self.inbox if m.is_response and m.method == "INVITE"
                      and m.status == 183 and m.body), None)
        pracked = any(m.is_response and m.method == "PRACK" and m.status == 200
                      for m in self.inbox)
        if early is None or not pracked:
            return
        contact = re.search(r"<([^>]+)>", early.get("Contact"))
        assert contact is not None
        self.cseq += 1
        self.early_update = self._request_msg("UPDATE", contact.group(1),
                                              to=early.get("To"), body=self.early_sdp)
        self.send(self.early_update)

    def update_answer(self) -> Message | None:
        update = self.early_update
        if update is None:
            return None
        return next((m for m in self.inbox if m.is_response and m.method == "UPDATE"
                     and m.status >= 200 and m.get("CSeq") == update.get("CSeq")), None)


def test_update_in_the_early_dialog_is_relayed(
        pbx_setup: tuple[PBXProcess, dict[str, str], Path]) -> None:
    """RFC 3311 §5.1: the callee's reliable 183 answers the offer; the caller's UPDATE
    with a new offer in the early dialog reaches the callee with the SDP rewritten by
    the PBX, the callee's answer comes back in the 200; then the call is answered and
    hung up as usual."""
    pbx, passwords, _tmp = pbx_setup
    net = Net()
    address = ("127.0.0.1", pbx.sip_port)
    caller = EarlyUpdater(net, CALLER, passwords[CALLER], address,
                          private_host="127.0.0.1", public_host="127.0.0.1")
    callee = EarlyCallee(net, CALLEE, passwords[CALLEE], address,
                         private_host="127.0.0.1", public_host="127.0.0.1")
    caller.register()
    callee.register()
    caller.early_sdp = caller.sdp().replace(b"a=sendrecv", b"a=sendonly")

    def answer_once_updated() -> None:
        if caller.update_answer() is not None:
            callee.answer_now()

    net.background.append(answer_once_updated)
    final = caller.call_with(CALLEE, [("Supported", "100rel")])
    assert final.status == 200, final.start
    answer = caller.update_answer()
    assert answer is not None and answer.status == 200, answer and answer.start
    assert b"m=audio" in answer.body
    updates = callee.received("UPDATE")
    assert len(updates) == 1 and b"a=sendonly" in updates[0].body
    relayed_port = re.search(rb"m=audio (\d+)", updates[0].body)
    assert relayed_port is not None and int(relayed_port.group(1)) != caller.sdp_port
    assert callee.received("PRACK"), "the PBX did not PRACK the callee's 183"
    net.run(5.0, until=lambda: callee.acked)
    assert callee.acked
    caller.bye()
    net.run(5.0, until=lambda: bool(callee.received("BYE")))
    assert callee.received("BYE")
    caller.close()
    callee.close()
