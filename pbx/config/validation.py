"""The configuration rule set: one validator for start-up, ``pbx validate-config`` and both wizards.

Loading (:mod:`pbx.config.loading`) already rejects what cannot be represented: wrong types,
unknown keys, ports outside 0..65535, an odd or inverted RTP range, TLS enabled without
files.  This module judges a configuration that *loads*: does it collide, is it safe, is it
ready for production.  Each problem is a :class:`Finding` with a stable ``code`` (scripts and
tests match on it), the dotted key and a fix.  A file that does not load is reported in the
same shape by :func:`validate_file` (codes ``CONFIG_*``), so operators see one format.

Severity policy: an **error** means the PBX would not work or would be unsafe enough to
refuse (start-up exits 78); a **warning** is shown and logged.  Several rules are warnings in
development and errors in production (``mode: production``): weak credentials mostly.

Rules and codes (``E`` error, ``W`` warning, ``W/E`` warning in development, error in
production):

========================================  ===  ==========================================
code                                      sev  when
========================================  ===  ==========================================
SERVER_PORT_COLLISION                     E    two TCP/UDP listeners share port and address
SERVER_PORT_IN_RTP_RANGE                  E    the SIP (UDP) port lies inside the RTP range
SERVER_RTP_RANGE_TOO_SMALL                E    fewer than 4 ports per ``calls.max_calls``
SERVER_RTP_RANGE_SMALL                    W    fewer than 100 RTP ports
SERVER_EXTERNAL_IP_UNSET                  W    ``sip.external_ip`` unset or 0.0.0.0
SERVER_BIND_ADDRESS_NOT_LOCAL             E    ``sip.host``/``api.host`` not bindable here
DB_URL_INVALID                            E    the database URL does not parse
DB_POSTGRES_INCOMPLETE                    E    PostgreSQL URL without host, user or database
DB_POSTGRES_PORT_MISSING                  W    PostgreSQL URL without an explicit port
DB_PASSWORD_IN_CONFIG_FILE                W    a database password written in config.yml
DB_PASSWORD_WEAK                          W    the database password is a placeholder
DB_SQLITE_IN_PRODUCTION                   W    SQLite with ``mode: production``
DB_CONNECT_FAILED                         E    ``check_connectivity`` could not connect
SECRET_IN_CONFIG_FILE                     W    ``api.token``/``auth.secret`` in config.yml
SECURITY_FIPS_DISABLED                    W    ``security.fips_mode`` is off
SECURITY_FIPS_MD5                         E    FIPS mode on and MD5 digest still offered
SECURITY_RATE_LIMIT_DISABLED              W    ``security.rate_limit.enabled`` false
SECURITY_BRUTE_FORCE_DISABLED             W    ``security.brute_force.enabled`` false
API_TOKEN_MISSING                         W/E  no ``PBX_API__TOKEN``
API_TOKEN_WEAK                            W/E  token shorter than 32, placeholder, repetitive
AUTH_SECRET_MISSING                       W    production without ``PBX_AUTH__SECRET``
TLS_DISABLED                              W    SIP over TLS is off
TLS_CERT_MISSING / TLS_KEY_MISSING        E    the file does not exist
TLS_CERT_UNREADABLE / TLS_KEY_UNREADABLE  E    the file cannot be read
TLS_CERT_INVALID                          E    not a PEM certificate
TLS_KEY_INVALID                           E    not a usable (unencrypted PEM) private key
TLS_KEY_MISMATCH                          E    the key does not belong to the certificate
TLS_CERT_EXPIRED                          E    ``notAfter`` is in the past
TLS_CERT_NOT_YET_VALID                    E    ``notBefore`` is in the future
TLS_CERT_EXPIRING                         W    expires within 30 days
TLS_KEY_PERMISSIONS                       W    the private key is readable by group/others
EXT_DUPLICATE_NUMBER                      E    two extensions share a number
EXT_NO_PASSWORD                           W    an extension without ``password_env``
EXT_PASSWORD_ENV_UNSET                    W    the named variable is not set
EXT_PASSWORD_<WEAKNESS>                   W/E  TOO_SHORT, COMMON, SEQUENCE, REPEATED,
                                               LOW_VARIETY, IS_NUMBER, CONTAINS_NUMBER, EMPTY
CODEC_NONE_ENABLED                        E    (when ``rtp.codecs`` exists) no codec enabled
CODEC_NO_G711                             W    (when ``rtp.codecs`` exists) no PCMU/PCMA
CALLS_SESSION_TIMER_MIN_SE_LOW            W    ``calls.session_timer.min_se`` below 90 s
PROD_EXAMPLE_VALUE                        W    example.com, changeme... left in a value
PROD_DEFAULT_VALUE                        W    production with ``sip.domain: pbx.local``
PROD_DEBUG_LOGGING                        W    ``logging.level: DEBUG``
PROD_ENV_PERMISSIONS                      W    ``.env`` readable by group or others
CONFIG_FILE_INVALID                       E    the file is missing, unreadable, not YAML
CONFIG_INVALID                            E    any other load error (see the key)
CONFIG_LOAD_WARNING                       W    load-time notices (duplicate YAML keys, ...)
========================================  ===  ==========================================

The RTP capacity formula: a relayed call has two legs, each leg needs an even RTP port and
the odd RTCP port above it, so one call takes 4 ports and the range holds
``((port_max - port_min + 1) // 2) // 2`` calls.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from dotenv import dotenv_values
from pydantic import ValidationError

from pbx.config import loading
from pbx.config.loading import AUTO, ConfigError, ConfigIssue, load_settings
from pbx.config.model import (
    Settings,
    collect_warnings,
    file_value,
    mask_url_password,
    url_has_password,
)
from pbx.config.passwords import check_password, check_token

__all__ = [
    "EXIT_CONFIG",
    "Finding",
    "ValidationReport",
    "check_database",
    "render_json",
    "render_text",
    "rtp_call_capacity",
    "validate",
    "validate_data",
    "validate_file",
]

#: Exit status for configuration errors (sysexits EX_CONFIG), shared with ``pbx`` and twistd.
EXIT_CONFIG: Final = 78
Severity = Literal["error", "warning"]

#: Ports one call needs: 2 legs x (RTP even port + RTCP odd port).
PORTS_PER_CALL: Final = 4
MIN_RTP_PORTS: Final = 100
CERT_EXPIRY_WARNING_DAYS: Final = 30
DB_CONNECT_TIMEOUT: Final = 3.0

_WILDCARDS: Final = frozenset({"0.0.0.0", "::", "*", ""})
_EXAMPLE_MARKERS: Final = ("example.com", "example.org", "example.net", "changeme",
                           "change-me", "change_me", "replace-me", "replace_me")


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule's verdict on one key; ``code`` is stable and safe to match in scripts."""

    severity: Severity
    code: str
    key: str
    message: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        """JSON-able form (``--json``, the ops API, the desktop wizard)."""
        return {"severity": self.severity, "code": self.code, "key": self.key,
                "message": self.message, "fix": self.fix}


@dataclass(frozen=True, init=False)
class ValidationReport:
    """All findings for one configuration, in rule order."""

    findings: tuple[Finding, ...] = ()
    config_file: Path | None = None

    def __init__(self, findings: Iterable[Finding] = (), config_file: Path | None = None) -> None:
        object.__setattr__(self, "findings", tuple(findings))
        object.__setattr__(self, "config_file", config_file)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when the PBX may start (warnings allowed)."""
        return not self.has_errors

    @property
    def exit_code(self) -> int:
        """0 (valid, maybe with warnings) or 78 (errors), the ``pbx validate-config`` status."""
        return EXIT_CONFIG if self.has_errors else 0

    def codes(self) -> list[str]:
        """The codes found, in order (handy in tests and scripts)."""
        return [f.code for f in self.findings]


# ---------------------------------------------------------------------------- entry points


def validate(
    settings: Settings,
    *,
    check_connectivity: bool = False,
    env_file: Path | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Run every rule on loaded ``settings``; never raises for any configuration.

    ``env_file`` (default: the ``.env`` the settings were loaded with, else the one next to
    ``config_file``) is checked for permissions and read for extension passwords.
    ``environ`` replaces ``os.environ`` for those look-ups (the wizards pass their answers).
    ``check_connectivity`` really connects to the database (a few seconds at most).
    """
    config_file = config_file or settings.config_file
    if env_file is None:
        env_file = settings.env_file
        if env_file is None and config_file is not None:
            candidate = Path(config_file).parent / loading.DOTENV_NAME
            env_file = candidate if candidate.is_file() else None
    if environ is None:
        merged = _read_env_file(env_file)
        merged.update(os.environ)
        environ = merged
    ctx = _Context(settings, environ, env_file, config_file)
    for rule in _RULES:
        rule(ctx)
    if check_connectivity:
        _database_connectivity(ctx)
    return ctx.findings


def validate_file(
    path: str | os.PathLike[str] | None = None,
    *,
    check_connectivity: bool = False,
    env_file: Any = AUTO,
) -> ValidationReport:
    """Load ``path`` (default ``$PBX_CONFIG`` / ``./config.yml``) and validate it.

    A file that does not load gives error findings (``CONFIG_*``) instead of an exception,
    so the CLI prints one format whatever went wrong.
    """
    try:
        settings = load_settings(path, env_file=env_file)
    except ConfigError as err:
        return ValidationReport([_finding_from_issue(i) for i in err.errors], err.config_file)
    except yaml.YAMLError as exc:
        # load_settings builds its YAML reader outside its error handling, so a control
        # character in the file escapes as ReaderError; report it like any YAML error.
        where = Path(path) if path is not None else None
        return ValidationReport([Finding(
            "error", "CONFIG_FILE_INVALID", "", f"invalid YAML: {exc}".replace("\n", " "),
            "remove control characters and fix the YAML syntax")], where)
    from_model = set(collect_warnings(settings))  # re-reported below with their own codes
    findings = [Finding("warning", "CONFIG_LOAD_WARNING", "", text,
                        "fix the line or variable named in the message")
                for text in settings.settings_warnings if text not in from_model]
    findings += validate(settings, check_connectivity=check_connectivity)
    return ValidationReport(findings, settings.config_file)


def validate_data(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    check_connectivity: bool = False,
    env_file: Path | None = None,
) -> ValidationReport:
    """Validate a configuration mapping in isolation (no file, no ``PBX_*`` environment).

    This is how the wizards check their answers before writing: the mapping holds what
    config.yml *and* .env will hold, ``environ`` the extension password variables.
    """
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as exc:
        origin = loading._Origins({}, {}, None, None, {})
        issues = loading._issues_from_validation(exc, origin)
        return ValidationReport([_finding_from_issue(i) for i in issues])
    return ValidationReport(validate(settings, check_connectivity=check_connectivity,
                                     env_file=env_file, environ=dict(environ or {})))


def rtp_call_capacity(port_min: int, port_max: int) -> int:
    """Concurrent calls an RTP range carries: ports // 2 (RTP+RTCP) // 2 (two legs)."""
    if port_max < port_min:
        return 0
    return ((port_max - port_min + 1) // 2) // 2


def check_database(url: str, *, timeout: float = DB_CONNECT_TIMEOUT) -> str | None:
    """Really connect to ``url``; None on success, else a message without the password.

    PostgreSQL: psycopg2 with ``connect_timeout`` and ``SELECT 1``.  SQLite: an existing
    file must open read-write as a database; a missing one must be creatable.  Blocking: the
    desktop wizard calls it from a worker thread.
    """
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
    except ValueError as exc:
        return f"the URL does not parse: {exc}"
    if scheme == "sqlite":
        return _check_sqlite(Path(url[len("sqlite:///"):]), timeout)
    if scheme not in ("postgresql", "postgres"):
        return f"unsupported database scheme {scheme!r}"
    import psycopg2  # server dependency; imported late to keep the validator import light

    password = unquote(parts.password) if parts.password else None
    try:
        conn = psycopg2.connect(url, connect_timeout=max(2, int(timeout)))
    except psycopg2.Error as exc:
        return _clean_db_error(str(exc), password)
    except Exception as exc:  # libpq URL errors surface as other types too
        return _clean_db_error(f"{type(exc).__name__}: {exc}", password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    except psycopg2.Error as exc:
        return _clean_db_error(str(exc), password)
    finally:
        conn.close()
    return None


# ---------------------------------------------------------------------------- rendering


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def render_text(report: ValidationReport) -> str:
    """Human format: a warnings block (⚠), an errors block (✗), then one ✓/✗ summary line."""
    lines: list[str] = []
    if report.config_file is not None:
        lines.append(f"Configuration: {report.config_file}")
    for title, mark, items in (("Warnings", "⚠", report.warnings),
                               ("Errors", "✗", report.errors)):
        if not items:
            continue
        if lines:
            lines.append("")
        lines.append(f"{title}:")
        for f in items:
            where = f"{f.key}: " if f.key else ""
            lines.append(f"  {mark} {where}{f.message} [{f.code}]")
            if f.fix:
                lines.append(f"      fix: {f.fix}")
    if lines:
        lines.append("")
    errors, warnings = len(report.errors), len(report.warnings)
    if errors:
        lines.append(f"✗ Configuration has {_plural(errors, 'error')}")
    elif warnings:
        lines.append(f"✓ Configuration is valid ({_plural(warnings, 'warning')})")
    else:
        lines.append("✓ Configuration is valid")
    return "\n".join(lines)


def render_json(report: ValidationReport) -> str:
    """Machine format: ``valid``, ``exit_code``, ``config_file``, ``errors``, ``warnings``."""
    return json.dumps({
        "valid": report.ok,
        "exit_code": report.exit_code,
        "config_file": str(report.config_file) if report.config_file else None,
        "errors": [f.as_dict() for f in report.errors],
        "warnings": [f.as_dict() for f in report.warnings],
    }, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------- internals


@dataclass
class _Context:
    settings: Settings
    environ: Mapping[str, str]
    env_file: Path | None
    config_file: Path | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def strict(self) -> Severity:
        """Severity of rules that are warnings in development and errors in production."""
        return "error" if self.settings.is_production else "warning"

    def add(self, severity: Severity, code: str, key: str, message: str, fix: str) -> None:
        self.findings.append(Finding(severity, code, key, message, fix))


def _read_env_file(path: Path | None) -> dict[str, str]:
    if path is None or not Path(path).is_file():
        return {}
    try:
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    except (OSError, UnicodeDecodeError):
        return {}


_ISSUE_CODES: Final = (
    ("rtp.", "SERVER_RTP_RANGE_INVALID"),
    ("sip.port", "SERVER_PORT_INVALID"),
    ("sip.tls_port", "SERVER_PORT_INVALID"),
    ("api.port", "SERVER_PORT_INVALID"),
    ("sip.tls_", "TLS_CONFIG_INVALID"),
    ("database.url", "DB_URL_INVALID"),
    ("extensions", "EXT_INVALID"),
)


def _finding_from_issue(issue: ConfigIssue) -> Finding:
    """A load error as an error finding; the code comes from the key's area."""
    code = "CONFIG_FILE_INVALID" if not issue.key else "CONFIG_INVALID"
    for prefix, candidate in _ISSUE_CODES:
        if issue.key == prefix or issue.key.startswith(prefix):
            code = candidate
            break
    message = f"{issue.message} (from {issue.source})" if issue.source else issue.message
    return Finding("error", code, issue.key, message, issue.fix)


def _hosts_overlap(a: str, b: str) -> bool:
    return a in _WILDCARDS or b in _WILDCARDS or a == b


# ------------------------------------------------------------------- server


def _server_ports(ctx: _Context) -> None:
    s = ctx.settings
    # (key, host, port, protocols); port 0 = "any free port", which never collides.
    listeners: list[tuple[str, str, int, frozenset[str]]] = [
        ("sip.port", s.sip.host, s.sip.port, frozenset({"udp", "tcp"})),
    ]
    if s.sip.tls_enabled:
        listeners.append(("sip.tls_port", s.sip.host, s.sip.tls_port, frozenset({"tcp"})))
    listeners.append(("api.port", s.api.host, s.api.port, frozenset({"tcp"})))
    for i, (key, host, port, protos) in enumerate(listeners):
        for other_key, other_host, other_port, other_protos in listeners[:i]:
            if port and port == other_port and protos & other_protos and _hosts_overlap(
                    host, other_host):
                ctx.add("error", "SERVER_PORT_COLLISION", key,
                        f"{key} {port} is already used by {other_key} "
                        f"({'/'.join(sorted(protos & other_protos)).upper()} on {host})",
                        f"give {key} its own port (defaults: SIP 5060, TLS 5061, API 8080)")
    lo, hi = s.rtp.port_min, s.rtp.port_max
    if s.sip.port and lo <= s.sip.port <= hi:
        ctx.add("error", "SERVER_PORT_IN_RTP_RANGE", "sip.port",
                f"SIP port {s.sip.port} (UDP) lies inside the RTP range {lo}-{hi}",
                "move sip.port out of the range or the range away from it "
                "(e.g. SIP 5060, RTP 10000-20000)")


def _rtp_range(ctx: _Context) -> None:
    s = ctx.settings
    lo, hi = s.rtp.port_min, s.rtp.port_max
    ports = hi - lo + 1
    capacity = rtp_call_capacity(lo, hi)
    max_calls = s.calls.max_calls
    if capacity < max_calls:
        needed = max_calls * PORTS_PER_CALL
        ctx.add("error", "SERVER_RTP_RANGE_TOO_SMALL", "rtp.port_max",
                f"RTP range {lo}-{hi} has {ports} ports for {capacity} calls, but "
                f"calls.max_calls is {max_calls} (each call needs {PORTS_PER_CALL} ports: "
                "2 legs x RTP+RTCP)",
                f"set rtp.port_max to at least {lo + needed - 1} or lower calls.max_calls "
                f"to {capacity}")
    if ports < MIN_RTP_PORTS:
        ctx.add("warning", "SERVER_RTP_RANGE_SMALL", "rtp.port_max",
                f"RTP range {lo}-{hi} has only {ports} ports",
                f"use at least {MIN_RTP_PORTS} ports, e.g. 10000-20000")


def _external_ip(ctx: _Context) -> None:
    value = ctx.settings.sip.external_ip
    if value is None or value.strip() in ("", "0.0.0.0", "::"):
        ctx.add("warning", "SERVER_EXTERNAL_IP_UNSET", "sip.external_ip",
                "sip.external_ip is not set: phones behind NAT or outside this network may "
                "get no audio",
                "set sip.external_ip to the address phones reach this PBX at "
                "(PBX_SIP__EXTERNAL_IP)")


def _bind_problem(host: str) -> str | None:
    """Why ``host`` cannot be bound here, or None.  A UDP bind to port 0 is the real test."""
    if host in _WILDCARDS:
        return None
    try:
        ipaddress.ip_address(host)
        flags = socket.AI_NUMERICHOST
    except ValueError:
        flags = 0
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM, flags=flags)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return f"{host!r} is neither an IP address nor a resolvable name ({reason})"
    for family, socktype, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, socktype, proto) as sock:
                sock.bind((sockaddr[0], 0))
                return None
        except OSError:
            continue
    return f"{host} is not an address of this host"


def _bind_addresses(ctx: _Context) -> None:
    s = ctx.settings
    checked: dict[str, str | None] = {}
    for key, host in (("sip.host", s.sip.host), ("api.host", s.api.host)):
        if host not in checked:
            checked[host] = _bind_problem(host)
        problem = checked[host]
        if problem:
            ctx.add("error", "SERVER_BIND_ADDRESS_NOT_LOCAL", key, problem,
                    f"use 0.0.0.0 (all interfaces) or an address of this host for {key}")


# ------------------------------------------------------------------- database


def _database(ctx: _Context) -> None:
    s = ctx.settings
    url = s.database_url
    shown = mask_url_password(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        ctx.add("error", "DB_URL_INVALID", "database.url", f"{shown} does not parse: {exc}",
                "use postgresql://user@host:5432/dbname (password via PBX_DATABASE__URL)")
        return
    if parts.scheme.lower() == "sqlite":
        if s.is_production:
            ctx.add("warning", "DB_SQLITE_IN_PRODUCTION", "database.url",
                    "production mode uses the embedded SQLite database (one node only, no "
                    "shared state)",
                    "set PBX_DATABASE__URL=postgresql://user:password@host:5432/pbx")
        return
    query = parse_qs(parts.query)
    missing = [name for name, present in (
        ("host", parts.hostname or query.get("host")),
        ("user", parts.username or query.get("user")),
        ("database name", parts.path.strip("/") or query.get("dbname")),
    ) if not present]
    if missing:
        ctx.add("error", "DB_POSTGRES_INCOMPLETE", "database.url",
                f"the PostgreSQL URL {shown} has no {', '.join(missing)}",
                "use postgresql://user:password@host:5432/dbname")
    if port is None and not query.get("port"):
        ctx.add("warning", "DB_POSTGRES_PORT_MISSING", "database.url",
                f"the PostgreSQL URL {shown} has no port (5432 is assumed)",
                "write the port explicitly, e.g. postgresql://user@host:5432/pbx")
    raw = file_value(s, "database", "url")
    if isinstance(raw, str) and url_has_password(raw):
        ctx.add("warning", "DB_PASSWORD_IN_CONFIG_FILE", "database.url",
                f"the database password is written in {ctx.config_file or 'the config file'}",
                "remove it there and set PBX_DATABASE__URL in the environment or .env")
    weak = check_password(unquote(parts.password), min_length=1) if parts.password else []
    if weak:
        ctx.add("warning", "DB_PASSWORD_WEAK", "database.url",
                "the database password is weak: " + "; ".join(w.message for w in weak),
                "set a generated password on the database role and in PBX_DATABASE__URL")


def _database_connectivity(ctx: _Context) -> None:
    problem = check_database(ctx.settings.database_url)
    if problem:
        ctx.add("error", "DB_CONNECT_FAILED", "database.url",
                f"cannot connect to {mask_url_password(ctx.settings.database_url)}: {problem}",
                "check that the server runs, the host/port/database/user are right and the "
                "password in PBX_DATABASE__URL is current")


def _check_sqlite(path: Path, timeout: float) -> str | None:
    if path.exists():
        if path.is_dir():
            return f"{path} is a directory"
        try:
            conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout)
            try:
                conn.execute("PRAGMA schema_version").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return f"{path}: {exc}"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} does not exist and {parent} is not writable, so it cannot be created"
    return None


def _clean_db_error(text: str, password: str | None) -> str:
    """First meaningful line of a driver error, with any password masked."""
    text = mask_url_password(text)
    if password:
        text = text.replace(password, "***")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else "connection failed"


# ------------------------------------------------------------------- security


def _security(ctx: _Context) -> None:
    s = ctx.settings
    if not s.security.fips_mode:
        ctx.add("warning", "SECURITY_FIPS_DISABLED", "security.fips_mode",
                "FIPS mode is off: MD5 digest authentication may be used",
                "set security.fips_mode: true (and remove MD5 from auth.algorithms)")
    elif "MD5" in s.auth.algorithms:
        ctx.add("error", "SECURITY_FIPS_MD5", "auth.algorithms",
                "FIPS mode is on but MD5 digest is still offered (MD5 is not FIPS-approved)",
                "set auth.algorithms: [SHA-256]")
    if not s.security.rate_limit.enabled:
        ctx.add("warning", "SECURITY_RATE_LIMIT_DISABLED", "security.rate_limit.enabled",
                "rate limiting is off: one source can flood the PBX with REGISTER/OPTIONS",
                "set security.rate_limit.enabled: true")
    if not s.security.brute_force.enabled:
        ctx.add("warning", "SECURITY_BRUTE_FORCE_DISABLED", "security.brute_force.enabled",
                "brute-force blocking is off: password guessing is never stopped",
                "set security.brute_force.enabled: true")
    for key, path in (("api.token", ("api", "token")), ("auth.secret", ("auth", "secret"))):
        if file_value(s, *path):
            ctx.add("warning", "SECRET_IN_CONFIG_FILE", key,
                    f"{key} is written in {ctx.config_file or 'the config file'}",
                    f"remove it there and set {loading.env_var_name(key)} in the environment "
                    "or .env")
    token = s.api.token.get_secret_value() if s.api.token is not None else ""
    if not token:
        ctx.add(ctx.strict, "API_TOKEN_MISSING", "api.token",
                "no API token: the admin API is not protected",
                "set PBX_API__TOKEN in .env to a generated value, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    else:
        weak = check_token(token)
        if weak:
            ctx.add(ctx.strict, "API_TOKEN_WEAK", "api.token",
                    "the API token is weak: " + "; ".join(w.message for w in weak),
                    "set PBX_API__TOKEN to a generated value of 32+ characters, e.g. "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if s.is_production and s.auth.secret is None:
        ctx.add("warning", "AUTH_SECRET_MISSING", "auth.secret",
                "no PBX_AUTH__SECRET: nonces change at every restart and differ between nodes",
                "set PBX_AUTH__SECRET in .env to a generated value (same on every node)")


def _tls(ctx: _Context) -> None:
    sip = ctx.settings.sip
    if not sip.tls_enabled:
        ctx.add("warning", "TLS_DISABLED", "sip.tls_enabled",
                "SIP over TLS is disabled: signalling, including digest exchanges, is "
                "plain text",
                "set sip.tls_enabled: true with sip.tls_cert and sip.tls_key")
        return
    cert, key = sip.tls_cert, sip.tls_key
    if cert is None or key is None:
        return  # the model already refuses this combination
    ok = True
    for what, path in (("cert", cert), ("key", key)):
        upper = what.upper()
        if not path.exists():
            ctx.add("error", f"TLS_{upper}_MISSING", f"sip.tls_{what}",
                    f"{path} does not exist", f"point sip.tls_{what} at the PEM {what} file")
            ok = False
        elif not path.is_file() or not _readable(path):
            ctx.add("error", f"TLS_{upper}_UNREADABLE", f"sip.tls_{what}",
                    f"{path} cannot be read", "check the path and the file permissions")
            ok = False
    if not ok:
        return
    if key.stat().st_mode & 0o077:
        ctx.add("warning", "TLS_KEY_PERMISSIONS", "sip.tls_key",
                f"the private key {key} is readable by group or others "
                f"(mode {stat.S_IMODE(key.stat().st_mode):04o})",
                f"chmod 600 {key}")
    info = _decode_cert(cert)
    if info is None:
        ctx.add("error", "TLS_CERT_INVALID", "sip.tls_cert",
                f"{cert} is not a PEM certificate", "use a PEM file (-----BEGIN CERTIFICATE-----)")
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback stops OpenSSL from prompting on the terminal for an
        # encrypted key; such a key is reported as unusable.
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            ctx.add("error", "TLS_KEY_MISMATCH", "sip.tls_key",
                    f"{key} is not the private key of {cert}",
                    "use the key the certificate was issued for")
        else:
            ctx.add("error", "TLS_KEY_INVALID", "sip.tls_key",
                    f"{key} is not a usable private key ({reason})",
                    "use an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)")
    now = time.time()
    not_before, not_after = info
    if not_after is not None and not_after < now:
        ctx.add("error", "TLS_CERT_EXPIRED", "sip.tls_cert",
                f"{cert} expired on {time.strftime('%Y-%m-%d', time.gmtime(not_after))}",
                "renew the certificate")
    elif not_after is not None and not_after < now + CERT_EXPIRY_WARNING_DAYS * 86400:
        ctx.add("warning", "TLS_CERT_EXPIRING", "sip.tls_cert",
                f"{cert} expires on {time.strftime('%Y-%m-%d', time.gmtime(not_after))}",
                "renew the certificate soon")
    if not_before is not None and not_before > now:
        ctx.add("error", "TLS_CERT_NOT_YET_VALID", "sip.tls_cert",
                f"{cert} is valid only from "
                f"{time.strftime('%Y-%m-%d', time.gmtime(not_before))}",
                "check the system clock or use a certificate valid now")


def _readable(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError:
        return False
    return True


def _decode_cert(path: Path) -> tuple[float | None, float | None] | None:
    """(notBefore, notAfter) as epoch seconds, or None when ``path`` is not a certificate.

    The ``cryptography`` package is not a dependency.  CPython's ``ssl`` decodes a PEM file
    through ``_ssl._test_decode_cert`` (private but present since Python 3.2 and used by the
    stdlib's own tests); when a future Python drops it, the ``openssl`` command is used.
    """
    text = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in text:
        return None
    decoder: Callable[[str], dict[str, Any]] | None = getattr(ssl._ssl, "_test_decode_cert", None)
    if decoder is not None:
        try:
            data = decoder(str(path))
        except (ssl.SSLError, OSError, ValueError):
            return None
        return (_cert_time(data.get("notBefore")), _cert_time(data.get("notAfter")))
    try:
        out = subprocess.run(["openssl", "x509", "-noout", "-startdate", "-enddate", "-in",
                              str(path)], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return (_cert_time(fields.get("notBefore")), _cert_time(fields.get("notAfter")))


def _cert_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(ssl.cert_time_to_seconds(value))
    except ValueError:
        return None


# ------------------------------------------------------------------- extensions


def _extensions(ctx: _Context) -> None:
    seen: dict[str, int] = {}
    for index, ext in enumerate(ctx.settings.extensions):
        prefix = f"extensions.{index}"
        if ext.number in seen:
            ctx.add("error", "EXT_DUPLICATE_NUMBER", f"{prefix}.number",
                    f"extension {ext.number} is defined twice (also extensions.{seen[ext.number]})",
                    "give every extension its own number")
        else:
            seen[ext.number] = index
        if not ext.password_env:
            ctx.add("warning", "EXT_NO_PASSWORD", f"{prefix}.password_env",
                    f"extension {ext.number} has no password_env, so it has no password",
                    f"set password_env: PBX_EXT_{ext.number}_PASSWORD and put the password "
                    "in .env")
            continue
        password = _lookup_env(ctx.environ, ext.password_env)
        if password is None:
            ctx.add("warning", "EXT_PASSWORD_ENV_UNSET", f"{prefix}.password_env",
                    f"extension {ext.number}: {ext.password_env} is not set",
                    f"set {ext.password_env} in the environment or .env")
            continue
        for weakness in check_password(password, number=ext.number):
            ctx.add(ctx.strict, f"EXT_PASSWORD_{weakness.code}", f"{prefix}.password_env",
                    f"extension {ext.number}: {weakness.message} ({ext.password_env})",
                    f"set {ext.password_env} to a generated password of 12+ characters "
                    "(the wizard makes one)")


# Environment names are case-insensitive, as pydantic-settings reads them.
_lookup_env = loading.getenv_ci


# ------------------------------------------------------------------- codecs


def _codecs(ctx: _Context) -> None:
    """Guarded: the model has no codec list yet (the calls issue adds ``rtp.codecs``)."""
    codecs = getattr(ctx.settings.rtp, "codecs", None)
    if codecs is None:
        return
    enabled: list[str] = []
    for codec in codecs:
        if isinstance(codec, str):
            enabled.append(codec.upper())
        elif getattr(codec, "enabled", True):
            enabled.append(str(getattr(codec, "name", codec)).upper())
    if not enabled:
        ctx.add("error", "CODEC_NONE_ENABLED", "rtp.codecs", "no codec is enabled",
                "enable at least PCMU and PCMA")
    elif not {"PCMU", "PCMA", "G711U", "G711A"} & set(enabled):
        ctx.add("warning", "CODEC_NO_G711", "rtp.codecs",
                "G.711 (PCMU/PCMA) is not enabled; most phones and trunks expect it",
                "add PCMU and PCMA to rtp.codecs")


# ------------------------------------------------------------------- production readiness


def _walk_strings(value: Any, key: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, f"{key}.{i}")
    elif isinstance(value, str):
        yield key, value


def _production(ctx: _Context) -> None:
    s = ctx.settings
    data = s.model_dump(mode="json")  # SecretStr fields dump as "**********"
    data["database"]["url"] = mask_url_password(s.database_url)
    for key, value in _walk_strings(data, ""):
        lowered = value.lower()
        marker = next((m for m in _EXAMPLE_MARKERS if m in lowered), None)
        if marker:
            ctx.add("warning", "PROD_EXAMPLE_VALUE", key,
                    f"{key} still holds an example value ({value!r})",
                    f"replace {key} with the real value for this installation")
    if s.is_production and s.sip.domain == "pbx.local":
        ctx.add("warning", "PROD_DEFAULT_VALUE", "sip.domain",
                "sip.domain is the default pbx.local",
                "set sip.domain to the SIP domain phones register to, e.g. pbx.yourcompany.com")
    if s.logging.level == "DEBUG":
        ctx.add("warning", "PROD_DEBUG_LOGGING", "logging.level",
                "debug logging is on: it is verbose and slows the PBX",
                "set logging.level: INFO")
    env_file = ctx.env_file
    if env_file is not None and Path(env_file).is_file():
        mode = stat.S_IMODE(Path(env_file).stat().st_mode)
        if mode & 0o077:
            ctx.add("warning", "PROD_ENV_PERMISSIONS", "",
                    f"{env_file} holds secrets but has mode {mode:04o} (readable by others)",
                    f"chmod 600 {env_file}")


def _session_timer(ctx: _Context) -> None:
    min_se = ctx.settings.calls.session_timer.min_se
    if min_se < 90:
        ctx.add("warning", "CALLS_SESSION_TIMER_MIN_SE_LOW", "calls.session_timer.min_se",
                f"calls.session_timer.min_se is {min_se}: RFC 4028 §4 says a session "
                "interval below 90 s must not be used (meant for tests only)",
                "use 90 or more (the default is 90)")


_RULES: Final[Sequence[Callable[[_Context], None]]] = (
    _server_ports, _rtp_range, _external_ip, _bind_addresses, _database, _security, _tls,
    _extensions, _codecs, _production, _session_timer,
)
