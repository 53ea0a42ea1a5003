"""Tests for pbx.config: sources, precedence, validation and error text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from pbx.config import (
    ConfigError,
    LogLevel,
    Settings,
    collect_warnings,
    describe_sources,
    env_var_name,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-T0ken-value"
DB_PASSWORD = "db-Pa55word-xyz"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate from the developer's environment: no PBX_* vars, cwd = empty tmp dir."""
    for name in list(os.environ):
        if name.upper().startswith("PBX_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_without_file(clean_env: Path) -> None:
    s = load_settings()
    assert s.config_file is None
    assert (s.sip.host, s.sip.port, s.sip.tls_port, s.sip.tls_enabled) == ("0.0.0.0", 5060, 5061,
                                                                         False)
    assert (s.api.host, s.api.port, s.api.token) == ("0.0.0.0", 8080, None)
    assert (s.rtp.port_min, s.rtp.port_max) == (10000, 20000)
    assert s.data_dir == Path("var")
    assert s.database_url == "sqlite:///var/pbx.sqlite3"
    assert s.database.url == s.database_url
    assert s.sqlite_path == Path("var/pbx.sqlite3")
    assert s.mode == "development"
    assert s.logging.level is LogLevel.INFO
    assert s.logging.format == "text"
    assert (s.sip.timers.t1, s.sip.timers.t2, s.sip.timers.t4) == (0.5, 4.0, 5.0)
    assert (s.lifecycle.drain_timeout, s.lifecycle.stop_timeout, s.lifecycle.retry_after) == (
        30.0, 5.0, 30)
    assert (s.calls.max_calls, s.calls.ring_timeout, s.calls.media_timeout) == (100, 30.0, 60.0)
    assert s.sip.domain == s.sip.realm == "pbx.local"
    assert s.settings_warnings == []


def test_repo_config_yml_matches_defaults_and_has_no_secrets(clean_env: Path) -> None:
    """The shipped config.yml documents the defaults; it must not drift or carry secrets."""
    s = load_settings(REPO_ROOT / "config.yml", env_file=None)
    assert s.config_file == REPO_ROOT / "config.yml"
    assert s.model_dump() == Settings().model_dump()
    assert s.settings_warnings == []
    sources = describe_sources(s)
    assert sources["sip.port"].startswith("file")
    assert sources["api.token"] == "default"


def test_data_dir_drives_derived_sqlite_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_DATA_DIR", "/srv/pbx")
    s = load_settings()
    assert s.data_dir == Path("/srv/pbx")
    assert s.database_url == "sqlite:////srv/pbx/pbx.sqlite3"
    assert s.sqlite_path == Path("/srv/pbx/pbx.sqlite3")
    assert describe_sources(s)["data_dir"] == "env (PBX_DATA_DIR)"


# --------------------------------------------------------------------------- file loading


def test_file_values_are_loaded(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", """
mode: production
sip:
  port: 5070
  domain: example.org
  timers: {t1: 1.0}
rtp: {port_min: 30000, port_max: 31000}
logging: {level: debug, format: json}
calls: {max_calls: 7}
""")
    s = load_settings(cfg)
    assert s.config_file == cfg
    assert s.mode == "production" and s.is_production
    assert s.sip.port == 5070
    assert s.sip.host == "0.0.0.0"  # untouched keys keep defaults
    assert s.sip.realm == "example.org"  # realm follows domain when unset
    assert s.sip.timers.t1 == 1.0 and s.sip.timers.t2 == 4.0
    assert (s.rtp.port_min, s.rtp.port_max) == (30000, 31000)
    assert s.logging.level is LogLevel.DEBUG and s.logging.format == "json"
    assert s.calls.max_calls == 7
    assert describe_sources(s)["sip.port"] == f"file ({cfg} line 4)"


def test_implicit_config_yml_in_cwd_is_used(clean_env: Path) -> None:
    write(clean_env / "config.yml", "sip:\n  port: 5999\n")
    s = load_settings()
    assert s.sip.port == 5999
    assert s.config_file == clean_env / "config.yml"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "c.yml", "# only a comment\n"))
    assert s.sip.port == 5060


def test_pbx_config_env_selects_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: Path
) -> None:
    write(clean_env / "config.yml", "sip:\n  port: 5111\n")
    chosen = write(tmp_path / "elsewhere" / "pbx.yml", "sip:\n  port: 5222\n")
    monkeypatch.setenv("PBX_CONFIG", str(chosen))
    assert load_settings().sip.port == 5222
    # An explicit argument beats $PBX_CONFIG.
    assert load_settings(clean_env / "config.yml").sip.port == 5111


def test_explicit_missing_file_is_error(tmp_path: Path) -> None:
    err = load_error(tmp_path / "missing.yml")
    assert "missing.yml" in str(err)
    assert "does not exist" in str(err)


def test_pbx_config_pointing_to_missing_file_is_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PBX_CONFIG", str(tmp_path / "gone.yml"))
    err = load_error()
    assert "gone.yml" in str(err)


def test_directory_as_config_is_error(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert "directory" in str(err)


# --------------------------------------------------------------------------- env overrides

BASE_FILE = """
data_dir: file-dir
sip: {host: 10.0.0.1, port: 5070, tls_port: 5071}
rtp: {port_min: 30000, port_max: 31000}
api: {host: 127.0.0.1, port: 9000}
database: {url: "sqlite:///file.sqlite3"}
"""


@pytest.mark.parametrize(
    ("var", "value", "getter", "expected"),
    [
        ("PBX_SIP__HOST", "192.0.2.10", lambda s: s.sip.host, "192.0.2.10"),
        ("PBX_SIP__PORT", "5080", lambda s: s.sip.port, 5080),
        ("PBX_SIP__TLS_PORT", "5081", lambda s: s.sip.tls_port, 5081),
        ("PBX_RTP__PORT_MIN", "30100", lambda s: s.rtp.port_min, 30100),
        ("PBX_RTP__PORT_MAX", "30900", lambda s: s.rtp.port_max, 30900),
        ("PBX_API__HOST", "0.0.0.0", lambda s: s.api.host, "0.0.0.0"),
        ("PBX_API__PORT", "9100", lambda s: s.api.port, 9100),
        ("PBX_API__TOKEN", SECRET, lambda s: s.api.token and s.api.token.get_secret_value(),
         SECRET),
        ("PBX_DATABASE__URL", "postgresql://pbx:pw@db:5432/pbx", lambda s: s.database_url,
         "postgresql://pbx:pw@db:5432/pbx"),
        ("PBX_DATABASE__URL", "sqlite:////tmp/x.sqlite3", lambda s: s.database_url,
         "sqlite:////tmp/x.sqlite3"),
        ("PBX_DATA_DIR", "/data", lambda s: s.data_dir, Path("/data")),
        ("pbx_sip__port", "5090", lambda s: s.sip.port, 5090),  # case-insensitive
    ],
)
def test_env_overrides_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    var: str, value: str, getter: object, expected: object,
) -> None:
    cfg = write(tmp_path / "c.yml", BASE_FILE)
    baseline = getter(load_settings(cfg))  # type: ignore[operator]
    assert baseline != expected
    monkeypatch.setenv(var, value)
    s = load_settings(cfg)
    assert getter(s) == expected  # type: ignore[operator]
    # Overriding one key keeps the other file values of the same section.
    if var.upper().startswith("PBX_SIP__") and var.upper() != "PBX_SIP__HOST":
        assert s.sip.host == "10.0.0.1"


def test_env_override_of_nested_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIP__TIMERS__T2", "8")
    monkeypatch.setenv("PBX_LOGGING__LEVEL", "warning")
    monkeypatch.setenv("PBX_MODE", "Production")
    s = load_settings()
    assert s.sip.timers.t2 == 8.0
    assert s.logging.level is LogLevel.WARNING
    assert s.mode == "production"


def test_empty_env_var_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yml", "sip: {port: 5070}\n")
    monkeypatch.setenv("PBX_SIP__PORT", "")
    monkeypatch.setenv("PBX_API__TOKEN", "")
    s = load_settings(cfg)
    assert s.sip.port == 5070
    assert s.api.token is None


# --------------------------------------------------------------------------- .env


def test_dotenv_next_to_config_is_loaded(tmp_path: Path) -> None:
    cfg = write(tmp_path / "conf" / "pbx.yml", "sip: {port: 5070}\n")
    write(tmp_path / "conf" / ".env", f"PBX_SIP__PORT=5075\nPBX_API__TOKEN={SECRET}\n"
                                      "PBX_CONFIG=ignored.yml\nUNRELATED=1\n")
    s = load_settings(cfg)
    assert s.sip.port == 5075  # .env beats the file
    assert s.api.token is not None and s.api.token.get_secret_value() == SECRET
    assert s.env_file == tmp_path / "conf" / ".env"
    assert describe_sources(s)["api.token"] == ".env (PBX_API__TOKEN)"
    assert s.settings_warnings == []  # a token from .env is the right place


def test_dotenv_in_cwd_used_with_implicit_config(clean_env: Path) -> None:
    write(clean_env / ".env", "PBX_API__PORT=8181\n")
    assert load_settings().api.port == 8181


def test_real_env_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", "")
    write(tmp_path / ".env", "PBX_SIP__PORT=5075\nPBX_API__PORT=8181\n")
    monkeypatch.setenv("PBX_SIP__PORT", "5099")
    s = load_settings(cfg)
    assert s.sip.port == 5099
    assert s.api.port == 8181  # not overridden by the real env: .env still applies
    assert describe_sources(s)["sip.port"] == "env (PBX_SIP__PORT)"


def test_dotenv_can_be_disabled_or_chosen(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", "")
    write(tmp_path / ".env", "PBX_SIP__PORT=5075\n")
    other = write(tmp_path / "other.env", "PBX_SIP__PORT=5076\n")
    assert load_settings(cfg, env_file=None).sip.port == 5060
    assert load_settings(cfg, env_file=other).sip.port == 5076


def test_dotenv_value_errors_are_attributed(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", "")
    write(tmp_path / ".env", "PBX_API__PORT=http\n")
    err = load_error(cfg)
    assert [e.key for e in err.errors] == ["api.port"]
    assert "PBX_API__PORT" in (err.errors[0].source or "")
    assert ".env" in (err.errors[0].source or "")


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_key_and_suggests(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", "sip:\n  host: 0.0.0.0\n  prot: 5070\n")
    err = load_error(cfg)
    assert len(err.errors) == 1
    issue = err.errors[0]
    assert issue.key == "sip.prot"
    assert "unknown key `sip.prot`" in issue.message
    assert "`sip.port`" in issue.fix
    assert issue.source == "pbx.yml line 3"
    assert err.as_dicts()[0] == {"key": "sip.prot", "message": issue.message, "fix": issue.fix,
                                 "source": "pbx.yml line 3"}
    text = str(err)
    assert "sip.prot" in text and "did you mean `sip.port`" in text
    assert "Traceback" not in text


def test_unknown_top_level_key_suggests_section_key(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "sipp: {}\nmax_calls: 5\n"))
    by_key = {e.key: e for e in err.errors}
    assert set(by_key) == {"sipp", "max_calls"}
    assert "`sip`" in by_key["sipp"].fix
    assert "`calls.max_calls`" in by_key["max_calls"].fix


def test_unknown_env_key_inside_section_is_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIP__PROT", "5070")
    err = load_error()
    assert err.errors[0].key == "sip.prot"
    assert err.errors[0].source == "PBX_SIP__PROT"
    assert "sip.prot (from PBX_SIP__PROT)" in str(err)


def test_unknown_env_section_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIPP__PORT", "5070")
    s = load_settings()
    assert s.sip.port == 5060
    assert any("PBX_SIPP__PORT" in w and "PBX_SIP__PORT" in w for w in s.settings_warnings)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "sip:\n  port: fivethousand\n"))
    issue = err.errors[0]
    assert issue.key == "sip.port"
    assert "integer" in issue.message and "'fivethousand'" in issue.message
    assert "between 1 and 65535" in issue.fix
    assert "sip.port" in str(err) and "between 1 and 65535" in str(err)


def test_wrong_type_from_env_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_SIP__PORT", "abc")
    err = load_error()
    assert err.errors[0].key == "sip.port"
    assert "sip.port (from PBX_SIP__PORT)" in str(err)


def test_out_of_range_port(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "api: {port: 70000}\n"))
    assert err.errors[0].key == "api.port"
    assert "65535" in err.errors[0].message


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "sip: 5060\n"))
    assert err.errors[0].key == "sip"
    assert "mapping" in err.errors[0].message


def test_bad_enum_values(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml",
                           "logging: {level: verbose, format: xml}\nmode: staging\n"))
    keys = {e.key for e in err.errors}
    assert keys == {"logging.level", "logging.format", "mode"}
    assert "DEBUG" in str(err) and "json" in str(err) and "production" in str(err)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "sip: {port: x}\napi: {port: y}\n"))
    assert {e.key for e in err.errors} == {"sip.port", "api.port"}
    assert "2 problems" in str(err)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "broken.yml", "sip:\n  port: 5060\n   host: x\n")
    err = load_error(cfg)
    text = str(err)
    assert "broken.yml" in text
    assert "line 3" in text
    assert "Traceback" not in text


def test_unclosed_bracket_yaml(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "b.yml", "a: 1\nsip: {port: 5060\n"))
    assert "b.yml" in str(err) and "invalid YAML" in str(err)


@pytest.mark.parametrize("body", ["- sip\n- api\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, body: str) -> None:
    err = load_error(write(tmp_path / "t.yml", body))
    assert "top level must be a mapping" in str(err)


# --------------------------------------------------------------------------- validation rules


@pytest.mark.parametrize(
    ("rtp", "key", "words"),
    [
        ({"port_min": 1000, "port_max": 2000}, "rtp.port_min", "1024"),
        ({"port_min": 20000, "port_max": 20000}, "rtp.port_min", "lower than"),
        ({"port_min": 30000, "port_max": 20000}, "rtp.port_min", "lower than"),
        ({"port_min": 10001, "port_max": 20000}, "rtp.port_min", "odd"),
        ({"port_min": 10000, "port_max": 70000}, "rtp.port_max", "65535"),
    ],
)
def test_rtp_range_rules(tmp_path: Path, rtp: dict[str, int], key: str, words: str) -> None:
    cfg = write(tmp_path / "pbx.yml", json.dumps({"rtp": rtp}))
    err = load_error(cfg)
    assert [e.key for e in err.errors] == [key]
    assert words in err.errors[0].message
    assert err.errors[0].fix


def test_rtp_range_edges_accepted(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "pbx.yml", "rtp: {port_min: 1024, port_max: 65535}\n"))
    assert (s.rtp.port_min, s.rtp.port_max) == (1024, 65535)


def test_rtp_rule_applies_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_RTP__PORT_MAX", "9000")
    err = load_error()
    assert err.errors[0].key == "rtp.port_min"


@pytest.mark.parametrize(
    ("timers", "key"),
    [({"t1": 0}, "sip.timers.t1"), ({"t1": 2, "t2": 1}, "sip.timers.t2"),
     ({"t4": -1}, "sip.timers.t4")],
)
def test_timer_rules(tmp_path: Path, timers: dict[str, float], key: str) -> None:
    err = load_error(write(tmp_path / "pbx.yml", json.dumps({"sip": {"timers": timers}})))
    assert [e.key for e in err.errors] == [key]


def test_tls_enabled_requires_cert_and_key(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "sip: {tls_enabled: true}\n"))
    assert err.errors[0].key == "sip.tls_cert"
    assert "tls_key" in err.errors[0].message
    ok = load_settings(write(tmp_path / "ok.yml",
                             "sip: {tls_enabled: true, tls_cert: c.pem, tls_key: k.pem}\n"))
    assert ok.sip.tls_cert == Path("c.pem")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite://", "sqlite:///", "not a url"])
def test_bad_database_url(tmp_path: Path, url: str) -> None:
    err = load_error(write(tmp_path / "pbx.yml", json.dumps({"database": {"url": url}})))
    assert err.errors[0].key == "database.url"
    assert "postgresql://" in err.errors[0].fix


def test_pool_bounds(tmp_path: Path) -> None:
    err = load_error(write(tmp_path / "pbx.yml", "database: {pool_min: 5, pool_max: 2}\n"))
    assert err.errors[0].key == "database.pool_max"


# --------------------------------------------------------------------------- secrets


def test_secret_not_in_error_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBX_API__TOKEN", SECRET)
    monkeypatch.setenv("PBX_DATABASE__URL", f"mysql://pbx:{DB_PASSWORD}@db/pbx")
    cfg = write(tmp_path / "pbx.yml", f"""
sip: {{port: bad}}
api: {{tokn: {SECRET}}}
database: {{pool_min: [{DB_PASSWORD}]}}
""")
    err = load_error(cfg)
    text = str(err) + repr(err) + repr(err.errors) + json.dumps(err.as_dicts())
    assert {e.key for e in err.errors} >= {"sip.port", "api.tokn", "database.url"}
    assert SECRET not in text
    assert DB_PASSWORD not in text


def test_wrong_typed_secret_is_masked(tmp_path: Path) -> None:
    # A numeric token is a type error (YAML int, not a string); its value must not leak.
    cfg = write(tmp_path / "pbx.yml", "api:\n  token: 987654321987\n")
    err = load_error(cfg)
    assert err.errors[0].key == "api.token"
    assert "987654321987" not in str(err)
    assert "***" in str(err)


def test_db_url_password_masked_in_type_error(tmp_path: Path) -> None:
    # The value is shown (it helps), but its password is masked.
    cfg = write(tmp_path / "pbx.yml", f'data_dir: [1]\ndatabase: {{pool_max: "x:{DB_PASSWORD}"}}\n')
    err = load_error(cfg)
    assert DB_PASSWORD in str(err)  # not a URL and not a secret key: shown as-is
    cfg2 = write(tmp_path / "pbx2.yml",
                 f'database: {{pool_max: "postgresql://u:{DB_PASSWORD}@h/db"}}\n')
    err2 = load_error(cfg2)
    assert DB_PASSWORD not in str(err2)
    assert "postgresql://u:***@h/db" in str(err2)


def test_redacted_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBX_API__TOKEN", SECRET)
    monkeypatch.setenv("PBX_DATABASE__URL", f"postgresql://pbx:{DB_PASSWORD}@db:5432/pbx")
    s = load_settings()
    red = s.redacted()
    dumped = json.dumps(red)  # must be JSON-able
    assert SECRET not in dumped and DB_PASSWORD not in dumped
    assert red["api"]["token"] == "***"
    assert red["database"]["url"] == "postgresql://pbx:***@db:5432/pbx"
    assert red["sip"]["port"] == 5060 and red["data_dir"] == "var"
    # The real values are still available to the code that needs them.
    assert isinstance(s.api.token, SecretStr) and s.api.token.get_secret_value() == SECRET
    assert DB_PASSWORD in s.database_url
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert DB_PASSWORD not in repr(s) and DB_PASSWORD not in str(s)


def test_redacted_keeps_unset_token_visible() -> None:
    assert load_settings().redacted()["api"]["token"] is None


def test_secrets_in_file_load_with_warnings(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pbx.yml", f"""
api: {{token: {SECRET}}}
database: {{url: "postgresql://pbx:{DB_PASSWORD}@db/pbx"}}
""")
    s = load_settings(cfg, env_file=None)
    assert s.api.token is not None and s.api.token.get_secret_value() == SECRET
    warnings = s.settings_warnings
    assert any("api.token" in w and "PBX_API__TOKEN" in w for w in warnings)
    assert any("database.url" in w and "password" in w for w in warnings)
    assert not any(SECRET in w or DB_PASSWORD in w for w in warnings)
    assert collect_warnings(s) == warnings


def test_db_url_without_password_in_file_is_fine(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "pbx.yml", 'database: {url: "postgresql://pbx@db/pbx"}\n'))
    assert s.settings_warnings == []
    assert s.database.kind == "postgresql"


def test_duplicate_yaml_key_warns(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path / "pbx.yml", "sip:\n  port: 5070\n  port: 5080\n"))
    assert s.sip.port == 5080
    assert any("duplicate key `sip.port`" in w for w in s.settings_warnings)


# --------------------------------------------------------------------------- misc


def test_loads_are_independent_in_one_process(tmp_path: Path) -> None:
    a = load_settings(write(tmp_path / "a.yml", "sip: {port: 5001}\n"))
    b = load_settings(write(tmp_path / "b.yml", "sip: {port: 5002}\n"))
    assert (a.sip.port, b.sip.port) == (5001, 5002)
    assert Settings().sip.port == 5060  # direct construction never sees a file


def test_env_var_name() -> None:
    assert env_var_name("sip.timers.t1") == "PBX_SIP__TIMERS__T1"
    assert env_var_name("data_dir") == "PBX_DATA_DIR"


def test_describe_sources_covers_every_key() -> None:
    sources = describe_sources(load_settings())
    assert sources["database.url"] == "derived"
    assert sources["sip.port"] == "default"
    assert {"sip.timers.t1", "rtp.port_max", "api.token", "calls.max_calls", "data_dir",
            "mode", "lifecycle.retry_after", "logging.format"} <= set(sources)
    assert "sip" not in sources and "sip.timers" not in sources  # leaves only


@pytest.mark.parametrize(
    ("body", "key", "suggestion"),
    [
        ("sip: {t1: 1}\n", "sip.t1", "`sip.timers.t1`"),
        ("sip: {port_min: 1}\n", "sip.port_min", "`rtp.port_min`"),
        ("prot: 1\n", "prot", "`sip.port`"),
        ("api: {tokenn: x}\n", "api.tokenn", "`api.token`"),
    ],
)
def test_unknown_key_suggestions(tmp_path: Path, body: str, key: str, suggestion: str) -> None:
    err = load_error(write(tmp_path / "pbx.yml", body))
    assert err.errors[0].key == key
    assert suggestion in err.errors[0].fix
