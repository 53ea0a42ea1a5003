"""Registrar: RFC 3261 §10.3 REGISTER processing with digest authentication."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from pbx.config.security import RegistrarSettings
from pbx.sip.abuse import BruteForcePolicy, RateLimitPolicy, SecurityPolicy, SourceGuard
from pbx.sip.auth import (
    CachedCredentialLookup,
    CredentialDirectory,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    compute_ha1,
    compute_response,
    credentials_from_password,
)
from pbx.sip.location import LocationService
from pbx.sip.message import Request, Response, parse
from pbx.sip.registrar import Registrar, RegistrarPolicy
from pbx.sip.transactions import Peer

DOMAIN = "pbx.example.com"
PHONE = Peer("udp", "192.0.2.20", 5062)
T0 = 1_700_000_000.0


class Wall:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Txn:
    """Fake server transaction: records every response it is asked to send."""

    def __init__(self) -> None:
        self.responses: list[Response] = []

    def respond(self, response: Response) -> None:
        self.responses.append(response)


class AbandonableTxn(Txn):
    def __init__(self) -> None:
        super().__init__()
        self.abandoned = False

    def abandon(self) -> None:
        self.abandoned = True


class Extensions:
    """Credential store fake; ``defer`` holds answers back, ``error`` fails them."""

    def __init__(self) -> None:
        self.users: dict[str, Credentials] = {
            n: credentials_from_password(n, DOMAIN, f"pw{n}") for n in ("1001", "1002")
        }
        self.users["1003"] = credentials_from_password("1003", DOMAIN, "pw1003", enabled=False)
        self.defer = False
        self.pending: list[tuple[str, Deferred[Credentials | None]]] = []
        self.error: Exception | None = None

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        if self.error is not None:
            return fail(self.error)
        if self.defer:
            d: Deferred[Credentials | None] = Deferred()
            self.pending.append((username, d))
            return d
        return succeed(self.users.get(username))


class Setup:
    def __init__(self, *, policy: RegistrarPolicy | None = None,
                 security: SecurityPolicy | None = None, cached: bool = False,
                 **kw: Any) -> None:
        self.clock = Clock()
        self.wall = Wall()
        self.monotonic = [0.0]
        self.extensions = Extensions()
        self.location = LocationService(self.clock, None, wall_clock=self.wall)
        self.auth = DigestAuthenticator(DOMAIN, DigestPolicy(secret=b"k" * 32),
                                        now=self.wall)
        self.guard = SourceGuard(security or SecurityPolicy(), now=lambda: self.monotonic[0])
        creds: Any = self.extensions
        if cached:
            creds = CachedCredentialLookup(self.extensions, self.clock)
        self.registrar = Registrar(
            location=self.location, authenticator=self.auth, credentials=creds,
            policy=policy or RegistrarPolicy(min_expires=60, max_expires=3600,
                                             default_expires=1800, max_contacts=3),
            domains=[DOMAIN], guard=self.guard, node="node-a", user_agent="PBX",
            wall_clock=self.wall, tag_factory=lambda: "totag", **kw)
        self.nc = 0

    def send(self, request: Request, peer: Peer = PHONE, txn: Txn | None = None) -> Response:
        txn = txn or Txn()
        self.registrar.handle_register(request, txn, peer)  # type: ignore[arg-type]
        assert len(txn.responses) == 1, txn.responses
        return txn.responses[0]

    def authorize(self, challenge: Response, request: Request, *, user: str | None = None,
                  password: str | None = None, algorithm: str = "SHA-256") -> Request:
        """Answer ``challenge`` the way a phone does: same request, CSeq + 1, credentials."""
        user = user or request.to.uri.user  # type: ignore[union-attr]
        assert user is not None
        password = password if password is not None else f"pw{user}"
        nonce = nonce_of(challenge, algorithm)
        self.nc += 1
        nc = f"{self.nc:08x}"
        uri = str(request.uri)
        ha1 = compute_ha1(user, DOMAIN, password, algorithm)
        response = compute_response(ha1, "REGISTER", uri, nonce, algorithm, qop="auth",
                                    nc=nc, cnonce="c0ffee")
        header = (f'Digest username="{user}", realm="{DOMAIN}", nonce="{nonce}", uri="{uri}", '
                  f'response="{response}", algorithm={algorithm}, qop=auth, nc={nc}, '
                  'cnonce="c0ffee"')
        text = request.to_bytes().decode()
        cseq = request.cseq.seq
        text = text.replace(f"CSeq: {cseq} REGISTER", f"CSeq: {cseq + 1} REGISTER")
        text = text.replace("Content-Length: 0", f"Authorization: {header}\r\nContent-Length: 0")
        return parse(text.encode())  # type: ignore[return-value]

    def register(self, request: Request, *, peer: Peer = PHONE, **kw: Any) -> Response:
        """The full exchange: REGISTER -> 401 -> REGISTER with credentials -> answer."""
        challenge = self.send(request, peer)
        assert challenge.status == 401, challenge
        return self.send(self.authorize(challenge, request, **kw), peer)


def register(user: str = "1001", *, contacts: list[str] | None = None,
             expires: str | None = None, call_id: str = "call-1", cseq: int = 1,
             to_user: str | None = None, host: str = DOMAIN, to_host: str | None = None,
             extra: list[str] | None = None) -> Request:
    to_user = to_user or user
    if contacts is None:
        contacts = [f"<sip:{user}@192.0.2.20:5062;transport=udp>"]
    lines = [
        f"REGISTER sip:{host} SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.20:5062;branch=z9hG4bK{call_id}{cseq};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{host}>;tag=ft{user}",
        f"To: <sip:{to_user}@{to_host or host}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *[f"Contact: {c}" for c in contacts],
        *([f"Expires: {expires}"] if expires is not None else []),
        "User-Agent: TestPhone/1.0",
        *(extra or []),
        "Content-Length: 0", "", "",
    ]
    request = parse("\r\n".join(lines).encode())
    assert isinstance(request, Request)
    return request


def nonce_of(challenge: Response, algorithm: str = "SHA-256") -> str:
    for value in challenge.headers.getall("WWW-Authenticate"):
        if f"algorithm={algorithm}," in value:
            match = re.search(r'nonce="([^"]+)"', value)
            assert match
            return match.group(1)
    raise AssertionError(f"no {algorithm} challenge in {challenge.headers}")


def contact_expires(response: Response) -> dict[str, int]:
    out = {}
    for value in response.headers.getall("Contact"):
        uri = value[value.index("<") + 1:value.index(">")]
        out[uri] = int(re.search(r";expires=(\d+)", value).group(1))  # type: ignore[union-attr]
    return out


# -- challenge and success ----------------------------------------------------------------


def test_first_register_is_challenged_with_sha256_then_md5() -> None:
    s = Setup()
    response = s.send(register())
    assert response.status == 401
    challenges = response.headers.getall("WWW-Authenticate")
    assert [re.search(r"algorithm=([\w-]+)", c).group(1) for c in challenges] == [  # type: ignore[union-attr]
        "SHA-256", "MD5"]
    assert all('qop="auth"' in c and f'realm="{DOMAIN}"' in c for c in challenges)
    assert response.to.tag == "totag"
    assert s.location.binding_count == 0
    assert s.registrar.stats.challenges == 1


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_authenticated_register_binds_the_contact_and_records_the_flow(algorithm: str) -> None:
    s = Setup()
    response = s.register(register(expires="600"), algorithm=algorithm)
    assert response.status == 200
    assert contact_expires(response) == {"sip:1001@192.0.2.20:5062;transport=udp": 600}
    assert response.headers.get("Date", "").endswith(" GMT")
    assert response.headers.get("Server") == "PBX"
    [b] = s.location.lookup("1001")
    assert (b.aor, b.contact, b.expires_at, b.call_id, b.cseq) == (
        "1001", "sip:1001@192.0.2.20:5062;transport=udp", T0 + 600, "call-1", 2)
    assert (b.transport, b.source_host, b.source_port, b.node, b.user_agent) == (
        "udp", "192.0.2.20", 5062, "node-a", "TestPhone/1.0")
    assert s.registrar.stats.registrations == 1


def test_behind_nat_the_source_address_is_recorded_not_the_contact() -> None:
    s = Setup()
    nat = Peer("tcp", "198.51.100.7", 61000)
    response = s.register(register(contacts=["<sip:1001@10.0.0.5:5060>"]), peer=nat)
    assert response.status == 200
    [b] = s.location.lookup("1001")
    assert (b.contact, b.transport, b.source_host, b.source_port) == (
        "sip:1001@10.0.0.5:5060", "tcp", "198.51.100.7", 61000)


def test_async_credential_lookup_answers_once_when_it_fires() -> None:
    s = Setup()
    s.extensions.defer = True
    request = register()
    challenge = s.send(request)
    txn = Txn()
    s.registrar.handle_register(s.authorize(challenge, request), txn, PHONE)  # type: ignore[arg-type]
    assert txn.responses == []
    username, d = s.extensions.pending.pop()
    d.callback(s.extensions.users[username])
    assert [r.status for r in txn.responses] == [200]


def test_cached_lookup_is_used_synchronously() -> None:
    s = Setup(cached=True)
    assert s.register(register()).status == 200
    assert s.register(register(call_id="call-2")).status == 200


# -- failures ---------------------------------------------------------------------------------


def test_wrong_password_is_challenged_again_and_counted() -> None:
    s = Setup()
    response = s.register(register(), password="wrong")
    assert response.status == 401
    assert nonce_of(response)  # a fresh challenge
    assert "stale" not in response.headers.get("WWW-Authenticate", "")
    assert s.guard.stats.auth_failures == 1
    assert s.registrar.stats.auth_failures == 1
    assert s.location.binding_count == 0


def _masked(response: Response) -> bytes:
    return re.sub(rb'nonce="[^"]+"', b'nonce="X"', response.to_bytes())


def test_unknown_user_gets_the_same_401_as_a_wrong_password() -> None:
    s = Setup()
    request = register()
    challenge = s.send(request)
    wrong = s.send(s.authorize(challenge, request, password="wrong"))
    unknown = s.send(s.authorize(challenge, request, user="9999", password="whatever"))
    assert wrong.status == unknown.status == 401
    assert _masked(wrong) == _masked(unknown)
    assert nonce_of(wrong) != nonce_of(unknown)
    assert s.guard.stats.auth_failures == 2


def test_unknown_aor_and_known_aor_get_identical_challenges() -> None:
    s = Setup()
    known = s.register(register("1001"), password="wrong")
    unknown = s.register(register("9999", call_id="call-1"), password="wrong")
    assert _masked(known) == _masked(unknown).replace(b"9999", b"1001")
    first_known = s.send(register("1001"))
    first_unknown = s.send(register("9999"))
    assert _masked(first_known) == _masked(first_unknown).replace(b"9999", b"1001")


def test_repeated_failures_block_the_source_with_403() -> None:
    s = Setup(security=SecurityPolicy(brute_force=BruteForcePolicy(max_failures=3)))
    for _ in range(3):
        assert s.register(register(), password="wrong").status == 401
    blocked = s.send(register())
    assert blocked.status == 403
    # even the right password is refused while blocked
    assert s.send(register(cseq=10)).status == 403
    other = Peer("udp", "192.0.2.99", 5060)
    assert s.send(register(), other).status == 401
    s.monotonic[0] += 601
    assert s.register(register(call_id="call-9")).status == 200


def test_blocked_source_with_drop_action_gets_silence() -> None:
    s = Setup(security=SecurityPolicy(brute_force=BruteForcePolicy(max_failures=1,
                                                                   action="drop")))
    assert s.register(register(), password="wrong").status == 401
    txn = AbandonableTxn()
    s.registrar.handle_register(register(), txn, PHONE)  # type: ignore[arg-type]
    assert txn.responses == [] and txn.abandoned
    assert s.registrar.stats.dropped == 1
    # a transaction that cannot be abandoned still ends, with a 403
    assert s.send(register()).status == 403


def test_rate_limited_source_gets_503_with_retry_after() -> None:
    s = Setup(security=SecurityPolicy(rate_limit=RateLimitPolicy(requests_per_second=1,
                                                                 burst=2)))
    assert s.send(register()).status == 401
    assert s.send(register()).status == 401
    limited = s.send(register())
    assert (limited.status, limited.headers.get("Retry-After")) == (503, "1")
    assert s.registrar.stats.rate_limited == 1


def test_trusted_source_is_never_limited() -> None:
    s = Setup(security=SecurityPolicy(trusted_networks=("192.0.2.0/24",),
                                      rate_limit=RateLimitPolicy(burst=1)))
    assert all(s.send(register()).status == 401 for _ in range(10))


def test_stale_nonce_gets_stale_challenge_and_no_failure() -> None:
    s = Setup()
    request = register()
    challenge = s.send(request)
    s.wall.t += 301
    response = s.send(s.authorize(challenge, request))
    assert response.status == 401
    assert all("stale=true" in v for v in response.headers.getall("WWW-Authenticate"))
    assert s.guard.stats.auth_failures == 0
    assert s.send(s.authorize(response, request)).status == 200


def test_replayed_request_is_not_accepted() -> None:
    s = Setup()
    request = register()
    authorized = s.authorize(s.send(request), request)
    assert s.send(authorized).status == 200
    replay = s.send(authorized)
    assert replay.status == 401
    assert "stale=true" in replay.headers.get("WWW-Authenticate", "")


def test_forged_or_malformed_credentials_get_a_plain_challenge_and_no_failure() -> None:
    s = Setup()
    for header in ('Digest username="1001", realm="pbx.example.com", nonce="AAAA", '
                   'uri="sip:pbx.example.com", response="00", qop=auth, nc=00000001, '
                   'cnonce="x", algorithm=SHA-256',
                   'Digest username="1001", garbage', "Basic MTAwMTpwdw=="):
        response = s.send(register(extra=[f"Authorization: {header}"]))
        assert response.status == 401
    assert s.guard.stats.auth_failures == 0


def test_user_may_only_register_its_own_aor() -> None:
    s = Setup()
    response = s.register(register("1002", to_user="1001"), user="1002")
    assert response.status == 403
    assert s.location.binding_count == 0


def test_disabled_extension_is_forbidden_with_the_right_password() -> None:
    s = Setup()
    assert s.register(register("1003")).status == 403
    assert s.register(register("1003", call_id="x"), password="wrong").status == 401


def test_foreign_domain_is_404_without_a_challenge() -> None:
    s = Setup()
    assert s.send(register(host="elsewhere.example.org")).status == 404
    assert s.send(register(to_host="elsewhere.example.org")).status == 404
    assert s.registrar.stats.challenges == 0


def test_ip_literal_domains() -> None:
    assert Setup().send(register(host="192.0.2.1")).status == 401
    assert Setup(accept_ip_literals=False).send(register(host="192.0.2.1")).status == 404


def test_unsupported_require_gets_420() -> None:
    s = Setup()
    response = s.send(register(extra=["Require: foo, bar"]))
    assert response.status == 420
    assert response.headers.getall("Unsupported") == ["foo", "bar"]
    assert Setup(supported=["foo", "bar"]).send(register(extra=["Require: foo"])).status == 401


def test_lookup_error_is_500_exactly_once_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup()
    request = register()
    challenge = s.send(request)
    s.extensions.error = RuntimeError("database down")
    with caplog.at_level(logging.ERROR, logger="pbx.sip.registrar"):
        assert s.send(s.authorize(challenge, request)).status == 500
    assert "database down" in caplog.text
    assert s.registrar.stats.errors == 1


def test_internal_error_after_auth_is_500_exactly_once(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = Setup()

    def broken(*args: Any, **kw: Any) -> None:
        raise RuntimeError("bug")
    monkeypatch.setattr(s.location, "apply", broken)
    with caplog.at_level(logging.ERROR, logger="pbx.sip.registrar"):
        assert s.register(register()).status == 500
    assert "bug" in caplog.text


def test_rejection_after_a_deferred_lookup_answers_once() -> None:
    s = Setup()
    s.extensions.defer = True
    request = register(contacts=["<sip:1001@h>;q=7"])  # 400 raised inside the callback
    challenge = s.send(request)
    txn = Txn()
    s.registrar.handle_register(s.authorize(challenge, request), txn, PHONE)  # type: ignore[arg-type]
    _, d = s.extensions.pending.pop()
    d.callback(s.extensions.users["1001"])
    assert [r.status for r in txn.responses] == [400]


# -- expiry -------------------------------------------------------------------------------------


def test_default_expires_when_none_given() -> None:
    s = Setup()
    response = s.register(register())
    assert list(contact_expires(response).values()) == [1800]


def test_contact_parameter_beats_the_expires_header() -> None:
    s = Setup()
    response = s.register(register(contacts=["<sip:1001@h>;expires=120"], expires="900"))
    assert contact_expires(response) == {"sip:1001@h": 120}


def test_too_brief_gets_423_with_min_expires() -> None:
    s = Setup()
    for request in (register(expires="59"),
                    register(contacts=["<sip:1001@h>;expires=30"], call_id="c2")):
        response = s.register(request)
        assert response.status == 423
        assert response.headers.get("Min-Expires") == "60"
    assert s.location.binding_count == 0


def test_too_long_is_clamped_to_max_expires() -> None:
    s = Setup()
    response = s.register(register(expires="86400"))
    assert list(contact_expires(response).values()) == [3600]
    assert s.location.lookup("1001")[0].expires_at == T0 + 3600


def test_malformed_expires_counts_as_the_default() -> None:
    s = Setup()
    response = s.register(register(expires="soon"))
    assert list(contact_expires(response).values()) == [1800]


def test_expiry_arithmetic_in_later_answers() -> None:
    s = Setup()
    s.register(register(expires="600"))
    s.wall.t += 100.4
    query = s.register(register(contacts=[], call_id="q1"))
    assert query.status == 200
    assert list(contact_expires(query).values()) == [500]
    s.wall.t += 500
    query = s.register(register(contacts=[], call_id="q2"))
    assert contact_expires(query) == {}


# -- contacts -------------------------------------------------------------------------------------


def test_query_returns_current_bindings_without_changing_them() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>", "<sip:1001@b>;q=0.5"]))
    query = s.register(register(contacts=[], call_id="q"))
    assert query.status == 200
    assert set(contact_expires(query)) == {"sip:1001@a", "sip:1001@b"}
    assert any(";q=0.5" in v for v in query.headers.getall("Contact"))
    assert s.registrar.stats.queries == 1
    assert s.location.lookup("1001")[0].call_id == "call-1"


def test_multiple_contacts_in_one_request_and_the_200_lists_all_bindings() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>"], call_id="phone-a"))
    response = s.register(register(contacts=["<sip:1001@b>", "<sip:1001@c>;expires=300"],
                                   call_id="phone-b"))
    assert contact_expires(response) == {"sip:1001@a": 1800, "sip:1001@b": 1800,
                                         "sip:1001@c": 300}


def test_comma_separated_contacts() -> None:
    s = Setup()
    response = s.register(register(contacts=['"A, B" <sip:1001@a>, <sip:1001@b>']))
    assert set(contact_expires(response)) == {"sip:1001@a", "sip:1001@b"}


def test_expires_zero_removes_one_binding() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>", "<sip:1001@b>"]))
    response = s.register(register(contacts=["<sip:1001@a>;expires=0"], call_id="other"))
    assert response.status == 200
    assert set(contact_expires(response)) == {"sip:1001@b"}
    assert s.registrar.stats.unregistrations == 1


def test_wildcard_with_expires_zero_removes_everything() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>", "<sip:1001@b>"]))
    response = s.register(register(contacts=["*"], expires="0", call_id="other"))
    assert response.status == 200
    assert response.headers.getall("Contact") == []
    assert s.location.lookup("1001") == []


@pytest.mark.parametrize(("contacts", "expires"), [
    (["*"], None), (["*"], "3600"), (["*", "<sip:1001@a>"], "0"),
])
def test_invalid_wildcard_is_400(contacts: list[str], expires: str | None) -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>"]))
    response = s.register(register(contacts=contacts, expires=expires, call_id="other"))
    assert response.status == 400
    assert len(s.location.lookup("1001")) == 1


def test_wildcard_obeys_the_call_id_ordering_rule() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>"], cseq=10))  # stored with CSeq 11
    response = s.register(register(contacts=["*"], expires="0", cseq=5))
    assert response.status == 500
    assert len(s.location.lookup("1001")) == 1


@pytest.mark.parametrize("contact", ["<sip:1001@h>;q=7", "<sip:1001@h>;q=abc",
                                     "<sip:1001@h", "<sip:1001@h>;+sip.instance=\"x"])
def test_malformed_contact_is_400(contact: str) -> None:
    s = Setup()
    assert s.register(register(contacts=[contact])).status == 400


def test_out_of_order_register_with_the_same_call_id_is_500() -> None:
    s = Setup()
    assert s.register(register(cseq=10)).status == 200  # binding stored with CSeq 11
    same = s.register(register(cseq=10))                 # authenticated with CSeq 11
    assert same.status == 500 and same.reason == "Out Of Order REGISTER"
    lower = s.register(register(cseq=3))
    assert lower.status == 500
    assert s.register(register(cseq=11)).status == 200
    assert s.register(register(cseq=1, call_id="another-call")).status == 200
    assert s.location.lookup("1001")[0].call_id == "another-call"


def test_changes_apply_all_or_nothing() -> None:
    s = Setup()
    s.register(register(contacts=["<sip:1001@a>"], cseq=10))
    response = s.register(register(contacts=["<sip:1001@new>", "<sip:1001@a>"], cseq=4))
    assert response.status == 500
    assert [b.contact for b in s.location.lookup("1001")] == ["sip:1001@a"]


def test_max_contacts_is_enforced_with_403() -> None:
    s = Setup()
    contacts = [f"<sip:1001@d{i}>" for i in range(3)]
    assert s.register(register(contacts=contacts)).status == 200
    # refreshing existing bindings does not count against the limit
    assert s.register(register(contacts=contacts, call_id="again")).status == 200
    too_many = s.register(register(contacts=["<sip:1001@d9>"], call_id="x"))
    assert (too_many.status, too_many.reason) == (403, "Too Many Contacts")
    # ... but replacing one in the same request is fine
    swap = s.register(register(contacts=["<sip:1001@d0>;expires=0", "<sip:1001@d9>"],
                               call_id="y"))
    assert swap.status == 200
    assert len(s.location.lookup("1001")) == 3


def test_expired_bindings_do_not_count_against_max_contacts() -> None:
    s = Setup()
    s.register(register(contacts=[f"<sip:1001@d{i}>" for i in range(3)], expires="60"))
    s.wall.t += 61
    assert s.register(register(contacts=["<sip:1001@new>"], call_id="x")).status == 200


def test_same_instance_and_reg_id_replaces_the_old_flow() -> None:
    s = Setup()
    inst = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>";reg-id=1'
    s.register(register(contacts=[f"<sip:1001@10.0.0.5:5060>{inst}"], call_id="a"))
    response = s.register(register(contacts=[f"<sip:1001@10.0.0.6:5070>{inst}"], call_id="b"))
    assert set(contact_expires(response)) == {"sip:1001@10.0.0.6:5070"}
    [b] = s.location.lookup("1001")
    assert (b.instance_id, b.reg_id) == ("<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>", 1)
    assert '+sip.instance="<urn:uuid:' in response.headers.get("Contact", "")


def test_policy_from_config_settings() -> None:
    settings = RegistrarSettings(min_expires=30, max_expires=7200, default_expires=600,
                                 max_contacts=5, sweep_interval=2)
    assert RegistrarPolicy.from_settings(settings) == RegistrarPolicy(30, 7200, 600, 5, 2.0)


def directory_setup() -> tuple[Setup, CredentialDirectory]:
    s = Setup()
    directory = CredentialDirectory(lambda: succeed(list(s.extensions.users.values())),
                                    s.extensions, s.clock, recheck_after=2.0)
    directory.start()
    s.registrar = Registrar(
        location=s.location, authenticator=s.auth, credentials=directory,
        domains=[DOMAIN], guard=s.guard, node="node-a", wall_clock=s.wall,
        tag_factory=lambda: "totag")
    return s, directory


def test_password_changed_a_moment_ago_works_at_once_with_the_directory() -> None:
    s, directory = directory_setup()
    s.clock.advance(3.0)  # the directory's copy is older than recheck_after
    s.extensions.users["1001"] = credentials_from_password("1001", DOMAIN, "changed")
    ok = s.register(register("1001"), password="changed")
    assert ok.status == 200
    assert s.registrar.stats.auth_failures == 0
    assert directory.peek("1001") is s.extensions.users["1001"]


def test_wrong_password_with_the_directory_fails_after_one_recheck() -> None:
    s, _ = directory_setup()
    s.clock.advance(3.0)
    assert s.register(register("1001"), password="wrong").status == 401
    assert s.registrar.stats.auth_failures == 1
    # fetched again just now: the next wrong password is rejected without a query
    s.extensions.error = RuntimeError("must not be asked")
    assert s.register(register("1001", call_id="c2"), password="wrong").status == 401
    assert s.registrar.stats.auth_failures == 2


def test_unknown_user_with_the_directory_is_looked_up_then_remembered() -> None:
    s, directory = directory_setup()
    assert s.register(register("4242")).status == 401
    assert directory.peek("4242") is None
    assert s.registrar.stats.auth_failures == 1
