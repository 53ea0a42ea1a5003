"""The database schema as data, and every SQL dialect difference in one place.

Theory of operation: ``MIGRATIONS`` is an ordered list of ``(version, description,
statements)``. Statements are written once, in a neutral SQL with ``{tokens}`` for the
column types that differ (``{double}``, ``{bool}``, ``{true}``, ``{id}``);
a :class:`Dialect` fills them in. Queries use ``?`` placeholders; the PostgreSQL dialect
turns them into psycopg2's ``%s``. Nothing else in ``pbx.store`` knows which database
it talks to, apart from the two drivers that execute statements.

The schema's version lives in ``schema_version`` (one row per applied migration); the
database is at ``MAX(version)``, or 0 when the table does not exist. A migration is
never edited once released: a change is a new entry at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "POSTGRESQL",
    "SQLITE",
    "Dialect",
    "Migration",
]


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: applied in a single transaction with its version row."""

    version: int
    description: str
    statements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQLite and PostgreSQL, and nothing more."""

    name: str
    types: tuple[tuple[str, str], ...]
    #: statement that starts a read-write transaction
    begin: str
    #: appended to ``ORDER BY <text column>`` so both backends order by code point
    collate_binary: str
    #: one row when the table named by the single parameter exists (in the search path)
    table_exists: str
    #: run first inside the migration transaction so concurrent nodes migrate one by one
    migration_lock: str | None
    #: ``?`` placeholders (sqlite3) or ``%s`` (psycopg2)
    qmark: bool

    def ddl(self, statement: str) -> str:
        """A neutral DDL statement with this dialect's types filled in."""
        return statement.format(**dict(self.types))

    def sql(self, statement: str) -> str:
        """A neutral query with this dialect's placeholders."""
        return statement if self.qmark else _to_format_style(statement)


@lru_cache(maxsize=512)
def _to_format_style(statement: str) -> str:
    # psycopg2 formats with %: escape literal percent signs first. Our statements keep
    # values out of the SQL text, so a "?" is always a placeholder.
    return statement.replace("%", "%%").replace("?", "%s")


SQLITE = Dialect(
    name="sqlite",
    types=(
        ("double", "REAL"),  # SQLite's REAL is an 8-byte IEEE double
        ("bool", "INTEGER"),
        ("true", "1"),
        ("id", "INTEGER PRIMARY KEY AUTOINCREMENT"),  # AUTOINCREMENT: ids never reused
    ),
    # IMMEDIATE takes the write lock up front: no deadlock when a reader upgrades.
    begin="BEGIN IMMEDIATE",
    collate_binary="",  # BINARY is the default: UTF-8 byte order = code point order
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    migration_lock=None,  # BEGIN IMMEDIATE already serialises writers
    qmark=True,
)

POSTGRESQL = Dialect(
    name="postgresql",
    types=(
        ("double", "DOUBLE PRECISION"),  # REAL would be float4 and lose precision
        ("bool", "BOOLEAN"),
        ("true", "TRUE"),
        ("id", "BIGSERIAL PRIMARY KEY"),
    ),
    begin="BEGIN",
    collate_binary=' COLLATE "C"',
    table_exists="SELECT 1 WHERE to_regclass(?) IS NOT NULL",
    # Any constant shared by all nodes works (5062 + 1200, recognisable in pg_locks).
    migration_lock="SELECT pg_advisory_xact_lock(50621200)",
    qmark=False,
)

_VALID_SCHEMA = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_schema_name(name: str) -> str:
    """A PostgreSQL schema name we can put into ``search_path`` without quoting."""
    if not _VALID_SCHEMA.match(name):
        raise ValueError(f"invalid PostgreSQL schema name {name!r}: use letters, digits, _")
    return name


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "extensions, location bindings, call detail records", (
        """CREATE TABLE schema_version (
            version INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at {double} NOT NULL
        )""",
        """CREATE TABLE extensions (
            number TEXT PRIMARY KEY,
            display_name TEXT,
            enabled {bool} NOT NULL DEFAULT {true},
            realm TEXT NOT NULL,
            ha1_md5 TEXT,
            ha1_sha256 TEXT,
            voicemail_pin TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL
        )""",
        # RFC 3261 §10.3: a binding is an (address-of-record, contact) pair.
        """CREATE TABLE registrations (
            aor TEXT NOT NULL,
            contact TEXT NOT NULL,
            expires_at {double} NOT NULL,
            q {double},
            call_id TEXT NOT NULL,
            cseq INTEGER NOT NULL,
            transport TEXT NOT NULL,
            source_host TEXT NOT NULL,
            source_port INTEGER NOT NULL,
            user_agent TEXT,
            instance_id TEXT,
            reg_id INTEGER,
            node TEXT,
            updated_at {double} NOT NULL,
            PRIMARY KEY (aor, contact)
        )""",
        "CREATE INDEX registrations_expires_at ON registrations (expires_at)",
        """CREATE TABLE cdr (
            id {id},
            call_id TEXT NOT NULL,
            caller TEXT NOT NULL,
            callee TEXT NOT NULL,
            start_time {double} NOT NULL,
            answer_time {double},
            end_time {double},
            duration {double} NOT NULL DEFAULT 0,
            billsec {double} NOT NULL DEFAULT 0,
            disposition TEXT NOT NULL,
            hangup_cause TEXT,
            hangup_side TEXT,
            qos TEXT,
            node TEXT,
            state TEXT NOT NULL DEFAULT 'closed'
                CHECK (state IN ('open', 'closed', 'interrupted'))
        )""",
        # qos is JSON *text* on both backends, not JSONB: JSONB rewrites numbers
        # (7.2e16 comes back as an integer), and the text round-trips exactly.
        "CREATE INDEX cdr_start_time ON cdr (start_time)",
        "CREATE INDEX cdr_caller ON cdr (caller, start_time)",
        "CREATE INDEX cdr_callee ON cdr (callee, start_time)",
        "CREATE INDEX cdr_call_id ON cdr (call_id)",
        # Only calls up during a crash are 'open': a small partial index finds them.
        "CREATE INDEX cdr_open ON cdr (node) WHERE state = 'open'",
    )),
)

LATEST_VERSION: int = MIGRATIONS[-1].version


def _check_migrations() -> None:
    versions = [m.version for m in MIGRATIONS]
    if versions != list(range(1, len(MIGRATIONS) + 1)):
        raise AssertionError(f"migration versions must be 1..n without gaps: {versions}")


_check_migrations()
