"""PBX desktop setup wizard (PySide6), started with ``pbx-wizard`` or ``python -m wizard``.

This package must import without PySide6 installed: the server's base install has no Qt,
and :mod:`wizard.__main__` has to be able to say how to install it.  The Qt code lives in
:mod:`wizard.app`; the rules it applies come from :mod:`pbx.config.validation` and the files
it writes from :mod:`pbx.config.writer`, shared with the terminal wizard.
"""

__all__: list[str] = []
