"""The configuration rule set (pbx.config.validation), passwords and the files writer.

Every rule is shown firing on a minimal change to a configuration that has no finding at
all, so each test also proves the rule stays silent when it should.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from pbx.config import load_settings
from pbx.config.passwords import (
    check_password,
    check_token,
    generate_password,
    generate_secret,
    generate_token,
    strength,
)
from pbx.config.validation import (
    EXIT_CONFIG,
    Finding,
    ValidationReport,
    check_database,
    render_json,
    render_text,
    rtp_call_capacity,
    validate,
    validate_data,
    validate_file,
)
from pbx.config.writer import (
    Answers,
    ExtensionAnswer,
    config_data,
    parse_email,
    parse_hostname,
    parse_port,
    postgres_url,
    render_env,
    validation_input,
    write_files,
)
from tests.conftest import require_tool

TOKEN = "Zq3vN8xK2mP7rT5wY1bC4dF6gH9jL0sA-uE"
SECRET = "5f0b2c7e9a1d4e6f8a0b2c4d6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f"
EXT_PW = "Vb7kQ2mZx9LpR4tW"
PG_DSN = os.environ.get("PBX_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PBX_* variables from the developer's shell; cwd = an empty directory."""
    for name in list(os.environ):
        if name.upper().startswith("PBX_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# ---------------------------------------------------------------------------- certificates

_CA_CNF = """[ca]
default_ca = d
[d]
database = index.txt
new_certs_dir = .
default_md = sha256
policy = p
serial = serial
[p]
commonName = supplied
"""


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_cert(directory: Path, name: str, start: str, end: str) -> tuple[Path, Path]:
    """A self-signed EC certificate valid from ``start`` to ``end`` (YYYYmmddHHMMSSZ)."""
    work = directory / name
    work.mkdir()
    (work / "ca.cnf").write_text(_CA_CNF)
    (work / "index.txt").write_text("")
    (work / "serial").write_text("01\n")
    _openssl(work, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", "/CN=pbx.test", "-keyout", "key.pem", "-out", "req.csr")
    _openssl(work, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "key.pem",
             "-in", "req.csr", "-out", "cert.pem", "-startdate", start, "-enddate", end,
             "-notext")
    (work / "key.pem").chmod(0o600)
    return work / "cert.pem", work / "key.pem"


def _stamp(days: float) -> str:
    import time
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + days * 86400))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "openssl")
    base = tmp_path_factory.mktemp("certs")
    return {
        "good": _make_cert(base, "good", _stamp(-1), _stamp(365)),
        "other": _make_cert(base, "other", _stamp(-1), _stamp(365)),
        "expiring": _make_cert(base, "expiring", _stamp(-1), _stamp(10)),
        "expired": _make_cert(base, "expired", "20000101000000Z", "20010101000000Z"),
        "future": _make_cert(base, "future", _stamp(400), _stamp(800)),
    }


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def clean(certs: dict[str, tuple[Path, Path]]) -> dict[str, Any]:
    """A production configuration that passes every rule without a single finding."""
    cert, key = certs["good"]
    return {
        "mode": "production",
        "sip": {"host": "127.0.0.1", "port": 5060, "external_ip": "192.0.2.10",
                "domain": "pbx.acme.test", "tls_enabled": True, "tls_port": 5061,
                "tls_cert": str(cert), "tls_key": str(key)},
        "rtp": {"port_min": 10000, "port_max": 20000},
        "api": {"host": "127.0.0.1", "port": 8080, "token": TOKEN},
        "auth": {"algorithms": ["SHA-256"], "secret": SECRET},
        "security": {"fips_mode": True},
        "database": {"url": "postgresql://pbx@db.acme.test:5432/pbx"},
        "calls": {"max_calls": 100},
        "extensions": [{"number": "1001", "name": "Reception",
                        "password_env": "PBX_EXT_1001_PASSWORD"}],
    }


ENV = {"PBX_EXT_1001_PASSWORD": EXT_PW}


def report_for(data: dict[str, Any], environ: dict[str, str] | None = None) -> ValidationReport:
    return validate_data(data, environ=ENV if environ is None else environ)


def find(report: ValidationReport, code: str) -> Finding:
    matches = [f for f in report.findings if f.code == code]
    assert matches, f"{code} not in {report.codes()}"
    return matches[0]


def mutated(base: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    change(data)
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_clean_configuration_has_no_finding(clean: dict[str, Any]) -> None:
    report = report_for(clean)
    assert report.findings == ()
    assert report.ok and not report.has_errors and report.exit_code == 0


# ---------------------------------------------------------------------------- rule table


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return change


# (code, severity, key, change) — each change makes exactly that rule fire.
RULES: list[tuple[str, str, str, Callable[[dict[str, Any]], None]]] = [
    ("SERVER_PORT_COLLISION", "error", "api.port", _set("api.port", 5060)),
    ("SERVER_PORT_IN_RTP_RANGE", "error", "sip.port", _set("sip.port", 10500)),
    ("SERVER_RTP_RANGE_TOO_SMALL", "error", "rtp.port_max", _set("calls.max_calls", 2501)),
    ("SERVER_EXTERNAL_IP_UNSET", "warning", "sip.external_ip", _set("sip.external_ip", None)),
    ("SERVER_BIND_ADDRESS_NOT_LOCAL", "error", "sip.host", _set("sip.host", "192.0.2.77")),
    ("DB_POSTGRES_INCOMPLETE", "error", "database.url",
     _set("database.url", "postgresql://db.acme.test:5432/pbx")),
    ("DB_POSTGRES_PORT_MISSING", "warning", "database.url",
     _set("database.url", "postgresql://pbx@db.acme.test/pbx")),
    ("DB_URL_INVALID", "error", "database.url",
     _set("database.url", "postgresql://pbx@db.acme.test:99999/pbx")),
    ("DB_PASSWORD_WEAK", "warning", "database.url",
     _set("database.url", "postgresql://pbx:password@db.acme.test:5432/pbx")),
    ("DB_SQLITE_IN_PRODUCTION", "warning", "database.url",
     _set("database.url", "sqlite:///var/pbx.sqlite3")),
    ("SECURITY_FIPS_DISABLED", "warning", "security.fips_mode", _set("security.fips_mode", False)),
    ("SECURITY_FIPS_MD5", "error", "auth.algorithms", _set("auth.algorithms", ["SHA-256", "MD5"])),
    ("SECURITY_RATE_LIMIT_DISABLED", "warning", "security.rate_limit.enabled",
     _set("security.rate_limit.enabled", False)),
    ("SECURITY_BRUTE_FORCE_DISABLED", "warning", "security.brute_force.enabled",
     _set("security.brute_force.enabled", False)),
    ("API_TOKEN_MISSING", "error", "api.token", _set("api.token", None)),
    ("API_TOKEN_WEAK", "error", "api.token", _set("api.token", "changeme")),
    ("AUTH_SECRET_MISSING", "warning", "auth.secret", _set("auth.secret", None)),
    ("TLS_DISABLED", "warning", "sip.tls_enabled", _set("sip.tls_enabled", False)),
    ("TLS_CERT_MISSING", "error", "sip.tls_cert", _set("sip.tls_cert", "/nonexistent/c.pem")),
    ("TLS_KEY_MISSING", "error", "sip.tls_key", _set("sip.tls_key", "/nonexistent/k.pem")),
    ("EXT_DUPLICATE_NUMBER", "error", "extensions.1.number",
     lambda d: d["extensions"].append(dict(d["extensions"][0]))),
    ("EXT_NO_PASSWORD", "warning", "extensions.0.password_env",
     _set("extensions", [{"number": "1001"}])),
    ("EXT_PASSWORD_ENV_UNSET", "warning", "extensions.0.password_env",
     _set("extensions", [{"number": "1001", "password_env": "PBX_EXT_NOT_SET"}])),
    ("PROD_EXAMPLE_VALUE", "warning", "sip.domain", _set("sip.domain", "pbx.example.com")),
    ("PROD_DEFAULT_VALUE", "warning", "sip.domain", _set("sip.domain", "pbx.local")),
    ("PROD_DEBUG_LOGGING", "warning", "logging.level", _set("logging.level", "DEBUG")),
    ("CODEC_NONE_ENABLED", "error", "rtp.codecs", _set("rtp.codecs", [])),
    ("CODEC_NO_G711", "warning", "rtp.codecs", _set("rtp.codecs", ["G722", "telephone-event"])),
    ("SERVER_RTP_RANGE_SMALL", "warning", "rtp.port_max",
     lambda d: (d["rtp"].update(port_max=10049), d["calls"].update(max_calls=10))),
    ("CALLS_SESSION_TIMER_MIN_SE_LOW", "warning", "calls.session_timer.min_se",
     _set("calls.session_timer.min_se", 30)),
]


@pytest.mark.parametrize(("code", "severity", "key", "change"), RULES,
                         ids=[r[0] for r in RULES])
def test_rule_fires_on_its_trigger_only(clean: dict[str, Any], code: str, severity: str,
                                        key: str, change: Callable[[dict[str, Any]], None]
                                        ) -> None:
    assert code not in report_for(clean).codes()
    report = report_for(mutated(clean, change))
    finding = find(report, code)
    assert (finding.severity, finding.key) == (severity, key)
    assert finding.message and finding.fix
    # No other rule is disturbed by the change.
    assert set(report.codes()) == {code}, report.codes()


def test_sqlite_is_fine_in_development(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("database.url", "sqlite:///var/pbx.sqlite3"))
    data["mode"] = "development"
    assert "DB_SQLITE_IN_PRODUCTION" not in report_for(data).codes()


# ---------------------------------------------------------------------------- server


def test_port_collision_needs_shared_address_and_protocol(clean: dict[str, Any]) -> None:
    # Same port on two different addresses does not collide.
    data = mutated(clean, _set("api.port", 5060))
    data["api"]["host"] = "127.0.0.2"  # bindable on Linux: lo is 127.0.0.0/8
    assert "SERVER_PORT_COLLISION" not in report_for(data).codes()
    # TLS and API both use TCP: the same port collides when TLS is on...
    data = mutated(clean, _set("api.port", 5061))
    assert find(report_for(data), "SERVER_PORT_COLLISION").key == "api.port"
    # ...and not when TLS is off (its port is not bound).
    data["sip"]["tls_enabled"] = False
    assert "SERVER_PORT_COLLISION" not in report_for(data).codes()


def test_port_zero_never_collides(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("sip.port", 0))
    data["api"]["port"] = 0
    assert "SERVER_PORT_COLLISION" not in report_for(data).codes()


def test_rtp_capacity_formula_is_four_ports_per_call(clean: dict[str, Any]) -> None:
    assert rtp_call_capacity(10000, 10003) == 1
    assert rtp_call_capacity(10000, 10002) == 0
    assert rtp_call_capacity(10000, 20000) == 2500
    # 400 ports are exactly enough for 100 calls, 398 are not.
    data = mutated(clean, _set("rtp.port_max", 10399))
    assert "SERVER_RTP_RANGE_TOO_SMALL" not in report_for(data).codes()
    data["rtp"]["port_max"] = 10397
    finding = find(report_for(data), "SERVER_RTP_RANGE_TOO_SMALL")
    assert "10399" in finding.fix and "99" in finding.fix


def test_unresolvable_bind_host_is_reported(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("api.host", "no-such-host.invalid"))
    finding = find(report_for(data), "SERVER_BIND_ADDRESS_NOT_LOCAL")
    assert finding.key == "api.host" and "resolvable" in finding.message


def test_wildcard_and_loopback_bind_hosts_pass(clean: dict[str, Any]) -> None:
    for host in ("0.0.0.0", "127.0.0.1", "localhost"):
        data = mutated(clean, _set("sip.host", host))
        assert "SERVER_BIND_ADDRESS_NOT_LOCAL" not in report_for(data).codes(), host


def test_external_ip_all_zeroes_counts_as_unset(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("sip.external_ip", "0.0.0.0"))
    assert "SERVER_EXTERNAL_IP_UNSET" in report_for(data).codes()


# ---------------------------------------------------------------------------- database


def test_database_password_in_config_file_warns_but_env_does_not(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://pbx:Xk29dLq8Wm4z@db.acme.test:5432/pbx"
    cfg = clean_env / "config.yml"
    cfg.write_text(f"database:\n  url: {url}\n")
    report = validate_file(cfg, env_file=None)
    finding = find(report, "DB_PASSWORD_IN_CONFIG_FILE")
    assert "Xk29dLq8Wm4z" not in render_text(report) + render_json(report)
    assert finding.severity == "warning"
    cfg.write_text("mode: development\n")
    monkeypatch.setenv("PBX_DATABASE__URL", url)
    assert "DB_PASSWORD_IN_CONFIG_FILE" not in validate_file(cfg, env_file=None).codes()


def test_connectivity_to_real_postgres_succeeds(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("database.url", PG_DSN))
    report = validate_data(data, environ=ENV, check_connectivity=True)
    assert "DB_CONNECT_FAILED" not in report.codes()
    assert check_database(PG_DSN) is None


def test_connectivity_to_closed_port_is_an_error(clean: dict[str, Any]) -> None:
    url = f"postgresql://pbx:S3cretPassw0rdXY@127.0.0.1:{free_port()}/pbx"
    report = validate_data(mutated(clean, _set("database.url", url)), environ=ENV,
                           check_connectivity=True)
    finding = find(report, "DB_CONNECT_FAILED")
    assert finding.severity == "error" and report.exit_code == EXIT_CONFIG
    assert "S3cretPassw0rdXY" not in finding.message
    assert "refused" in finding.message.lower() or "connect" in finding.message.lower()


def test_connectivity_wrong_database_name_fails() -> None:
    base = PG_DSN.rsplit("/", 1)[0]
    problem = check_database(f"{base}/no_such_database_pbx")
    assert problem is not None and "no_such_database_pbx" in problem


def test_sqlite_connectivity(tmp_path: Path) -> None:
    assert check_database(f"sqlite:///{tmp_path}/new/sub/pbx.sqlite3") is None  # creatable
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    assert "not a database" in (check_database(f"sqlite:///{garbage}") or "")
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    assert check_database(f"sqlite:///{a_file}/db.sqlite3") is not None
    # No file is created by the check.
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- security / TLS


def test_api_token_rules_are_warnings_in_development(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("api.token", None))
    data["mode"] = "development"
    assert find(report_for(data), "API_TOKEN_MISSING").severity == "warning"
    data["api"]["token"] = "short-token"
    assert find(report_for(data), "API_TOKEN_WEAK").severity == "warning"


def test_api_token_weak_message_never_shows_the_token(clean: dict[str, Any]) -> None:
    token = "abcabcabcabcabcabcabcabcabcabcabcabc"
    report = report_for(mutated(clean, _set("api.token", token)))
    assert "API_TOKEN_WEAK" in report.codes()
    assert token not in render_text(report) and token not in render_json(report)


@pytest.mark.parametrize(("which", "code", "severity"), [
    ("expired", "TLS_CERT_EXPIRED", "error"),
    ("expiring", "TLS_CERT_EXPIRING", "warning"),
    ("future", "TLS_CERT_NOT_YET_VALID", "error"),
])
def test_certificate_dates(clean: dict[str, Any], certs: dict[str, tuple[Path, Path]],
                           which: str, code: str, severity: str) -> None:
    cert, key = certs[which]
    data = mutated(clean, _set("sip.tls_cert", str(cert)))
    data["sip"]["tls_key"] = str(key)
    report = report_for(data)
    assert report.codes() == [code]
    assert find(report, code).severity == severity


def test_key_of_another_certificate_is_a_mismatch(clean: dict[str, Any],
                                                  certs: dict[str, tuple[Path, Path]]) -> None:
    data = mutated(clean, _set("sip.tls_key", str(certs["other"][1])))
    assert report_for(data).codes() == ["TLS_KEY_MISMATCH"]


def test_garbage_cert_and_key_files(clean: dict[str, Any], tmp_path: Path,
                                    certs: dict[str, tuple[Path, Path]]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem\n")
    junk.chmod(0o600)
    data = mutated(clean, _set("sip.tls_cert", str(junk)))
    assert report_for(data).codes() == ["TLS_CERT_INVALID"]
    data = mutated(clean, _set("sip.tls_key", str(junk)))
    assert report_for(data).codes() == ["TLS_KEY_INVALID"]


def test_unreadable_and_directory_paths(clean: dict[str, Any], tmp_path: Path) -> None:
    data = mutated(clean, _set("sip.tls_cert", str(tmp_path)))  # a directory
    assert report_for(data).codes() == ["TLS_CERT_UNREADABLE"]


def test_world_readable_private_key_warns(clean: dict[str, Any], tmp_path: Path,
                                          certs: dict[str, tuple[Path, Path]]) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(certs["good"][1].read_bytes())
    key.chmod(0o644)
    data = mutated(clean, _set("sip.tls_key", str(key)))
    assert report_for(data).codes() == ["TLS_KEY_PERMISSIONS"]


def test_tls_files_ignored_when_tls_disabled(clean: dict[str, Any]) -> None:
    data = mutated(clean, _set("sip.tls_cert", "/nonexistent/c.pem"))
    data["sip"]["tls_enabled"] = False
    assert report_for(data).codes() == ["TLS_DISABLED"]


def test_secrets_written_in_config_file_warn(clean_env: Path) -> None:
    cfg = clean_env / "config.yml"
    cfg.write_text(f"api:\n  token: {TOKEN}\nauth:\n  secret: {SECRET}\n")
    report = validate_file(cfg, env_file=None)
    keys = [f.key for f in report.findings if f.code == "SECRET_IN_CONFIG_FILE"]
    assert keys == ["api.token", "auth.secret"]
    text = render_text(report)
    assert TOKEN not in text and SECRET not in text


# ---------------------------------------------------------------------------- extensions


@pytest.mark.parametrize(("password", "code"), [
    ("1001", "EXT_PASSWORD_IS_NUMBER"),
    ("Short1x", "EXT_PASSWORD_TOO_SHORT"),
    ("password1234", "EXT_PASSWORD_COMMON"),
    ("abcdefghijklmn", "EXT_PASSWORD_SEQUENCE"),
    ("xY3xY3xY3xY3xY3", "EXT_PASSWORD_REPEATED"),
    ("Qw9z1001Lm4kTx", "EXT_PASSWORD_CONTAINS_NUMBER"),
    ("aaaabbbbaaaabbbbcc", "EXT_PASSWORD_LOW_VARIETY"),
])
def test_weak_extension_passwords(clean: dict[str, Any], password: str, code: str) -> None:
    report = report_for(clean, {"PBX_EXT_1001_PASSWORD": password})
    finding = find(report, code)
    assert finding.severity == "error"  # production
    if password != "1001":  # the number itself is of course named
        assert password not in render_text(report)
    dev = mutated(clean, _set("mode", "development"))
    assert find(report_for(dev, {"PBX_EXT_1001_PASSWORD": password}), code).severity == "warning"


def test_extension_password_read_from_env_file(clean_env: Path) -> None:
    cfg = clean_env / "config.yml"
    cfg.write_text("extensions:\n  - {number: '1001', password_env: PBX_EXT_1001_PASSWORD}\n")
    env = clean_env / ".env"
    env.write_text("PBX_EXT_1001_PASSWORD=1001\n")
    env.chmod(0o600)
    assert "EXT_PASSWORD_IS_NUMBER" in validate_file(cfg).codes()
    env.write_text(f"PBX_EXT_1001_PASSWORD={EXT_PW}\n")
    codes = validate_file(cfg).codes()
    assert not [c for c in codes if c.startswith("EXT_")]


# ---------------------------------------------------------------------------- readiness


def test_env_file_permissions(clean_env: Path) -> None:
    cfg = clean_env / "config.yml"
    cfg.write_text("mode: development\n")
    env = clean_env / ".env"
    env.write_text(f"PBX_API__TOKEN={TOKEN}\n")
    env.chmod(0o644)
    finding = find(validate_file(cfg), "PROD_ENV_PERMISSIONS")
    assert "0644" in finding.message and "chmod 600" in finding.fix
    env.chmod(0o600)
    assert "PROD_ENV_PERMISSIONS" not in validate_file(cfg).codes()


def test_example_value_in_secret_is_not_echoed(clean: dict[str, Any]) -> None:
    url = "postgresql://pbx:changeme@db.acme.test:5432/pbx"
    report = report_for(mutated(clean, _set("database.url", url)))
    assert "DB_PASSWORD_WEAK" in report.codes()
    assert "changeme" not in render_text(report)


# ---------------------------------------------------------------------------- load errors


def test_file_that_does_not_load_is_reported_as_findings(clean_env: Path) -> None:
    cfg = clean_env / "config.yml"
    cfg.write_text("sip:\n  port: [oops\n")
    report = validate_file(cfg, env_file=None)
    assert report.codes() == ["CONFIG_FILE_INVALID"] and report.exit_code == EXIT_CONFIG
    cfg.write_text("rtp:\n  port_min: 10001\n")
    finding = find(validate_file(cfg, env_file=None), "SERVER_RTP_RANGE_INVALID")
    assert finding.key == "rtp.port_min" and "odd" in finding.message
    cfg.write_text("sip:\n  prot: 5060\n")
    finding = find(validate_file(cfg, env_file=None), "CONFIG_INVALID")
    assert finding.key == "sip.prot" and "port" in finding.fix
    missing = validate_file(clean_env / "nope.yml")
    assert missing.codes() == ["CONFIG_FILE_INVALID"]


def test_env_override_error_names_the_variable(clean_env: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIP__PORT", "70000")
    finding = find(validate_file(None), "SERVER_PORT_INVALID")
    assert "PBX_SIP__PORT" in finding.message


def test_load_warnings_are_carried(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_NOT_A_SETTING", "1")
    report = validate_file(None)
    assert "CONFIG_LOAD_WARNING" in report.codes() and report.ok


def test_validate_accepts_loaded_settings(clean_env: Path) -> None:
    """The start-up path: load_settings then validate."""
    settings = load_settings(None)
    codes = [f.code for f in validate(settings)]
    assert codes == ["SERVER_EXTERNAL_IP_UNSET", "SECURITY_FIPS_DISABLED", "API_TOKEN_MISSING",
                     "TLS_DISABLED"]


def test_repo_config_yml_is_valid() -> None:
    repo_cfg = Path(__file__).resolve().parents[2] / "config.yml"
    report = validate_file(repo_cfg, env_file=None)
    assert report.ok, render_text(report)


# ---------------------------------------------------------------------------- rendering


def test_render_text_format() -> None:
    warn = Finding("warning", "TLS_DISABLED", "sip.tls_enabled", "TLS off", "turn it on")
    err = Finding("error", "SERVER_PORT_COLLISION", "api.port", "clash", "move it")
    assert render_text(ValidationReport([])).splitlines()[-1] == "✓ Configuration is valid"
    text = render_text(ValidationReport([warn]))
    assert "  ⚠ sip.tls_enabled: TLS off [TLS_DISABLED]" in text
    assert "      fix: turn it on" in text
    assert text.splitlines()[-1] == "✓ Configuration is valid (1 warning)"
    text = render_text(ValidationReport([warn, warn, err]))
    assert text.index("Warnings:") < text.index("Errors:")
    assert "  ✗ api.port: clash [SERVER_PORT_COLLISION]" in text
    assert text.splitlines()[-1] == "✗ Configuration has 1 error"
    both = ValidationReport([err, err], Path("/etc/pbx/config.yml"))
    assert render_text(both).splitlines()[0] == "Configuration: /etc/pbx/config.yml"
    assert render_text(both).splitlines()[-1] == "✗ Configuration has 2 errors"


def test_render_json_shape() -> None:
    warn = Finding("warning", "TLS_DISABLED", "sip.tls_enabled", "TLS off", "turn it on")
    err = Finding("error", "SERVER_PORT_COLLISION", "api.port", "clash", "move it")
    data = json.loads(render_json(ValidationReport([warn, err])))
    assert data["valid"] is False and data["exit_code"] == 78
    assert data["errors"] == [err.as_dict()] and data["warnings"] == [warn.as_dict()]
    assert json.loads(render_json(ValidationReport([warn])))["valid"] is True


# ---------------------------------------------------------------------------- passwords


def test_generated_secrets_are_strong_and_distinct() -> None:
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    for pw in passwords:
        assert len(pw) == 20 and check_password(pw) == [] and strength(pw).score == 4
    token = generate_token()
    assert len(token) >= 43 and check_token(token) == []
    assert len(generate_secret()) == 64 and generate_secret() != generate_secret()
    with pytest.raises(ValueError):
        generate_password(8)


def test_strength_scores_rank_passwords() -> None:
    assert strength("").score == 0
    assert strength("password").score == 0
    assert strength("1001", number="1001").score == 0
    assert strength("Short1x").score == 1
    assert strength("Tr0ub4dor-xyz").score >= 3
    assert strength("Summer2024!!").weaknesses[0].code == "COMMON"


def test_token_placeholders_refused() -> None:
    assert [w.code for w in check_token("your-api-token-here-please-change-it")] == []
    assert "COMMON" in [w.code for w in check_token("changeme")]
    assert "LOW_VARIETY" in [w.code for w in check_token("ab" * 20)]


# ---------------------------------------------------------------------------- writer


def test_answer_parsers() -> None:
    assert parse_port("5060") == 5060
    for bad in ("0", "65536", "http", ""):
        with pytest.raises(ValueError):
            parse_port(bad)
    assert parse_port("0", allow_zero=True) == 0
    assert parse_hostname("PBX.Example.org.") == "pbx.example.org"
    assert parse_hostname("::1") == "::1"
    for bad in ("bad host", "-x.com", "1.2.3.999", "", "a..b"):
        with pytest.raises(ValueError):
            parse_hostname(bad)
    assert parse_email("ops@acme.test") == "ops@acme.test"
    for bad in ("ops", "ops@", "ops@acme", "a b@c.d"):
        with pytest.raises(ValueError):
            parse_email(bad)


def test_postgres_url_escapes_credentials() -> None:
    url = postgres_url("db", 5432, "pbx", "us er", "p@ss:/w'rd")
    assert url == "postgresql://us%20er:p%40ss%3A%2Fw%27rd@db:5432/pbx"


def _answers() -> Answers:
    return Answers(domain="pbx.acme.test", external_ip="192.0.2.10", api_token=TOKEN,
                   auth_secret=SECRET,
                   database_url="postgresql://pbx:Xk29dLq8Wm4z@db.acme.test:5432/pbx",
                   extensions=[ExtensionAnswer("1001", "Reception", EXT_PW, True)])


def test_secrets_never_reach_config_yml(tmp_path: Path) -> None:
    result = write_files(_answers(), tmp_path)
    config_text = result.config_path.read_text()
    for secret in (TOKEN, SECRET, EXT_PW, "Xk29dLq8Wm4z"):
        assert secret not in config_text
    env = dotenv_values(result.env_path)
    assert env == {"PBX_API__TOKEN": TOKEN, "PBX_AUTH__SECRET": SECRET,
                   "PBX_DATABASE__URL": "postgresql://pbx:Xk29dLq8Wm4z@db.acme.test:5432/pbx",
                   "PBX_EXT_1001_PASSWORD": EXT_PW}
    assert stat.S_IMODE(result.env_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.config_path.stat().st_mode) == 0o644
    assert result.backups == ()


def test_written_files_load_and_match_the_answers(tmp_path: Path) -> None:
    answers = _answers()
    answers.database_url = ""  # SQLite, so no server is needed
    result = write_files(answers, tmp_path)
    settings = load_settings(result.config_path)
    assert settings.api.token is not None and settings.api.token.get_secret_value() == TOKEN
    assert settings.extensions[0].password_env == "PBX_EXT_1001_PASSWORD"
    data, environ = validation_input(answers)
    from_file = [f.code for f in validate_file(result.config_path).findings]
    from_answers = validate_data(data, environ=environ).codes()
    assert from_file == from_answers  # the wizards predict exactly what the PBX will say


def test_existing_files_are_backed_up_with_their_modes(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("old: config\n")
    (tmp_path / ".env").write_text("PBX_API__TOKEN=old\nOTHER_TOOL=keep me\n")
    (tmp_path / ".env").chmod(0o644)
    result = write_files(_answers(), tmp_path)
    assert len(result.backups) == 2
    by_name = {b.name.split(".bak-")[0]: b for b in result.backups}
    assert by_name["config.yml"].read_text() == "old: config\n"
    assert stat.S_IMODE(by_name[".env"].stat().st_mode) == 0o600  # narrowed, holds secrets
    env = dotenv_values(result.env_path)
    assert env["OTHER_TOOL"] == "keep me" and env["PBX_API__TOKEN"] == TOKEN
    again = write_files(_answers(), tmp_path)  # same second: names stay unique
    assert len(set(again.backups) | set(result.backups)) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_env_values_with_special_characters_round_trip(tmp_path: Path) -> None:
    values = {"A": "plain", "B": "with space", "C": "quote'and\\slash", "D": 'dq"#hash'}
    path = tmp_path / ".env"
    path.write_text(render_env(values))
    assert dotenv_values(path) == values
    with pytest.raises(ValueError):
        render_env({"E": "line\nbreak"})


def test_config_data_for_fips_drops_md5() -> None:
    answers = _answers()
    answers.fips_mode = True
    assert config_data(answers)["auth"]["algorithms"] == ["SHA-256"]
