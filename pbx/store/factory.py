"""Choose the storage backend from the configured URL."""

from __future__ import annotations

from typing import Any

from pbx.store.base import SQLStore
from pbx.store.postgres import PostgresStore
from pbx.store.sqlite import SQLiteStore, sqlite_path_from_url

__all__ = ["open_store"]


def open_store(url: str, *, pool_min: int = 1, pool_max: int = 5, reactor: Any = None,
               **options: Any) -> SQLStore:
    """A store for ``url``, not yet connected: call ``open()`` (or ``migrate()``).

    ``sqlite:///path`` (relative to the working directory; ``sqlite:////abs`` for an
    absolute path) gives :class:`SQLiteStore`; the pool sizes do not apply to it (one
    database thread). ``postgresql://`` / ``postgres://`` gives :class:`PostgresStore`;
    ``options`` go to it (``schema``, ``application_name``, ``connect_timeout``,
    ``acquire_timeout``, ``reconnect_initial``, ``reconnect_max``).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path_from_url(url), reactor=reactor, **options)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, pool_min=pool_min, pool_max=pool_max, reactor=reactor,
                             **options)
    raise ValueError(f"unsupported database URL scheme {scheme or '(none)'!r}: "
                     "use sqlite:///path or postgresql://user@host:port/db")
