"""The ``pbx`` command: run the PBX, check its configuration, manage extensions and the
database schema."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Generator
from typing import Any

from pbx.config import ConfigError, Settings, load_settings
from pbx.service import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

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
    """The same rules start-up applies; exit 0 (ok or warnings) or 78 (errors)."""
    from pbx.config.validation import render_json, render_text, validate_file

    report = validate_file(args.config, check_connectivity=args.check_connectivity)
    print(render_json(report) if args.json else render_text(report))
    return report.exit_code


# -- commands that talk to the store --------------------------------------------------

StoreCommand = Callable[[Any, Settings, argparse.Namespace], Generator[Any, Any, int]]


def _with_store(args: argparse.Namespace, command: StoreCommand, *,
                init_schema: bool = False) -> int:
    """Open the configured store on a private reactor run, run ``command``, close."""
    from twisted.internet import defer, task

    from pbx.store import SchemaOutdated, StoreError, open_store

    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"pbx: configuration error\n{err}", file=sys.stderr)
        return EXIT_CONFIG
    outcome = {"code": EXIT_FAILURE}

    @defer.inlineCallbacks
    def body(reactor: Any) -> Generator[Any, Any, None]:
        db = settings.database
        store = open_store(settings.database_url, pool_min=db.pool_min, pool_max=db.pool_max,
                           reactor=reactor)
        try:
            if init_schema:
                yield store.migrate()
                yield store.open()
            else:
                try:
                    yield store.open()
                except SchemaOutdated:
                    version = yield store.schema_version()
                    if version != 0:
                        raise
                    yield store.migrate()  # an empty database: create the schema
                    yield store.open()
            outcome["code"] = yield from command(store, settings, args)
        except StoreError as err:
            print(f"pbx: database error: {err}", file=sys.stderr)
            outcome["code"] = EXIT_FAILURE
        finally:
            yield store.close()

    with contextlib.suppress(SystemExit):  # react() always exits; we return the code
        task.react(body)
    return outcome["code"]


def _db_init(store: Any, settings: Settings, args: argparse.Namespace
             ) -> Generator[Any, Any, int]:
    version = yield store.schema_version()
    print(f"database schema at version {version} ({store.kind})")
    return EXIT_OK


def _ext_add(store: Any, settings: Settings, args: argparse.Namespace
             ) -> Generator[Any, Any, int]:
    from pbx.admin import ExtensionError, add_extension
    from pbx.store import ExtensionExists

    try:
        generated = yield add_extension(store, settings, args.number, name=args.name,
                                        password=args.password, enabled=not args.disabled)
    except ExtensionError as err:
        print(f"pbx: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except ExtensionExists:
        print(f"pbx: extension {args.number} already exists", file=sys.stderr)
        return EXIT_FAILURE
    print(f"extension {args.number} created")
    _show_generated(generated)
    return EXIT_OK


def _ext_passwd(store: Any, settings: Settings, args: argparse.Namespace
                ) -> Generator[Any, Any, int]:
    from pbx.admin import ExtensionError, change_password

    try:
        generated = yield change_password(store, settings, args.number, args.password)
    except ExtensionError as err:
        print(f"pbx: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"password of extension {args.number} changed")
    _show_generated(generated)
    return EXIT_OK


def _show_generated(password: str | None) -> None:
    """A generated password is printed this once: the store keeps only its hashes."""
    if password:
        print(f"password: {password}")
        print("(shown once: only hashes are stored)")


def _ext_remove(store: Any, settings: Settings, args: argparse.Namespace
                ) -> Generator[Any, Any, int]:
    removed = yield store.remove_extension(args.number)
    if not removed:
        print(f"pbx: extension {args.number} does not exist", file=sys.stderr)
        return EXIT_FAILURE
    print(f"extension {args.number} removed")
    return EXIT_OK


def _ext_list(store: Any, settings: Settings, args: argparse.Namespace
              ) -> Generator[Any, Any, int]:
    import time

    records = yield store.list_extensions()
    rows = yield store.load_bindings()
    now = time.time()
    live: dict[str, int] = {}
    for row in rows:
        if row["expires_at"] > now:
            live[row["aor"]] = live.get(row["aor"], 0) + 1
    items = [{"number": r.number, "name": r.display_name, "enabled": r.enabled,
              "registered_contacts": live.get(r.number, 0)} for r in records]
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    if not items:
        print("no extensions (add one with: pbx extensions add NUMBER)")
        return EXIT_OK
    print(f"{'NUMBER':<16} {'NAME':<24} {'ENABLED':<8} CONTACTS")
    for item in items:
        print(f"{item['number']:<16} {item['name'] or '':<24} "
              f"{'yes' if item['enabled'] else 'no':<8} {item['registered_contacts']}")
    return EXIT_OK


def _store_cmd(command: StoreCommand, *, init_schema: bool = False
               ) -> Callable[[argparse.Namespace], int]:
    return lambda args: _with_store(args, command, init_schema=init_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbx", description="A state-machine PBX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="configuration file (default $PBX_CONFIG or "
                                        "./config.yml)")
        return p

    run = with_config(sub.add_parser("run", help="run the PBX in the foreground "
                                                 "(≡ twistd -n pbx)"))
    run.set_defaults(func=_cmd_run)

    val = with_config(sub.add_parser("validate-config",
                                     help="check a configuration; exit 78 on errors"))
    val.add_argument("--json", action="store_true", help="machine-readable output")
    val.add_argument("--check-connectivity", action="store_true",
                     help="also connect to the database")
    val.set_defaults(func=_cmd_validate_config)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    init = with_config(db_sub.add_parser("init", help="create or migrate the schema"))
    init.set_defaults(func=_store_cmd(_db_init, init_schema=True))

    ext = sub.add_parser("extensions", help="manage extensions")
    ext_sub = ext.add_subparsers(dest="ext_command", required=True)
    add = with_config(ext_sub.add_parser("add", help="add an extension"))
    add.add_argument("number")
    add.add_argument("--name", help="display name")
    add.add_argument("--password", help="SIP password (omitted: a strong one is generated "
                                        "and printed once)")
    add.add_argument("--disabled", action="store_true", help="create it disabled")
    add.set_defaults(func=_store_cmd(_ext_add))
    lst = with_config(ext_sub.add_parser("list", help="list extensions"))
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_store_cmd(_ext_list))
    rm = with_config(ext_sub.add_parser("remove", help="remove an extension"))
    rm.add_argument("number")
    rm.set_defaults(func=_store_cmd(_ext_remove))
    pw = with_config(ext_sub.add_parser("passwd", help="change an extension's password"))
    pw.add_argument("number")
    pw.add_argument("--password", help="new password (omitted: generated and printed once)")
    pw.set_defaults(func=_store_cmd(_ext_passwd))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `pbx ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
