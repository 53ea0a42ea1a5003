#!/usr/bin/env python3
"""Regenerate docs/statecharts/<name>.md from statecharts/<name>.yaml.

`--check` exits 1 when a generated file is stale (the test suite does the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pbx.statecharts import all_chart_names, load_chart, render_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "statecharts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale diagrams")
    args = parser.parse_args(argv)
    DOCS.mkdir(parents=True, exist_ok=True)
    stale = []
    for name in all_chart_names():
        target = DOCS / f"{name}.md"
        text = render_markdown(load_chart(name))
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if args.check and stale:
        print(f"stale diagrams: {', '.join(stale)}; run `make diagrams`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
