#!/usr/bin/env python3
"""Render every page of the desktop setup wizard to ``docs/images/wizard-<page>.png``.

Runs offscreen (no display needed) with sample answers, so the README can show the wizard
and the pictures can be regenerated after a UI change:

    python scripts/wizard_screenshots.py [--out docs/images]

Nothing is written except the PNG files: Finish is never pressed (the output directory
shown, /etc/pbx, is only displayed).  The secrets visible on the last page are freshly generated
random values, not real credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
try:
    import pbx  # noqa: F401
except ImportError:  # running from a checkout without `make install`
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)

    from PySide6.QtWidgets import QApplication

    from wizard.app import PAGE_NAMES, PbxWizard

    app = QApplication.instance() or QApplication([])
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wiz = PbxWizard(Path(tmp) / "pbx")
        wiz.resize(820, 640)
        wiz.show()
        # A typical target shown in the pictures; Finish is never pressed, so nothing
        # is written there.
        wiz.pages["welcome"].output_dir.setText("/etc/pbx")
        wiz.pages["welcome"].email.setText("ops@acme.test")
        net = wiz.pages["network"]
        net.domain.setText("pbx.acme.test")
        net.external_ip.setCurrentText("203.0.113.10")
        db = wiz.pages["database"]
        db.postgres.setChecked(True)
        db.host.setText("db.acme.test")
        db.password.setText("not-a-real-password")
        ext = wiz.pages["extensions"]
        for number, name in (("1001", "Reception"), ("1002", "Sales"), ("1003", "Support")):
            ext.add_extension(number, name)
        written: list[Path] = []
        for index, name in enumerate(PAGE_NAMES):
            if index:
                wiz.next()
            app.processEvents()
            if wiz.currentPage() is not wiz.pages[name]:
                problems = wiz.currentPage().problems.text()
                print(f"stuck before page {name}: {problems}", file=sys.stderr)
                return 1
            target = args.out / f"wizard-{name}.png"
            if not wiz.grab().save(str(target)):
                print(f"cannot write {target}", file=sys.stderr)
                return 1
            written.append(target)
        wiz.close()
    for path in written:
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
