"""Digest authentication: RFC 7616 vectors, stateless nonces, replay, parsing, caching."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from pbx.sip.auth import (
    AuthOutcome,
    CachedCredentialLookup,
    CredentialDirectory,
    Credentials,
    DigestAuthenticator,
    DigestPolicy,
    NonceState,
    compute_ha1,
    compute_response,
    credentials_from_password,
    parse_authorization,
)
from pbx.sip.uri import URI

# RFC 7616 §3.9.1
MUFASA = "Mufasa"
RFC_REALM = "http-auth@example.org"
RFC_PASSWORD = "Circle of Life"
RFC_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"

REALM = "pbx.example.com"
SOURCE = "192.0.2.7"
R_URI = URI.parse("sip:pbx.example.com")


class WallClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def authenticator(now: WallClock | None = None, **kw: object) -> DigestAuthenticator:
    policy = DigestPolicy(nonce_lifetime=300, secret=b"s" * 32)
    return DigestAuthenticator(REALM, policy, now=now or WallClock(), **kw)  # type: ignore[arg-type]


def digest_header(nonce: str, *, user: str = "1001", password: str = "pw",
                  algorithm: str = "SHA-256", nc: str = "00000001",
                  uri: str = "sip:pbx.example.com", realm: str = REALM,
                  qop: str | None = "auth") -> str:
    ha1 = compute_ha1(user, realm, password, algorithm)
    response = compute_response(ha1, "REGISTER", uri, nonce, algorithm, qop=qop, nc=nc,
                                cnonce="0a4f113b")
    text = (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm={algorithm}')
    if qop:
        text += f', qop={qop}, nc={nc}, cnonce="0a4f113b"'
    return text


ALICE = credentials_from_password("1001", REALM, "pw")


def verify(auth: DigestAuthenticator, header: str, creds: Credentials | None = ALICE,
           source: str = SOURCE) -> AuthOutcome:
    digest = parse_authorization(header)
    assert digest is not None
    return auth.verify(digest, "REGISTER", R_URI, creds, source)


# -- RFC 7616 test vectors ---------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_rfc7616_response_vectors(algorithm: str, expected: str) -> None:
    ha1 = compute_ha1(MUFASA, RFC_REALM, RFC_PASSWORD, algorithm)
    response = compute_response(ha1, "GET", "/dir/index.html", RFC_NONCE, algorithm,
                                qop="auth", nc="00000001", cnonce=RFC_CNONCE)
    assert response == expected


def test_ha1_accepts_algorithm_names_case_insensitively() -> None:
    assert compute_ha1("u", "r", "p", "sha-256") == compute_ha1("u", "r", "p", "SHA-256")
    with pytest.raises(ValueError):
        compute_ha1("u", "r", "p", "SHA-1")


def test_rfc2069_response_without_qop() -> None:
    ha1 = compute_ha1(MUFASA, RFC_REALM, RFC_PASSWORD, "MD5")
    import hashlib
    ha2 = hashlib.md5(b"GET:/dir/index.html").hexdigest()
    want = hashlib.md5(f"{ha1}:{RFC_NONCE}:{ha2}".encode()).hexdigest()
    assert compute_response(ha1, "GET", "/dir/index.html", RFC_NONCE, "MD5", qop=None) == want


# -- nonces ------------------------------------------------------------------------------------


def test_fresh_nonce_is_valid_for_its_source_only() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    assert auth.check_nonce(nonce, SOURCE) is NonceState.VALID
    assert auth.check_nonce(nonce, "192.0.2.8") is NonceState.INVALID


def test_nonces_are_unique() -> None:
    auth = authenticator()
    assert len({auth.make_nonce(SOURCE) for _ in range(1000)}) == 1000


def test_nonce_with_bad_mac_is_invalid() -> None:
    auth = authenticator()
    blob = bytearray(base64.urlsafe_b64decode(auth.make_nonce(SOURCE)))
    blob[-1] ^= 1
    assert auth.check_nonce(base64.urlsafe_b64encode(bytes(blob)).decode(), SOURCE) \
        is NonceState.INVALID


def test_nonce_with_tampered_timestamp_is_invalid() -> None:
    now = WallClock()
    auth = authenticator(now)
    blob = bytearray(base64.urlsafe_b64decode(auth.make_nonce(SOURCE)))
    blob[7] ^= 0x10  # younger by some seconds: would extend its life
    assert auth.check_nonce(base64.urlsafe_b64encode(bytes(blob)).decode(), SOURCE) \
        is NonceState.INVALID


def test_nonce_from_another_secret_is_invalid() -> None:
    other = DigestAuthenticator(REALM, DigestPolicy(secret=b"x" * 32), now=WallClock())
    assert authenticator().check_nonce(other.make_nonce(SOURCE), SOURCE) is NonceState.INVALID


def test_nonce_goes_stale_after_its_lifetime() -> None:
    now = WallClock()
    auth = authenticator(now)
    nonce = auth.make_nonce(SOURCE)
    now.t += 300
    assert auth.check_nonce(nonce, SOURCE) is NonceState.VALID
    now.t += 1.5
    assert auth.check_nonce(nonce, SOURCE) is NonceState.STALE


def test_nonce_survives_a_restart_with_the_same_secret() -> None:
    now = WallClock()
    nonce = authenticator(now).make_nonce(SOURCE)
    assert authenticator(now).check_nonce(nonce, SOURCE) is NonceState.VALID


def test_nonce_from_the_future_is_invalid() -> None:
    now = WallClock()
    auth = authenticator(now)
    nonce = auth.make_nonce(SOURCE)
    now.t -= 60
    assert auth.check_nonce(nonce, SOURCE) is NonceState.INVALID


@given(st.text(max_size=80))
def test_any_text_as_nonce_is_invalid_without_raising(text: str) -> None:
    assert authenticator().check_nonce(text, SOURCE) is NonceState.INVALID


# -- challenges -------------------------------------------------------------------------------


def test_challenge_offers_sha256_then_md5_with_one_nonce() -> None:
    headers = authenticator().challenge(SOURCE)
    assert [name for name, _ in headers] == ["WWW-Authenticate", "WWW-Authenticate"]
    sha, md5 = (parse_challenge(value) for _, value in headers)
    assert sha["algorithm"] == "SHA-256" and md5["algorithm"] == "MD5"
    for params in (sha, md5):
        assert params["realm"] == REALM
        assert params["qop"] == "auth"
        assert "stale" not in params
    assert sha["nonce"] == md5["nonce"]


def test_stale_and_proxy_challenges() -> None:
    headers = authenticator().challenge(SOURCE, stale=True, proxy=True)
    assert {name for name, _ in headers} == {"Proxy-Authenticate"}
    assert all(parse_challenge(v)["stale"] == "true" for _, v in headers)


def test_challenge_follows_configured_algorithms() -> None:
    auth = DigestAuthenticator(REALM, DigestPolicy(algorithms=("SHA-256",)), now=WallClock())
    assert [parse_challenge(v)["algorithm"] for _, v in auth.challenge(SOURCE)] == ["SHA-256"]
    nonce = auth.make_nonce(SOURCE)
    # an MD5 response is not accepted when MD5 is not offered
    digest = parse_authorization(digest_header(nonce, algorithm="MD5"))
    assert digest is not None and auth.select([digest_header(nonce, algorithm="MD5")]) is None


def parse_challenge(value: str) -> dict[str, str]:
    # Reuse the credentials parser: a challenge has the same auth-param syntax.
    params: dict[str, str] = {}
    for part in value.removeprefix("Digest ").split(", "):
        name, _, val = part.partition("=")
        params[name] = val.strip('"')
    return params


# -- verification ---------------------------------------------------------------------------


def test_right_password_is_ok_for_both_algorithms() -> None:
    auth = authenticator()
    for algorithm in ("SHA-256", "MD5"):
        nonce = auth.make_nonce(SOURCE)
        assert verify(auth, digest_header(nonce, algorithm=algorithm)) is AuthOutcome.OK


def test_wrong_password_fails() -> None:
    auth = authenticator()
    header = digest_header(auth.make_nonce(SOURCE), password="nope")
    assert verify(auth, header) is AuthOutcome.FAILED


def test_unknown_user_fails_like_a_wrong_password() -> None:
    auth = authenticator()
    header = digest_header(auth.make_nonce(SOURCE), user="9999")
    assert verify(auth, header, creds=None) is AuthOutcome.FAILED


def test_credentials_of_another_user_or_realm_never_match() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    bob = credentials_from_password("1002", REALM, "pw")
    assert verify(auth, digest_header(nonce), creds=bob) is AuthOutcome.FAILED
    other_realm = credentials_from_password("1001", "elsewhere", "pw")
    assert verify(auth, digest_header(nonce, nc="00000002"), creds=other_realm) \
        is AuthOutcome.FAILED
    assert auth.realm_mismatches == 1


def test_disabled_extension_with_right_password() -> None:
    auth = authenticator()
    creds = credentials_from_password("1001", REALM, "pw", enabled=False)
    assert verify(auth, digest_header(auth.make_nonce(SOURCE)), creds=creds) \
        is AuthOutcome.DISABLED


def test_stale_nonce_with_right_password_is_stale() -> None:
    now = WallClock()
    auth = authenticator(now)
    nonce = auth.make_nonce(SOURCE)
    now.t += 301
    assert verify(auth, digest_header(nonce)) is AuthOutcome.STALE


def test_stale_nonce_with_wrong_password_is_a_failure() -> None:
    now = WallClock()
    auth = authenticator(now)
    nonce = auth.make_nonce(SOURCE)
    now.t += 301
    assert verify(auth, digest_header(nonce, password="nope")) is AuthOutcome.FAILED


def test_forged_nonce_gets_a_plain_challenge() -> None:
    auth = authenticator()
    forged = base64.urlsafe_b64encode(b"\0" * 36).decode()
    assert verify(auth, digest_header(forged)) is AuthOutcome.CHALLENGE


def test_nonce_issued_to_another_source_gets_a_plain_challenge() -> None:
    auth = authenticator()
    header = digest_header(auth.make_nonce("198.51.100.1"))
    assert verify(auth, header) is AuthOutcome.CHALLENGE


def test_nonce_count_must_increase() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    assert verify(auth, digest_header(nonce, nc="00000001")) is AuthOutcome.OK
    assert verify(auth, digest_header(nonce, nc="00000001")) is AuthOutcome.STALE  # replay
    assert verify(auth, digest_header(nonce, nc="00000003")) is AuthOutcome.OK
    assert verify(auth, digest_header(nonce, nc="00000002")) is AuthOutcome.STALE
    assert verify(auth, digest_header(nonce, nc="0000000a")) is AuthOutcome.OK


def test_failed_attempts_do_not_consume_nonce_counts() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    assert verify(auth, digest_header(nonce, nc="ffffffff", password="x")) is AuthOutcome.FAILED
    assert verify(auth, digest_header(nonce, nc="00000001")) is AuthOutcome.OK


def test_nonce_count_history_is_bounded_and_fails_safe() -> None:
    now = WallClock()
    auth = authenticator(now, max_tracked_nonces=3)
    nonces = []
    for _ in range(5):
        nonces.append(auth.make_nonce(SOURCE))
        now.t += 1
    for nonce in nonces:
        assert verify(auth, digest_header(nonce)) is AuthOutcome.OK
    assert auth.tracked_nonces == 3
    # The evicted nonces' history is gone: a replay of them must not be accepted.
    assert verify(auth, digest_header(nonces[0])) is AuthOutcome.STALE
    assert verify(auth, digest_header(nonces[1], nc="00000002")) is AuthOutcome.STALE
    # A nonce issued after the eviction works normally.
    assert verify(auth, digest_header(auth.make_nonce(SOURCE))) is AuthOutcome.OK


def test_nonce_count_history_expires_with_the_nonces() -> None:
    now = WallClock()
    auth = authenticator(now)
    for _ in range(10):
        assert verify(auth, digest_header(auth.make_nonce(SOURCE))) is AuthOutcome.OK
    assert auth.tracked_nonces == 10
    now.t += 302
    assert verify(auth, digest_header(auth.make_nonce(SOURCE))) is AuthOutcome.OK
    assert auth.tracked_nonces == 1


def test_missing_qop_is_refused_unless_legacy_clients_are_allowed() -> None:
    auth = authenticator()
    header = digest_header(auth.make_nonce(SOURCE), algorithm="MD5", qop=None)
    assert verify(auth, header) is AuthOutcome.CHALLENGE
    legacy = authenticator(allow_no_qop=True)
    header = digest_header(legacy.make_nonce(SOURCE), algorithm="MD5", qop=None)
    assert verify(legacy, header) is AuthOutcome.OK
    assert verify(legacy, header) is AuthOutcome.STALE  # no nc: a nonce is good once


def test_digest_uri_must_name_the_request_uri() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    assert verify(auth, digest_header(nonce, uri="sip:elsewhere.example.com")) \
        is AuthOutcome.FAILED
    # parameters and letter case do not matter
    assert verify(auth, digest_header(nonce, uri="sip:PBX.example.com;transport=udp",
                                      nc="00000002")) is AuthOutcome.OK


def test_select_skips_credentials_for_other_realms() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    other = digest_header(nonce, realm="other.example.com")
    mine = digest_header(nonce)
    digest = auth.select([other, "Basic Zm9vOmJhcg==", mine])
    assert digest is not None and digest.realm == REALM


def test_invalid_qop_or_nc_is_refused_before_lookup() -> None:
    auth = authenticator()
    nonce = auth.make_nonce(SOURCE)
    for header in (digest_header(nonce, qop="auth-int"), digest_header(nonce, nc="1"),
                   digest_header(nonce, nc="zzzzzzzz")):
        digest = parse_authorization(header)
        assert digest is not None
        assert auth.precheck(digest, SOURCE) is NonceState.INVALID


# -- parsing ------------------------------------------------------------------------------------


def test_parse_typical_sip_authorization() -> None:
    digest = parse_authorization(
        'Digest username="1001",realm="pbx.example.com", nonce="abc",uri="sip:pbx.example.com",'
        ' response="00ff", algorithm=MD5, cnonce="x", qop=auth, nc=00000001, opaque="o"')
    assert digest is not None
    assert (digest.username, digest.realm, digest.nonce, digest.uri, digest.response) == (
        "1001", "pbx.example.com", "abc", "sip:pbx.example.com", "00ff")
    assert (digest.algorithm, digest.qop, digest.nc, digest.cnonce, digest.opaque) == (
        "MD5", "auth", "00000001", "x", "o")


def test_parse_quoted_strings_with_commas_and_escapes() -> None:
    digest = parse_authorization(
        'digest USERNAME="a\\"b, c", realm="r, s", nonce="n", uri="sip:x", response="r"')
    assert digest is not None
    assert digest.username == 'a"b, c'
    assert digest.realm == "r, s"


def test_parse_defaults_algorithm_to_md5_and_normalises_its_case() -> None:
    digest = parse_authorization('Digest username="u", realm="r", nonce="n", uri="u", '
                                 'response="x"')
    assert digest is not None and digest.algorithm == "MD5"
    digest = parse_authorization('Digest username="u", realm="r", nonce="n", uri="u", '
                                 'response="x", algorithm=sha-256')
    assert digest is not None and digest.algorithm == "SHA-256"


@pytest.mark.parametrize("text", [
    "", "Digest", "Basic dXNlcjpwYXNz", 'Digest username="u"',
    'Digest username="u", realm="r", nonce="n", uri="u"',                      # no response
    'Digest username="u", realm="r", nonce="n", uri="u", response="x", realm="r2"',  # twice
    'Digest username="u" realm="r", nonce="n", uri="u", response="x"',         # no comma
    'Digest username="u, realm="r", nonce="n", uri="u", response="x"',         # open quote
    'Digest username="u", realm="r", nonce="n", uri="u", response="x", junk',
])
def test_parse_rejects_malformed(text: str) -> None:
    assert parse_authorization(text) is None


@given(st.text(max_size=300))
def test_parse_never_raises(text: str) -> None:
    parse_authorization(text)


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_QUOTED = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)


@given(st.dictionaries(_TOKEN, _QUOTED, max_size=6), _QUOTED, _QUOTED)
def test_parse_round_trips_quoted_values(extra: dict[str, str], user: str, nonce: str) -> None:
    """Whatever the values, quoting them and parsing gives them back unchanged."""
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    params = {k: v for k, v in extra.items()
              if k not in ("username", "realm", "nonce", "uri", "response")}
    params.update(username=user, realm="r", nonce=nonce, uri="sip:x", response="ab")
    text = "Digest " + ", ".join(f"{k}={quote(v)}" for k, v in params.items())
    digest = parse_authorization(text)
    assert digest is not None
    assert digest.params == params


# -- credential cache -----------------------------------------------------------------------------


class CountingLookup:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: list[Deferred[Credentials | None]] = []
        self.users = {"1001": ALICE}
        self.defer = False
        self.error: Exception | None = None

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        self.calls.append(username)
        if self.error is not None:
            return fail(self.error)
        if self.defer:
            d: Deferred[Credentials | None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.users.get(username))


def result_of(d: Deferred[Credentials | None]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_cache_serves_hits_until_ttl() -> None:
    clock = Clock()
    inner = CountingLookup()
    cache = CachedCredentialLookup(inner, clock, ttl=5.0, negative_ttl=2.0)
    assert result_of(cache.credentials("1001")) is ALICE
    clock.advance(4.9)
    assert result_of(cache.credentials("1001")) is ALICE
    assert cache.peek("1001") is ALICE
    assert inner.calls == ["1001"]
    clock.advance(0.2)
    assert cache.peek("1001") is CachedCredentialLookup.MISS
    assert result_of(cache.credentials("1001")) is ALICE
    assert inner.calls == ["1001", "1001"]


def test_cache_remembers_unknown_users_briefly() -> None:
    clock = Clock()
    inner = CountingLookup()
    cache = CachedCredentialLookup(inner, clock, ttl=5.0, negative_ttl=2.0)
    assert result_of(cache.credentials("9999")) is None
    assert cache.peek("9999") is None
    clock.advance(2.1)
    assert cache.peek("9999") is CachedCredentialLookup.MISS


def test_cache_shares_one_query_between_concurrent_misses() -> None:
    inner = CountingLookup()
    inner.defer = True
    cache = CachedCredentialLookup(inner, Clock())
    first, second = cache.credentials("1001"), cache.credentials("1001")
    assert inner.calls == ["1001"]
    inner.pending[0].callback(ALICE)
    assert result_of(first) is ALICE and result_of(second) is ALICE


def test_cache_does_not_remember_errors() -> None:
    inner = CountingLookup()
    inner.error = RuntimeError("database down")
    cache = CachedCredentialLookup(inner, Clock())
    failure = result_of(cache.credentials("1001"))
    assert failure.check(RuntimeError)  # type: ignore[attr-defined]
    inner.error = None
    assert result_of(cache.credentials("1001")) is ALICE


def test_cache_invalidate_and_bound() -> None:
    inner = CountingLookup()
    cache = CachedCredentialLookup(inner, Clock(), max_entries=10)
    result_of(cache.credentials("1001"))
    cache.invalidate("1001")
    assert cache.peek("1001") is CachedCredentialLookup.MISS
    for i in range(100):
        result_of(cache.credentials(f"u{i}"))
    assert len(cache) <= 10


# -- CredentialDirectory -------------------------------------------------------------------


class Directory:
    """A store as the directory sees it: a full listing and single lookups."""

    def __init__(self, users: dict[str, Credentials]) -> None:
        self.users = dict(users)
        self.loads = 0
        self.single: list[str] = []
        self.fail_load: Exception | None = None
        self.defer_load = False
        self.pending_loads: list[Deferred[list[Credentials]]] = []

    def load_all(self) -> Deferred[list[Credentials]]:
        self.loads += 1
        if self.fail_load is not None:
            return fail(self.fail_load)
        if self.defer_load:
            d: Deferred[list[Credentials]] = Deferred()
            self.pending_loads.append(d)
            return d
        return succeed(list(self.users.values()))

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        self.single.append(username)
        return succeed(self.users.get(username))


BOB = credentials_from_password("1002", REALM, "bobs-password")


def started_directory(store: Directory, clock: Clock, **kwargs: float) -> CredentialDirectory:
    directory = CredentialDirectory(store.load_all, store, clock, **kwargs)  # type: ignore[arg-type]
    assert result_of(directory.start()) == len(store.users)  # type: ignore[arg-type]
    return directory


def test_directory_serves_every_extension_without_queries() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE, "1002": BOB})
    directory = started_directory(store, clock)
    assert directory.peek("1001") is ALICE
    assert result_of(directory.credentials("1002")) is BOB
    assert store.single == [] and store.loads == 1
    assert len(directory) == 2


def test_directory_reload_picks_up_additions_changes_and_removals() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE, "1002": BOB})
    directory = started_directory(store, clock, refresh_interval=10.0)
    changed = credentials_from_password("1001", REALM, "new-password")
    store.users["1001"] = changed
    del store.users["1002"]
    store.users["1003"] = credentials_from_password("1003", REALM, "x")
    clock.advance(9.9)
    assert directory.peek("1001") is ALICE
    clock.advance(0.1)
    assert store.loads == 2
    assert directory.peek("1001") is changed
    assert directory.peek("1002") is CredentialDirectory.MISS
    assert directory.peek("1003") is not CredentialDirectory.MISS


def test_directory_looks_up_a_new_extension_and_remembers_unknown_ones_briefly() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE})
    directory = started_directory(store, clock, negative_ttl=2.0)
    assert directory.peek("1002") is CredentialDirectory.MISS
    assert result_of(directory.credentials("9999")) is None
    assert directory.peek("9999") is None
    store.users["1002"] = BOB
    assert result_of(directory.credentials("1002")) is BOB  # created since the load
    assert directory.peek("1002") is BOB
    assert store.single == ["9999", "1002"]
    store.users["9999"] = credentials_from_password("9999", REALM, "x")
    assert directory.peek("9999") is None
    clock.advance(2.1)
    assert directory.peek("9999") is CredentialDirectory.MISS


def test_directory_rechecks_an_entry_older_than_recheck_after() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE})
    directory = started_directory(store, clock, recheck_after=2.0)
    clock.advance(1.0)
    assert directory.recheck("1001") is None  # fresh: the rejection stands
    clock.advance(1.5)
    changed = credentials_from_password("1001", REALM, "new-password")
    store.users["1001"] = changed
    d = directory.recheck("1001")
    assert d is not None and result_of(d) is changed
    assert directory.peek("1001") is changed
    assert directory.recheck("1001") is None  # just fetched


def test_directory_keeps_data_when_a_reload_fails_and_never_caches_errors() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE})
    directory = started_directory(store, clock, refresh_interval=10.0)
    store.fail_load = RuntimeError("database down")
    clock.advance(10.0)
    assert directory.refresh_failures == 1
    assert directory.peek("1001") is ALICE
    store.fail_load = None
    clock.advance(10.0)
    assert directory.refreshes == 2


def test_directory_first_load_failure_fails_start() -> None:
    store = Directory({})
    store.fail_load = RuntimeError("no database")
    directory = CredentialDirectory(store.load_all, store, Clock())  # type: ignore[arg-type]
    failure = result_of(directory.start())  # type: ignore[arg-type]
    assert failure.check(RuntimeError)  # type: ignore[attr-defined]


def test_directory_single_fetch_newer_than_a_running_reload_wins() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE})
    directory = started_directory(store, clock)
    store.defer_load = True
    clock.advance(10.0)  # reload starts, answers later with the old password
    stale_listing = [ALICE]
    clock.advance(3.0)
    changed = credentials_from_password("1001", REALM, "new-password")
    store.users["1001"] = changed
    assert result_of(directory.recheck("1001")) is changed  # type: ignore[arg-type]
    store.pending_loads[0].callback(stale_listing)
    assert directory.peek("1001") is changed


def test_directory_stop_ends_reloads() -> None:
    clock = Clock()
    store = Directory({"1001": ALICE})
    directory = started_directory(store, clock)
    directory.stop()
    clock.advance(60.0)
    assert store.loads == 1 and not clock.calls
