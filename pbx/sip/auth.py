"""Digest authentication for SIP (RFC 3261 §22, RFC 7616, RFC 8760).

Theory of operation
-------------------
* **Challenges.** :meth:`DigestAuthenticator.challenge` returns one
  ``WWW-Authenticate`` (or ``Proxy-Authenticate``) header per configured algorithm,
  strongest first (RFC 8760 §2.4: SHA-256 before MD5), all with ``qop="auth"`` and the
  same nonce.  The header text is precomputed; only the nonce is spliced in.
* **Stateless nonces.** A nonce is ``base64url(timestamp | salt | counter | mac)`` where
  ``mac = HMAC-SHA-256(secret, timestamp | salt | counter | source address)``.  Checking
  it needs no table: a bad MAC (forged, tampered, or issued to another source address)
  is ``INVALID``; a good MAC older than ``nonce_lifetime`` is ``STALE`` (RFC 7616 §3.3:
  answer ``stale=true`` so the client retries without asking the user).  Binding the
  nonce to the source address means a spoofed UDP request cannot present a usable
  nonce, so only sources that can *receive* our challenges can accumulate failures and
  get blocked (see :class:`pbx.sip.abuse.SourceGuard`).
* **Replay.** For ``qop=auth`` the nonce-count must strictly increase per nonce.  The
  last accepted ``nc`` of each nonce is remembered until the nonce goes stale, in a
  table with a hard size cap; when the cap forces an entry out early, every nonce issued
  at or before that entry's timestamp is treated as stale (a fresh challenge) rather than
  risking an accepted replay.  A replay of a *correct* response is answered as stale and
  is not counted as a failed authentication (a client that reuses nc gets a new nonce).
* **Unknown users** are verified against a dummy HA1 of the same algorithm, so they cost
  the same work and get the same 401 as a wrong password.
* Comparisons of secrets use :func:`hmac.compare_digest`.

Deliberately not implemented: ``-sess`` algorithms, ``qop=auth-int``, ``userhash`` and
SHA-512-256 (none of the configured algorithms need them; such responses fail).  The
digest ``uri`` must name the Request-URI (scheme, user, host, port), RFC 7616 §3.4.6.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from pbx.sip.errors import SIPParseError
from pbx.sip.uri import URI

__all__ = [
    "DIGEST_ALGORITHMS",
    "AuthOutcome",
    "CachedCredentialLookup",
    "CredentialDirectory",
    "CredentialLookup",
    "Credentials",
    "DigestAuthenticator",
    "DigestPolicy",
    "DigestResponse",
    "NonceState",
    "compute_ha1",
    "compute_response",
    "credentials_from_password",
    "parse_authorization",
]

log = logging.getLogger(__name__)

_HASHES: Final[dict[str, Callable[..., Any]]] = {
    "MD5": hashlib.md5,
    "SHA-256": hashlib.sha256,
}
DIGEST_ALGORITHMS: Final[tuple[str, ...]] = ("SHA-256", "MD5")
_CANONICAL_ALGORITHM = {name.upper(): name for name in _HASHES}


def _hash(algorithm: str, text: str) -> str:
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()  # type: ignore[no-any-return]


def compute_ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """``H(username:realm:password)`` (RFC 7616 §3.4.2); what the store keeps, never the
    password.  ``algorithm`` is ``"MD5"`` or ``"SHA-256"``."""
    algorithm = _CANONICAL_ALGORITHM.get(algorithm.upper(), algorithm)
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return _hash(algorithm, f"{username}:{realm}:{password}")


def compute_response(ha1: str, method: str, uri: str, nonce: str, algorithm: str = "MD5", *,
                     qop: str | None = "auth", nc: str | None = None,
                     cnonce: str | None = None) -> str:
    """The ``response`` value (RFC 7616 §3.4.1); ``qop=None`` is the RFC 2069 form."""
    h = _HASHES[algorithm]
    ha2 = h(f"{method}:{uri}".encode()).hexdigest()
    text = (f"{ha1}:{nonce}:{ha2}" if qop is None
            else f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return h(text.encode("utf-8")).hexdigest()  # type: ignore[no-any-return]


# -- credentials -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the registrar needs of an extension: HA1 per algorithm, never the password.

    HA1 values are bound to ``realm``: changing the realm invalidates them.
    """

    username: str
    realm: str
    ha1: Mapping[str, str]
    enabled: bool = True


class CredentialLookup(Protocol):
    """Asynchronous credential source (the store, or a cache in front of it)."""

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        """The extension's credentials, or ``None`` when it does not exist."""
        ...


_MISS: Final = object()


class CachedCredentialLookup:
    """In-memory cache in front of a :class:`CredentialLookup`.

    Why: every authenticated REGISTER needs the HA1, and a store round trip per request
    would dominate the registrar's budget.  Positive entries live ``ttl`` seconds and
    negative ones (unknown users) ``negative_ttl``, so a password change or a new
    extension is seen within seconds even without :meth:`invalidate`.  Concurrent misses
    for one user share a single store query; errors are never cached.  The cache holds
    at most ``max_entries`` users (a flood of invented user names cannot grow it).
    """

    def __init__(self, lookup: CredentialLookup, clock: IReactorTime, ttl: float = 5.0,
                 negative_ttl: float = 2.0, max_entries: int = 100_000) -> None:
        self.lookup = lookup
        self.clock = clock
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Credentials | None]] = {}
        self._pending: dict[str, list[Deferred[Credentials | None]]] = {}
        self.hits = 0
        self.misses = 0

    def peek(self, username: str) -> Any:
        """The cached value (``Credentials`` or ``None``), or the module's miss marker.

        Lets the registrar skip creating a Deferred on the hot path; compare the result
        with :attr:`MISS`.
        """
        entry = self._cache.get(username)
        if entry is not None and entry[0] > self.clock.seconds():
            self.hits += 1
            return entry[1]
        return _MISS

    MISS: Final = _MISS

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        value = self.peek(username)
        if value is not _MISS:
            return succeed(value)
        self.misses += 1
        waiting = self._pending.get(username)
        d: Deferred[Credentials | None] = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[username] = [d]
        try:
            query = self.lookup.credentials(username)
        except Exception:
            self._finish(username, None, fail())
            return d
        query.addCallbacks(lambda v: self._finish(username, v, None),
                           lambda f: self._finish(username, None, f))
        return d

    def _finish(self, username: str, value: Credentials | None, failure: Any) -> None:
        waiting = self._pending.pop(username, [])
        if failure is None:
            if len(self._cache) >= self.max_entries:
                self._evict()
            ttl = self.ttl if value is not None else self.negative_ttl
            self._cache[username] = (self.clock.seconds() + ttl, value)
        for d in waiting:
            if failure is None:
                d.callback(value)
            else:
                d.errback(failure)

    def _evict(self) -> None:
        now = self.clock.seconds()
        for name in [n for n, (exp, _) in self._cache.items() if exp <= now]:
            del self._cache[name]
        while len(self._cache) >= self.max_entries:  # all fresh: drop the oldest inserted
            del self._cache[next(iter(self._cache))]

    def __len__(self) -> int:
        """Users cached (fresh or not yet evicted)."""
        return len(self._cache)

    def invalidate(self, username: str | None = None) -> None:
        """Forget one user (password changed, extension removed) or everyone."""
        if username is None:
            self._cache.clear()
        else:
            self._cache.pop(username, None)


class CredentialDirectory:
    """Every extension's credentials held in memory, reloaded in full periodically.

    Why: a per-user cache with a TTL (:class:`CachedCredentialLookup`) still sends a
    query to the store for each user every TTL; under load those queries run on the
    store's database thread, whose Python work competes with the reactor for the GIL.
    The directory instead loads ALL extensions at :meth:`start` (``load_all``) and again
    every ``refresh_interval`` seconds in one query, so authenticating a known user
    never waits for the store.  The full reload is what makes changes made elsewhere
    (``pbx extensions add/remove`` is a separate process) visible within
    ``refresh_interval``, removals included: an extension missing from a reload is gone.

    Between reloads:

    * a user the directory does not know is looked up through ``lookup`` (one query,
      shared by concurrent requests); an unknown answer is remembered for
      ``negative_ttl`` seconds (a flood of invented names costs one query per name per
      ``negative_ttl``, and at most ``max_negative`` names are remembered);
    * :meth:`recheck` lets the registrar fetch a user once more before it reports a
      wrong password, when the entry is older than ``recheck_after``: a password
      changed a moment ago works at once.

    Lookup errors are never cached; a failed reload keeps the previous data (logged).
    """

    MISS: Final = _MISS

    def __init__(self, load_all: Callable[[], Deferred[list[Credentials]]],
                 lookup: CredentialLookup, clock: IReactorTime, *,
                 refresh_interval: float = 10.0, negative_ttl: float = 2.0,
                 recheck_after: float = 2.0, max_negative: int = 100_000) -> None:
        self.load_all = load_all
        self.lookup = lookup
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.negative_ttl = negative_ttl
        self.recheck_after = recheck_after
        self.max_negative = max_negative
        # username -> (when the value was read from the store, credentials)
        self._entries: dict[str, tuple[float, Credentials]] = {}
        self._negative: dict[str, float] = {}  # username -> expiry
        self._pending: dict[str, list[Deferred[Credentials | None]]] = {}
        self._refresher: LoopingCall | None = None
        self._waiters: list[Deferred[int]] | None = None  # set while a reload runs
        self.loaded_at: float | None = None
        self.hits = 0
        self.misses = 0
        self.refreshes = 0
        self.refresh_failures = 0

    # -- service ------------------------------------------------------------------------
    def start(self) -> Deferred[int]:
        """Load every extension, then reload every ``refresh_interval``; fires with the
        number loaded (errbacks if the first load fails: start-up should then fail)."""
        d = self.refresh()

        def started(count: int) -> int:
            if self._refresher is None:
                self._refresher = LoopingCall(self._timed_refresh)
                self._refresher.clock = self.clock
                self._refresher.start(self.refresh_interval, now=False)
            return count

        return d.addCallback(started)

    def stop(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None

    def _timed_refresh(self) -> None:
        if self._waiters is None:  # a slow store: never stack reloads
            self.refresh().addErrback(self._refresh_failed)

    def _refresh_failed(self, failure: Failure) -> None:
        log.warning("reloading credentials failed (keeping the previous ones): %s",
                    failure.getErrorMessage())

    def refresh(self) -> Deferred[int]:
        """Reload every extension now; fires with how many there are.  While a reload
        runs, callers wait for it instead of starting another."""
        waiter: Deferred[int] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        began = self.clock.seconds()
        maybeDeferred(self.load_all).addCallbacks(
            lambda creds: self._loaded(began, creds), self._load_failed)
        return waiter

    def _loaded(self, began: float, creds: list[Credentials]) -> None:
        entries = {c.username: (began, c) for c in creds}
        # A user fetched singly after this reload began is newer than its answer.
        for name, entry in self._entries.items():
            if entry[0] > began:
                entries[name] = entry
        self._entries = entries
        negative = self._negative
        for name in [n for n in negative if n in entries]:
            del negative[name]
        self.loaded_at = began
        self.refreshes += 1
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(len(entries))

    def _load_failed(self, failure: Failure) -> None:
        self.refresh_failures += 1
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.errback(failure)

    # -- lookups --------------------------------------------------------------------------
    def peek(self, username: str) -> Any:
        """``Credentials``, ``None`` (known not to exist) or :attr:`MISS` (ask
        :meth:`credentials`); never touches the store."""
        entry = self._entries.get(username)
        if entry is not None:
            self.hits += 1
            return entry[1]
        expiry = self._negative.get(username)
        if expiry is not None:
            if expiry > self.clock.seconds():
                self.hits += 1
                return None
            del self._negative[username]
        return _MISS

    def credentials(self, username: str) -> Deferred[Credentials | None]:
        value = self.peek(username)
        if value is not _MISS:
            return succeed(value)
        return self._fetch(username)

    def recheck(self, username: str) -> Deferred[Credentials | None] | None:
        """Fetch ``username`` from the store again when what the directory holds is
        older than ``recheck_after`` seconds, else None (the answer stands).

        The registrar calls this before rejecting a password (or a disabled
        extension), so a change made a moment ago is honoured at once.
        """
        entry = self._entries.get(username)
        if entry is not None:
            if self.clock.seconds() - entry[0] < self.recheck_after:
                return None
        elif username in self._negative:
            return None  # unknown a moment ago: the negative TTL already bounds it
        return self._fetch(username)

    def _fetch(self, username: str) -> Deferred[Credentials | None]:
        self.misses += 1
        d: Deferred[Credentials | None] = Deferred()
        waiting = self._pending.get(username)
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[username] = [d]
        began = self.clock.seconds()
        try:
            query = self.lookup.credentials(username)
        except Exception:
            self._fetched(username, began, None, Failure())
            return d
        query.addCallbacks(lambda value: self._fetched(username, began, value, None),
                           lambda failure: self._fetched(username, began, None, failure))
        return d

    def _fetched(self, username: str, began: float, value: Credentials | None,
                 failure: Failure | None) -> None:
        waiting = self._pending.pop(username, [])
        if failure is None:
            if value is not None:
                self._entries[username] = (began, value)
                self._negative.pop(username, None)
            else:
                self._entries.pop(username, None)
                if len(self._negative) >= self.max_negative:
                    self._negative.clear()
                self._negative[username] = self.clock.seconds() + self.negative_ttl
        for d in waiting:
            if failure is None:
                d.callback(value)
            else:
                d.errback(failure)

    def invalidate(self, username: str | None = None) -> None:
        """Forget one user (or everyone) until the next lookup or reload."""
        if username is None:
            self._entries = {}
            self._negative.clear()
        else:
            self._entries.pop(username, None)
            self._negative.pop(username, None)

    def __len__(self) -> int:
        """Extensions held."""
        return len(self._entries)


# -- Authorization header parsing ----------------------------------------------------------

# One auth-param: name = token | quoted-string, then a comma or the end.
# The quoted-string is written "unrolled" so it runs in C without per-character
# alternation (and without backtracking blow-ups on hostile input).
_PARAM_RE = re.compile(
    r'([A-Za-z0-9!#$%&\'*+.^_`|~-]+)[ \t]*=[ \t]*'
    r'(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^\s,"]*))[ \t]*(?:,[ \t]*|$)', re.S)
_SCHEME_RE = re.compile(r"[ \t]*([A-Za-z0-9!#$%&'*+.^_`|~-]+)[ \t]+")
_UNESCAPE_RE = re.compile(r"\\(.)", re.S)
_NC_RE = re.compile(r"[0-9a-fA-F]{8}")


@dataclass(slots=True)
class DigestResponse:
    """A parsed ``Authorization``/``Proxy-Authorization`` Digest header (RFC 7616 §3.4)."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    # Filled by DigestAuthenticator.precheck so verify() need not redo the HMAC.
    checked: tuple[str, NonceState, int] | None = field(default=None, repr=False,
                                                         compare=False)


def parse_authorization(value: str) -> DigestResponse | None:
    """Parse one credentials header value; ``None`` if it is not a usable Digest response.

    Never raises: malformed input (bad quoting, duplicate or missing parameters, an
    unknown scheme) is simply not a credential, which callers answer like a wrong one.
    """
    try:
        return _parse_authorization(value)
    except Exception:  # defensive: hostile text must never escape as an exception
        return None


def _parse_authorization(value: str) -> DigestResponse | None:
    m = _SCHEME_RE.match(value)
    if m is None or m.group(1).lower() != "digest":
        return None
    pos = m.end()
    value = value.rstrip(" \t")
    end = len(value)
    params: dict[str, str] = {}
    for m in _PARAM_RE.finditer(value, pos):
        if m.start() != pos:
            return None  # something between two parameters that is not a parameter
        name, quoted, token = m.groups()
        name = name.lower()
        if name in params:
            return None
        if quoted is not None:
            params[name] = _UNESCAPE_RE.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            params[name] = token
        pos = m.end()
    if pos != end:
        return None
    try:
        username = params["username"]
        realm = params["realm"]
        nonce = params["nonce"]
        uri = params["uri"]
        response = params["response"]
    except KeyError:
        return None
    algorithm = params.get("algorithm", "MD5")
    return DigestResponse(username, realm, nonce, uri, response,
                          _CANONICAL_ALGORITHM.get(algorithm.upper(), algorithm),
                          params.get("qop"), params.get("nc"), params.get("cnonce"),
                          params.get("opaque"), params)


# -- the authenticator --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DigestPolicy:
    """pbx.sip's mirror of ``pbx.config.AuthSettings`` (so pbx.sip needs no pbx.config).

    ``secret`` unset: a random secret per process (nonces do not survive a restart,
    which costs clients one extra 401).
    """

    algorithms: tuple[str, ...] = DIGEST_ALGORITHMS
    nonce_lifetime: float = 300.0
    secret: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> DigestPolicy:
        """Build from any object with the config section's attribute names."""
        secret = getattr(settings, "secret", None)
        if secret is not None and hasattr(secret, "get_secret_value"):
            secret = secret.get_secret_value()
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        return cls(tuple(settings.algorithms), float(settings.nonce_lifetime), secret or None)


class NonceState(enum.IntEnum):
    VALID = 0
    STALE = 1
    INVALID = 2


class AuthOutcome(enum.IntEnum):
    """What to do with a request after checking its credentials."""

    OK = 0          # authenticated
    CHALLENGE = 1   # no usable credentials (none, malformed, forged nonce): 401, not a failure
    STALE = 2       # right password, nonce expired or nc replayed: 401 stale=true
    FAILED = 3      # wrong password or unknown user: 401, counts as a failure
    DISABLED = 4    # right password, extension disabled: 403


_NONCE_RAW = 20          # timestamp(8) + salt(4) + counter(8)
_NONCE_MAC = 16
_NONCE_BYTES = _NONCE_RAW + _NONCE_MAC
_NONCE_CHARS = 48        # base64 of 36 bytes, no padding needed
_FUTURE_SKEW = 5         # seconds a nonce timestamp may lie ahead of our clock


class DigestAuthenticator:
    """Issues challenges and verifies Digest responses for one realm.

    ``now`` is the wall clock (seconds) stamped into nonces; with a configured secret,
    nonces stay valid across restarts and across nodes sharing the secret.
    """

    def __init__(self, realm: str, policy: DigestPolicy | None = None, *,
                 now: Callable[[], float] = time.time, allow_no_qop: bool = False,
                 check_uri: bool = True, max_tracked_nonces: int = 200_000) -> None:
        policy = policy or DigestPolicy()
        algorithms = tuple(_CANONICAL_ALGORITHM.get(a.upper(), a) for a in policy.algorithms)
        for algorithm in algorithms:
            if algorithm not in _HASHES:
                raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        if not algorithms:
            raise ValueError("at least one digest algorithm is needed")
        if '"' in realm or "\\" in realm or "\r" in realm or "\n" in realm:
            raise ValueError("the realm must not contain quotes, backslashes or CR/LF")
        self.realm = realm
        self.algorithms = algorithms
        self.nonce_lifetime = policy.nonce_lifetime
        self.now = now
        self.allow_no_qop = allow_no_qop
        self.check_uri = check_uri
        self.max_tracked_nonces = max_tracked_nonces
        self._secret = policy.secret or os.urandom(32)
        self._salt = os.urandom(4)
        self._counter = itertools.count(int.from_bytes(os.urandom(4), "big"))
        # Challenge text around the nonce, one pair per algorithm (the hot path splices).
        self._challenge_parts = [
            (f'Digest realm="{realm}", nonce="', f'", algorithm={a}, qop="auth"')
            for a in algorithms
        ]
        self._dummy_ha1 = {a: _HASHES[a](os.urandom(16)).hexdigest() for a in algorithms}
        # nonce -> (nonce timestamp, last accepted nc); insertion ordered for pruning.
        self._nc: dict[str, tuple[int, int]] = {}
        self._forgotten_before = -1  # nonces stamped at or before this are treated stale
        self.realm_mismatches = 0

    # -- nonces -------------------------------------------------------------------------
    def make_nonce(self, source: str) -> str:
        """A fresh nonce for requests from ``source`` (the peer's IP address)."""
        raw = (int(self.now()).to_bytes(8, "big") + self._salt
               + (next(self._counter) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big"))
        mac = hmac.digest(self._secret, raw + source.encode(), "sha256")[:_NONCE_MAC]
        return base64.urlsafe_b64encode(raw + mac).decode("ascii")

    def _nonce_time(self, nonce: str, source: str) -> int | None:
        """The nonce's timestamp if we issued it to ``source``, else ``None``."""
        if len(nonce) != _NONCE_CHARS:
            return None
        try:
            blob = base64.urlsafe_b64decode(nonce)
        except (binascii.Error, ValueError):
            return None
        if len(blob) != _NONCE_BYTES:
            return None
        raw = blob[:_NONCE_RAW]
        mac = hmac.digest(self._secret, raw + source.encode(), "sha256")[:_NONCE_MAC]
        if not hmac.compare_digest(mac, blob[_NONCE_RAW:]):
            return None
        return int.from_bytes(raw[:8], "big")

    def check_nonce(self, nonce: str, source: str) -> NonceState:
        """``VALID``, ``STALE`` (ours but too old) or ``INVALID`` (not ours)."""
        return self._check_nonce(nonce, source)[0]

    def _check_nonce(self, nonce: str, source: str) -> tuple[NonceState, int]:
        stamp = self._nonce_time(nonce, source)
        if stamp is None:
            return NonceState.INVALID, -1
        age = self.now() - stamp
        if age < -_FUTURE_SKEW:
            return NonceState.INVALID, stamp
        return (NonceState.STALE if age > self.nonce_lifetime else NonceState.VALID), stamp

    # -- challenges -----------------------------------------------------------------------
    def challenge(self, source: str, *, stale: bool = False,
                  proxy: bool = False) -> list[tuple[str, str]]:
        """The challenge headers for a 401 (or a 407 when ``proxy``), strongest first."""
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self.make_nonce(source)
        tail = ", stale=true" if stale else ""
        return [(name, head + nonce + rest + tail) for head, rest in self._challenge_parts]

    # -- responses --------------------------------------------------------------------------
    def select(self, values: Iterable[str]) -> DigestResponse | None:
        """The first credentials header meant for our realm with an algorithm we offer."""
        for value in values:
            digest = parse_authorization(value)
            if (digest is not None and digest.realm == self.realm
                    and digest.algorithm in self._dummy_ha1):
                return digest
        return None

    def verify(self, digest: DigestResponse, method: str, request_uri: URI | None,
               credentials: Credentials | None, source: str) -> AuthOutcome:
        """Check ``digest`` for a request from ``source``; never raises on bad input.

        Call :meth:`precheck` first to skip the credential lookup for responses that can
        only get a plain challenge; this method repeats those checks regardless.
        """
        try:
            return self._verify(digest, method, request_uri, credentials, source)
        except Exception:  # defensive: malformed values are a failure, never an exception
            return AuthOutcome.FAILED

    def precheck(self, digest: DigestResponse, source: str) -> NonceState:
        """Syntax and nonce checks that need no credentials.

        ``INVALID`` means the response gets a plain challenge (not counted as a failure:
        a forged or foreign nonce proves nothing about who sent it).
        """
        qop = digest.qop
        if qop is None:
            if not self.allow_no_qop or digest.algorithm != "MD5":
                return NonceState.INVALID
        elif qop != "auth" or digest.cnonce is None or digest.nc is None \
                or _NC_RE.fullmatch(digest.nc) is None:
            return NonceState.INVALID
        if digest.realm != self.realm or digest.algorithm not in self._dummy_ha1:
            return NonceState.INVALID
        state, stamp = self._check_nonce(digest.nonce, source)
        digest.checked = (source, state, stamp)
        return state

    def _verify(self, digest: DigestResponse, method: str, request_uri: URI | None,
                credentials: Credentials | None, source: str) -> AuthOutcome:
        checked = digest.checked
        if checked is None or checked[0] != source:
            self.precheck(digest, source)
            checked = digest.checked
            if checked is None:
                return AuthOutcome.CHALLENGE
        _, nonce_state, stamp = checked
        if nonce_state is NonceState.INVALID:
            return AuthOutcome.CHALLENGE
        algorithm = digest.algorithm
        ha1 = None
        if credentials is not None and credentials.username == digest.username:
            if credentials.realm == self.realm:
                ha1 = credentials.ha1.get(algorithm)
            else:
                self._realm_mismatch(credentials)
        known = ha1 is not None
        if ha1 is None:
            ha1 = self._dummy_ha1[algorithm]  # same work for unknown users
        expected = compute_response(ha1, method, digest.uri, digest.nonce, algorithm,
                                    qop=digest.qop, nc=digest.nc, cnonce=digest.cnonce)
        matched = hmac.compare_digest(expected.encode(), digest.response.lower().encode())
        if not (matched and known):
            return AuthOutcome.FAILED
        if self.check_uri and request_uri is not None and not _same_uri(digest.uri,
                                                                         request_uri):
            return AuthOutcome.FAILED
        if nonce_state is NonceState.STALE:
            return AuthOutcome.STALE
        if not self._accept_nc(digest, stamp):
            return AuthOutcome.STALE
        assert credentials is not None
        return AuthOutcome.OK if credentials.enabled else AuthOutcome.DISABLED

    def _realm_mismatch(self, credentials: Credentials) -> None:
        """HA1s are bound to their realm: one stored for another realm can never match,
        so the extension cannot register.  Counted, and logged once per process."""
        self.realm_mismatches += 1
        if self.realm_mismatches == 1:
            log.warning("extension %s has credentials for realm %r, not %r: it cannot "
                        "authenticate until its password is set again", credentials.username,
                        credentials.realm, self.realm)

    def _accept_nc(self, digest: DigestResponse, stamp: int) -> bool:
        """Record the nonce-count; ``False`` for a replay (not strictly increasing)."""
        nc = int(digest.nc, 16) if digest.nc is not None else 0x100000000  # no qop: once
        table = self._nc
        self._prune()
        entry = table.get(digest.nonce)
        if entry is None:
            if stamp <= self._forgotten_before:
                return False  # its history was evicted: cannot prove this is not a replay
            if len(table) >= self.max_tracked_nonces:
                old_stamp = table.pop(next(iter(table)))[0]
                self._forgotten_before = max(self._forgotten_before, old_stamp)
            table[digest.nonce] = (stamp, nc)
            return True
        last = entry[1]
        if nc <= last or last == 0x100000000:
            return False
        table[digest.nonce] = (stamp, nc)
        return True

    def _prune(self) -> None:
        """Forget the nc history of nonces that are stale anyway (oldest first)."""
        table = self._nc
        if not table:
            return
        limit = self.now() - self.nonce_lifetime
        while table:
            nonce = next(iter(table))
            if table[nonce][0] >= limit:
                break
            del table[nonce]

    @property
    def tracked_nonces(self) -> int:
        return len(self._nc)


_URI_CACHE: dict[str, tuple[str, str | None, str, int | None] | None] = {}


def _same_uri(digest_uri: str, request_uri: URI) -> bool:
    """Does the digest ``uri`` name the Request-URI?  Compared on scheme, user, host and
    port, so harmless differences in parameters or spelling do not lock phones out.
    Parsed digest URIs are cached (a registrar sees few distinct ones)."""
    try:
        ident = _URI_CACHE[digest_uri]
    except KeyError:
        try:
            uri = URI.parse(digest_uri)
            ident = (uri.scheme, uri.user, uri.host, uri.port)
        except SIPParseError:
            ident = None
        if len(_URI_CACHE) >= 1024:
            _URI_CACHE.clear()
        _URI_CACHE[digest_uri] = ident
    return ident is not None and ident == (request_uri.scheme, request_uri.user,
                                           request_uri.host, request_uri.port)


def credentials_from_password(username: str, realm: str, password: str,
                              algorithms: Sequence[str] = DIGEST_ALGORITHMS,
                              enabled: bool = True) -> Credentials:
    """Convenience for tests and seeding: HA1 for each algorithm from a password."""
    return Credentials(username, realm,
                       {a: compute_ha1(username, realm, password, a) for a in algorithms},
                       enabled)
