"""Storage: extensions, location bindings and call detail records, on SQLite (the
embedded default) or PostgreSQL (shared by several nodes).

This is the package's public face; other packages import only from here. Every I/O
method returns a Deferred and never blocks the reactor.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from pbx.store.base import (
    BINDING_COLUMNS,
    CDR_COLUMNS,
    CDR_STATES,
    EXTENSION_FIELDS,
    ExtensionExists,
    ExtensionRecord,
    SchemaOutdated,
    SchemaTooNew,
    Store,
    StoreError,
    StoreUnavailable,
)
from pbx.store.factory import open_store
from pbx.store.postgres import PostgresStore
from pbx.store.schema import LATEST_VERSION
from pbx.store.sqlite import SQLiteStore

__all__ = [
    "BINDING_COLUMNS",
    "CDR_COLUMNS",
    "CDR_STATES",
    "EXTENSION_FIELDS",
    "LATEST_VERSION",
    "ExtensionExists",
    "ExtensionRecord",
    "PostgresStore",
    "SQLiteStore",
    "SchemaOutdated",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "init_database",
    "open_store",
]


@inlineCallbacks
def init_database(url: str, **kw: Any) -> Generator[Deferred[Any], Any, int]:
    """Create or migrate the schema of ``url`` and close again; returns the version.

    What ``pbx db init`` does; ``kw`` goes to :func:`open_store`.
    """
    store = open_store(url, **kw)
    try:
        version: int = yield store.migrate()
    finally:
        yield store.close()
    return version
