"""The ``pbx`` command."""

from __future__ import annotations

import argparse
import json
import sys

from pbx.config import ConfigError, load_settings
from pbx.service import EXIT_CONFIG

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    """``pbx run`` is ``twistd -n pbx``: same plugin, same service, same exit codes."""
    from pbx import runner

    runner.load_or_exit(args.config)  # fail fast with 78 before twistd starts
    from twisted.scripts import twistd

    argv = ["twistd", "--nodaemon", "--pidfile=", "pbx"]
    if args.config:
        argv += ["--config", args.config]
    saved, sys.argv = sys.argv, argv
    try:
        twistd.run()
    finally:
        sys.argv = saved
    return runner.exit_code()


def _cmd_validate_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        if args.json:
            print(json.dumps({"valid": False, "errors": err.as_dicts()}, indent=2))
        else:
            print(str(err), file=sys.stderr)
            print("✗ configuration has errors", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps({"valid": True, "errors": []}, indent=2))
    else:
        print(f"✓ configuration is valid (SIP {settings.sip.host}:{settings.sip.port})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbx", description="A state-machine PBX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the PBX in the foreground (≡ twistd -n pbx)")
    run.add_argument("--config", help="configuration file (default $PBX_CONFIG or ./config.yml)")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate-config", help="check a configuration; exit 78 on errors")
    val.add_argument("--config", help="configuration file")
    val.add_argument("--json", action="store_true", help="machine-readable output")
    val.set_defaults(func=_cmd_validate_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
