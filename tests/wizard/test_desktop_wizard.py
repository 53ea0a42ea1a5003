"""The desktop wizard on a real (offscreen) Qt widget tree, driven like an operator.

No pytest-qt: a module-wide QApplication, real clicks through ``QTest`` and direct widget
calls; the event loop is pumped while waiting for the worker thread of Test connection.
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before anything imports Qt

import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dotenv import dotenv_values
from PySide6.QtCore import QPoint, Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QAbstractButton, QApplication, QLabel, QWidget, QWizard

from pbx.config.validation import check_database, validate_file
from pbx.config.writer import detect_local_addresses
from tests.conftest import IN_CI
from wizard.app import PAGE_NAMES, PbxWizard

PG_DSN = os.environ.get("PBX_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app() -> QApplication:
    instance = QApplication.instance() or QApplication([])
    assert isinstance(instance, QApplication)
    return instance


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PBX_") and name != "PBX_TEST_POSTGRES_DSN":
            monkeypatch.delenv(name)


@pytest.fixture
def wiz(app: QApplication, tmp_path: Path) -> Iterator[PbxWizard]:
    wizard = PbxWizard(tmp_path / "out")
    wizard.show()
    app.processEvents()
    yield wizard
    wizard.close()
    wizard.deleteLater()
    app.processEvents()


@pytest.fixture(scope="module")
def postgres() -> str:
    problem = check_database(PG_DSN)
    if problem:
        message = f"PostgreSQL at {PG_DSN} is not reachable: {problem}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return PG_DSN


def pump_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        QApplication.processEvents()
        time.sleep(0.01)


def next_button(w: PbxWizard) -> QWidget:
    return w.button(QWizard.WizardButton.NextButton)


def click_next(w: PbxWizard) -> None:
    before = w.currentId()
    assert next_button(w).isEnabled(), w.currentPage().problems.text()
    QTest.mouseClick(next_button(w), Qt.MouseButton.LeftButton)
    QApplication.processEvents()
    assert w.currentId() == before + 1


def page_name(w: PbxWizard) -> str:
    return w.currentPage().objectName().removeprefix("page-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def click_toggle(button: QAbstractButton) -> None:
    """Click a radio/check box on its indicator (the middle of a wide one is empty space)."""
    QTest.mouseClick(button, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(8, button.height() // 2))


def fill_database(w: PbxWizard, dsn: str, port: int | None = None) -> None:
    db = w.pages["database"]
    parts = urlsplit(dsn)
    click_toggle(db.postgres)
    assert db.postgres.isChecked() and db.pg_box.isEnabled()
    db.host.setText(parts.hostname or "127.0.0.1")
    db.port.setValue(port or parts.port or 5432)
    db.name.setText(parts.path.lstrip("/"))
    db.user.setText(parts.username or "postgres")
    db.password.setText(parts.password or "")


def run_connection_test(w: PbxWizard) -> str:
    db = w.pages["database"]
    QTest.mouseClick(db.test_button, Qt.MouseButton.LeftButton)
    pump_until(lambda: db.test_button.isEnabled(), timeout=15)
    return db.test_result.text()


# ---------------------------------------------------------------------------- full run


def test_fill_every_page_and_finish_writes_files(wiz: PbxWizard, postgres: str) -> None:
    assert page_name(wiz) == "welcome"
    welcome = wiz.pages["welcome"]
    assert welcome.mode.currentText() == "production"
    QTest.keyClicks(welcome.email, "ops@acme.test")
    click_next(wiz)

    assert page_name(wiz) == "network"
    net = wiz.pages["network"]
    net.domain.setText("pbx.acme.test")
    net.external_ip.setCurrentText("192.0.2.10")
    net.sip_port.setValue(5070)
    click_next(wiz)

    assert page_name(wiz) == "database"
    fill_database(wiz, postgres)
    assert run_connection_test(wiz) == "✓ Connected"
    assert wiz.answers.database_url.startswith("postgresql://")
    click_next(wiz)

    assert page_name(wiz) == "security"
    sec = wiz.pages["security"]
    token = sec.token.text()
    assert len(token) >= 43 and token == wiz.generated_token
    assert sec.token.echoMode() == sec.token.EchoMode.Password  # hidden until asked
    click_toggle(sec.show_token)
    assert sec.token.echoMode() == sec.token.EchoMode.Normal
    click_next(wiz)

    assert page_name(wiz) == "extensions"
    ext = wiz.pages["extensions"]
    QTest.mouseClick(ext.add_button, Qt.MouseButton.LeftButton)
    QTest.mouseClick(ext.add_button, Qt.MouseButton.LeftButton)
    assert [ext.table.item(r, 0).text() for r in range(2)] == ["1001", "1002"]
    ext.table.item(0, 1).setText("Reception")
    assert ext.meter.value() == 4 and ext.meter_label.text() == "strong"
    passwords = {ext.table.item(r, 0).text(): ext.table.item(r, 2).text() for r in range(2)}
    click_next(wiz)

    assert page_name(wiz) == "review"
    review = wiz.pages["review"]
    assert review.results.toPlainText().splitlines()[-1].startswith("✓ Configuration is valid")
    click_next(wiz)

    assert page_name(wiz) == "write"
    write = wiz.pages["write"]
    shown = write.secrets.toPlainText()
    assert f"API token: {token}" in shown
    for number, pw in passwords.items():
        assert f"Extension {number} password: {pw}" in shown
    finish = wiz.button(QWizard.WizardButton.FinishButton)
    assert finish.isVisible() and finish.isEnabled()
    QTest.mouseClick(finish, Qt.MouseButton.LeftButton)
    QApplication.processEvents()

    out = wiz.output_dir
    assert wiz.result_files is not None and not wiz.isVisible()
    assert stat.S_IMODE((out / ".env").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "config.yml").stat().st_mode) == 0o644
    env = dotenv_values(out / ".env")
    assert env["PBX_API__TOKEN"] == token
    assert env["PBX_EXT_1001_PASSWORD"] == passwords["1001"]
    config = (out / "config.yml").read_text()
    assert "port: 5070" in config and "name: Reception" in config
    assert token not in config and passwords["1001"] not in config
    report = validate_file(out / "config.yml", check_connectivity=True)
    assert report.ok, report.codes()


# ---------------------------------------------------------------------------- invalid input


def go_to(w: PbxWizard, name: str) -> None:
    while page_name(w) != name:
        click_next(w)


def problems(w: PbxWizard) -> QLabel:
    label = w.currentPage().problems
    assert isinstance(label, QLabel)
    return label


def test_invalid_network_input_keeps_next_disabled_with_a_message(wiz: PbxWizard) -> None:
    go_to(wiz, "network")
    net = wiz.pages["network"]
    assert next_button(wiz).isEnabled() and not problems(wiz).isVisible()

    net.api_port.setValue(net.sip_port.value())
    assert not next_button(wiz).isEnabled()
    assert problems(wiz).isVisible() and "already used by sip.port" in problems(wiz).text()
    net.api_port.setValue(8080)
    assert next_button(wiz).isEnabled() and not problems(wiz).isVisible()

    net.domain.setText("bad domain!")
    assert not next_button(wiz).isEnabled()
    assert "not a valid host name" in problems(wiz).text()
    net.domain.setText("pbx.acme.test")

    net.rtp_min.setValue(10001)
    assert not next_button(wiz).isEnabled() and "odd" in problems(wiz).text()
    net.rtp_min.setValue(10000)
    net.max_calls.setValue(5000)
    assert not next_button(wiz).isEnabled() and "each call needs 4 ports" in problems(wiz).text()
    net.max_calls.setValue(100)
    assert next_button(wiz).isEnabled()


def test_invalid_email_blocks_welcome(wiz: PbxWizard) -> None:
    welcome = wiz.pages["welcome"]
    welcome.email.setText("ops@")
    assert not next_button(wiz).isEnabled()
    assert "not an e-mail address" in problems(wiz).text()
    welcome.email.setText("")
    assert next_button(wiz).isEnabled()


def test_security_page_refuses_weak_token_and_missing_tls_files(wiz: PbxWizard,
                                                                tmp_path: Path) -> None:
    go_to(wiz, "security")
    sec = wiz.pages["security"]
    sec.token.setText("changeme")
    assert not next_button(wiz).isEnabled() and "token refused" in problems(wiz).text()
    QTest.mouseClick(sec.generate_button, Qt.MouseButton.LeftButton)
    assert next_button(wiz).isEnabled() and sec.token.text() != "changeme"
    sec.tls.setChecked(True)
    assert not next_button(wiz).isEnabled()
    assert "choose the certificate" in problems(wiz).text()
    sec.cert.setText(str(tmp_path / "missing-cert.pem"))
    sec.key.setText(str(tmp_path / "missing-key.pem"))
    assert not next_button(wiz).isEnabled()
    assert "missing-cert.pem does not exist" in problems(wiz).text()
    sec.tls.setChecked(False)
    sec.fips.setChecked(True)
    assert next_button(wiz).isEnabled()
    assert wiz.answers.fips_mode


def test_extensions_page_refuses_weak_and_duplicate(wiz: PbxWizard) -> None:
    go_to(wiz, "extensions")
    ext = wiz.pages["extensions"]
    ext.add_extension()
    ext.add_extension()
    assert next_button(wiz).isEnabled()
    ext.table.item(1, 2).setText("password123")
    assert not next_button(wiz).isEnabled()
    assert "password refused" in problems(wiz).text()
    ext.table.setCurrentCell(1, 2)
    assert ext.meter.value() == 0 and "common" in ext.meter_label.text()
    QTest.mouseClick(ext.regen_button, Qt.MouseButton.LeftButton)
    assert next_button(wiz).isEnabled() and ext.meter.value() == 4
    ext.table.item(1, 0).setText("1001")
    assert not next_button(wiz).isEnabled()
    assert "defined twice" in problems(wiz).text()
    ext.table.setCurrentCell(1, 0)
    QTest.mouseClick(ext.remove_button, Qt.MouseButton.LeftButton)
    assert ext.table.rowCount() == 1 and next_button(wiz).isEnabled()


def test_review_errors_block_finish(wiz: PbxWizard) -> None:
    go_to(wiz, "review")
    review = wiz.pages["review"]
    assert next_button(wiz).isEnabled()
    wiz.answers.api_port = wiz.answers.sip_port  # as if an earlier page had let it through
    review.refresh()
    assert not next_button(wiz).isEnabled()
    assert "SERVER_PORT_COLLISION" in review.results.toPlainText()
    assert "go back and fix" in problems(wiz).text()


# ---------------------------------------------------------------------------- database test


def test_connection_to_closed_port_fails_with_a_message(wiz: PbxWizard, postgres: str) -> None:
    go_to(wiz, "database")
    fill_database(wiz, postgres, port=free_port())
    result = run_connection_test(wiz)
    assert result.startswith("✗ Connection failed:")
    assert "refused" in result.lower() or "connect" in result.lower()


def test_connection_test_does_not_freeze_the_window(wiz: PbxWizard, postgres: str) -> None:
    """A server that never answers: the click returns at once and the UI keeps running."""
    go_to(wiz, "database")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel completes the handshake; nobody ever speaks
    db = wiz.pages["database"]
    db.connect_timeout = 2.0
    fill_database(wiz, postgres, port=silent.getsockname()[1])
    started = time.monotonic()
    QTest.mouseClick(db.test_button, Qt.MouseButton.LeftButton)
    assert time.monotonic() - started < 0.5
    assert db.test_result.text() == "Testing…" and not db.test_button.isEnabled()
    # The event loop keeps serving input while the worker waits.
    db.name.setText("")
    QTest.keyClicks(db.name, "typed-while-testing")
    QApplication.processEvents()
    assert db.name.text() == "typed-while-testing"
    silent.close()
    pump_until(lambda: db.test_button.isEnabled(), timeout=15)
    assert db.test_result.text().startswith("✗ Connection failed")


# ---------------------------------------------------------------------------- keyboard / a11y


def test_every_input_has_an_accessible_name_and_tab_order_follows_layout(
        wiz: PbxWizard) -> None:
    for name in PAGE_NAMES:
        page = wiz.pages[name]
        assert page.inputs, name
        for widget in page.inputs:
            assert widget.accessibleName(), f"{name}: {widget!r} has no accessible name"
    net = wiz.pages["network"]
    go_to(wiz, "network")
    order = [w for w in net.inputs if w.focusPolicy() != Qt.FocusPolicy.NoFocus]
    walk: list[QWidget] = []
    widget: QWidget = order[0]
    for _ in range(200):
        if widget in order and widget not in walk:
            walk.append(widget)
        widget = widget.nextInFocusChain()
        if len(walk) == len(order):
            break
    assert walk == order


def test_mnemonics_are_unique_on_every_page(wiz: PbxWizard) -> None:
    """Alt+letter reaches one control per page, never the wizard's own Back/Next."""
    nav = [wiz.buttonText(QWizard.WizardButton.BackButton),
           wiz.buttonText(QWizard.WizardButton.NextButton)]
    for name in PAGE_NAMES:
        page = wiz.pages[name]
        texts = [w.text() for w in page.findChildren(QLabel) + page.findChildren(QAbstractButton)]
        letters = [m.group(1).lower() for t in texts + nav
                   for m in re.finditer(r"&([^&\s])", t)]
        assert len(letters) == len(set(letters)), (name, sorted(letters))


def test_keyboard_only_navigation(wiz: PbxWizard, app: QApplication) -> None:
    wiz.activateWindow()
    app.processEvents()
    welcome = wiz.pages["welcome"]
    welcome.mode.setFocus()
    QTest.keyClick(welcome.mode, Qt.Key.Key_Down)  # production -> development
    assert welcome.mode.currentText() == "development"
    QTest.keyClick(next_button(wiz), Qt.Key.Key_Space)
    app.processEvents()
    assert page_name(wiz) == "network"
    net = wiz.pages["network"]
    net.sip_port.setFocus()
    net.sip_port.selectAll()
    QTest.keyClicks(net.sip_port, "5080")
    assert net.sip_port.value() == 5080 and wiz.answers.sip_port == 5080


def test_detect_lists_local_interface_addresses(wiz: PbxWizard) -> None:
    net = wiz.pages["network"]
    net.external_ip.setCurrentText("")
    QTest.mouseClick(net.detect_button, Qt.MouseButton.LeftButton)
    items = [net.external_ip.itemText(i) for i in range(net.external_ip.count())]
    assert items == detect_local_addresses()
    if items:
        assert net.external_ip.currentText() == items[0]


# ---------------------------------------------------------------------------- entry point


def test_entry_point_without_pyside6_explains_and_exits_1() -> None:
    code = ("import sys; sys.modules['PySide6'] = None; sys.modules['PySide6.QtWidgets'] = None;"
            "from wizard.__main__ import main; raise SystemExit(main([]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 1
    assert "pip install 'pbx[wizard]'" in result.stderr and "make install" in result.stderr


def test_entry_point_without_display_explains_and_exits_1() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = subprocess.run([sys.executable, "-m", "wizard"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 1
    assert "needs a graphical display" in result.stderr
