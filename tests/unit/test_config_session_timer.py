"""calls.session_timer: defaults (RFC 4028), bounds with fix hints, min_se <= expires,
and that the B2BUA gets what the file says (no setting that does nothing)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pbx.config import ConfigError, load_settings
from pbx.config.model import Settings


@pytest.fixture(autouse=True)
def _no_pbx_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    for name in list(os.environ):
        if name.upper().startswith("PBX_"):
            monkeypatch.delenv(name)


def test_defaults_are_rfc_4028s() -> None:
    timer = Settings().calls.session_timer
    assert (timer.enabled, timer.expires, timer.min_se) == (True, 1800, 90)


def _load(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "config.yml"
    path.write_text("calls:\n  session_timer:\n" + body, encoding="utf-8")
    return load_settings(path)


def test_min_se_above_expires_is_refused_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "    expires: 100\n    min_se: 120\n")
    text = str(info.value)
    assert "calls.session_timer.min_se" in text and "expires" in text


@pytest.mark.parametrize("body", ["    min_se: 5\n", "    expires: 100000\n",
                                  "    expires: soon\n"])
def test_out_of_range_values_are_refused(tmp_path: Path, body: str) -> None:
    with pytest.raises(ConfigError):
        _load(tmp_path, body)


def test_the_b2bua_gets_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pbx.calls import wiring

    settings = _load(tmp_path, "    enabled: false\n    expires: 600\n    min_se: 120\n")
    captured: dict[str, object] = {}

    class FakeB2BUA:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.session_timer = None
            self.call_ended_hooks: list[object] = []

        def install(self) -> None:
            captured["policy"] = self.session_timer

    lifecycle = SimpleNamespace(subscribe=lambda _f: None, active_work=None,
                                work_finished=lambda: None)
    service = SimpleNamespace(settings=settings, reactor=None, transactions=None,
                              endpoint=None, location=None,
                              registrar=SimpleNamespace(authenticator=None),
                              credentials=None, store=None, node="n", lifecycle=lifecycle)
    monkeypatch.setattr(wiring, "B2BUA", FakeB2BUA)
    wiring.install_calls(service)
    policy = captured["policy"]
    assert (policy.enabled, policy.expires, policy.min_se) == (False, 600, 120)  # type: ignore[attr-defined]
