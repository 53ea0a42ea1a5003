"""Registrar, digest authentication, abuse defence and extension seeding settings."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from pbx.config.base import Section, fix_hint, rule_error

__all__ = [
    "DIGEST_ALGORITHMS",
    "AuthSettings",
    "BruteForceSettings",
    "ExtensionSeed",
    "RateLimitSettings",
    "RegistrarSettings",
    "SecuritySettings",
]

DigestAlgorithm = Literal["SHA-256", "MD5"]
DIGEST_ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")
EXTENSION_NUMBER = re.compile(r"^[0-9]{2,15}$")


class RegistrarSettings(Section):
    """RFC 3261 §10 registration lifetimes and limits."""

    min_expires: int = Field(60, ge=1, le=86400,
                             json_schema_extra=fix_hint("use whole seconds, e.g. 60"))
    max_expires: int = Field(3600, ge=1, le=604800,
                             json_schema_extra=fix_hint("use whole seconds, e.g. 3600"))
    default_expires: int = Field(3600, ge=1, le=604800,
                                 json_schema_extra=fix_hint("use whole seconds, e.g. 3600"))
    max_contacts: int = Field(10, ge=1, le=100, json_schema_extra=fix_hint(
        "use the largest number of devices one extension may register, e.g. 10"))
    sweep_interval: float = Field(5.0, gt=0, json_schema_extra=fix_hint(
        "use seconds between sweeps of expired bindings, e.g. 5"))

    @model_validator(mode="after")
    def _ordered(self) -> RegistrarSettings:
        if not self.min_expires <= self.default_expires <= self.max_expires:
            raise rule_error("registrar.default_expires",
                             "need min_expires <= default_expires <= max_expires",
                             "e.g. min_expires 60, default_expires 3600, max_expires 3600")
        return self


class AuthSettings(Section):
    """Digest authentication (RFC 7616 / RFC 8760) for REGISTER and INVITE."""

    algorithms: list[DigestAlgorithm] = Field(
        default_factory=lambda: ["SHA-256", "MD5"],
        json_schema_extra=fix_hint("list SHA-256 and/or MD5, strongest first"))
    nonce_lifetime: int = Field(300, ge=10, le=86400, json_schema_extra=fix_hint(
        "use seconds a nonce stays valid before stale=true, e.g. 300"))
    secret: SecretStr | None = Field(None, json_schema_extra=fix_hint(
        "set PBX_AUTH__SECRET in the environment (unset: a random secret per start)"))

    @field_validator("algorithms")
    @classmethod
    def _non_empty_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one digest algorithm is needed")
        if len(set(value)) != len(value):
            raise ValueError("digest algorithms are listed twice")
        return value


class BruteForceSettings(Section):
    """Block a source (IPv4 address, IPv6 /64) after repeated failed authentications,
    and lock an account after repeated failures from any sources (see
    :mod:`pbx.sip.abuse` for the rules, including trusted networks)."""

    enabled: bool = True
    max_failures: int = Field(10, ge=1, json_schema_extra=fix_hint("use an integer >= 1"))
    window: float = Field(60.0, gt=0, json_schema_extra=fix_hint(
        "use seconds over which failures are counted, e.g. 60"))
    block_time: float = Field(600.0, gt=0, json_schema_extra=fix_hint(
        "use seconds a source stays blocked, e.g. 600"))
    action: Literal["reject", "drop"] = Field("reject", json_schema_extra=fix_hint(
        "use reject (answer 403) or drop (stay silent)"))
    success_memory: float = Field(3600.0, gt=0, json_schema_extra=fix_hint(
        "use seconds a source that logged in to an account stays exempt from that "
        "account's lock-out, e.g. 3600 (at least the phones' registration interval)"))


class RateLimitSettings(Section):
    """Per-source token bucket for out-of-dialog requests (REGISTER, OPTIONS, ...)."""

    enabled: bool = True
    requests_per_second: float = Field(20.0, gt=0, json_schema_extra=fix_hint(
        "use the sustained requests per second one source may send, e.g. 20"))
    burst: int = Field(60, ge=1, json_schema_extra=fix_hint(
        "use how many requests a source may send at once, e.g. 60"))


class SecuritySettings(Section):
    """Abuse defence and crypto policy."""

    fips_mode: bool = Field(False, json_schema_extra=fix_hint(
        "use true to allow only FIPS-approved algorithms (no MD5 digest)"))
    trusted_networks: list[str] = Field(default_factory=list, json_schema_extra=fix_hint(
        "list CIDRs exempt from rate limits and source blocks (account lock-outs still "
        "apply), e.g. your SIP load balancer"))
    brute_force: BruteForceSettings = Field(default_factory=BruteForceSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("trusted_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/24)") from None
        return value


class ExtensionSeed(Section):
    """An extension created at start-up if missing; its password comes from the environment."""

    number: str = Field(json_schema_extra=fix_hint("use 2-15 digits, e.g. '1001' (quoted)"))
    name: str | None = None
    password_env: str | None = Field(None, json_schema_extra=fix_hint(
        "name an environment variable holding the password, e.g. PBX_EXT_1001_PASSWORD"))
    enabled: bool = True

    @field_validator("number", mode="before")
    @classmethod
    def _digits(cls, value: object) -> object:
        text = str(value) if isinstance(value, int) else value
        if not isinstance(text, str) or not EXTENSION_NUMBER.match(text):
            raise ValueError("an extension number is 2-15 digits")
        return text
