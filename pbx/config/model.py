"""Typed configuration model for the PBX.

Every section forbids unknown keys so a typo in ``config.yml`` (or in a
``PBX_*`` variable) is reported instead of silently ignored.  Fields carry a
``fix`` hint in ``json_schema_extra``; :mod:`pbx.config.loading` uses it to
tell the operator what a valid value looks like.

Secrets (``api.token``, passwords in ``database.url``) are expected to come
from the environment or ``.env``; the model accepts them from any source and
:func:`collect_warnings` flags the ones that were written into the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pbx.config.base import Section as _Section
from pbx.config.base import fix_hint as _fix
from pbx.config.base import rule_error as _rule_error
from pbx.config.security import (
    AuthSettings,
    ExtensionSeed,
    RegistrarSettings,
    SecuritySettings,
)

__all__ = [
    "SECRET_KEY_PARTS",
    "ApiSettings",
    "CallsSettings",
    "DatabaseSettings",
    "LifecycleSettings",
    "LogFormat",
    "LogLevel",
    "LoggingSettings",
    "Mode",
    "RtpSettings",
    "Settings",
    "SipSettings",
    "SipTimers",
    "collect_warnings",
    "default_sqlite_url",
    "file_value",
    "is_secret_key",
    "iter_leaf_keys",
    "mask_url_password",
    "url_has_password",
]

#: A key whose last component contains one of these words holds a secret.
SECRET_KEY_PARTS: tuple[str, ...] = ("token", "password", "secret")

#: Replacement text for secrets in anything shown to humans or the ops API.
MASK = "***"

Mode = Literal["development", "production"]
Codec = Literal["PCMU", "PCMA", "G722", "telephone-event"]
LogFormat = Literal["text", "json"]


class LogLevel(StrEnum):
    """Log levels accepted in ``logging.level`` (input is case-insensitive)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def is_secret_key(key: str) -> bool:
    """True when a (dotted) key names a secret and its value must never be shown."""
    last = key.rsplit(".", 1)[-1].lower()
    return any(part in last for part in SECRET_KEY_PARTS)


# The password runs to the *last* "@" of the authority, so an unencoded "@" in it
# ("u:p@ss@host") cannot leave its tail visible; an unencoded "/" in it still masks.
_URL_PASSWORD = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:)(?P<pw>[^@]*(?:@[^@/?#]*)*)(?P<at>@)")
# libpq takes the password as a query parameter too: ?password=…, &sslpassword=….
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][^=&#]*password=)(?P<pw>[^&#]*)", re.IGNORECASE)


def mask_url_password(url: str) -> str:
    """Replace the password of ``scheme://user:pw@host`` and any ``?password=`` /
    ``&password=`` (also ``sslpassword``) query parameter with ``***``."""
    masked = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", url)
    if "://" in masked:
        masked = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", masked)
    return masked


def url_has_password(url: str) -> bool:
    """True when a URL carries an inline password (``user:pw@``)."""
    match = _URL_PASSWORD.match(url)
    return bool(match and match["pw"])


class SipTimers(_Section):
    """RFC 3261 timers in seconds; T1 drives retransmission, T2 caps it, T4 = network lifetime."""

    t1: float = Field(0.5, json_schema_extra=_fix("use a number of seconds greater than 0"))
    t2: float = Field(4.0, json_schema_extra=_fix("use a number of seconds >= sip.timers.t1"))
    t4: float = Field(5.0, json_schema_extra=_fix("use a number of seconds greater than 0"))
    # RFC 3261 §16.6: how long an outgoing INVITE may ring without a provisional response
    # resetting it before it is CANCELled (callee gets CANCEL, caller 408); > 3 minutes.
    timer_c: float = Field(180.0, gt=0, le=86_400, json_schema_extra=_fix(
        "use seconds an INVITE may go unanswered after a provisional, e.g. 180"))

    @model_validator(mode="after")
    def _check_order(self) -> SipTimers:
        if self.t1 <= 0:
            raise _rule_error("sip.timers.t1", f"t1 must be > 0 (got {self.t1})",
                              "use a positive number of seconds, e.g. 0.5")
        if self.t2 < self.t1:
            raise _rule_error("sip.timers.t2", f"t2 ({self.t2}) must be >= t1 ({self.t1})",
                              "raise sip.timers.t2 or lower sip.timers.t1 (defaults: 0.5 / 4.0)")
        if self.t4 <= 0:
            raise _rule_error("sip.timers.t4", f"t4 must be > 0 (got {self.t4})",
                              "use a positive number of seconds, e.g. 5.0")
        return self


_PORT_FIX = _fix("use an integer between 1 and 65535")
# 0 asks the OS for a free port (tests, several nodes on one host); the bound port is
# logged at start-up.
_LISTEN_PORT_FIX = _fix("use an integer between 1 and 65535 (or 0 for any free port)")


class SipTcpSettings(_Section):
    """Limits of the SIP stream listeners (TCP and TLS): what one peer may hold.

    A connection-oriented listener facing the internet must bound connections in total
    and per source, how long a header may take to arrive (slowloris) and how long a
    silent connection is kept (RFC 5626 CRLF keep-alives count as traffic), and how
    much it queues for a peer that never reads.
    """

    max_connections: int = Field(
        1024, ge=1, le=1_000_000,
        json_schema_extra=_fix("use the most open TCP/TLS connections in total, e.g. 1024"))
    max_per_source: int = Field(
        32, ge=1, le=100_000,
        json_schema_extra=_fix("use the most open connections from one IP address, e.g. 32"))
    header_timeout: float = Field(
        10.0, gt=0, le=3600,
        json_schema_extra=_fix("use seconds a message header may take to arrive, e.g. 10"))
    idle_timeout: float = Field(
        600.0, gt=0, le=86_400,
        json_schema_extra=_fix("use seconds a silent connection is kept, e.g. 600"))
    max_write_buffer: int = Field(
        262_144, ge=4096, le=64 << 20,
        json_schema_extra=_fix("use bytes queued for a slow reader before it is dropped"))


class SipSettings(_Section):
    """SIP listener: one port is bound for both UDP and TCP; TLS is opt-in."""

    host: str = Field("0.0.0.0", min_length=1,
                      json_schema_extra=_fix("use an IP address to bind, e.g. 0.0.0.0"))
    port: int = Field(5060, ge=0, le=65535, json_schema_extra=_LISTEN_PORT_FIX)
    tls_port: int = Field(5061, ge=0, le=65535, json_schema_extra=_LISTEN_PORT_FIX)
    tls_enabled: bool = Field(False, json_schema_extra=_fix("use true or false"))
    tls_cert: Path | None = Field(None, json_schema_extra=_fix("use a path to a PEM certificate"))
    tls_key: Path | None = Field(None, json_schema_extra=_fix("use a path to a PEM private key"))
    external_ip: str | None = Field(
        None, json_schema_extra=_fix("use the public IP/hostname put in SDP and Contact, or null")
    )
    domain: str = Field("pbx.local", min_length=1,
                        json_schema_extra=_fix("use a SIP domain name, e.g. pbx.example.com"))
    realm: str | None = Field(
        None, json_schema_extra=_fix("use a digest realm string, or null to reuse sip.domain")
    )
    user_agent: str = Field("PBX", json_schema_extra=_fix("use a short product string"))
    max_message_size: int = Field(
        65535, ge=1024, le=1_048_576,
        json_schema_extra=_fix("use an integer between 1024 and 1048576"),
    )
    # Cap of the server and of the client transaction table, each: beyond it new
    # requests get 503 + Retry-After statelessly.  ~100,000 server transactions are
    # alive at 3,000 REGISTER/s (Timer J), hence the default.
    max_transactions: int = Field(200_000, ge=100, le=10_000_000, json_schema_extra=_fix(
        "use the most live SIP transactions per direction, e.g. 200000"))
    timers: SipTimers = Field(default_factory=SipTimers)
    tcp: SipTcpSettings = Field(default_factory=SipTcpSettings)

    @model_validator(mode="after")
    def _check_tls(self) -> SipSettings:
        # Fill realm from domain so consumers never deal with None.
        if self.realm is None:
            object.__setattr__(self, "realm", self.domain)
        if self.tls_enabled:
            missing = [name for name in ("tls_cert", "tls_key") if getattr(self, name) is None]
            if missing:
                raise _rule_error(
                    f"sip.{missing[0]}",
                    "TLS is enabled but " + " and ".join(f"sip.{m}" for m in missing) + " not set",
                    "set sip.tls_cert and sip.tls_key to PEM files, or set sip.tls_enabled: false",
                )
            if self.tls_port == self.port and self.port != 0:
                raise _rule_error("sip.tls_port", f"tls_port equals port ({self.port})",
                                  "use a different port for TLS, e.g. 5061")
        return self


class RtpSettings(_Section):
    """UDP port range for media; RTP uses the even port, RTCP the next odd one."""

    port_min: int = Field(
        10000, json_schema_extra=_fix("use an even integer between 1024 and 65534")
    )
    port_max: int = Field(20000, json_schema_extra=_fix("use an integer between 1025 and 65535"))
    # Offered/accepted in SDP, in order of preference. An empty list is reported by the
    # validator (CODEC_NONE_ENABLED), which refuses to start.
    codecs: list[Codec] = Field(
        default_factory=lambda: ["PCMU", "PCMA", "G722", "telephone-event"],
        json_schema_extra=_fix("list codecs from PCMU, PCMA, G722, telephone-event"))
    # Seconds a side may stay silent after our SDP reached it (and again after its
    # dialog is confirmed) while the relay still learns its real (NAT) source address.
    learning_window: float = Field(5.0, gt=0, le=60, json_schema_extra=_fix(
        "use seconds between 0 and 60, e.g. 5"))

    @model_validator(mode="after")
    def _check_range(self) -> RtpSettings:
        lo, hi = self.port_min, self.port_max
        if lo < 1024:
            raise _rule_error("rtp.port_min", f"port_min {lo} is below 1024",
                              "use an even port >= 1024 (privileged ports are not allowed)")
        if hi > 65535:
            raise _rule_error("rtp.port_max", f"port_max {hi} is above 65535",
                              "use a port <= 65535")
        if lo >= hi:
            raise _rule_error("rtp.port_min", f"port_min ({lo}) must be lower than port_max ({hi})",
                              "make rtp.port_min < rtp.port_max, e.g. 10000 and 20000")
        if lo % 2:
            raise _rule_error("rtp.port_min", f"port_min {lo} is odd",
                              f"use an even port (RTP takes even ports), e.g. {lo - 1} or {lo + 1}")
        return self


class ApiSettings(_Section):
    """HTTP ops API (health, readiness, metrics, admin).

    Binds 0.0.0.0 by default because Kubernetes probes reach the pod IP, not
    loopback; protect admin endpoints with ``PBX_API__TOKEN``.
    """

    host: str = Field(
        "0.0.0.0", min_length=1,
        json_schema_extra=_fix("use an IP address to bind, e.g. 0.0.0.0 or 127.0.0.1"),
    )
    port: int = Field(8080, ge=0, le=65535, json_schema_extra=_LISTEN_PORT_FIX)
    token: SecretStr | None = Field(
        None, json_schema_extra=_fix("set PBX_API__TOKEN in the environment or .env")
    )
    enabled: bool = Field(True, json_schema_extra=_fix("use true or false"))
    rate_limit: float = Field(20.0, gt=0, json_schema_extra=_fix(
        "use requests per second one client may send to /api/, e.g. 20"))
    rate_burst: int = Field(60, ge=1, json_schema_extra=_fix("use an integer >= 1, e.g. 60"))

    @field_validator("token", mode="after")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # `PBX_API__TOKEN=` (empty) should mean "no token", not "the empty token".
        if value is not None and not value.get_secret_value():
            return None
        return value


_DB_URL_FIX = "use sqlite:///path/to/file.sqlite3 or postgresql://user:pw@host:port/db"


class DatabaseSettings(_Section):
    """Storage backend; ``url`` is derived from ``data_dir`` when left unset."""

    url: str | None = Field(None, json_schema_extra=_fix(_DB_URL_FIX))
    pool_min: int = Field(1, ge=0, le=1000, json_schema_extra=_fix("use an integer >= 0"))
    pool_max: int = Field(5, ge=1, le=1000, json_schema_extra=_fix("use an integer >= 1"))
    # Create or migrate the schema at start-up. Turn off where several nodes share one
    # PostgreSQL and upgrades are rolled out node by node: run `pbx db init` once instead.
    migrate_on_start: bool = Field(True, json_schema_extra=_fix("use true or false"))

    @field_validator("url", mode="after")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme == "sqlite":
            if not value.startswith("sqlite:///") or value == "sqlite:///":
                raise PydanticCustomError(
                    "pbx_rule", "{message}",
                    {"message": "sqlite URL needs a path after sqlite:///", "fix": _DB_URL_FIX},
                )
            return value
        if scheme in ("postgresql", "postgres"):
            parts = urlsplit(value)
            if not parts.hostname and not parts.path.strip("/"):
                raise PydanticCustomError(
                    "pbx_rule", "{message}",
                    {"message": "postgresql URL needs a host or database name", "fix": _DB_URL_FIX},
                )
            return value
        raise PydanticCustomError(
            "pbx_rule", "{message}",
            {
                "message": f"unsupported database URL scheme {scheme or '(none)'!r}",
                "fix": _DB_URL_FIX,
            },
        )

    @model_validator(mode="after")
    def _check_pool(self) -> DatabaseSettings:
        if self.pool_max < self.pool_min:
            raise _rule_error("database.pool_max",
                              f"pool_max ({self.pool_max}) is lower than "
                              f"pool_min ({self.pool_min})",
                              "make database.pool_max >= database.pool_min")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Keep the password out of repr()/logs; the real value stays on `.url`.
        for name, value in super().__repr_args__():
            if name == "url" and isinstance(value, str):
                yield name, mask_url_password(value)
            else:
                yield name, value

    @property
    def kind(self) -> Literal["sqlite", "postgresql"] | None:
        """Backend family of :attr:`url` (None while the url is not derived yet)."""
        if self.url is None:
            return None
        return "sqlite" if self.url.lower().startswith("sqlite:") else "postgresql"


class HealthSettings(_Section):
    """Probe timing and the resource thresholds that make health `degraded`."""

    heartbeat_interval: float = Field(0.25, gt=0, json_schema_extra=_fix(
        "use seconds between reactor heartbeats, e.g. 0.25"))
    liveness_max_lag: float = Field(2.0, gt=0, json_schema_extra=_fix(
        "use the reactor lag in seconds that fails /live, e.g. 2"))
    database_timeout: float = Field(2.0, gt=0, json_schema_extra=_fix(
        "use seconds the health database query may take, e.g. 2"))
    cache_seconds: float = Field(1.0, ge=0, json_schema_extra=_fix(
        "use seconds a database/system reading is reused by probes, e.g. 1"))
    cpu_warn_percent: float = Field(80.0, gt=0, le=100, json_schema_extra=_fix(
        "use a percentage between 1 and 100"))
    memory_warn_percent: float = Field(85.0, gt=0, le=100, json_schema_extra=_fix(
        "use a percentage between 1 and 100"))
    disk_warn_percent: float = Field(90.0, gt=0, le=100, json_schema_extra=_fix(
        "use a percentage between 1 and 100"))


class LifecycleSettings(_Section):
    """Graceful shutdown / readiness knobs."""

    drain_timeout: float = Field(30.0, ge=0,
                                 json_schema_extra=_fix("use a number of seconds >= 0"))
    stop_timeout: float = Field(5.0, ge=0, json_schema_extra=_fix("use a number of seconds >= 0"))
    retry_after: int = Field(
        30, ge=0, le=86400,
        json_schema_extra=_fix("use whole seconds (0..86400) sent as Retry-After with 503"),
    )


class LoggingSettings(_Section):
    """Log verbosity and output format."""

    level: LogLevel = Field(LogLevel.INFO,
                            json_schema_extra=_fix("use one of DEBUG, INFO, WARNING, ERROR"))
    format: LogFormat = Field("text", json_schema_extra=_fix("use text or json"))

    @field_validator("level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class SessionTimerSettings(_Section):
    """RFC 4028 session timers, negotiated by the B2BUA on each leg of a call.

    Enabled, the PBX asks for a timer on calls where the phone did not (refreshing
    the leg itself when it is the refresher) and ends a call whose refreshes stop with
    BYE and the CDR cause "Session Timer Expired".  Disabled, it asks for none; a
    phone that asks for one still gets it (RFC 4028 §9).
    """

    enabled: bool = Field(True, json_schema_extra=_fix("use true or false"))
    # Session-Expires we offer and the most we accept (seconds; RFC 4028 §4: 1800).
    expires: int = Field(1800, ge=10, le=86_400, json_schema_extra=_fix(
        "use seconds between 10 and 86400, e.g. 1800 (RFC 4028's recommendation)"))
    # Min-SE: shorter intervals get 422 (RFC 4028 §5/§6).  RFC 4028 §4 wants >= 90; a
    # smaller value is accepted for tests only (the validator warns).
    min_se: int = Field(90, ge=10, le=86_400, json_schema_extra=_fix(
        "use seconds >= 90 (RFC 4028 §4) and <= calls.session_timer.expires"))

    @model_validator(mode="after")
    def _check_order(self) -> SessionTimerSettings:
        if self.min_se > self.expires:
            raise _rule_error(
                "calls.session_timer.min_se",
                f"min_se ({self.min_se}) must not exceed expires ({self.expires})",
                "lower calls.session_timer.min_se or raise calls.session_timer.expires")
        return self


class CallsSettings(_Section):
    """Call admission and call-level timers."""

    max_calls: int = Field(100, ge=1, json_schema_extra=_fix("use an integer >= 1"))
    ring_timeout: float = Field(30.0, gt=0, json_schema_extra=_fix("use a number of seconds > 0"))
    media_timeout: float = Field(60.0, gt=0,
                                 json_schema_extra=_fix("use a number of seconds > 0"))
    # Numbers matching this are internal extensions (dialled directly).
    dialplan_pattern: str = Field(r"^[0-9]{2,15}$", json_schema_extra=_fix(
        "use a regular expression matching your extension numbers, e.g. ^[0-9]{3,4}$"))
    session_timer: SessionTimerSettings = Field(default_factory=SessionTimerSettings)

    @field_validator("dialplan_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


# The YAML file's parsed mapping for the load in progress.  A ContextVar (not a
# class attribute) so concurrent/nested loads in one process cannot see each
# other's file, and so plain ``Settings()`` sees no file at all.
_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("pbx_config_file_data", default=None)


class _FileSource(InitSettingsSource):
    """Settings source that yields the config file mapping chosen by ``load_settings``."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, dict(_FILE_DATA.get() or {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={sorted(self.init_kwargs)!r})"


class Settings(BaseSettings):
    """Effective PBX configuration.

    Precedence (highest first): constructor kwargs, real environment
    (``PBX_*``, ``__`` for nesting), ``.env``, the YAML file, defaults.
    Use :func:`pbx.config.load_settings` rather than calling this directly;
    it chooses the file and ``.env`` and turns errors into ``ConfigError``.
    """

    model_config = SettingsConfigDict(
        env_prefix="PBX_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        validate_assignment=True,
        env_ignore_empty=True,  # `PBX_X=` (e.g. an unset compose variable) means "not set"
        env_file=None,  # chosen per load by load_settings(_env_file=...)
        env_file_encoding="utf-8",
        dotenv_filtering="only_existing",  # .env may hold PBX_CONFIG and non-PBX vars
        nested_model_default_partial_update=False,
    )

    mode: Mode = Field("development", json_schema_extra=_fix("use development or production"))
    data_dir: Path = Field(
        Path("var"),
        json_schema_extra=_fix("use a directory path (relative paths are relative to the cwd)"),
    )
    sip: SipSettings = Field(default_factory=SipSettings)
    rtp: RtpSettings = Field(default_factory=RtpSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    calls: CallsSettings = Field(default_factory=CallsSettings)
    registrar: RegistrarSettings = Field(default_factory=RegistrarSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    extensions: list[ExtensionSeed] = Field(default_factory=list)

    @field_validator("mode", mode="before")
    @classmethod
    def _lower_mode(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    # Filled by load_settings; not configuration, so not fields.
    _config_file: Path | None = PrivateAttr(default=None)
    _file_data: dict[str, Any] = PrivateAttr(default_factory=dict)
    _env_file: Path | None = PrivateAttr(default=None)
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Insert the YAML file below env and .env; secrets-dir support is not used."""
        return (init_settings, env_settings, dotenv_settings, _FileSource(settings_cls))

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        # Derive the default SQLite URL so every consumer sees a concrete URL.
        if self.database.url is None:
            object.__setattr__(self.database, "url", default_sqlite_url(self.data_dir))
        return self

    # -- convenience -------------------------------------------------------

    @property
    def database_url(self) -> str:
        """Effective database URL (``sqlite:///<data_dir>/pbx.sqlite3`` unless set)."""
        return self.database.url or default_sqlite_url(self.data_dir)

    @property
    def sqlite_path(self) -> Path | None:
        """Filesystem path of the SQLite database, or None for PostgreSQL."""
        url = self.database_url
        if not url.lower().startswith("sqlite:///"):
            return None
        return Path(url[len("sqlite:///"):])

    @property
    def is_production(self) -> bool:
        """True in production mode (stricter checks, no dev conveniences)."""
        return self.mode == "production"

    @property
    def config_file(self) -> Path | None:
        """The YAML file this configuration was loaded from, if any."""
        return self._config_file

    @property
    def env_file(self) -> Path | None:
        """The ``.env`` file that was read, if one existed."""
        return self._env_file

    @property
    def settings_warnings(self) -> list[str]:
        """Non-fatal problems found at load time (e.g. secrets written in the file)."""
        return list(self._warnings)

    def redacted(self) -> dict[str, Any]:
        """JSON-able effective config with every secret replaced by ``"***"``.

        Safe to return from the ops API or log at startup.
        """
        data = self.model_dump(mode="json")
        data["database"]["url"] = self.database_url
        return _redact(data, "")


def default_sqlite_url(data_dir: Path) -> str:
    """The SQLite URL used when ``database.url`` is unset."""
    return f"sqlite:///{(Path(data_dir) / 'pbx.sqlite3').as_posix()}"


def _redact(value: Any, key: str) -> Any:
    """Recursively mask secret-named keys and URL passwords in dumped data."""
    if isinstance(value, dict):
        return {k: _redact(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if value is not None and is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return mask_url_password(value)
    return value


def iter_leaf_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Yield dotted paths of every scalar setting (sections are descended into)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _section_type(info)
        if sub is not None:
            yield from iter_leaf_keys(sub, f"{path}.")
        else:
            yield path


def _section_type(info: FieldInfo) -> type[BaseModel] | None:
    """The nested section model of a field, if it is one."""
    ann = info.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def file_value(settings: Settings, *path: str) -> Any:
    """The raw value written in the config file at ``path`` (keys case-insensitive).

    Tells a secret written into the file from one that came from the environment.
    """
    node: Any = settings._file_data or {}
    for part in path:
        if not isinstance(node, dict):
            return None
        match = [v for k, v in node.items() if str(k).lower() == part]
        if not match:
            return None
        node = match[0]
    return node


def collect_warnings(settings: Settings) -> list[str]:
    """Non-fatal findings about a loaded configuration.

    Hook for the full validator (issue 6).  Currently: secrets that were
    written into the config file instead of the environment / ``.env``.
    """
    warnings: list[str] = []
    where = str(settings.config_file) if settings.config_file else "the config file"
    if file_value(settings, "api", "token"):
        warnings.append(
            f"api.token is set in {where}; keep secrets out of the config file and "
            "set PBX_API__TOKEN in the environment or .env instead"
        )
    url = file_value(settings, "database", "url")
    if isinstance(url, str) and url_has_password(url):
        warnings.append(
            f"database.url in {where} contains a password; set PBX_DATABASE__URL in the "
            "environment or .env instead"
        )
    return warnings
