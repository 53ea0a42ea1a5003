"""Entry point of ``pbx-wizard`` / ``python -m wizard``.

PySide6 is an optional extra (``pbx[wizard]``): a server needs no Qt.  Without it the
command explains how to install it, or how to use the terminal wizard, and exits 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

INSTALL_HINT = """\
pbx-wizard needs PySide6, which is not installed.
Install it with:   pip install 'pbx[wizard]'   (or `make install` in a source checkout)
or use the terminal wizard instead:   python scripts/setup_production_env.py"""

NO_DISPLAY_HINT = """\
pbx-wizard needs a graphical display, and none was found ($DISPLAY and $WAYLAND_DISPLAY are
unset). Run it in a desktop session, or use the terminal wizard instead:
    python scripts/setup_production_env.py"""


def main(argv: Sequence[str] | None = None) -> int:
    """Start the desktop wizard; 0 when files were written, 1 otherwise."""
    try:
        import PySide6.QtWidgets  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    if (sys.platform.startswith("linux") and not os.environ.get("QT_QPA_PLATFORM")
            and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")):
        print(NO_DISPLAY_HINT, file=sys.stderr)
        return 1
    from wizard.app import run

    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
