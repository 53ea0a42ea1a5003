"""The store, as a specification: one suite run against SQLite and the real PostgreSQL.

Every test gets a fresh database (a tmp_path file, or its own PostgreSQL schema) and
talks to it through the public API on the real reactor. PostgreSQL-only behaviour
(reconnection, pool sizing) is at the end.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from pbx.store import (
    BINDING_COLUMNS,
    LATEST_VERSION,
    ExtensionExists,
    ExtensionRecord,
    PostgresStore,
    SchemaOutdated,
    SchemaTooNew,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
    init_database,
    open_store,
)
from pbx.store.postgres import backoff_delay, build_dsn
from pbx.store.schema import MIGRATIONS, POSTGRESQL, SQLITE
from pbx.store.sqlite import sqlite_path_from_url

from .store_fixtures import (
    PG_DSN,
    Backend,
    backend,
    pg_admin,
    postgres_backend,
    sleep,
    wait_until,
)

pytestmark = pytest.mark.integration
_fixtures = (backend, postgres_backend)  # imported for pytest, not a conftest


def ext(number: str, **kw: Any) -> ExtensionRecord:
    fields: dict[str, Any] = {"display_name": f"User {number}", "enabled": True,
                              "realm": "pbx.test", "ha1_md5": "m" * 32, "ha1_sha256": "s" * 64}
    fields.update(kw)
    return ExtensionRecord(number=number, **fields)


def binding(aor: str, contact: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "aor": aor, "contact": contact, "expires_at": 1_700_000_060.25, "q": 0.5,
        "call_id": "a84b4c76e66710", "cseq": 314159, "transport": "udp",
        "source_host": "192.0.2.4", "source_port": 5062, "user_agent": "Phone/1.0",
        "instance_id": "<urn:uuid:00000000-0000-1000-8000-000A95A0E128>", "reg_id": 1,
        "node": "node-a", "updated_at": 1_700_000_000.5,
    }
    row.update(kw)
    return row


def cdr(call_id: str, caller: str, callee: str, start: float, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"call_id": call_id, "caller": caller, "callee": callee,
                           "start_time": start, "disposition": "ANSWERED"}
    row.update(kw)
    return row


async def ready(db: Backend, **kw: Any) -> Store:
    """A store on a migrated database, opened."""
    store = db.make(**kw)
    await store.migrate()
    await store.open()
    return store


# -- schema ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_open_on_empty_database_asks_for_db_init_and_stays_connected(backend: Backend):
    store = backend.make()
    assert store.state == "closed"
    with pytest.raises(SchemaOutdated, match="pbx db init"):
        await store.open()
    assert store.state == "connected"
    assert await store.schema_version() == 0


@pytest_twisted.ensureDeferred
async def test_migrate_from_empty_creates_the_latest_schema(backend: Backend):
    store = backend.make()
    with pytest.raises(SchemaOutdated):
        await store.open()
    assert await store.migrate() == LATEST_VERSION
    assert await store.schema_version() == LATEST_VERSION
    await store.open()  # now verifies
    rows = await backend.run_raw("SELECT version, description FROM schema_version "
                                 "ORDER BY version")
    assert [tuple(r) for r in rows] == [(m.version, m.description) for m in MIGRATIONS]


@pytest_twisted.ensureDeferred
async def test_migrate_before_open_works_on_an_unopened_store(backend: Backend):
    store = backend.make()
    assert await store.migrate() == LATEST_VERSION
    await store.open()
    assert store.state == "connected"


@pytest_twisted.ensureDeferred
async def test_migrate_is_idempotent_and_keeps_data(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001"))
    assert await store.migrate() == LATEST_VERSION
    assert await store.migrate() == LATEST_VERSION
    rows = await backend.run_raw("SELECT COUNT(*) FROM schema_version")
    assert rows[0][0] == len(MIGRATIONS)
    assert (await store.get_extension("1001")) is not None


@pytest_twisted.ensureDeferred
async def test_schema_newer_than_the_code_is_refused_by_open_and_migrate(backend: Backend):
    await (await ready(backend)).close()
    await backend.run_raw("INSERT INTO schema_version (version, description, applied_at) "
                          "VALUES (?, ?, ?)", (LATEST_VERSION + 1, "from the future", 0.0))
    store = backend.make()
    with pytest.raises(SchemaTooNew, match="newer"):
        await store.open()
    with pytest.raises(SchemaTooNew):
        await store.migrate()
    assert await store.schema_version() == LATEST_VERSION + 1


@pytest_twisted.ensureDeferred
async def test_init_database_migrates_and_closes(backend: Backend):
    assert await init_database(backend.url, reactor=reactor, **backend.options) == \
        LATEST_VERSION
    assert await init_database(backend.url, reactor=reactor, **backend.options) == \
        LATEST_VERSION
    store = backend.make()
    await store.open()  # no SchemaOutdated: the schema is there


# -- lifecycle ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_ping_measures_a_real_round_trip(backend: Backend):
    store = await ready(backend)
    latency = await store.ping()
    assert isinstance(latency, float)
    assert 0 < latency < 5


@pytest_twisted.ensureDeferred
async def test_closed_store_fails_fast_with_store_unavailable(backend: Backend):
    store = await ready(backend)
    await store.close()
    assert store.state == "closed"
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get_extension("1001")
    await store.close()  # closing twice is harmless


@pytest_twisted.ensureDeferred
async def test_close_waits_for_running_queries(backend: Backend):
    store = await ready(backend)
    pending = [store.add_extension(ext(f"2{i:03d}")) for i in range(20)]
    await store.close()
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert all(ok for ok, _ in results), results
    reopened = await ready(backend)
    assert len(await reopened.list_extensions()) == 20


@pytest_twisted.ensureDeferred
async def test_data_survives_close_and_reopen(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001", voicemail_pin="4321"))
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:1001@192.0.2.4:5062")], [])
    cdr_id = await store.add_cdr(cdr("call-1", "1001", "1002", 100.0, qos={"mos": 4.3}))
    await store.close()

    restarted = backend.make()
    await restarted.open()
    record = await restarted.get_extension("1001")
    assert record is not None and record.voicemail_pin == "4321"
    assert await restarted.load_bindings() == [
        binding("sip:1001@pbx.test", "sip:1001@192.0.2.4:5062")]
    [row] = await restarted.list_cdr()
    assert row["id"] == cdr_id and row["qos"] == {"mos": 4.3}


# -- extensions --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_add_and_get_extension_round_trips_every_field(backend: Backend):
    store = await ready(backend)
    record = ext("1001", display_name="Zoë Ünïcode ☎", enabled=False, voicemail_pin="0042",
                 created_at=1_700_000_000.125, updated_at=1_700_000_001.5)
    await store.add_extension(record)
    assert await store.get_extension("1001") == record
    assert await store.get_extension("9999") is None


@pytest_twisted.ensureDeferred
async def test_add_extension_stamps_times_when_missing(backend: Backend):
    store = await ready(backend)
    before = time.time()
    await store.add_extension(ext("1001"))
    record = await store.get_extension("1001")
    assert record is not None and record.created_at is not None
    assert before - 1 <= record.created_at <= time.time() + 1
    assert record.updated_at == record.created_at


@pytest_twisted.ensureDeferred
async def test_duplicate_extension_number_is_refused(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001", display_name="first"))
    with pytest.raises(ExtensionExists, match="1001"):
        await store.add_extension(ext("1001", display_name="second"))
    record = await store.get_extension("1001")
    assert record is not None and record.display_name == "first"
    await store.add_extension(ext("1002"))  # the store is still usable afterwards


@pytest_twisted.ensureDeferred
async def test_list_extensions_is_ordered_by_number(backend: Backend):
    store = await ready(backend)
    for number in ("2000", "1001", "10", "1000", "999"):
        await store.add_extension(ext(number))
    listed = [e.number for e in await store.list_extensions()]
    assert listed == ["10", "1000", "1001", "2000", "999"]


@pytest_twisted.ensureDeferred
async def test_update_extension_changes_only_the_given_fields(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001", created_at=10.0, updated_at=10.0))
    assert await store.update_extension("1001", display_name="Bob", enabled=False,
                                        ha1_md5="n" * 32) is True
    record = await store.get_extension("1001")
    assert record is not None
    assert (record.display_name, record.enabled, record.ha1_md5) == ("Bob", False, "n" * 32)
    assert record.ha1_sha256 == "s" * 64 and record.realm == "pbx.test"
    assert record.created_at == 10.0 and record.updated_at is not None
    assert record.updated_at > 10.0
    assert await store.update_extension("1001", display_name=None) is True
    record = await store.get_extension("1001")
    assert record is not None and record.display_name is None


@pytest_twisted.ensureDeferred
async def test_update_of_a_missing_extension_returns_false(backend: Backend):
    store = await ready(backend)
    assert await store.update_extension("4040", display_name="nobody") is False
    assert await store.get_extension("4040") is None


@pytest_twisted.ensureDeferred
async def test_update_extension_rejects_unknown_fields(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001"))
    with pytest.raises(ValueError, match="password"):
        await store.update_extension("1001", password="secret")


@pytest_twisted.ensureDeferred
async def test_remove_extension_deletes_it_and_its_bindings_only(backend: Backend):
    store = await ready(backend)
    await store.add_extension(ext("1001"))
    await store.add_extension(ext("10011"))
    await store.save_bindings([
        binding("sip:1001@pbx.test", "sip:1001@192.0.2.4"),
        binding("sips:1001@pbx.test", "sips:1001@192.0.2.5"),
        binding("1001", "sip:1001@192.0.2.6"),
        binding("sip:10011@pbx.test", "sip:10011@192.0.2.7"),  # a longer number: kept
        binding("sip:1002@pbx.test", "sip:1001@192.0.2.8"),  # contact mentions 1001: kept
    ], [])
    assert await store.remove_extension("1001") is True
    assert await store.get_extension("1001") is None
    assert await store.get_extension("10011") is not None
    assert sorted(b["aor"] for b in await store.load_bindings()) == [
        "sip:10011@pbx.test", "sip:1002@pbx.test"]
    assert await store.remove_extension("1001") is False


# -- location bindings -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_bindings_round_trip_with_exact_columns(backend: Backend):
    store = await ready(backend)
    row = binding("sip:1001@pbx.test", "sip:1001@192.0.2.4:5062;transport=udp")
    minimal = {k: v for k, v in binding("sip:1002@pbx.test", "sip:1002@[2001:db8::1]").items()
               if k not in ("q", "user_agent", "instance_id", "reg_id", "node")}
    await store.save_bindings([row, minimal], [])
    loaded = await store.load_bindings()
    assert [set(r) for r in loaded] == [set(BINDING_COLUMNS)] * 2
    assert loaded[0] == row
    assert loaded[1] == {**minimal, "q": None, "user_agent": None, "instance_id": None,
                         "reg_id": None, "node": None}


@pytest_twisted.ensureDeferred
async def test_save_bindings_upserts_by_aor_and_contact(backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h", cseq=1)], [])
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h", cseq=2,
                                       expires_at=2e9, user_agent=None)], [])
    [row] = await store.load_bindings()
    assert (row["cseq"], row["expires_at"], row["user_agent"]) == (2, 2e9, None)


@pytest_twisted.ensureDeferred
async def test_save_bindings_applies_deletes_and_upserts_together(backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h"),
                               binding("sip:1001@pbx.test", "sip:b@h"),
                               binding("sip:1002@pbx.test", "sip:c@h")], [])
    await store.save_bindings(
        [binding("sip:1003@pbx.test", "sip:d@h"), binding("sip:1001@pbx.test", "sip:b@h",
                                                          cseq=7)],
        [("sip:1001@pbx.test", "sip:a@h"), ("sip:1002@pbx.test", "sip:c@h"),
         ("sip:nobody@pbx.test", "sip:x@h")])
    rows = await store.load_bindings()
    assert [(r["aor"], r["contact"], r["cseq"]) for r in rows] == [
        ("sip:1001@pbx.test", "sip:b@h", 7), ("sip:1003@pbx.test", "sip:d@h", 314159)]


@pytest_twisted.ensureDeferred
async def test_a_key_both_deleted_and_upserted_stays_stored(backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h", cseq=1)], [])
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h", cseq=2)],
                              [("sip:1001@pbx.test", "sip:a@h")])
    assert [r["cseq"] for r in await store.load_bindings()] == [2]


@pytest_twisted.ensureDeferred
async def test_save_bindings_is_one_transaction(backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h")], [])
    # The delete runs first, then the database refuses the (valid-looking) huge CSeq:
    # the delete must be rolled back with it.
    batch = [binding(f"sip:{n}@pbx.test", "sip:x@h") for n in range(300)]
    batch.append(binding("sip:9999@pbx.test", "sip:y@h", cseq=2**70))
    with pytest.raises(StoreError):
        await store.save_bindings(batch, [("sip:1001@pbx.test", "sip:a@h")])
    assert [r["contact"] for r in await store.load_bindings()] == ["sip:a@h"]


@pytest_twisted.ensureDeferred
async def test_large_binding_batches_are_saved_whole(backend: Backend):
    store = await ready(backend)
    batch = [binding(f"sip:{n}@pbx.test", f"sip:{n}@h") for n in range(450)]
    await store.save_bindings(batch, [])
    assert len(await store.load_bindings()) == 450
    await store.save_bindings([], [(b["aor"], b["contact"]) for b in batch[:430]])
    assert len(await store.load_bindings()) == 20


@pytest_twisted.ensureDeferred
async def test_save_bindings_rejects_malformed_rows_before_touching_the_database(
        backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h")], [])
    good = binding("sip:1002@pbx.test", "sip:b@h")
    for bad, match in (({**good, "expires": 60}, "unknown"),
                       ({k: v for k, v in good.items() if k != "call_id"}, "call_id"),
                       ({**good, "cseq": "1"}, "cseq"),
                       ({**good, "expires_at": float("nan")}, "expires_at"),
                       ({**good, "contact": "sip:b\x00@h"}, "NUL")):
        with pytest.raises(ValueError, match=match):
            await store.save_bindings([bad], [("sip:1001@pbx.test", "sip:a@h")])
    assert len(await store.load_bindings()) == 1


@pytest_twisted.ensureDeferred
async def test_delete_bindings_for_one_aor_counts_them(backend: Backend):
    store = await ready(backend)
    await store.save_bindings([binding("sip:1001@pbx.test", "sip:a@h"),
                               binding("sip:1001@pbx.test", "sip:b@h"),
                               binding("sip:1002@pbx.test", "sip:a@h")], [])
    assert await store.delete_bindings_for("sip:1001@pbx.test") == 2
    assert await store.delete_bindings_for("sip:1001@pbx.test") == 0
    assert [r["aor"] for r in await store.load_bindings()] == ["sip:1002@pbx.test"]


# -- call detail records -----------------------------------------------------------------

async def _seed_cdrs(store: Store) -> list[int]:
    ids = []
    for i, (caller, callee) in enumerate([("1001", "1002"), ("1002", "1003"),
                                          ("1003", "1001"), ("1001", "1004"),
                                          ("1005", "1006")]):
        ids.append(await store.add_cdr(cdr(f"call-{i}", caller, callee, 1000.0 + i * 10,
                                           duration=5.0, billsec=4.5)))
    return ids


@pytest_twisted.ensureDeferred
async def test_cdrs_are_listed_newest_first_with_all_columns(backend: Backend):
    store = await ready(backend)
    ids = await _seed_cdrs(store)
    assert ids == sorted(ids) and len(set(ids)) == 5
    rows = await store.list_cdr()
    assert [r["call_id"] for r in rows] == [f"call-{i}" for i in (4, 3, 2, 1, 0)]
    assert rows[-1] == {
        "id": ids[0], "call_id": "call-0", "caller": "1001", "callee": "1002",
        "start_time": 1000.0, "answer_time": None, "end_time": None, "duration": 5.0,
        "billsec": 4.5, "disposition": "ANSWERED", "hangup_cause": None,
        "hangup_side": None, "qos": None, "node": None, "state": "closed"}


@pytest_twisted.ensureDeferred
async def test_cdr_filters_by_time_window_and_extension(backend: Backend):
    store = await ready(backend)
    await _seed_cdrs(store)

    async def calls(**kw: Any) -> list[str]:
        return [r["call_id"] for r in await store.list_cdr(**kw)]

    assert await calls(since=1010.0, until=1030.0) == ["call-2", "call-1"]  # [since, until)
    assert await calls(extension="1001") == ["call-3", "call-2", "call-0"]
    assert await calls(extension="1001", since=1005.0) == ["call-3", "call-2"]
    assert await calls(extension="7777") == []


@pytest_twisted.ensureDeferred
async def test_cdr_paging_with_limit_and_offset(backend: Backend):
    store = await ready(backend)
    await _seed_cdrs(store)
    pages = [[r["call_id"] for r in await store.list_cdr(limit=2, offset=o)]
             for o in (0, 2, 4, 6)]
    assert pages == [["call-4", "call-3"], ["call-2", "call-1"], ["call-0"], []]
    with pytest.raises(ValueError):
        await store.list_cdr(limit=-1)


@pytest_twisted.ensureDeferred
async def test_cdr_qos_round_trips_as_json(backend: Backend):
    store = await ready(backend)
    qos = {"mos": 4.31, "jitter_ms": [1.5, 2.0], "lost": 0, "codec": "PCMU", "ok": True}
    await store.add_cdr(cdr("q1", "1001", "1002", 1.0, qos=qos))
    await store.add_cdr(cdr("q2", "1001", "1002", 2.0, qos='{"mos": 3.0}'))
    rows = {r["call_id"]: r["qos"] for r in await store.list_cdr()}
    assert rows == {"q1": qos, "q2": {"mos": 3.0}}
    with pytest.raises(ValueError):
        await store.add_cdr(cdr("q3", "1001", "1002", 3.0, qos="not json"))


@pytest_twisted.ensureDeferred
async def test_open_cdr_is_closed_by_update(backend: Backend):
    store = await ready(backend)
    await store.add_cdr(cdr("c1", "1001", "1002", 50.0, answer_time=51.0, state="open",
                            node="node-a"))
    changed = await store.update_cdr("c1", {"end_time": 81.0, "duration": 31.0,
                                            "billsec": 30.0, "state": "closed",
                                            "hangup_cause": "BYE", "hangup_side": "caller"})
    assert changed == 1
    [row] = await store.list_cdr()
    assert (row["state"], row["end_time"], row["billsec"], row["hangup_side"]) == (
        "closed", 81.0, 30.0, "caller")
    assert await store.update_cdr("missing", {"state": "closed"}) == 0
    with pytest.raises(ValueError):
        await store.update_cdr("c1", {"state": "ringing"})
    with pytest.raises(ValueError):
        await store.update_cdr("c1", {"id": 5})


@pytest_twisted.ensureDeferred
async def test_mark_open_cdrs_interrupted_touches_only_this_nodes_open_calls(
        backend: Backend):
    store = await ready(backend)
    await store.add_cdr(cdr("a", "1", "2", 1.0, state="open", node="node-a"))
    await store.add_cdr(cdr("b", "1", "2", 2.0, state="open", node="node-a"))
    await store.add_cdr(cdr("c", "1", "2", 3.0, state="closed", node="node-a"))
    await store.add_cdr(cdr("d", "1", "2", 4.0, state="open", node="node-b"))
    await store.add_cdr(cdr("e", "1", "2", 5.0, state="open"))
    assert await store.mark_open_cdrs_interrupted("node-a") == 2
    assert await store.mark_open_cdrs_interrupted("node-a") == 0
    assert await store.mark_open_cdrs_interrupted(None) == 1
    states = {r["call_id"]: r["state"] for r in await store.list_cdr()}
    assert states == {"a": "interrupted", "b": "interrupted", "c": "closed", "d": "open",
                      "e": "interrupted"}


@pytest_twisted.ensureDeferred
async def test_add_cdr_requires_the_identifying_columns(backend: Backend):
    store = await ready(backend)
    with pytest.raises(ValueError, match="disposition"):
        await store.add_cdr({"call_id": "x", "caller": "1", "callee": "2", "start_time": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        await store.add_cdr(cdr("x", "1", "2", 1.0, colour="blue"))
    assert await store.list_cdr() == []


# -- backend selection and SQLite specifics ----------------------------------------------

def test_open_store_picks_the_backend_from_the_url_scheme(tmp_path):
    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.db"), SQLiteStore)
    for url in ("postgresql://u@h/db", "postgres://u@h:5433/db"):
        assert isinstance(open_store(url, pool_min=2, pool_max=4), PostgresStore)
    pool = open_store("postgresql://u@h/db", pool_min=0, pool_max=3)
    assert (pool.pool_min, pool.pool_max) == (1, 3)  # one connection is always kept
    with pytest.raises(ValueError, match="mysql"):
        open_store("mysql://u@h/db")


def test_sqlite_urls_map_to_relative_and_absolute_paths():
    assert sqlite_path_from_url("sqlite:///var/pbx.sqlite3") == "var/pbx.sqlite3"
    assert sqlite_path_from_url("sqlite:////srv/pbx/pbx.sqlite3") == "/srv/pbx/pbx.sqlite3"
    with pytest.raises(ValueError):
        sqlite_path_from_url("sqlite:///")


def test_postgres_dsn_gets_search_path_application_name_and_keepalives():
    dsn = build_dsn("postgresql://pbx:pw@db:5433/pbx", schema="tenant_1")
    assert "options=-csearch_path=tenant_1" in dsn and "application_name=pbx" in dsn
    assert "keepalives=1" in dsn and "port=5433" in dsn and "password=pw" in dsn
    with pytest.raises(ValueError):
        build_dsn("postgresql://db/pbx", schema="x; DROP TABLE y")


def test_reconnect_backoff_starts_at_once_doubles_and_caps():
    delays = [backoff_delay(n, rng=lambda: 0.5) for n in range(10)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert 0.45 <= backoff_delay(1, rng=lambda: 0.0) < backoff_delay(1, rng=lambda: 1.0) <= 0.55


def test_dialects_differ_only_in_placeholders_and_types():
    assert POSTGRESQL.sql("SELECT '100%' WHERE a = ?") == "SELECT '100%%' WHERE a = %s"
    assert SQLITE.sql("SELECT a WHERE a = ?") == "SELECT a WHERE a = ?"
    assert "DOUBLE PRECISION" in POSTGRESQL.ddl(MIGRATIONS[0].statements[1])
    assert "{" not in SQLITE.ddl(MIGRATIONS[0].statements[4])


@pytest_twisted.ensureDeferred
async def test_sqlite_creates_parent_directories_and_uses_wal(tmp_path):
    path = tmp_path / "a" / "b" / "pbx.sqlite3"
    store = open_store(f"sqlite:///{path}", reactor=reactor)
    try:
        await store.migrate()
        assert path.exists()
    finally:
        await store.close()
    import sqlite3
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_unusable_sqlite_path_fails_open_with_store_unavailable(tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    store = open_store(f"sqlite:///{tmp_path}/taken/pbx.sqlite3", reactor=reactor)
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert store.state == "closed"


# -- PostgreSQL: pool and reconnection ---------------------------------------------------

def _backends(app: str) -> int:
    return int(pg_admin("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s",
                        (app,))[0][0])


@pytest_twisted.ensureDeferred
async def test_unreachable_postgres_fails_open_quickly(postgres_backend: Backend):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store(f"postgresql://postgres@127.0.0.1:{port}/test", reactor=reactor)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await store.open()
    assert time.monotonic() - started < 3
    assert store.state == "closed"


@pytest_twisted.ensureDeferred
async def test_pool_opens_pool_min_and_grows_to_pool_max_under_load(
        postgres_backend: Backend):
    app = postgres_backend.options["application_name"]
    store = await ready(postgres_backend, pool_min=2, pool_max=4)
    assert await threads.deferToThread(_backends, app) == 2
    await store.add_extension(ext("1001"))
    results = await defer.gatherResults([store.list_extensions() for _ in range(60)])
    assert all(len(r) == 1 for r in results)
    count = await threads.deferToThread(_backends, app)
    assert 2 < count <= 4


@pytest_twisted.ensureDeferred
async def test_store_reconnects_after_its_backends_are_terminated(postgres_backend: Backend):
    app = postgres_backend.options["application_name"]
    store = await ready(postgres_backend, pool_min=2, pool_max=2)
    await store.add_extension(ext("1001"))
    killed = await postgres_backend.run_raw(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
        (app,))
    assert len(killed) == 2 and all(ok for (ok,) in killed)
    # Every query either works (on a reconnected connection) or fails fast: none hangs.
    outcomes = []
    for _ in range(30):
        started = time.monotonic()
        try:
            await store.get_extension("1001")
            outcomes.append("ok")
        except StoreUnavailable:
            outcomes.append("unavailable")
        assert time.monotonic() - started < 1.0
        await sleep(0.05)
    assert outcomes[-1] == "ok", outcomes
    await wait_until(lambda: _backends(app) == 2, 5, "both connections back")
    assert store.state == "connected"
    record = await store.get_extension("1001")
    assert record is not None and record.number == "1001"


@pytest_twisted.ensureDeferred
async def test_queries_fail_fast_while_postgres_refuses_and_recover_with_backoff(
        postgres_backend: Backend):
    role = f"pbx_test_{secrets.token_hex(4)}"
    schema = postgres_backend.schema
    app = f"{role}_app"
    await postgres_backend.run_raw(f"CREATE ROLE {role} LOGIN")
    try:
        await postgres_backend.run_raw(f"ALTER SCHEMA {schema} OWNER TO {role}")
        url = PG_DSN.replace("://postgres@", f"://{role}@")
        store = open_store(url, reactor=reactor, schema=schema, application_name=app,
                           pool_min=2, pool_max=2, reconnect_initial=0.2, reconnect_max=0.8)
        postgres_backend.stores.append(store)
        await store.migrate()  # as the least-privilege role that owns only its schema
        await store.open()
        await store.add_extension(ext("1001"))

        # The server goes away and refuses new connections.
        await postgres_backend.run_raw(f"ALTER ROLE {role} NOLOGIN")
        await postgres_backend.run_raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
            (app,))
        await wait_until(lambda: store.state == "disconnected", 5, "disconnected state")
        await sleep(1.0)  # several reconnect attempts fail meanwhile
        assert store.state == "disconnected"
        for call in (store.ping, lambda: store.get_extension("1001"),
                     lambda: store.add_extension(ext("1002"))):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 0.2

        # It comes back: the store reconnects on its own within the backoff cap.
        await postgres_backend.run_raw(f"ALTER ROLE {role} LOGIN")
        took = await wait_until(lambda: store.state == "connected", 5, "reconnection")
        assert took <= 0.8 * 1.1 + 0.5
        record = await store.get_extension("1001")
        assert record is not None
        await store.add_extension(ext("1002"))
    finally:
        for store in postgres_backend.stores:
            await store.close()
        await postgres_backend.run_raw(f"ALTER SCHEMA {schema} OWNER TO postgres")
        await postgres_backend.run_raw(f"DROP OWNED BY {role}")
        await postgres_backend.run_raw(f"DROP ROLE {role}")


def _hold_table_lock(table: str, seconds: float, schema: str | None,
                     locked: threading.Event) -> None:
    conn = psycopg2.connect(PG_DSN, options=f"-csearch_path={schema}")
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(seconds)
        conn.rollback()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_connection_lost_mid_transaction_fails_it_and_commits_nothing(
        postgres_backend: Backend):
    app = postgres_backend.options["application_name"]
    store = await ready(postgres_backend, pool_min=1, pool_max=1)
    locked = threading.Event()
    holder = threads.deferToThread(_hold_table_lock, "extensions", 2.0,
                                   postgres_backend.schema, locked)
    await wait_until(locked.is_set, 5, "table lock")
    started = time.monotonic()
    insert = store.add_extension(ext("3003"))  # waits for the lock inside its transaction
    finished: list[bool] = []
    insert.addBoth(lambda result: finished.append(True) or result)
    await sleep(0.3)
    assert not finished
    await postgres_backend.run_raw(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
        (app,))
    with pytest.raises(StoreUnavailable, match="lost"):
        await insert
    assert time.monotonic() - started < 1.5  # failed at once, not when the lock went
    await holder
    await wait_until(lambda: store.state == "connected", 5, "reconnection")
    assert await store.get_extension("3003") is None
    await store.add_extension(ext("3003"))
    assert await store.get_extension("3003") is not None
