"""The registrar: REGISTER processing per RFC 3261 §10.3 with digest authentication.

Theory of operation
-------------------
:meth:`Registrar.handle_register` is the SIP endpoint's handler for REGISTER.  Each
request walks these steps in order and stops at the first answer:

1. **Admission** (:class:`~pbx.sip.abuse.SourceGuard`): a rate-limited source gets
   ``503`` + ``Retry-After``; a blocked one ``403`` or nothing (``drop``).
2. **Domain** (§10.3 steps 1 and 5): Request-URI and To must name a local domain
   (a configured name, or any IP literal when ``accept_ip_literals``), else ``404``.
   This is decided on the domain only, so it says nothing about which users exist.
   A ``Require`` with option tags we do not support gets ``420`` (step 2).
3. **Authentication** (step 3, RFC 7616/8760): no or unusable credentials get ``401``
   with one challenge per algorithm (SHA-256 first).  A wrong password and an unknown
   user get the same ``401`` after the same work (a dummy HA1), and both count as a
   failure of the source.  A right password on a stale nonce (or a replayed nc) gets
   ``401`` with ``stale=true``.  A disabled extension with the right password: ``403``.
   An account locked for this source (:meth:`~pbx.sip.abuse.SourceGuard.account_locked`)
   gets the plain ``401`` without its response being checked.  Every ``401`` is sent
   statelessly (RFC 3261 §8.2.7): one response per request, no state kept.
4. **Authorisation** (step 4): the authenticated user must own the To AOR, else ``403``.
5. **Contacts** (steps 6-7): ``*`` only alone and with ``Expires: 0`` (else ``400``);
   expiry is the contact's ``expires`` parameter, else the ``Expires`` header, else
   ``default_expires``; malformed values count as ``default_expires`` (§20.19 says
   "treat as 3600", which is the default default); ``0`` removes; ``1..min_expires-1``
   gets ``423`` + ``Min-Expires``; above ``max_expires`` is clamped.  For an existing
   binding with the same Call-ID, a CSeq that is not higher aborts the whole request
   with ``500`` (step 7); the request's changes apply all or nothing.  A contact with
   ``+sip.instance`` (and ``reg-id``) replaces the binding of the same instance and
   reg-id (RFC 5626 §6), so a phone that moved does not leave its old address behind.
   More than ``max_contacts`` live bindings after the request: ``403 Too Many
   Contacts`` (503 would send the phone to another node that shares the same limit).
6. **Answer** (step 8): ``200`` listing every current binding with its remaining
   ``expires``, plus a ``Date`` header.  A REGISTER without Contact is a query.

Every binding records the flow the REGISTER came over (transport, source host and
port, this node): behind NAT that address, not the Contact, is how the PBX reaches the
phone.  The credential lookup is asynchronous; whatever happens (including lookup
errors, answered ``500`` and logged) the transaction is answered exactly once.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pbx.sip.abuse import SourceGuard, Verdict
from pbx.sip.auth import (
    _MISS,
    AuthOutcome,
    CredentialLookup,
    Credentials,
    DigestAuthenticator,
    DigestResponse,
    NonceState,
)
from pbx.sip.errors import SIPParseError
from pbx.sip.headers import NameAddress, split_comma_list, unquote_string
from pbx.sip.location import Binding, LocationService, contact_key
from pbx.sip.message import Request, make_response
from pbx.sip.transactions import Peer, ServerTransaction

__all__ = ["Registrar", "RegistrarPolicy", "RegistrarStats"]

log = logging.getLogger(__name__)

_MAX_EXPIRES_DIGITS = 10
_MAX_TEXT = 255  # longest User-Agent / instance id we store


@dataclass(frozen=True, slots=True)
class RegistrarPolicy:
    """Mirror of ``pbx.config.RegistrarSettings``."""

    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    max_contacts: int = 10
    sweep_interval: float = 5.0

    @classmethod
    def from_settings(cls, settings: Any) -> RegistrarPolicy:
        """Build from any object with the config section's attribute names."""
        return cls(int(settings.min_expires), int(settings.max_expires),
                   int(settings.default_expires), int(settings.max_contacts),
                   float(settings.sweep_interval))


@dataclass(slots=True)
class RegistrarStats:
    """Counters for metrics."""

    registrations: int = 0   # 200 OK that added or refreshed bindings
    unregistrations: int = 0  # 200 OK that only removed bindings
    queries: int = 0
    challenges: int = 0      # 401 without a failure (first REGISTER, stale, forged nonce)
    auth_failures: int = 0   # 401 after a wrong password or an unknown user
    forbidden: int = 0       # 403 (wrong AOR, disabled, too many contacts, blocked)
    rate_limited: int = 0    # 503
    dropped: int = 0         # blocked, answered with silence
    rejected: int = 0        # 400, 404, 420, 423, 500 (out of order)
    errors: int = 0          # 500 after an internal error (logged)
    locked_out: int = 0      # 401 unchecked: the account is locked for this source

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class _Exchange:
    """One REGISTER being processed; guarantees the transaction gets one answer."""

    __slots__ = ("answered", "peer", "rechecked", "request", "to", "transaction")

    def __init__(self, request: Request, transaction: ServerTransaction, peer: Peer) -> None:
        self.request = request
        self.transaction = transaction
        self.peer = peer
        self.answered = False
        self.rechecked = False  # credentials fetched again before a rejection
        self.to: NameAddress | None = None  # the parsed To, once known to be valid


class _Reject(Exception):
    """Abort processing with a final response (cold path only)."""

    def __init__(self, status: int, reason: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


class Registrar:
    """REGISTER handler for :class:`~pbx.sip.endpoint.SIPEndpoint` (RFC 3261 §10.3)."""

    def __init__(self, *, location: LocationService, authenticator: DigestAuthenticator,
                 credentials: CredentialLookup, policy: RegistrarPolicy | None = None,
                 domains: Iterable[str] = (), accept_ip_literals: bool = True,
                 guard: SourceGuard | None = None, check_guard: bool = True,
                 node: str = "", user_agent: str = "PBX",
                 supported: Iterable[str] = (),
                 owns: Callable[[str, str], bool] | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 tag_factory: Callable[[], str] | None = None) -> None:
        """
        ``domains``: names served (lower-cased); ``accept_ip_literals``: also accept any
        IP address as the domain (phones often register to the PBX's address).
        ``guard``: abuse defence; with ``check_guard=False`` only failures are reported
        to it (use that when the endpoint already checks every request).
        ``owns(username, aor_user)``: may this user register this AOR (default: equal).
        """
        self.location = location
        self.authenticator = authenticator
        self.credentials = credentials
        self.policy = policy or RegistrarPolicy()
        self.domains = frozenset(d.lower() for d in domains)
        self.accept_ip_literals = accept_ip_literals
        self.guard = guard
        self.check_guard = check_guard and guard is not None
        self.node = node
        self.user_agent = user_agent
        self.supported = frozenset(s.lower() for s in supported)
        self.owns = owns or _same_user
        self.wall_clock = wall_clock
        self.tag_factory = tag_factory or _random_tag
        self.stats = RegistrarStats()
        # Optional capabilities of the credential source (CachedCredentialLookup,
        # CredentialDirectory): a synchronous peek, and a re-check before a rejection.
        self._peek = getattr(credentials, "peek", None)
        self._recheck = getattr(credentials, "recheck", None)
        self._local_cache: dict[str, bool] = {}
        self._date_second = -1
        self._date_text = ""

    # -- entry point ------------------------------------------------------------------------
    def handle_register(self, request: Request, transaction: ServerTransaction,
                        peer: Peer) -> None:
        """The endpoint's handler: answers ``transaction`` exactly once."""
        ex = _Exchange(request, transaction, peer)
        try:
            self._admit(ex)
        except _Reject as reject:
            self._reject(ex, reject)
        except Exception:
            self._internal_error(ex)

    def _reject(self, ex: _Exchange, reject: _Reject) -> None:
        if reject.status == 403:
            self.stats.forbidden += 1
        else:
            self.stats.rejected += 1
        self._reply(ex, reject.status, reject.reason, reject.headers)

    def _internal_error(self, ex: _Exchange) -> None:
        log.exception("REGISTER from %s:%s failed", ex.peer.host, ex.peer.port)
        if not ex.answered:
            self.stats.errors += 1
            self._reply(ex, 500)

    # -- responses --------------------------------------------------------------------------
    def _reply(self, ex: _Exchange, status: int, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        if ex.answered:
            return
        ex.answered = True
        extra = list(headers)
        extra.append(("Server", self.user_agent))
        # make_response reuses the To parsed during admission to check for a tag.
        ex.transaction.respond(make_response(ex.request, status, reason,
                                             to_tag=self.tag_factory(), extra=extra))

    def _challenge(self, ex: _Exchange, *, stale: bool = False) -> None:
        """401 with a fresh nonce (RFC 3261 §22.1), sent statelessly (§8.2.7) when the
        transaction can: a challenge proves nothing about the sender, so it must not
        hold a completed transaction for Timer J; a retransmitted REGISTER simply gets
        a new challenge."""
        headers = self.authenticator.challenge(ex.peer.host, stale=stale)
        respond = getattr(ex.transaction, "respond_statelessly", None)
        if respond is None or ex.answered:
            self._reply(ex, 401, None, headers)
            return
        ex.answered = True
        headers.append(("Server", self.user_agent))
        respond(make_response(ex.request, 401, None, to_tag=self.tag_factory(),
                              extra=headers))

    def _drop(self, ex: _Exchange) -> None:
        """Stay silent towards a blocked source.  The transaction must still end: use
        its ``abandon()`` when it has one, else fall back to a 403."""
        abandon = getattr(ex.transaction, "abandon", None)
        if callable(abandon):
            ex.answered = True
            self.stats.dropped += 1
            abandon()
        else:
            self.stats.forbidden += 1
            self._reply(ex, 403)

    # -- steps 0-2: admission, domain, Require ----------------------------------------------
    def _admit(self, ex: _Exchange) -> None:
        request = ex.request
        if self.check_guard:
            assert self.guard is not None
            verdict = self.guard.check(ex.peer.host)
            if verdict is not Verdict.ALLOW:
                if verdict is Verdict.RATE_LIMITED:
                    self.stats.rate_limited += 1
                    self._reply(ex, 503, "Rate Limited",
                                [("Retry-After", str(self.guard.retry_after(ex.peer.host)))])
                elif verdict is Verdict.DROP:
                    self._drop(ex)
                else:
                    self.stats.forbidden += 1
                    self._reply(ex, 403)
                return
        uri = request.uri
        if uri is None or uri.scheme not in ("sip", "sips") or not self._is_local(uri.host):
            raise _Reject(404, "Domain Not Served")
        try:
            ex.to = to = request.to
        except SIPParseError:
            raise _Reject(400, "Invalid To") from None
        to_uri = to.uri
        if (to_uri is None or to_uri.scheme not in ("sip", "sips") or not to_uri.user
                or not self._is_local(to_uri.host)):
            raise _Reject(404, "Domain Not Served")
        if "Require" in request.headers:
            unsupported = [t for t in _option_tags(request.headers.getall("Require"))
                           if t.lower() not in self.supported]
            if unsupported:
                raise _Reject(420, None, [("Unsupported", ", ".join(unsupported))])
        self._authenticate(ex, to_uri.user)

    def _is_local(self, host: str) -> bool:
        if host in self.domains:
            return True
        if not self.accept_ip_literals:
            return False
        cached = self._local_cache.get(host)
        if cached is None:
            try:
                ipaddress.ip_address(host)
                cached = True
            except ValueError:
                cached = False
            if len(self._local_cache) >= 4096:
                self._local_cache.clear()
            self._local_cache[host] = cached
        return cached

    # -- step 3: authentication ------------------------------------------------------------
    def _authenticate(self, ex: _Exchange, aor: str) -> None:
        values = ex.request.headers.getall("Authorization")
        if not values:
            self.stats.challenges += 1
            self._challenge(ex)
            return
        auth = self.authenticator
        digest = auth.select(values)
        if digest is None or auth.precheck(digest, ex.peer.host) is NonceState.INVALID:
            self.stats.challenges += 1
            self._challenge(ex)
            return
        if self.guard is not None and self.guard.account_locked(ex.peer.host,
                                                                digest.username):
            # Locked for this source: a plain challenge without checking the response,
            # so a right guess looks like a wrong one (see pbx.sip.abuse).
            self.stats.locked_out += 1
            self._challenge(ex)
            return
        if self._peek is not None:
            cached = self._peek(digest.username)
            if cached is not _MISS:
                self._authenticated(ex, digest, cached, aor)
                return
        d = self.credentials.credentials(digest.username)
        d.addCallback(lambda creds: self._authenticated(ex, digest, creds, aor))
        d.addErrback(self._lookup_failed, ex)

    def _recheck_then(self, ex: _Exchange, digest: DigestResponse, aor: str) -> bool:
        """Before rejecting a password, ask the source for fresher credentials when it
        can (the password was changed a moment ago); True if it will call back with
        them and the request is verified once more.  (A failed verification records
        no nonce-count, so verifying again is sound; a disabled extension is not
        re-checked: its nonce-count is already spent, and the next reload enables it.)"""
        if self._recheck is None or ex.rechecked:
            return False
        d = self._recheck(digest.username)
        if d is None:
            return False
        ex.rechecked = True
        d.addCallback(lambda creds: self._authenticated(ex, digest, creds, aor))
        d.addErrback(self._lookup_failed, ex)
        return True

    def _lookup_failed(self, failure: Any, ex: _Exchange) -> None:
        log.error("REGISTER from %s:%s: credential lookup failed: %s", ex.peer.host,
                  ex.peer.port, failure.getTraceback())
        if not ex.answered:
            self.stats.errors += 1
            self._reply(ex, 500)

    def _authenticated(self, ex: _Exchange, digest: DigestResponse,
                       creds: Credentials | None, aor: str) -> None:
        try:
            self._after_auth(ex, digest, creds, aor)
        except _Reject as reject:
            self._reject(ex, reject)
        except Exception:
            self._internal_error(ex)

    def _after_auth(self, ex: _Exchange, digest: DigestResponse, creds: Credentials | None,
                    aor: str) -> None:
        request = ex.request
        host = ex.peer.host
        outcome = self.authenticator.verify(digest, request.method, request.uri, creds, host)
        if outcome is not AuthOutcome.OK:
            if outcome is AuthOutcome.FAILED and self._recheck_then(ex, digest, aor):
                return
            if outcome is AuthOutcome.FAILED:
                self.stats.auth_failures += 1
                if self.guard is not None:
                    self.guard.record_failure(host, digest.username)
                self._challenge(ex)
            elif outcome is AuthOutcome.STALE:
                self.stats.challenges += 1
                self._challenge(ex, stale=True)
            elif outcome is AuthOutcome.DISABLED:
                raise _Reject(403, "Extension Disabled")
            else:
                self.stats.challenges += 1
                self._challenge(ex)
            return
        if self.guard is not None:
            self.guard.record_success(host, digest.username)
        # step 4: may this user touch this AOR?
        if not self.owns(digest.username, aor):
            raise _Reject(403, "Not Your Address Of Record")
        self._update(ex, aor)

    # -- steps 6-8: bindings -----------------------------------------------------------------
    def _update(self, ex: _Exchange, aor: str) -> None:
        request = ex.request
        contacts = _contacts(request)
        location = self.location
        if not contacts:
            self.stats.queries += 1
            self._ok(ex, aor)
            return
        try:
            call_id = request.call_id
            cseq = request.cseq.seq
        except SIPParseError:
            raise _Reject(400, "Invalid Call-ID or CSeq") from None
        header_text = request.headers.get("Expires")
        header_expires = _parse_expires(header_text) if header_text is not None else None

        wildcard = False
        for c in contacts:
            if c.uri is None:
                wildcard = True
        if wildcard:
            if len(contacts) != 1 or header_expires != 0:
                raise _Reject(400, "Wildcard Contact Needs Expires 0 And No Other Contact")
            current = location.lookup(aor)
            for binding in current:
                if binding.call_id == call_id and cseq <= binding.cseq:
                    raise _Reject(500, "Out Of Order REGISTER")
            location.apply(aor, removes=[b.contact for b in current])
            self.stats.unregistrations += 1
            self._ok(ex, aor)
            return

        policy = self.policy
        default = policy.default_expires if header_expires is None or header_expires < 0 \
            else header_expires
        now = self.wall_clock()
        peer = ex.peer
        user_agent = request.headers.get("User-Agent")
        if user_agent is not None:
            user_agent = user_agent[:_MAX_TEXT]
        changes: dict[Any, tuple[str, int, float, str | None, int | None]] = {}
        too_brief = False
        for c in contacts:
            uri = c.uri
            assert uri is not None
            params = c.params
            text = params.get("expires") if params else None
            expires = default if text is None else _parse_expires(text)
            if expires < 0:
                expires = policy.default_expires
            if expires:
                if expires < policy.min_expires:
                    too_brief = True
                elif expires > policy.max_expires:
                    expires = policy.max_expires
            q = 1.0
            instance_id: str | None = None
            reg_id: int | None = None
            if params:
                q = _parse_q(params.get("q"))
                instance_id, reg_id = _instance(params)
            contact = str(uri)
            changes[contact_key(contact)] = (contact, expires, q, instance_id, reg_id)
        if too_brief:
            raise _Reject(423, None, [("Min-Expires", str(policy.min_expires))])

        current = {contact_key(b.contact): b for b in location.lookup(aor)}
        # step 7: same Call-ID and a CSeq that is not higher aborts everything
        for key in changes:
            existing = current.get(key)
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                raise _Reject(500, "Out Of Order REGISTER")
        removes: list[str] = []
        upserts: list[Binding] = []
        remaining = dict(current)
        transport = peer.transport
        for key, (contact, expires, q, instance_id, reg_id) in changes.items():
            if expires == 0:
                old = remaining.pop(key, None)
                if old is not None:
                    removes.append(old.contact)
                continue
            if instance_id is not None:  # RFC 5626 §6: same instance and reg-id replace
                for other_key, other in list(remaining.items()):
                    if (other_key != key and other.instance_id == instance_id
                            and other.reg_id == reg_id and other_key not in changes):
                        del remaining[other_key]
                        removes.append(other.contact)
            binding = Binding(aor, contact, now + expires, q, call_id, cseq, transport,
                              peer.host, peer.port, user_agent, instance_id, reg_id,
                              self.node, now)
            remaining[key] = binding
            upserts.append(binding)
        if len(remaining) > policy.max_contacts:
            raise _Reject(403, "Too Many Contacts")
        location.apply(aor, upserts, removes)
        if upserts:
            self.stats.registrations += 1
        else:
            self.stats.unregistrations += 1
        self._ok(ex, aor)

    def _ok(self, ex: _Exchange, aor: str) -> None:
        """200 OK listing every current binding (§10.3 step 8)."""
        now = self.wall_clock()
        headers = [("Contact", _contact_value(b, now)) for b in self.location.lookup(aor)]
        headers.append(("Date", self._date(now)))
        self._reply(ex, 200, None, headers)

    def _date(self, now: float) -> str:
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date_text = email.utils.formatdate(second, usegmt=True)
        return self._date_text


# -- helpers ---------------------------------------------------------------------------------


def _same_user(username: str, aor_user: str) -> bool:
    return username == aor_user


def _random_tag() -> str:
    return secrets.token_hex(6)


def _contacts(request: Request) -> list[NameAddress]:
    """The Contact values; a line without a comma skips the list splitter (hot path)."""
    out: list[NameAddress] = []
    try:
        for name, value in request.headers:
            if name == "Contact":
                if "," in value:
                    out.extend(NameAddress.parse(v) for v in split_comma_list(value))
                elif value:
                    out.append(NameAddress.parse(value))
    except SIPParseError:
        raise _Reject(400, "Invalid Contact") from None
    return out


def _option_tags(values: list[str]) -> list[str]:
    tags: list[str] = []
    for value in values:
        tags.extend(split_comma_list(value))
    return tags


def _parse_expires(text: str) -> int:
    """A delta-seconds value; ``-1`` when malformed (the caller uses the default)."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_EXPIRES_DIGITS:
        return -1
    return int(text)


def _parse_q(text: str | None) -> float:
    """``qvalue`` = 0..1 with up to three decimals (§25.1); malformed is 400."""
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise _Reject(400, "Invalid q") from None
    if not 0.0 <= value <= 1.0 or len(text) > 5:
        raise _Reject(400, "Invalid q")
    return value


def _instance(params: dict[str, str | None]) -> tuple[str | None, int | None]:
    """``+sip.instance`` (RFC 5626 §4.1) and ``reg-id`` of a Contact."""
    raw = params.get("+sip.instance")
    if raw is None:
        return None, None
    try:
        instance = unquote_string(raw)[:_MAX_TEXT]
    except SIPParseError:
        raise _Reject(400, "Invalid +sip.instance") from None
    reg_text = params.get("reg-id")
    reg_id = None
    if reg_text is not None:
        if not (reg_text.isascii() and reg_text.isdigit()) or len(reg_text) > 9:
            raise _Reject(400, "Invalid reg-id")
        reg_id = int(reg_text)
    return instance, reg_id


def _contact_value(binding: Binding, now: float) -> str:
    out = f"<{binding.contact}>;expires={binding.remaining(now)}"
    if binding.q != 1.0:
        out += f";q={binding.q:.3f}".rstrip("0").rstrip(".")
    if binding.instance_id is not None:
        escaped = binding.instance_id.replace("\\", "\\\\").replace('"', '\\"')
        out += f';+sip.instance="{escaped}"'
        if binding.reg_id is not None:
            out += f";reg-id={binding.reg_id}"
    return out
