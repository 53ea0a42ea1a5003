#!/usr/bin/env python3
"""Create or migrate the PBX database schema (the same as ``pbx db init``).

Usage: scripts/init_database.py [--config FILE]
"""

from __future__ import annotations

import sys

from pbx.cli import main

if __name__ == "__main__":
    sys.exit(main(["db", "init", *sys.argv[1:]]))
