"""PBX configuration: typed settings from YAML file, ``.env`` and ``PBX_*`` env vars.

Typical use::

    from pbx.config import ConfigError, load_settings

    try:
        settings = load_settings()          # $PBX_CONFIG or ./config.yml
    except ConfigError as exc:
        raise SystemExit(str(exc))          # human text, secrets masked

See :mod:`pbx.config.loading` for source precedence and ``.env`` location.
"""

from pbx.config.loading import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_NAME,
    ConfigError,
    ConfigIssue,
    describe_sources,
    env_var_name,
    load_settings,
)
from pbx.config.model import (
    ApiSettings,
    CallsSettings,
    DatabaseSettings,
    LifecycleSettings,
    LogFormat,
    LoggingSettings,
    LogLevel,
    Mode,
    RtpSettings,
    Settings,
    SipSettings,
    SipTimers,
    collect_warnings,
    default_sqlite_url,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "ApiSettings",
    "CallsSettings",
    "ConfigError",
    "ConfigIssue",
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
    "describe_sources",
    "env_var_name",
    "load_settings",
]
