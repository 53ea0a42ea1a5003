"""The desktop setup wizard: Welcome → Network → Database → Security → Extensions → Review → Write.

Design rules:

* **No rule of its own.**  Each page pushes its inputs into one shared
  :class:`~pbx.config.writer.Answers` and asks :func:`pbx.config.validation.validate_data`
  for errors on the keys it owns (``prefixes``); those errors are shown on the page and keep
  *Next* disabled.  Only typing mistakes the model cannot express (a host name with spaces,
  a weak password the operator typed) are caught locally, with the shared parsers and
  :mod:`pbx.config.passwords`.
* **Same files as the terminal wizard**: :func:`pbx.config.writer.write_files`.
* **Never freeze**: *Test connection* runs :func:`pbx.config.validation.check_database` in
  a :class:`QThreadPool` worker and reports back through a queued signal.
* **Keyboard first**: every input has an accessible name and a label buddy with a mnemonic,
  and the tab order follows the visual order.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, QRunnable, Qt, QThreadPool, Signal
from PySide6.QtGui import QFont, QFontDatabase
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from pbx.config.passwords import (
    check_password,
    check_token,
    generate_password,
    generate_secret,
    generate_token,
    strength,
)
from pbx.config.security import EXTENSION_NUMBER
from pbx.config.validation import (
    Finding,
    ValidationReport,
    check_database,
    render_text,
    validate_data,
)
from pbx.config.writer import (
    Answers,
    ExtensionAnswer,
    WriteResult,
    detect_local_addresses,
    parse_email,
    parse_hostname,
    postgres_url,
    validation_input,
    write_files,
)

__all__ = ["PbxWizard", "run"]

PAGE_NAMES: tuple[str, ...] = ("welcome", "network", "database", "security", "extensions",
                               "review", "write")


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class _Page(QWizardPage):
    """A page that stores its inputs in the shared answers and shows the validator's errors."""

    #: Dotted keys whose errors belong to this page (and block its Next button).
    prefixes: tuple[str, ...] = ()

    def __init__(self, wiz: PbxWizard, title: str, subtitle: str) -> None:
        super().__init__()
        self.wiz = wiz
        self.setTitle(title)
        self.setSubTitle(subtitle)
        self.problems = QLabel()
        self.problems.setObjectName("problems")
        self.problems.setWordWrap(True)
        self.problems.setStyleSheet("color: #b00020;")
        self.problems.setAccessibleName("Problems on this page")
        self.problems.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.problems.hide()
        self.inputs: list[QWidget] = []
        self._ok = True

    # -- building helpers ---------------------------------------------------

    def named(self, widget: QWidget, name: str, tip: str = "", *, track: bool = True) -> QWidget:
        """Register an input: accessible name, tooltip, tab order and (if ``track``) re-checks."""
        widget.setAccessibleName(name)
        if tip:
            widget.setToolTip(tip)
            widget.setAccessibleDescription(tip)
        self.inputs.append(widget)
        if track:
            if isinstance(widget, QLineEdit):
                widget.textChanged.connect(self.refresh)
            elif isinstance(widget, QSpinBox):
                widget.valueChanged.connect(self.refresh)
            elif isinstance(widget, QComboBox):
                widget.currentTextChanged.connect(self.refresh)
            elif isinstance(widget, QCheckBox | QRadioButton):
                widget.toggled.connect(self.refresh)
            elif isinstance(widget, QTableWidget):
                widget.itemChanged.connect(self.refresh)
        return widget

    def finish_tab_order(self) -> None:
        """Tab follows the order inputs were registered in (their visual order)."""
        focusable = [w for w in self.inputs if w.focusPolicy() != Qt.FocusPolicy.NoFocus]
        for first, second in itertools.pairwise(focusable):
            QWidget.setTabOrder(first, second)

    # -- validation ------------------------------------------------------------

    def store(self) -> list[str]:
        """Copy inputs into ``self.wiz.answers``; return problems found while parsing."""
        return []

    def page_errors(self) -> list[str]:
        local = self.store()
        if local:
            return local
        return [f"{f.key}: {f.message}. Fix: {f.fix}" for f in self.wiz.report().errors
                if _matches(f.key, self.prefixes)]

    def refresh(self, *_: object) -> None:
        """Re-check the page; show problems and enable/disable Next accordingly."""
        problems = self.page_errors()
        self.problems.setText("\n".join(f"✗ {p}" for p in problems))
        self.problems.setVisible(bool(problems))
        self._ok = not problems
        self.completeChanged.emit()

    def initializePage(self) -> None:
        self.refresh()

    def isComplete(self) -> bool:
        return self._ok


def _buddy(text: str, widget: QWidget) -> QLabel:
    label = QLabel(text)
    label.setBuddy(widget)
    return label


def _spin(low: int, high: int, value: int) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setKeyboardTracking(True)
    return box


# ---------------------------------------------------------------------------- pages


class WelcomePage(_Page):
    prefixes = ("mode", "data_dir")

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Welcome", "This wizard writes config.yml and .env for a new PBX. "
                         "Nothing is written before the last page.")
        intro = QLabel(
            "You will choose the network ports, the database, the security settings and the "
            "first extensions. Each page is checked with the PBX's own rules; errors keep "
            "<b>Next</b> disabled and are explained under the fields.<br><br>"
            "Secrets (API token, passwords) are written to <tt>.env</tt> with mode 0600, "
            "never to <tt>config.yml</tt>. Existing files are backed up first.")
        intro.setWordWrap(True)
        form = QFormLayout()
        self.mode = QComboBox()
        self.mode.addItems(["production", "development"])
        self.named(self.mode, "Mode", "production enables the strict checks")
        form.addRow(_buddy("&Mode:", self.mode), self.mode)
        self.output_dir = QLineEdit(str(wiz.output_dir))
        self.named(self.output_dir, "Output directory",
                   "config.yml and .env are written here")
        browse = QPushButton("Bro&wse…")
        browse.setAccessibleName("Choose output directory")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.output_dir)
        row.addWidget(browse)
        form.addRow(_buddy("&Output directory:", self.output_dir), row)
        self.inputs.append(browse)
        self.data_dir = QLineEdit(wiz.answers.data_dir)
        self.named(self.data_dir, "Data directory", "runtime data such as the SQLite database")
        form.addRow(_buddy("&Data directory:", self.data_dir), self.data_dir)
        self.email = QLineEdit()
        self.email.setPlaceholderText("optional, e.g. ops@yourcompany.com")
        self.named(self.email, "Administrator e-mail", "written as a comment in config.yml")
        form.addRow(_buddy("Administrator &e-mail:", self.email), self.email)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addStretch(1)
        layout.addWidget(self.problems)
        self.finish_tab_order()

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Output directory", self.output_dir.text())
        if chosen:
            self.output_dir.setText(chosen)

    def store(self) -> list[str]:
        a = self.wiz.answers
        a.mode = self.mode.currentText()
        a.data_dir = self.data_dir.text().strip()
        problems: list[str] = []
        out = self.output_dir.text().strip()
        if not out:
            problems.append("output directory: choose where the files go")
        else:
            path = Path(out).expanduser()
            if path.exists() and not path.is_dir():
                problems.append(f"output directory: {path} is a file, not a directory")
            self.wiz.output_dir = path
        if not a.data_dir:
            problems.append("data directory: a directory is needed, e.g. var")
        text = self.email.text().strip()
        try:
            a.admin_email = parse_email(text) if text else ""
        except ValueError as exc:
            problems.append(f"administrator e-mail: {exc}")
        return problems


class NetworkPage(_Page):
    prefixes = ("sip.host", "sip.port", "sip.domain", "sip.external_ip", "rtp", "calls",
                "api.host", "api.port")

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Network", "Where the PBX listens and which address phones use.")
        a = wiz.answers
        form = QFormLayout()
        self.domain = QLineEdit(a.domain)
        self.named(self.domain, "SIP domain", "the domain phones register to")
        form.addRow(_buddy("SIP do&main:", self.domain), self.domain)
        self.sip_host = QComboBox()
        self.sip_host.setEditable(True)
        self.sip_host.addItems(["0.0.0.0", *detect_local_addresses(), "127.0.0.1"])
        self.sip_host.setCurrentText(a.sip_host)
        self.named(self.sip_host, "SIP bind address", "0.0.0.0 listens on all interfaces")
        form.addRow(_buddy("SIP b&ind address:", self.sip_host), self.sip_host)
        self.sip_port = _spin(1, 65535, a.sip_port)
        self.named(self.sip_port, "SIP port", "UDP and TCP; 5060 is the standard port")
        form.addRow(_buddy("&SIP port:", self.sip_port), self.sip_port)
        self.api_port = _spin(1, 65535, a.api_port)
        self.named(self.api_port, "API port", "HTTP health, metrics and admin API")
        form.addRow(_buddy("&API port:", self.api_port), self.api_port)
        self.external_ip = QComboBox()
        self.external_ip.setEditable(True)
        self.external_ip.setAccessibleName("External address")
        self.named(self.external_ip, "External address",
                   "the address phones reach this PBX at (written into SDP and Contact)")
        self.detect_button = QPushButton("&Detect")
        self.detect_button.setAccessibleName("Detect local addresses")
        self.detect_button.setToolTip("List this host's interface addresses (no Internet look-up)")
        self.detect_button.clicked.connect(self.detect)
        row = QHBoxLayout()
        row.addWidget(self.external_ip, 1)
        row.addWidget(self.detect_button)
        self.inputs.append(self.detect_button)
        form.addRow(_buddy("E&xternal address:", self.external_ip), row)
        self.rtp_min = _spin(1024, 65534, a.rtp_min)
        self.rtp_min.setSingleStep(2)
        self.named(self.rtp_min, "RTP port range start", "an even port; RTCP uses odd ports")
        self.rtp_max = _spin(1025, 65535, a.rtp_max)
        self.named(self.rtp_max, "RTP port range end")
        rtp_row = QHBoxLayout()
        rtp_row.addWidget(self.rtp_min)
        rtp_row.addWidget(QLabel("to"))
        rtp_row.addWidget(self.rtp_max)
        form.addRow(_buddy("&RTP ports:", self.rtp_min), rtp_row)
        self.max_calls = _spin(1, 100000, a.max_calls)
        self.named(self.max_calls, "Maximum concurrent calls",
                   "each call needs 4 RTP ports (2 legs x RTP+RTCP)")
        form.addRow(_buddy("Maximum &calls:", self.max_calls), self.max_calls)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addStretch(1)
        layout.addWidget(self.problems)
        self.finish_tab_order()
        self.detect()

    def detect(self) -> None:
        """Fill the external address list from this host's interfaces (local only)."""
        current = self.external_ip.currentText()
        found = detect_local_addresses()
        self.external_ip.blockSignals(True)
        self.external_ip.clear()
        self.external_ip.addItems(found)
        self.external_ip.blockSignals(False)
        self.external_ip.setCurrentText(current or (found[0] if found else ""))
        self.refresh()

    def store(self) -> list[str]:
        a = self.wiz.answers
        problems: list[str] = []
        for label, widget, attr in (("SIP domain", self.domain, "domain"),
                                    ("SIP bind address", self.sip_host, "sip_host")):
            text = widget.text() if isinstance(widget, QLineEdit) else widget.currentText()
            try:
                setattr(a, attr, parse_hostname(text))
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
        ext = self.external_ip.currentText().strip()
        try:
            a.external_ip = parse_hostname(ext) if ext else ""
        except ValueError as exc:
            problems.append(f"external address: {exc}")
        a.sip_port = self.sip_port.value()
        a.api_port = self.api_port.value()
        a.rtp_min = self.rtp_min.value()
        a.rtp_max = self.rtp_max.value()
        a.max_calls = self.max_calls.value()
        return problems


class _ConnectionSignals(QObject):
    """Carries a worker's result back to the GUI thread (queued connection)."""

    finished = Signal(str, str)  # url tested, problem ("" = connected)


class _ConnectionTest(QRunnable):
    """Runs :func:`check_database` off the GUI thread."""

    def __init__(self, url: str, signals: _ConnectionSignals, timeout: float) -> None:
        super().__init__()
        self.url, self.signals, self.timeout = url, signals, timeout

    def run(self) -> None:
        try:
            problem = check_database(self.url, timeout=self.timeout) or ""
        except Exception as exc:  # a worker must always answer
            problem = f"{type(exc).__name__}: {exc}"
        self.signals.finished.emit(self.url, problem)


class DatabasePage(_Page):
    prefixes = ("database",)
    connect_timeout = 3.0

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Database", "SQLite needs nothing; PostgreSQL lets several PBX "
                         "nodes share extensions and call records.")
        self.sqlite = QRadioButton("S&QLite (embedded, one node)")
        self.postgres = QRadioButton("&PostgreSQL")
        group = QButtonGroup(self)
        group.addButton(self.sqlite)
        group.addButton(self.postgres)
        self.sqlite.setChecked(True)
        self.named(self.sqlite, "Use SQLite")
        self.named(self.postgres, "Use PostgreSQL")
        self.pg_box = QGroupBox("PostgreSQL server")
        form = QFormLayout(self.pg_box)
        self.host = QLineEdit("127.0.0.1")
        self.named(self.host, "PostgreSQL host")
        form.addRow(_buddy("&Host:", self.host), self.host)
        self.port = _spin(1, 65535, 5432)
        self.named(self.port, "PostgreSQL port")
        form.addRow(_buddy("P&ort:", self.port), self.port)
        self.name = QLineEdit("pbx")
        self.named(self.name, "Database name")
        form.addRow(_buddy("Database na&me:", self.name), self.name)
        self.user = QLineEdit("pbx")
        self.named(self.user, "Database user")
        form.addRow(_buddy("&User:", self.user), self.user)
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.named(self.password, "Database password", "stored in .env, never in config.yml")
        form.addRow(_buddy("Pass&word:", self.password), self.password)
        self.test_button = QPushButton("&Test connection")
        self.test_button.setAccessibleName("Test database connection")
        self.test_button.clicked.connect(self.test_connection)
        self.inputs.append(self.test_button)
        self.test_result = QLabel("")
        self.test_result.setObjectName("testResult")
        self.test_result.setWordWrap(True)
        self.test_result.setAccessibleName("Connection test result")
        test_row = QHBoxLayout()
        test_row.addWidget(self.test_button)
        test_row.addWidget(self.test_result, 1)
        self.sqlite_note = QLabel()
        self.sqlite_note.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.sqlite)
        layout.addWidget(self.sqlite_note)
        layout.addWidget(self.postgres)
        layout.addWidget(self.pg_box)
        layout.addLayout(test_row)
        layout.addStretch(1)
        layout.addWidget(self.problems)
        self.finish_tab_order()
        self._signals = _ConnectionSignals(self)
        self._signals.finished.connect(self._tested)
        self.pool = QThreadPool(self)
        self.testing_url: str | None = None
        self._sync_enabled()
        self.postgres.toggled.connect(self._sync_enabled)

    def _sync_enabled(self, *_: object) -> None:
        self.pg_box.setEnabled(self.postgres.isChecked())
        self.sqlite_note.setText(
            f"The database file will be {self.wiz.answers.data_dir}/pbx.sqlite3 (relative to "
            "the directory the PBX runs in).")

    def url(self) -> str:
        if self.sqlite.isChecked():
            return ""
        return postgres_url(self.host.text().strip(), self.port.value(),
                            self.name.text().strip(), self.user.text().strip(),
                            self.password.text())

    def store(self) -> list[str]:
        self._sync_enabled()
        if self.postgres.isChecked():
            try:
                parse_hostname(self.host.text())
            except ValueError as exc:
                return [f"PostgreSQL host: {exc}"]
        self.wiz.answers.database_url = self.url()
        return []

    def test_connection(self) -> None:
        """Start a real connection attempt in a worker; the button is busy until it answers."""
        self.store()
        url = self.wiz.answers.database_url or f"sqlite:///{self.wiz.answers.data_dir}" \
                                                "/pbx.sqlite3"
        self.testing_url = url
        self.test_button.setEnabled(False)
        self.test_result.setText("Testing…")
        self.pool.start(_ConnectionTest(url, self._signals, self.connect_timeout))

    def _tested(self, url: str, problem: str) -> None:
        if url != self.testing_url:
            return  # an older test finished after the settings changed
        self.testing_url = None
        self.test_button.setEnabled(True)
        if problem:
            self.test_result.setText(f"✗ Connection failed: {problem}")
            self.test_result.setStyleSheet("color: #b00020;")
        else:
            self.test_result.setText("✓ Connected")
            self.test_result.setStyleSheet("color: #1b5e20;")


class SecurityPage(_Page):
    prefixes = ("api.token", "auth", "security", "sip.tls_enabled", "sip.tls_port",
                "sip.tls_cert", "sip.tls_key")

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Security", "Protect the admin API, encrypt signalling and stop "
                         "password guessing.")
        a = wiz.answers
        form = QFormLayout()
        self.token = QLineEdit(a.api_token)
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.named(self.token, "API token", "bearer token for the admin API; 32+ characters")
        self.generate_button = QPushButton("&Generate")
        self.generate_button.setAccessibleName("Generate API token")
        self.generate_button.clicked.connect(self.generate_token)
        self.show_token = QCheckBox("Sho&w")
        self.show_token.setAccessibleName("Show API token")
        self.show_token.toggled.connect(self._toggle_echo)
        row = QHBoxLayout()
        row.addWidget(self.token, 1)
        row.addWidget(self.generate_button)
        row.addWidget(self.show_token)
        self.inputs += [self.generate_button, self.show_token]
        form.addRow(_buddy("API to&ken:", self.token), row)
        self.tls = QCheckBox("Enable SIP over &TLS")
        self.named(self.tls, "Enable SIP over TLS")
        form.addRow(self.tls)
        self.tls_port = _spin(1, 65535, a.tls_port)
        self.named(self.tls_port, "TLS port")
        form.addRow(_buddy("TLS &port:", self.tls_port), self.tls_port)
        self.cert = QLineEdit(a.tls_cert)
        self.key = QLineEdit(a.tls_key)
        for edit, label, title, name in ((self.cert, "&Certificate:", "Certificate (PEM)",
                                          "TLS certificate file"),
                                         (self.key, "Private ke&y:", "Private key (PEM)",
                                          "TLS private key file")):
            self.named(edit, name)
            browse = QPushButton("Browse…")
            browse.setAccessibleName(f"Choose {name.lower()}")
            browse.clicked.connect(lambda _=False, e=edit, t=title: self._pick(e, t))
            self.inputs.append(browse)
            pick_row = QHBoxLayout()
            pick_row.addWidget(edit, 1)
            pick_row.addWidget(browse)
            form.addRow(_buddy(label, edit), pick_row)
        self.fips = QCheckBox("&FIPS mode (SHA-256 digest only; many desk phones support only "
                              "MD5)")
        self.fips.setChecked(a.fips_mode)
        self.named(self.fips, "FIPS mode")
        form.addRow(self.fips)
        self.brute = QCheckBox("Block addresses after repeated failed log&ins")
        self.brute.setChecked(a.brute_force)
        self.named(self.brute, "Brute-force blocking")
        form.addRow(self.brute)
        self.max_failures = _spin(1, 1000, a.max_failures)
        self.named(self.max_failures, "Failures before blocking")
        form.addRow(_buddy("Fail&ures before blocking:", self.max_failures), self.max_failures)
        self.block_time = _spin(1, 604800, int(a.block_time))
        self.block_time.setSuffix(" s")
        self.named(self.block_time, "Block time in seconds")
        form.addRow(_buddy("Block ti&me:", self.block_time), self.block_time)
        self.rate = QCheckBox("&Rate-limit requests per source address")
        self.rate.setChecked(a.rate_limit)
        self.named(self.rate, "Rate limiting")
        form.addRow(self.rate)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addStretch(1)
        layout.addWidget(self.problems)
        self.finish_tab_order()
        self.tls.toggled.connect(self._sync_enabled)
        self.brute.toggled.connect(self._sync_enabled)
        self._sync_enabled()
        if not a.api_token:
            self.generate_token()
        if not a.auth_secret:
            a.auth_secret = generate_secret()

    def generate_token(self) -> None:
        value = generate_token()
        self.wiz.generated_token = value
        self.token.setText(value)

    def _toggle_echo(self, shown: bool) -> None:
        self.token.setEchoMode(QLineEdit.EchoMode.Normal if shown
                               else QLineEdit.EchoMode.Password)

    def _pick(self, edit: QLineEdit, title: str) -> None:
        chosen, _ = QFileDialog.getOpenFileName(self, title, edit.text(),
                                                "PEM files (*.pem *.crt *.key);;All files (*)")
        if chosen:
            edit.setText(chosen)

    def _sync_enabled(self, *_: object) -> None:
        for widget in (self.tls_port, self.cert, self.key):
            widget.setEnabled(self.tls.isChecked())
        for widget in (self.max_failures, self.block_time):
            widget.setEnabled(self.brute.isChecked())

    def store(self) -> list[str]:
        a = self.wiz.answers
        a.api_token = self.token.text().strip()
        a.tls_enabled = self.tls.isChecked()
        a.tls_port = self.tls_port.value()
        a.tls_cert = self.cert.text().strip() if a.tls_enabled else ""
        a.tls_key = self.key.text().strip() if a.tls_enabled else ""
        a.fips_mode = self.fips.isChecked()
        a.brute_force = self.brute.isChecked()
        a.max_failures = self.max_failures.value()
        a.block_time = float(self.block_time.value())
        a.rate_limit = self.rate.isChecked()
        problems: list[str] = []
        if not a.api_token:
            problems.append("API token: generate one (the admin API needs it)")
        else:
            weak = check_token(a.api_token)
            if weak:
                problems.append("API token refused: " + "; ".join(w.message for w in weak))
        if a.tls_enabled and not (a.tls_cert and a.tls_key):
            problems.append("TLS: choose the certificate and the private key files")
        return problems


class ExtensionsPage(_Page):
    prefixes = ("extensions",)
    COLUMNS = ("Number", "Name", "Password")

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Extensions", "The first phones. Passwords are generated; copy "
                         "them to the phones (they are stored in .env).")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setTabKeyNavigation(False)  # Tab leaves the table; arrows move inside
        self.named(self.table, "Extensions table",
                   "number, name and password of each extension; F2 edits a cell")
        self.add_button = QPushButton("&Add extension")
        self.add_button.setAccessibleName("Add extension")
        self.add_button.clicked.connect(lambda: self.add_extension())
        self.remove_button = QPushButton("&Remove")
        self.remove_button.setAccessibleName("Remove selected extension")
        self.remove_button.clicked.connect(self.remove_selected)
        self.regen_button = QPushButton("New pass&word")
        self.regen_button.setAccessibleName("Generate a new password for the selected extension")
        self.regen_button.clicked.connect(self.regenerate_selected)
        self.inputs += [self.add_button, self.remove_button, self.regen_button]
        buttons = QHBoxLayout()
        for button in (self.add_button, self.remove_button, self.regen_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        self.meter = QProgressBar()
        self.meter.setRange(0, 4)
        self.meter.setAccessibleName("Password strength")
        self.meter.setFormat("")
        self.meter_label = QLabel("Select an extension to see its password strength.")
        self.meter_label.setAccessibleName("Password strength description")
        meter_row = QHBoxLayout()
        meter_row.addWidget(_buddy("Strength:", self.meter))
        meter_row.addWidget(self.meter, 1)
        meter_row.addWidget(self.meter_label, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        layout.addLayout(meter_row)
        layout.addWidget(self.problems)
        self.finish_tab_order()
        self.table.currentCellChanged.connect(lambda *_: self.update_meter())
        self.table.itemChanged.connect(lambda *_: self.update_meter())

    def add_extension(self, number: str | None = None, name: str = "",
                      password: str | None = None) -> int:
        """Append a row (next free number, generated password unless given); return its index."""
        taken = {self._cell(r, 0) for r in range(self.table.rowCount())}
        if number is None:
            candidate = 1001
            while str(candidate) in taken:
                candidate += 1
            number = str(candidate)
        row = self.table.rowCount()
        self.table.blockSignals(True)
        self.table.insertRow(row)
        pw = password if password is not None else generate_password()
        for col, value in enumerate((number, name, pw)):
            self.table.setItem(row, col, QTableWidgetItem(value))
        self.table.blockSignals(False)
        self.table.setCurrentCell(row, 0)
        if password is None:
            self.wiz.generated_passwords[number] = pw
        self.refresh()
        self.update_meter()
        return row

    def remove_selected(self) -> None:
        row = self.table.currentRow()
        if row >= 0:
            self.table.removeRow(row)
            self.refresh()
            self.update_meter()

    def regenerate_selected(self) -> None:
        row = self.table.currentRow()
        if row >= 0:
            pw = generate_password()
            self.table.item(row, 2).setText(pw)
            self.wiz.generated_passwords[self._cell(row, 0)] = pw

    def _cell(self, row: int, col: int) -> str:
        item = self.table.item(row, col)
        return item.text().strip() if item is not None else ""

    def update_meter(self) -> None:
        row = self.table.currentRow()
        if row < 0:
            self.meter.setValue(0)
            self.meter_label.setText("Select an extension to see its password strength.")
            return
        result = strength(self._cell(row, 2), number=self._cell(row, 0))
        self.meter.setValue(result.score)
        reasons = "; ".join(w.message for w in result.weaknesses)
        self.meter_label.setText(f"{result.label}" + (f": {reasons}" if reasons else ""))
        self.meter.setAccessibleDescription(self.meter_label.text())

    def store(self) -> list[str]:
        problems: list[str] = []
        extensions: list[ExtensionAnswer] = []
        for row in range(self.table.rowCount()):
            number, name, pw = (self._cell(row, c) for c in range(3))
            if not EXTENSION_NUMBER.match(number):
                problems.append(f"row {row + 1}: {number!r} is not an extension number "
                                "(2-15 digits)")
                continue
            weak = check_password(pw, number=number)
            if weak:
                problems.append(f"extension {number}: password refused: "
                                + "; ".join(w.message for w in weak))
            generated = self.wiz.generated_passwords.get(number) == pw
            extensions.append(ExtensionAnswer(number, name, pw, generated))
        self.wiz.answers.extensions = extensions
        return problems


class ReviewPage(_Page):
    prefixes = ("",)  # every error blocks

    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Review", "The PBX's validator on your answers. Errors must be "
                         "fixed (go Back); warnings are advice.")
        self.results = QPlainTextEdit()
        self.results.setReadOnly(True)
        self.results.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.named(self.results, "Validation results", track=False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.results, 1)
        layout.addWidget(self.problems)
        self.finish_tab_order()

    def page_errors(self) -> list[str]:
        report = self.wiz.report()
        self.results.setPlainText(render_text(report))
        if report.has_errors:
            return [f"{len(report.errors)} error(s): go back and fix them before writing"]
        return []


class WritePage(_Page):
    def __init__(self, wiz: PbxWizard) -> None:
        super().__init__(wiz, "Write", "Press Finish to write the files.")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.secrets = QPlainTextEdit()
        self.secrets.setReadOnly(True)
        self.secrets.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.named(self.secrets, "Generated credentials",
                   "shown only here; they are stored in .env", track=False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(_buddy("Generated credentials (copy them now; shown only here):",
                                self.secrets))
        layout.addWidget(self.secrets, 1)
        layout.addWidget(self.problems)
        self.setFinalPage(True)
        self.finish_tab_order()

    def initializePage(self) -> None:
        out = self.wiz.output_dir
        existing = [n for n in ("config.yml", ".env") if (out / n).exists()]
        note = (f"<br>Existing {' and '.join(existing)} will be backed up with a timestamp "
                "suffix first." if existing else "")
        self.summary.setText(
            f"<b>{out / 'config.yml'}</b> (settings, mode 0644) and <b>{out / '.env'}</b> "
            f"(secrets, mode 0600).{note}<br>Then check and start the PBX with "
            f"<tt>pbx validate-config --config {out / 'config.yml'}</tt> and "
            f"<tt>pbx run --config {out / 'config.yml'}</tt>.")
        lines: list[str] = []
        if self.wiz.answers.api_token and self.wiz.answers.api_token == self.wiz.generated_token:
            lines.append(f"API token: {self.wiz.answers.api_token}")
        lines += [f"Extension {e.number} password: {e.password}"
                  for e in self.wiz.answers.extensions if e.generated]
        self.secrets.setPlainText("\n".join(lines) or "(nothing was generated)")
        super().initializePage()

    def validatePage(self) -> bool:
        """Finish: write both files; on failure stay here and say why."""
        report = self.wiz.report()
        if report.has_errors:
            self.problems.setText("✗ the configuration has errors; go back to Review")
            self.problems.show()
            return False
        try:
            self.wiz.result_files = write_files(self.wiz.answers, self.wiz.output_dir)
        except (OSError, ValueError) as exc:
            self.problems.setText(f"✗ cannot write the files: {exc}")
            self.problems.show()
            return False
        return True


# ---------------------------------------------------------------------------- wizard


class PbxWizard(QWizard):
    """The whole wizard; ``answers`` is shared by the pages, ``result_files`` set on Finish."""

    def __init__(self, output_dir: Path | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("PBX setup")
        self.setWizardStyle(QWizard.WizardStyle.ModernStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage, True)
        self.setMinimumSize(780, 600)
        self.answers = Answers()
        self.output_dir = Path(output_dir) if output_dir else Path.cwd()
        self.generated_token: str | None = None
        self.generated_passwords: dict[str, str] = {}
        self.result_files: WriteResult | None = None
        self.pages: dict[str, _Page] = {}
        builders: tuple[Callable[[PbxWizard], _Page], ...] = (
            WelcomePage, NetworkPage, DatabasePage, SecurityPage, ExtensionsPage, ReviewPage,
            WritePage)
        for name, build in zip(PAGE_NAMES, builders, strict=True):
            page = build(self)
            page.setObjectName(f"page-{name}")
            self.pages[name] = page
            self.addPage(page)
        font = QFont(self.font())
        font.setPointSize(max(font.pointSize(), 10))
        self.setFont(font)

    def report(self) -> ValidationReport:
        """The validator's verdict on the current answers (no network, no files)."""
        data, environ = validation_input(self.answers)
        return validate_data(data, environ=environ)

    def errors(self) -> list[Finding]:
        return self.report().errors


def run(argv: Sequence[str]) -> int:
    """Show the wizard; 0 when Finish wrote the files, 1 when cancelled."""
    app = QApplication.instance() or QApplication([sys.argv[0], *argv])
    out = Path(argv[0]) if argv and not argv[0].startswith("-") else None
    wiz = PbxWizard(out)
    wiz.show()
    app.exec()
    if wiz.result_files is None:
        print("Cancelled; nothing was written.")
        return 1
    for backup in wiz.result_files.backups:
        print(f"Backed up the previous file to {backup}")
    print(f"Wrote {wiz.result_files.config_path} and {wiz.result_files.env_path} (mode 0600).")
    return 0
