#!/usr/bin/env python3
"""Terminal setup wizard: from a fresh install to a checked ``config.yml`` + ``.env``.

    scripts/setup_production_env.py                      # interactive
    scripts/setup_production_env.py --non-interactive --sip-port 5060 --api-port 8080 \\
        --database-url-env PBX_DATABASE__URL --generate-token --extension 1001:Reception \\
        --output-dir /etc/pbx
    scripts/setup_production_env.py validate [--config FILE] [--json] [--check-connectivity]

Every answer is checked when it is typed (ports, host names, e-mail addresses, passwords),
and each section is checked again with the PBX's own rules (:mod:`pbx.config.validation`)
before moving on, so the files written are the ones ``pbx validate-config`` accepts.
Secrets go to ``.env`` (mode 0600), never to ``config.yml``; the only secrets printed are
the ones generated here, once, at the end.  Existing files are backed up first.

Exit status: 0 written (or valid), 78 configuration errors (nothing written), 1 aborted.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

try:
    import pbx  # noqa: F401
except ImportError:  # running from a checkout without `make install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbx.config.passwords import (
    check_password,
    check_token,
    generate_password,
    generate_secret,
    generate_token,
)
from pbx.config.security import EXTENSION_NUMBER
from pbx.config.validation import (
    EXIT_CONFIG,
    Finding,
    ValidationReport,
    check_database,
    render_json,
    render_text,
    validate_data,
    validate_file,
)
from pbx.config.writer import (
    Answers,
    ExtensionAnswer,
    detect_local_addresses,
    parse_email,
    parse_hostname,
    parse_port,
    postgres_url,
    validation_input,
    write_files,
)

T = TypeVar("T")
EXIT_ABORTED = 1


class Aborted(Exception):
    """The operator quit (Ctrl-C / Ctrl-D); nothing has been written."""


# ---------------------------------------------------------------------------- prompting


def _read(prompt: str, *, secret: bool = False) -> str:
    try:
        return getpass.getpass(prompt) if secret else input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        raise Aborted from None


def ask(prompt: str, parse: Callable[[str], T], default: str | None = None) -> T:
    """Ask until ``parse`` accepts the answer; its ValueError text is shown as the reason."""
    shown = f"{prompt} [{default}]: " if default not in (None, "") else f"{prompt}: "
    while True:
        text = _read(shown).strip()
        if not text and default is not None:
            text = default
        try:
            return parse(text)
        except ValueError as exc:
            print(f"  ✗ {exc}")


def ask_yes(prompt: str, default: bool) -> bool:
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in ("y", "yes"):
            return True
        if lowered in ("n", "no"):
            return False
        raise ValueError("answer y or n")

    return ask(f"{prompt} ({'Y/n' if default else 'y/N'})", parse, "y" if default else "n")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.lower()
        if lowered not in options:
            raise ValueError(f"answer one of: {', '.join(options)}")
        return lowered
    return parse


def _optional(parse: Callable[[str], str]) -> Callable[[str], str]:
    def wrapped(text: str) -> str:
        return parse(text) if text else ""
    return wrapped


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError("use a number of at least 1")
    return value


def _path_that_exists(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{text!r} is not an existing file")
    return str(path.resolve())


def _section_errors(answers: Answers, prefixes: Sequence[str]) -> list[Finding]:
    """The PBX rules' errors for the keys one section of questions sets."""
    data, environ = validation_input(answers)
    report = validate_data(data, environ=environ)
    return [f for f in report.errors
            if any(f.key == p or f.key.startswith(p + ".") for p in prefixes)]


def _until_valid(section: Callable[[], None], answers: Answers, prefixes: Sequence[str]) -> None:
    """Ask a section, then re-ask it while the validator finds errors in its keys."""
    while True:
        section()
        errors = _section_errors(answers, prefixes)
        if not errors:
            return
        for finding in errors:
            print(f"  ✗ {finding.key}: {finding.message}\n      fix: {finding.fix}")
        print("  Please answer this section again.")


# ---------------------------------------------------------------------------- sections


def _ask_general(a: Answers) -> None:
    a.mode = ask("Mode (production/development)", _choice("production", "development"), a.mode)
    a.admin_email = ask("Administrator e-mail (written as a comment; Enter to skip)",
                        _optional(parse_email), a.admin_email or "")
    a.domain = ask("SIP domain phones register to", parse_hostname, a.domain)


def _ask_network(a: Answers) -> None:
    a.sip_host = ask("SIP bind address (0.0.0.0 = all interfaces)", parse_hostname, a.sip_host)
    a.sip_port = ask("SIP port (UDP and TCP)", parse_port, str(a.sip_port))
    detected = detect_local_addresses()
    hint = f" (this host: {', '.join(detected[:4])})" if detected else ""
    a.external_ip = ask(f"Address phones reach this PBX at{hint}", _optional(parse_hostname),
                        a.external_ip or (detected[0] if detected else ""))
    a.rtp_min = ask("RTP port range start (even)", parse_port, str(a.rtp_min))
    a.rtp_max = ask("RTP port range end", parse_port, str(a.rtp_max))
    a.max_calls = ask("Maximum concurrent calls", _positive_int, str(a.max_calls))
    a.api_port = ask("HTTP API port (health, metrics, admin)", parse_port, str(a.api_port))


def _ask_database(a: Answers) -> None:
    kind = ask("Database (sqlite/postgresql)", _choice("sqlite", "postgresql"),
               "postgresql" if a.database_url else "sqlite")
    if kind == "sqlite":
        a.database_url = ""
        return
    host = ask("  PostgreSQL host", parse_hostname, "127.0.0.1")
    port = ask("  PostgreSQL port", parse_port, "5432")
    name = ask("  Database name", _nonempty("a database name"), "pbx")
    user = ask("  User", _nonempty("a user name"), "pbx")
    password = _read("  Password (hidden; Enter for none): ", secret=True)
    a.database_url = postgres_url(host, port, name, user, password)
    if ask_yes("  Test the connection now?", True):
        problem = check_database(a.database_url)
        if problem is None:
            print("  ✓ connected")
        else:
            print(f"  ✗ {problem}")
            if not ask_yes("  Keep these settings anyway?", False):
                _ask_database(a)


def _nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text:
            raise ValueError(f"{what} is needed")
        return text
    return parse


def _ask_security(a: Answers, generated: dict[str, str]) -> None:
    if ask_yes("Generate a new API token?", True):
        a.api_token = generate_token()
        generated["API token (PBX_API__TOKEN)"] = a.api_token
    else:
        while True:
            token = _read("  API token (hidden): ", secret=True)
            weak = check_token(token)
            if not weak:
                a.api_token = token
                generated.pop("API token (PBX_API__TOKEN)", None)
                break
            print("  ✗ refused: " + "; ".join(w.message for w in weak))
    if not a.auth_secret:
        a.auth_secret = generate_secret()  # stays in .env; nobody needs to read it
    a.tls_enabled = ask_yes("Enable SIP over TLS (needs a certificate and key)?", a.tls_enabled)
    if a.tls_enabled:
        a.tls_port = ask("  TLS port", parse_port, str(a.tls_port))
        a.tls_cert = ask("  Certificate file (PEM)", _path_that_exists, a.tls_cert or None)
        a.tls_key = ask("  Private key file (PEM)", _path_that_exists, a.tls_key or None)
    a.fips_mode = ask_yes("FIPS mode (SHA-256 digest only; many desk phones support only MD5)?",
                          a.fips_mode)
    a.brute_force = ask_yes("Block addresses after repeated failed logins?", a.brute_force)
    if a.brute_force:
        a.max_failures = ask("  Failures before blocking", _positive_int, str(a.max_failures))
        a.block_time = float(ask("  Seconds an address stays blocked", _positive_int,
                                 str(int(a.block_time))))
    a.rate_limit = ask_yes("Rate-limit requests per source address?", a.rate_limit)


def _ask_extensions(a: Answers) -> None:
    print("Extensions (phones). Enter an empty number to finish.")
    while True:
        taken = {e.number for e in a.extensions}

        def number(text: str, taken: set[str] = taken) -> str:
            if text and not EXTENSION_NUMBER.match(text):
                raise ValueError("an extension number is 2-15 digits")
            if text in taken:
                raise ValueError(f"extension {text} already exists")
            return text

        num = ask("  Extension number", number, "")
        if not num:
            return
        name = _read(f"  Name for {num} (optional): ").strip()
        while True:
            password = _read("  Password (hidden; Enter = generate a strong one): ", secret=True)
            if not password:
                a.extensions.append(ExtensionAnswer(num, name, generate_password(), True))
                break
            weak = check_password(password, number=num)
            if not weak:
                a.extensions.append(ExtensionAnswer(num, name, password, False))
                break
            print("  ✗ refused: " + "; ".join(w.message for w in weak))


def interactive(args: argparse.Namespace) -> int:
    """Ask everything, check each section with the PBX rules, then write after confirmation."""
    out = Path(args.output_dir)
    print("PBX setup. Defaults are in [brackets]: press Enter to accept them.")
    print(f"Files will be written to {out.resolve()}/config.yml and .env. Ctrl-C aborts.\n")
    a = _answers_from_args(args)  # flags given on the command line become the defaults
    generated: dict[str, str] = {}
    _until_valid(lambda: _ask_general(a), a, ("mode", "sip.domain"))
    _until_valid(lambda: _ask_network(a), a, ("sip.host", "sip.port", "sip.external_ip", "rtp",
                                                "calls", "api.host", "api.port"))
    _until_valid(lambda: _ask_database(a), a, ("database",))
    _until_valid(lambda: _ask_security(a, generated), a,
                 ("api.token", "auth", "security", "sip.tls_enabled", "sip.tls_port",
                  "sip.tls_cert", "sip.tls_key"))
    _until_valid(lambda: _ask_extensions(a), a, ("extensions",))
    for ext in a.extensions:
        if ext.generated:
            generated[f"extension {ext.number} password"] = ext.password
    report = _report(a)
    print("\n" + render_text(report))
    if report.has_errors:
        print("Nothing was written: fix the errors above and run the wizard again.")
        return EXIT_CONFIG
    if not ask_yes(f"Write the files to {out.resolve()}?", True):
        print("Nothing was written.")
        return EXIT_ABORTED
    return _write(a, out, generated)


# ---------------------------------------------------------------------------- automation


def _split_extension(text: str) -> tuple[str, str]:
    number, _, name = text.partition(":")
    if not EXTENSION_NUMBER.match(number):
        raise argparse.ArgumentTypeError(f"{number!r}: an extension number is 2-15 digits")
    return number, name


def _answers_from_args(args: argparse.Namespace) -> Answers:
    return Answers(mode=args.mode, sip_host=args.sip_host, sip_port=args.sip_port,
                   domain=args.domain, external_ip=args.external_ip or "", rtp_min=args.rtp_min,
                   rtp_max=args.rtp_max, max_calls=args.max_calls, api_host=args.api_host,
                   api_port=args.api_port, fips_mode=args.fips, brute_force=args.brute_force,
                   rate_limit=args.rate_limit, log_level=args.log_level,
                   admin_email=args.admin_email or "", auth_secret=generate_secret(),
                   data_dir=args.data_dir)


def non_interactive(args: argparse.Namespace) -> int:
    """Build the answers from flags; refuse to write when the PBX rules find errors."""
    a = _answers_from_args(args)
    generated: dict[str, str] = {}
    if args.database_url:
        a.database_url = args.database_url
    elif args.database_url_env:
        a.database_url = os.environ.get(args.database_url_env, "")
        if not a.database_url:
            print(f"error: {args.database_url_env} is not set", file=sys.stderr)
            return EXIT_CONFIG
    if args.generate_token:
        a.api_token = generate_token()
        generated["API token (PBX_API__TOKEN)"] = a.api_token
    elif args.api_token_env:
        a.api_token = os.environ.get(args.api_token_env, "")
    if args.tls_cert or args.tls_key:
        a.tls_enabled = True
        a.tls_cert, a.tls_key = args.tls_cert or "", args.tls_key or ""
        a.tls_port = args.tls_port
    for number, name in args.extension:
        if any(e.number == number for e in a.extensions):
            print(f"error: extension {number} is given twice", file=sys.stderr)
            return EXIT_CONFIG
        password = generate_password()
        a.extensions.append(ExtensionAnswer(number, name, password, True))
        generated[f"extension {number} password"] = password
    report = _report(a)
    print(render_text(report))
    if report.has_errors:
        print("Nothing was written.", file=sys.stderr)
        return EXIT_CONFIG
    return _write(a, Path(args.output_dir), generated)


# ---------------------------------------------------------------------------- shared end


def _report(a: Answers) -> ValidationReport:
    data, environ = validation_input(a)
    return validate_data(data, environ=environ)


def _write(a: Answers, out: Path, generated: dict[str, str]) -> int:
    try:
        result = write_files(a, out)
    except OSError as exc:
        print(f"error: cannot write to {out}: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    for backup in result.backups:
        print(f"Backed up the previous file to {backup}")
    print(f"Wrote {result.config_path} (mode 0644) and {result.env_path} (mode 0600).")
    if generated:
        print("\nGenerated secrets, shown this once (they are stored in .env):")
        for label, value in generated.items():
            print(f"  {label}: {value}")
    print(f"\nNext: pbx validate-config --config {result.config_path}  then  "
          f"pbx run --config {result.config_path}")
    return 0


# ---------------------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    """Check existing files with the PBX rules (the same as ``pbx validate-config``)."""
    if args.env_file:
        report = validate_file(args.config, check_connectivity=args.check_connectivity,
                               env_file=Path(args.env_file))
    else:
        report = validate_file(args.config, check_connectivity=args.check_connectivity)
    print(render_json(report) if args.json else render_text(report))
    return report.exit_code


# ---------------------------------------------------------------------------- arguments


def _setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="setup_production_env.py",
        description="Write a checked PBX config.yml and .env (interactive unless "
                    "--non-interactive). Subcommand `validate` checks existing files.")
    p.add_argument("--output-dir", default=".", help="where config.yml and .env go (default .)")
    p.add_argument("--non-interactive", action="store_true",
                   help="take every answer from flags/defaults; never prompt")
    p.add_argument("--mode", choices=("production", "development"), default="production")
    p.add_argument("--data-dir", default="var",
                   help="runtime data directory (SQLite database); default var")
    p.add_argument("--domain", default="pbx.local", type=_arg(parse_hostname))
    p.add_argument("--sip-host", default="0.0.0.0", type=_arg(parse_hostname))
    p.add_argument("--sip-port", default=5060, type=_arg(parse_port))
    p.add_argument("--external-ip", type=_arg(parse_hostname),
                   help="address phones reach the PBX at (no Internet look-up is made)")
    p.add_argument("--rtp-min", default=10000, type=_arg(parse_port))
    p.add_argument("--rtp-max", default=20000, type=_arg(parse_port))
    p.add_argument("--max-calls", default=100, type=_arg(_positive_int))
    p.add_argument("--api-host", default="0.0.0.0", type=_arg(parse_hostname))
    p.add_argument("--api-port", default=8080, type=_arg(parse_port))
    db = p.add_mutually_exclusive_group()
    db.add_argument("--database-url", help="sqlite:///path or postgresql://user:pw@host:port/db "
                    "(visible in the process list: prefer --database-url-env)")
    db.add_argument("--database-url-env", metavar="VAR",
                    help="read the database URL from environment variable VAR")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--generate-token", action="store_true",
                     help="generate the API token (printed once)")
    tok.add_argument("--api-token-env", metavar="VAR",
                     help="read the API token from environment variable VAR")
    p.add_argument("--tls-cert", type=_arg(_path_that_exists))
    p.add_argument("--tls-key", type=_arg(_path_that_exists))
    p.add_argument("--tls-port", default=5061, type=_arg(parse_port))
    p.add_argument("--fips", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--brute-force", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rate-limit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    p.add_argument("--admin-email", type=_arg(parse_email))
    p.add_argument("--extension", action="append", default=[], type=_split_extension,
                   metavar="NUMBER[:NAME]", help="add an extension with a generated password")
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="setup_production_env.py validate",
                                description="Check an existing config.yml/.env with the PBX "
                                            "rules; exit 0 valid, 78 errors.")
    p.add_argument("--config", help="configuration file (default $PBX_CONFIG or ./config.yml)")
    p.add_argument("--env-file", help=".env to read (default: the one next to the config file)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check-connectivity", action="store_true",
                   help="really connect to the database")
    return p


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__.lstrip("_")
    return convert


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["validate"]:
        return cmd_validate(_validate_parser().parse_args(argv[1:]))
    if argv[:1] == ["setup"]:
        argv = argv[1:]
    args = _setup_parser().parse_args(argv)
    try:
        return non_interactive(args) if args.non_interactive else interactive(args)
    except Aborted:
        print("Aborted; nothing was written.")
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
