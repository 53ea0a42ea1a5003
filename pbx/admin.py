"""Extension management shared by the ``pbx extensions`` CLI, start-up seeding and (later)
the admin API: one place that turns a password into HA1 hashes and never keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from twisted.internet.defer import Deferred, inlineCallbacks

from pbx.config import Settings, passwords
from pbx.config.security import EXTENSION_NUMBER
from pbx.sip import compute_ha1
from pbx.store import ExtensionExists, ExtensionRecord, Store

__all__ = [
    "ExtensionError",
    "SeedResult",
    "add_extension",
    "change_password",
    "generate_password",
    "hashes_for",
    "realm_of",
    "seed_extensions",
]

class ExtensionError(ValueError):
    """A request about an extension that cannot be honoured (bad number, weak password)."""


def generate_password() -> str:
    """A strong random SIP password, letters and digits (easy to type into a phone)."""
    return passwords.generate_password()


def realm_of(settings: Settings) -> str:
    return settings.sip.realm or settings.sip.domain


def hashes_for(number: str, password: str, realm: str) -> dict[str, str]:
    """HA1 for every digest algorithm we may offer; the password itself is never stored."""
    return {
        "ha1_md5": compute_ha1(number, realm, password, "MD5"),
        "ha1_sha256": compute_ha1(number, realm, password, "SHA-256"),
    }


def check_number(number: str) -> str:
    if not EXTENSION_NUMBER.match(number):
        raise ExtensionError(f"extension number {number!r} must be 2-15 digits")
    return number


def check_password(number: str, password: str) -> str:
    """Refuse weak passwords (the validator's and wizards' rules): scanners guess them."""
    weaknesses = passwords.check_password(password, number=number)
    if weaknesses:
        reasons = "; ".join(w.message for w in weaknesses)
        raise ExtensionError(f"weak password: {reasons} (omit --password to generate one)")
    return password


@inlineCallbacks
def add_extension(store: Store, settings: Settings, number: str, *, name: str | None = None,
                  password: str | None = None,
                  enabled: bool = True) -> Generator[Deferred[Any], Any, str | None]:
    """Create an extension; returns the password when it was generated (to show once)."""
    check_number(number)
    generated = password is None
    secret = generate_password() if password is None else check_password(number, password)
    realm = realm_of(settings)
    hashes = hashes_for(number, secret, realm)
    record = ExtensionRecord(number=number, display_name=name, enabled=enabled, realm=realm,
                             ha1_md5=hashes["ha1_md5"], ha1_sha256=hashes["ha1_sha256"])
    yield store.add_extension(record)
    return secret if generated else None


@inlineCallbacks
def change_password(store: Store, settings: Settings, number: str,
                    password: str | None = None) -> Generator[Deferred[Any], Any, str | None]:
    """Set a new password; returns it when generated. Raises ExtensionError if missing."""
    check_number(number)
    generated = password is None
    secret = generate_password() if password is None else check_password(number, password)
    realm = realm_of(settings)
    updated = yield store.update_extension(number, realm=realm, **hashes_for(number, secret, realm))
    if not updated:
        raise ExtensionError(f"extension {number} does not exist")
    return secret if generated else None


@dataclass
class SeedResult:
    created: list[str]
    existing: list[str]
    skipped: dict[str, str]  # number -> why


def _seed_environment(env_file: Path | None) -> Mapping[str, str | None]:
    values: dict[str, str | None] = {}
    if env_file is not None and env_file.is_file():
        values.update(dotenv_values(env_file))
    values.update(os.environ)
    return values


@inlineCallbacks
def seed_extensions(store: Store,
                    settings: Settings) -> Generator[Deferred[Any], Any, SeedResult]:
    """Create the extensions listed in config that do not exist yet.

    Existing ones are left alone (their password may have been changed with the CLI);
    a seed whose password variable is unset is skipped with a reason, not guessed.
    """
    result = SeedResult([], [], {})
    env = _seed_environment(settings.env_file)
    for seed in settings.extensions:
        existing = yield store.get_extension(seed.number)
        if existing is not None:
            result.existing.append(seed.number)
            continue
        password = env.get(seed.password_env) if seed.password_env else None
        if not password:
            result.skipped[seed.number] = (
                f"set {seed.password_env} in the environment or .env" if seed.password_env
                else "no password_env given")
            continue
        try:
            yield add_extension(store, settings, seed.number, name=seed.name,
                                password=password, enabled=seed.enabled)
        except ExtensionExists:
            result.existing.append(seed.number)  # another node seeded it first
        except ExtensionError as err:
            result.skipped[seed.number] = str(err)
        else:
            result.created.append(seed.number)
    return result
