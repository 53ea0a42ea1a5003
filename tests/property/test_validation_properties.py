"""Properties of the configuration validator over generated configurations.

Example counts come from the profile in tests/conftest.py (``ci`` by default).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from hypothesis import given
from hypothesis import strategies as st

from pbx.config.passwords import check_password, check_token, generate_password, strength
from pbx.config.validation import (
    ValidationReport,
    render_json,
    render_text,
    validate_data,
    validate_file,
)
from pbx.config.writer import render_env

CODE = re.compile(r"^[A-Z][A-Z0-9_]+$")

ports = st.one_of(st.integers(0, 65535), st.integers(-10, 70000), st.just("5060"), st.none())
hosts = st.sampled_from(["0.0.0.0", "127.0.0.1", "localhost", "::", "192.0.2.1", "",
                         "bad host", "no-such-host.invalid"])
urls = st.one_of(
    st.none(),
    st.sampled_from([
        "sqlite:///var/pbx.sqlite3", "sqlite:///", "postgresql://pbx@db:5432/pbx",
        "postgresql://pbx:changeme@db.example.com/pbx", "postgresql://:x@/", "mysql://x",
        "postgresql://u@h:notaport/db", "postgres://h", "postgresql://[::1]:5432/x",
    ]),
    st.text(max_size=40),
)
secrets_ = st.one_of(st.none(), st.text(max_size=50), st.just("changeme"))
numbers = st.one_of(st.from_regex(r"\A[0-9]{2,6}\Z"), st.text(max_size=5), st.integers(0, 99999))
extensions = st.lists(st.fixed_dictionaries(
    {"number": numbers},
    optional={"name": st.one_of(st.none(), st.text(max_size=10)),
              "password_env": st.one_of(st.none(), st.sampled_from(["P1", "P2", "MISSING"])),
              "enabled": st.booleans()}),
    max_size=4)
configs = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["development", "production", "staging"]),
    "sip": st.fixed_dictionaries({}, optional={
        "host": hosts, "port": ports, "tls_port": ports, "tls_enabled": st.booleans(),
        "tls_cert": st.sampled_from([None, "/nonexistent.pem", "/etc/hostname", "/"]),
        "tls_key": st.sampled_from([None, "/nonexistent.key", "/etc/hostname"]),
        "external_ip": st.one_of(st.none(), hosts), "domain": st.sampled_from(
            ["pbx.local", "pbx.example.com", "acme.test", ""])}),
    "rtp": st.fixed_dictionaries({}, optional={"port_min": ports, "port_max": ports}),
    "api": st.fixed_dictionaries({}, optional={"host": hosts, "port": ports, "token": secrets_}),
    "database": st.fixed_dictionaries({}, optional={"url": urls}),
    "calls": st.fixed_dictionaries({}, optional={"max_calls": st.integers(-1, 10**6)}),
    "auth": st.fixed_dictionaries({}, optional={
        "algorithms": st.lists(st.sampled_from(["SHA-256", "MD5", "SHA-1"]), max_size=3),
        "secret": secrets_}),
    "security": st.fixed_dictionaries({}, optional={
        "fips_mode": st.booleans(),
        "brute_force": st.fixed_dictionaries({}, optional={"enabled": st.booleans()}),
        "rate_limit": st.fixed_dictionaries({}, optional={"enabled": st.booleans()})}),
    "logging": st.fixed_dictionaries({}, optional={
        "level": st.sampled_from(["DEBUG", "info", "LOUD"])}),
    "extensions": extensions,
})
environs = st.dictionaries(st.sampled_from(["P1", "P2"]), st.text(max_size=20), max_size=2)


def _check_report(report: ValidationReport) -> None:
    assert report.exit_code in (0, 78)
    assert report.has_errors == bool(report.errors) == (report.exit_code == 78)
    for finding in report.findings:
        assert finding.severity in ("error", "warning")
        assert CODE.match(finding.code), finding.code
        assert isinstance(finding.key, str) and finding.message
    last = render_text(report).splitlines()[-1]
    if report.errors:
        assert last.startswith("✗ Configuration has ")
    else:
        assert last.startswith("✓ Configuration is valid")
    data = json.loads(render_json(report))
    assert len(data["errors"]) == len(report.errors)
    assert len(data["warnings"]) == len(report.warnings)


@given(configs, environs)
def test_validator_never_crashes_and_is_deterministic(data: dict[str, Any],
                                                      environ: dict[str, str]) -> None:
    """Any mapping gives a well-formed report, and the same report every time."""
    first = validate_data(data, environ=environ)
    _check_report(first)
    assert validate_data(data, environ=environ).findings == first.findings


@given(st.text(max_size=300))
def test_any_file_content_gives_a_report(text: str) -> None:
    """Whatever the config file holds, validate_file reports instead of raising."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yml"
        path.write_text(text, encoding="utf-8")
        report = validate_file(path, env_file=None)
    _check_report(report)


_UPPER_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# At least one capital and one digit, 10+ characters: never a word of the report's text.
passwords = st.builds(lambda a, b, rest: a + b + rest,
                      st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), st.sampled_from("0123456789"),
                      st.text(_UPPER_DIGITS, min_size=8, max_size=22))


@given(passwords, st.from_regex(r"\A[0-9]{2,6}\Z"))
def test_extension_passwords_never_appear_in_output(password: str, number: str) -> None:
    """Whatever the verdict on a password, the report never contains it."""
    data = {"mode": "production",
            "extensions": [{"number": number, "password_env": "P1"}]}
    report = validate_data(data, environ={"P1": password})
    if number not in password:
        assert password not in render_text(report)
        assert password not in render_json(report)


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=6)))
def test_password_checks_are_total(password: str, number: str | None) -> None:
    """Checks never raise; empty findings mean a score of at least 2 ("fair")."""
    weak = check_password(password, number=number)
    result = strength(password, number=number)
    assert 0 <= result.score <= 4
    assert (result.score >= 2) == (not weak)
    check_token(password)


@given(st.integers(12, 64))
def test_generated_passwords_always_pass(length: int) -> None:
    """A generated password is never refused by the same checks that judge typed ones."""
    password = generate_password(length)
    assert len(password) == length and check_password(password) == []


env_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r\0"),
                   max_size=30)


@given(st.dictionaries(st.from_regex(r"\A[A-Z][A-Z0-9_]{0,10}\Z"), env_text, max_size=5))
def test_env_rendering_round_trips(values: dict[str, str]) -> None:
    """What the writer puts in .env is read back unchanged by python-dotenv (the loader)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".env"
        path.write_text(render_env(values), encoding="utf-8")
        assert dotenv_values(path) == values
