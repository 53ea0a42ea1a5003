"""Round-trip properties of the store on both backends (SQLite file, real PostgreSQL).

Each example is a real database round trip, so ``max_examples`` is set lower than the
suite's CI profile. Text is any Unicode except what UTF-8/PostgreSQL cannot carry
(surrogates) and NUL, which the store refuses on both backends.

pytest-twisted wraps a hypothesis test's inner test *in place* on each call, so one
test function parametrized over two backends would be wrapped twice and fail. Each
property is therefore written once as a factory and ``@each_backend`` builds one test
function per backend from it.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from pbx.store import ExtensionRecord, Store, open_store
from tests.integration.store_fixtures import PG_DSN, pg_admin, require_postgres

pytestmark = pytest.mark.integration

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
               max_size=40)
NONEMPTY = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                   min_size=1, max_size=20)
DB_SETTINGS = settings(max_examples=40, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One migrated store per backend for the whole module (examples clean up)."""
    schema = None
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("store") / "pbx.sqlite3"
        db = open_store(f"sqlite:///{path}", reactor=reactor)
    else:
        require_postgres()
        schema = f"pbx_test_{secrets.token_hex(6)}"
        pg_admin(f"CREATE SCHEMA {schema}")
        db = open_store(PG_DSN, reactor=reactor, schema=schema)
    try:
        pytest_twisted.blockon(db.migrate())
        pytest_twisted.blockon(db.open())
        yield db
    finally:
        pytest_twisted.blockon(db.close())
        if schema is not None:
            pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def each_backend(factory: Callable[[], Callable[..., Any]]) -> None:
    """Define ``<factory name>_<backend>`` tests in the factory's module."""
    module = sys.modules[factory.__module__]
    for kind in BACKENDS:
        test = pytest.mark.parametrize("store", [kind], indirect=True)(factory())
        name = f"{factory.__name__}_{kind}"
        test.__name__ = test.__qualname__ = name
        setattr(module, name, test)


async def _clear_extensions(db: Store) -> None:
    for record in await db.list_extensions():
        await db.remove_extension(record.number)


@each_backend
def test_extension_records_round_trip() -> Callable[..., Any]:
    @DB_SETTINGS
    @given(number=NONEMPTY, name=st.none() | TEXT, realm=TEXT, pin=st.none() | TEXT,
           enabled=st.booleans(),
           created=st.floats(min_value=0, max_value=4e9, allow_nan=False))
    @pytest_twisted.ensureDeferred
    async def test(store: Store, number: str, name: str | None, realm: str,
                   pin: str | None, enabled: bool, created: float) -> None:
        """Whatever text an extension holds comes back unchanged, floats included."""
        record = ExtensionRecord(number=number, display_name=name, enabled=enabled,
                                 realm=realm, ha1_md5=None, ha1_sha256="x",
                                 voicemail_pin=pin, created_at=created, updated_at=created)
        await store.add_extension(record)
        try:
            assert await store.get_extension(number) == record
        finally:
            await store.remove_extension(number)

    return test


@each_backend
def test_extensions_list_in_code_point_order() -> Callable[..., Any]:
    @settings(DB_SETTINGS, max_examples=20)
    @given(numbers=st.sets(NONEMPTY, min_size=1, max_size=8))
    @pytest_twisted.ensureDeferred
    async def test(store: Store, numbers: set[str]) -> None:
        """Both backends order numbers alike: by Unicode code point, like sorted()."""
        await _clear_extensions(store)
        for number in numbers:
            await store.add_extension(ExtensionRecord(number, None, True, "r", None, None))
        assert [e.number for e in await store.list_extensions()] == sorted(numbers)
        await _clear_extensions(store)

    return test


@each_backend
def test_bindings_round_trip() -> Callable[..., Any]:
    @DB_SETTINGS
    @given(aor=NONEMPTY, contacts=st.lists(NONEMPTY, min_size=1, max_size=4, unique=True),
           user_agent=st.none() | TEXT, call_id=TEXT,
           expires=st.floats(min_value=0, max_value=4e9, allow_nan=False),
           q=st.none() | st.floats(min_value=0, max_value=1),
           cseq=st.integers(min_value=0, max_value=2**31 - 1))
    @pytest_twisted.ensureDeferred
    async def test(store: Store, aor: str, contacts: list[str], user_agent: str | None,
                   call_id: str, expires: float, q: float | None, cseq: int) -> None:
        """A saved binding loads back equal, whatever Unicode its AOR and contact hold."""
        rows = [{"aor": aor, "contact": contact, "expires_at": expires, "q": q,
                 "call_id": call_id, "cseq": cseq, "transport": "tls",
                 "source_host": "::1", "source_port": 5061, "user_agent": user_agent,
                 "instance_id": None, "reg_id": None, "node": None, "updated_at": 1.5}
                for contact in contacts]
        await store.save_bindings(rows, [])
        try:
            loaded = [b for b in await store.load_bindings() if b["aor"] == aor]
            assert sorted(loaded, key=lambda b: b["contact"]) == \
                sorted(rows, key=lambda b: b["contact"])
        finally:
            assert await store.delete_bindings_for(aor) == len(contacts)

    return test


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False, width=64) | TEXT,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=10)


@each_backend
def test_cdr_qos_json_round_trips() -> Callable[..., Any]:
    @DB_SETTINGS
    @given(qos=st.dictionaries(TEXT, JSON, max_size=5), caller=NONEMPTY, callee=NONEMPTY)
    @pytest_twisted.ensureDeferred
    async def test(store: Store, qos: dict[str, Any], caller: str, callee: str) -> None:
        """QoS JSON comes back equal on both backends (stored as exact JSON text)."""
        call_id = secrets.token_hex(8)
        await store.add_cdr({"call_id": call_id, "caller": caller, "callee": callee,
                             "start_time": 1.0, "disposition": "ANSWERED", "qos": qos})
        rows = [r for r in await store.list_cdr(extension=caller, limit=1000)
                if r["call_id"] == call_id]
        assert [r["qos"] for r in rows] == [qos]

    return test
