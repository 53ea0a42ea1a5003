"""IPv6 signalling: our own Via sent-by and Contact are bracketed (RFC 3261 §25.1
IPv6reference), and with a dual-stack bind each peer sees our address of its own family.

Before this, ``make_via`` wrote ``SIP/2.0/UDP ::1:5060``, which no parser can split into
host and port, so every response to a request the PBX sent over IPv6 was dropped.
"""

from __future__ import annotations

from typing import Any

import pytest

from pbx.calls import advertised_host
from pbx.calls.wiring import LocalAddresses
from pbx.sip import Binding, Headers, NameAddress, Peer, Request, Response, Via, make_response
from tests.unit.test_calls_support import REALM, CalleePhone, CallerPhone, Harness

V6_CALLER = Peer("udp", "2001:db8::10", 5060)
V6_CALLEE = Peer("udp", "2001:db8::20", 5062)
V4_PEER = Peer("udp", "192.0.2.20", 5062)
DUAL = LocalAddresses.from_bind("::", "203.0.113.7")  # external IPv4, IPv6 probed


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- which address the PBX calls itself ------------------------------------------------


def test_ipv6_loopback_bind_advertises_itself_only() -> None:
    local = LocalAddresses.from_bind("::1", None)
    assert (local.ipv4, local.ipv6) == (None, "::1")
    assert local.host_for("::1") == "::1"
    assert local.media_for("::1") == ("::1", "::1")
    # No IPv4 face: an IPv4 peer cannot reach this PBX anyway; never an empty answer.
    assert local.host_for("127.0.0.1") == "::1"
    assert local.primary == "::1"


def test_ipv4_binds_keep_their_old_meaning() -> None:
    assert LocalAddresses.from_bind("10.1.2.3", None).host_for("10.9.9.9") == "10.1.2.3"
    wildcard = LocalAddresses.from_bind("0.0.0.0", "203.0.113.5")
    assert wildcard.host_for("198.51.100.1") == "203.0.113.5"
    assert wildcard.media_for("198.51.100.1") == ("0.0.0.0", "203.0.113.5")
    assert advertised_host("0.0.0.0", "203.0.113.5") == "203.0.113.5"


def test_dual_stack_picks_the_address_of_the_peers_family() -> None:
    assert DUAL.host_for("198.51.100.1") == "203.0.113.7"
    six = DUAL.host_for("2001:db8::10")
    assert ":" in six  # the probed IPv6 address, or ::1 on a host without IPv6 routes
    assert DUAL.media_for("198.51.100.1") == ("0.0.0.0", "203.0.113.7")
    assert DUAL.media_for("2001:db8::10") == ("::", six)


def test_an_external_ipv6_address_is_advertised_to_ipv6_peers_only() -> None:
    local = LocalAddresses.from_bind("::", "2001:db8::1")
    assert local.host_for("2001:db8::99") == "2001:db8::1"
    assert "." in local.host_for("192.0.2.1")  # probed IPv4 (or 127.0.0.1), not the v6 one
    named = LocalAddresses.from_bind("::", "pbx.example.com")  # a host name: for everyone
    assert named.host_for("192.0.2.1") == named.host_for("2001:db8::9") == "pbx.example.com"


def test_wildcard_ipv6_bind_advertises_an_ipv6_address() -> None:
    assert ":" in advertised_host("::", None)


# -- Via and Contact ---------------------------------------------------------------------


@pytest.fixture
def harness() -> Harness:
    return Harness()


def test_via_and_contact_bracket_an_ipv6_host(harness: Harness) -> None:
    b2bua = harness.b2bua
    b2bua.local_host, b2bua.local_port = "::1", 5070
    via = b2bua.make_via(Peer("udp", "::1", 5060))
    assert via.startswith("SIP/2.0/UDP [::1]:5070;branch=z9hG4bK")
    parsed = Via.parse(via)
    assert (parsed.host, parsed.port, parsed.transport) == ("::1", 5070, "UDP")
    contact = b2bua.contact(Peer("tcp", "::1", 5060))
    assert contact == "<sip:pbx@[::1]:5070;transport=tcp>"
    uri = NameAddress.parse(contact).uri
    assert (uri.host, uri.port) == ("::1", 5070)


def test_dual_stack_via_and_contact_follow_the_peer(harness: Harness) -> None:
    b2bua = harness.b2bua
    b2bua.local_host_for = DUAL.host_for
    six = _bracket(DUAL.host_for(V6_CALLEE.host))
    assert f"UDP {six}:5060;" in b2bua.make_via(V6_CALLEE)
    assert b2bua.contact(V6_CALLEE) == f"<sip:pbx@{six}:5060>"
    assert "UDP 203.0.113.7:5060;" in b2bua.make_via(V4_PEER)
    assert b2bua.contact(V4_PEER) == "<sip:pbx@203.0.113.7:5060>"


class _Recorder:
    """Stands in for a MediaSession: records where the B2BUA placed each side."""

    def __init__(self) -> None:
        self.placed: dict[str, str | None] = {}

    def place(self, side: str, host: str | None) -> None:
        self.placed[side] = host


def test_place_media_uses_the_caller_flow_and_the_first_target(harness: Harness) -> None:
    media = _Recorder()
    target = Binding("1002", "sip:1002@[2001:db8::20]:5062", 0.0, source_host="2001:db8::20",
                     source_port=5062)
    harness.b2bua.place_media(media, V4_PEER, [target])
    assert media.placed == {"a": "192.0.2.20", "b": "2001:db8::20"}
    harness.b2bua.place_media(object(), V4_PEER, [target])  # a media layer without place()


# -- a whole call between two IPv6 phones, sans-IO ------------------------------------


class V6Caller(CallerPhone):
    """The harness's caller with its own Via and Contact in the IPv6 form."""

    def _headers(self, method: str, seq: int, branch: str, to_tag: str | None,
                 number: str) -> Headers:
        headers = super()._headers(method, seq, branch, to_tag, number)
        hostport = f"{_bracket(self.peer.host)}:{self.peer.port}"
        headers.set("Via", f"SIP/2.0/UDP {hostport};branch={branch};rport")
        headers.set("Contact", f"<sip:{self.user}@{hostport}>")
        return headers


class V6Callee(CalleePhone):
    """The harness's callee answering with a bracketed IPv6 Contact."""

    def respond(self, status: int, body: bytes = b"", request: Request | None = None,
                reason: str | None = None) -> Response:
        request = request or self.invite
        response = make_response(request, status, reason, to_tag=self.tag)
        if 100 < status < 300:
            response.headers.add("Contact", f"<sip:{self.user}@[{self.peer.host}]:"
                                            f"{self.peer.port}>")
        if body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = body
        self.h.response(response, self.peer)
        return response


SDP_V6 = (b"v=0\r\no=- 1 1 IN IP6 2001:db8::10\r\ns=-\r\nc=IN IP6 2001:db8::10\r\n"
          b"t=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\n")


def test_an_ipv6_call_carries_bracketed_via_and_contact_to_the_callee() -> None:
    h = Harness(registered={})
    h.b2bua.local_host_for = DUAL.host_for
    h.location.apply("1002", [Binding("1002", "sip:1002@[2001:db8::20]:5062",
                                      h.clock.seconds() + 3600, 1.0, "reg-1", 1, "udp",
                                      V6_CALLEE.host, V6_CALLEE.port)])
    a = V6Caller(h, peer=V6_CALLER)
    b = V6Callee(h, V6_CALLEE)
    a.dial(body=SDP_V6)
    fork: Any = b.invite
    six = DUAL.host_for(V6_CALLEE.host)
    via = fork.top_via
    assert (via.host, via.port) == (six, 5060)
    assert f"{_bracket(six)}:5060" in fork.headers.get("Via")
    assert fork.contacts[0].uri.host == six
    assert fork.uri.host == "2001:db8::20"
    assert fork.from_.uri.host == REALM
    b.ringing()
    b.answer(SDP_V6.replace(b"::10", b"::20"))
    final = a.final()
    assert final is not None and final.status == 200
    assert final.contacts[0].uri.host == DUAL.host_for(V6_CALLER.host)


def test_a_loopback_peer_of_a_wildcard_bind_gets_the_loopback_address() -> None:
    """Guessed (probed) addresses give way to loopback toward a peer on this host; a
    configured external address stays what everyone is told."""
    local = LocalAddresses.from_bind("::", None)
    assert local.host_for("::1") == "::1"
    assert local.host_for("127.0.0.1") == "127.0.0.1"
    assert local.media_for("::1") == ("::", "::1")
    assert local.media_for("127.0.0.1") == ("0.0.0.0", "127.0.0.1")
    assert DUAL.host_for("127.0.0.1") == "203.0.113.7"  # external IPv4 configured
    assert DUAL.host_for("::1") == "::1"                 # IPv6 still guessed


def test_bind_and_external_literals_are_taken_in_rfc5952_form() -> None:
    local = LocalAddresses.from_bind("[0:0:0:0:0:0:0:1]", None)
    assert local.host_for("::1") == "::1"
    assert LocalAddresses.from_bind("::", "2001:DB8:0::1").host_for("2001:db8::9") == \
        "2001:db8::1"
