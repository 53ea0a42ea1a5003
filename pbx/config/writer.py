"""Turning setup-wizard answers into ``config.yml`` + ``.env``, written safely.

Shared by the terminal wizard (``scripts/setup_production_env.py``) and the desktop wizard
(``wizard/``) so both produce byte-for-byte the same files with the same permissions.

Rules the files follow (DESIGN.md: secrets come from the environment or ``.env``):

* ``config.yml`` holds no secret.  Extensions name the variable holding their password
  (``password_env: PBX_EXT_1001_PASSWORD``); a PostgreSQL URL with a password goes to
  ``.env`` as ``PBX_DATABASE__URL``.
* ``.env`` (mode 0600) holds ``PBX_API__TOKEN``, ``PBX_AUTH__SECRET``,
  ``PBX_DATABASE__URL`` (when it has a password) and ``PBX_EXT_<N>_PASSWORD``.
* Every write is atomic (temporary file in the same directory, fsync, ``os.replace``), and
  an existing file is first copied to ``<name>.bak-YYYYmmdd-HHMMSS`` with its mode kept
  (``.env`` backups are always 0600).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import yaml
from dotenv import dotenv_values

from pbx.config.model import url_has_password

__all__ = [
    "CONFIG_MODE",
    "ENV_MODE",
    "Answers",
    "ExtensionAnswer",
    "WriteResult",
    "atomic_write",
    "config_data",
    "detect_local_addresses",
    "env_values",
    "extension_env_name",
    "parse_email",
    "parse_hostname",
    "parse_port",
    "postgres_url",
    "render_config",
    "render_env",
    "validation_input",
    "write_files",
]

ENV_MODE: Final = 0o600
CONFIG_MODE: Final = 0o644
CONFIG_NAME: Final = "config.yml"
ENV_NAME: Final = ".env"


@dataclass
class ExtensionAnswer:
    """One extension to seed; ``password`` ends up in ``.env`` only."""

    number: str
    name: str = ""
    password: str = ""
    generated: bool = False


@dataclass
class Answers:
    """Everything a wizard asks.  Defaults are the safe production choices."""

    mode: str = "production"
    data_dir: str = "var"
    admin_email: str = ""
    sip_host: str = "0.0.0.0"
    sip_port: int = 5060
    domain: str = "pbx.local"
    external_ip: str = ""
    tls_enabled: bool = False
    tls_port: int = 5061
    tls_cert: str = ""
    tls_key: str = ""
    rtp_min: int = 10000
    rtp_max: int = 20000
    max_calls: int = 100
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    api_token: str = ""
    database_url: str = ""  # empty: SQLite under data_dir
    auth_secret: str = ""
    fips_mode: bool = False
    brute_force: bool = True
    max_failures: int = 10
    block_time: float = 600.0
    rate_limit: bool = True
    log_level: str = "INFO"
    extensions: list[ExtensionAnswer] = field(default_factory=list)


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_files` did: the files written and the backups made."""

    config_path: Path
    env_path: Path
    backups: tuple[Path, ...]


# ---------------------------------------------------------------------------- answer checks
# Each parser returns the clean value or raises ValueError with a message for the operator;
# the terminal wizard re-prompts with it, the desktop wizard shows it under the field.

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def parse_port(text: str | int, *, allow_zero: bool = False) -> int:
    """A TCP/UDP port number."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number; a port is 1-65535") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{port} is outside {low}-65535")
    return port


def parse_hostname(text: str) -> str:
    """A DNS name (RFC 1123 labels) or an IP address."""
    value = text.strip().rstrip(".")
    if not value:
        raise ValueError("a host name is needed")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) > 253 or not all(_HOST_LABEL.match(p) for p in value.split(".")):
        raise ValueError(f"{text!r} is not a valid host name (letters, digits, '-' and '.')")
    if value.split(".")[-1].isdigit():
        raise ValueError(f"{text!r} is neither an IP address nor a host name")
    return value.lower()


def parse_email(text: str) -> str:
    """An e-mail address (shape only: local@domain.tld)."""
    value = text.strip()
    if not _EMAIL.match(value) or len(value) > 254:
        raise ValueError(f"{text!r} is not an e-mail address (name@example.org)")
    return value


def postgres_url(host: str, port: int, database: str, user: str, password: str = "") -> str:
    """A ``postgresql://`` URL with user and password percent-encoded."""
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host}:{port}/{quote(database, safe='')}"


def detect_local_addresses() -> list[str]:
    """IP addresses of this host's interfaces, most useful first; no Internet look-up.

    Order: global IPv4, private IPv4, global IPv6; loopback and link-local are left out.
    """
    import psutil

    found: list[tuple[int, str]] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            try:
                ip = ipaddress.ip_address(addr.address.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            rank = (0 if ip.is_global else 1) if ip.version == 4 else 2
            found.append((rank, str(ip)))
    return [ip for _, ip in sorted(set(found))]


# ---------------------------------------------------------------------------- file content


def extension_env_name(number: str) -> str:
    """The ``.env`` variable holding one extension's password."""
    return f"PBX_EXT_{number}_PASSWORD"


def _db_secret(answers: Answers) -> bool:
    return bool(answers.database_url) and url_has_password(answers.database_url)


def config_data(answers: Answers) -> dict[str, Any]:
    """The mapping written to ``config.yml`` (never a secret)."""
    sip: dict[str, Any] = {
        "host": answers.sip_host,
        "port": answers.sip_port,
        "domain": answers.domain,
        "external_ip": answers.external_ip or None,
        "tls_enabled": answers.tls_enabled,
        "tls_port": answers.tls_port,
        "tls_cert": answers.tls_cert or None,
        "tls_key": answers.tls_key or None,
    }
    data: dict[str, Any] = {
        "mode": answers.mode,
        "data_dir": answers.data_dir,
        "sip": sip,
        "rtp": {"port_min": answers.rtp_min, "port_max": answers.rtp_max},
        "api": {"host": answers.api_host, "port": answers.api_port},
        "database": {"url": None if _db_secret(answers) else (answers.database_url or None)},
        "logging": {"level": answers.log_level},
        "calls": {"max_calls": answers.max_calls},
        "auth": {"algorithms": ["SHA-256"] if answers.fips_mode else ["SHA-256", "MD5"]},
        "security": {
            "fips_mode": answers.fips_mode,
            "brute_force": {"enabled": answers.brute_force, "max_failures": answers.max_failures,
                            "block_time": answers.block_time},
            "rate_limit": {"enabled": answers.rate_limit},
        },
        "extensions": [
            {"number": e.number, "name": e.name or None,
             "password_env": extension_env_name(e.number)}
            for e in answers.extensions
        ],
    }
    return data


def env_values(answers: Answers) -> dict[str, str]:
    """The variables written to ``.env``: every secret of the configuration."""
    values: dict[str, str] = {}
    if answers.api_token:
        values["PBX_API__TOKEN"] = answers.api_token
    if answers.auth_secret:
        values["PBX_AUTH__SECRET"] = answers.auth_secret
    if _db_secret(answers):
        values["PBX_DATABASE__URL"] = answers.database_url
    for ext in answers.extensions:
        if ext.password:
            values[extension_env_name(ext.number)] = ext.password
    return values


def validation_input(answers: Answers) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings mapping, environment) as the PBX will see them once the files are written.

    Feed to :func:`pbx.config.validation.validate_data` so the wizards run the real rules.
    """
    data = config_data(answers)
    if answers.api_token:
        data["api"]["token"] = answers.api_token
    if answers.auth_secret:
        data["auth"]["secret"] = answers.auth_secret
    if answers.database_url:
        data["database"]["url"] = answers.database_url
    return data, env_values(answers)


def render_config(answers: Answers) -> str:
    """``config.yml`` text: a header saying where the secrets are, then the settings."""
    header = [
        "# PBX configuration written by the setup wizard on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "# Secrets are NOT in this file: they are in .env next to it (mode 0600).",
        "# Check it with: pbx validate-config --config <this file>",
    ]
    if answers.admin_email:
        header.append(f"# Administrator: {answers.admin_email}")
    body = yaml.safe_dump(config_data(answers), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n\n" + body


_SAFE_ENV_VALUE = re.compile(r"^[A-Za-z0-9_\-.:/@%+=~,]*$")


def _env_quote(value: str) -> str:
    """Quote for python-dotenv: bare when safe, else single quotes with \\ and ' escaped."""
    if _SAFE_ENV_VALUE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def render_env(values: Mapping[str, str], kept: Mapping[str, str] | None = None) -> str:
    """``.env`` text; ``kept`` are unrelated variables carried over from the previous file."""
    for name, value in {**values, **(kept or {})}.items():
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"{name} contains a line break or NUL, which .env cannot hold")
    lines = ["# PBX secrets written by the setup wizard. Keep this file mode 0600.",
             "# Never commit it; back it up like a password store."]
    lines += [f"{name}={_env_quote(value)}" for name, value in values.items()]
    if kept:
        lines.append("")
        lines.append("# Kept from the previous .env:")
        lines += [f"{name}={_env_quote(value)}" for name, value in kept.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- writing


def _backup(path: Path, stamp: str, mode: int | None) -> Path:
    """Copy ``path`` to ``<name>.bak-<stamp>[-N]``, created exclusively with ``mode``."""
    original_mode = os.stat(path).st_mode & 0o777
    use_mode = mode if mode is not None else original_mode
    data = path.read_bytes()
    counter = 0
    while True:
        suffix = f".bak-{stamp}" + (f"-{counter}" if counter else "")
        target = path.with_name(path.name + suffix)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, use_mode)
        except FileExistsError:
            counter += 1
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(target, use_mode)  # the umask may have narrowed it
        return target


def atomic_write(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never half of one.

    The temporary file gets ``mode`` before any byte is written, so a secret is never
    readable by others, even briefly.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_files(answers: Answers, directory: Path) -> WriteResult:
    """Write ``config.yml`` and ``.env`` into ``directory``, backing up what is there.

    Unrelated (non-``PBX_``) variables of an existing ``.env`` are kept; its ``PBX_*``
    variables are replaced so they cannot silently override the new ``config.yml``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path, env_path = directory / CONFIG_NAME, directory / ENV_NAME
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backups: list[Path] = []
    kept: dict[str, str] = {}
    if env_path.is_file():
        previous = dotenv_values(env_path)
        kept = {k: v for k, v in previous.items()
                if v is not None and not k.upper().startswith("PBX_")}
    config_text = render_config(answers)
    env_text = render_env(env_values(answers), kept)
    if config_path.exists():
        backups.append(_backup(config_path, stamp, None))
    if env_path.exists():
        backups.append(_backup(env_path, stamp, ENV_MODE))
    atomic_write(env_path, env_text, ENV_MODE)
    atomic_write(config_path, config_text, CONFIG_MODE)
    return WriteResult(config_path, env_path, tuple(backups))
