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
    HealthSettings,
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
from pbx.config.validation import (
    Finding,
    ValidationReport,
    render_json,
    render_text,
    validate,
    validate_data,
    validate_file,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "ApiSettings",
    "CallsSettings",
    "ConfigError",
    "ConfigIssue",
    "DatabaseSettings",
    "Finding",
    "HealthSettings",
    "LifecycleSettings",
    "LogFormat",
    "LogLevel",
    "LoggingSettings",
    "Mode",
    "RtpSettings",
    "Settings",
    "SipSettings",
    "SipTimers",
    "ValidationReport",
    "collect_warnings",
    "default_sqlite_url",
    "describe_sources",
    "env_var_name",
    "load_settings",
    "render_json",
    "render_text",
    "validate",
    "validate_data",
    "validate_file",
]
