"""Database fixtures: a migrated PostgreSQL schema and a migrated SQLite file per test.

PostgreSQL: each test gets a fresh schema ``t_<random>`` in the local database (never the
``public`` schema, which other tests may use), selected through the connection's
``search_path``, migrated with ``service.db.upgrade`` and dropped afterwards. PostgreSQL not
answering is a failure, not a skip: the integration tests exist to run against it.

``tests/integration/conftest.py`` imports the fixtures, so every integration test module sees
them.
Fixtures: ``pg_empty_url``/``sqlite_empty_url`` (fresh, unmigrated), ``pg_url``/``sqlite_url``
(migrated), ``db_url`` (both, parametrised), ``db_engine``, ``db_session``, ``db_tenant_id``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, make_url, text
from sqlalchemy.orm import Session

from service.db import make_engine, session_factory, upgrade
from service.models import Tenant

# The local PostgreSQL of these machines (trust auth); override to point elsewhere.
PG_ADMIN_URL = os.environ.get(
    "BIRD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pg_schema_url(schema: str, base: str | URL = PG_ADMIN_URL) -> URL:
    """``base`` with every connection's ``search_path`` set to ``schema`` (libpq options)."""
    return make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})


def _admin_engine() -> Engine:
    # A bounded connect: an unreachable host must fail the test, not hang it.
    engine = make_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # the message names the URL and what went wrong
        engine.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({type(error).__name__}: {error}). "
            "Integration tests need it: start the local cluster (.ci/run does) or set "
            "BIRD_TEST_POSTGRES_URL.",
            pytrace=False,
        )
    return engine


@pytest.fixture
def pg_empty_url() -> Iterator[URL]:
    """A URL whose connections use a fresh, empty PostgreSQL schema (dropped afterwards)."""
    admin = _admin_engine()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield pg_schema_url(schema)
    finally:
        with admin.begin() as connection:
            # A connection the test leaked with locks held must fail the teardown, not hang it.
            connection.execute(text("SET LOCAL lock_timeout = '30s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_empty_url: URL) -> URL:
    """A URL of a fresh PostgreSQL schema migrated to head."""
    upgrade(pg_empty_url)
    return pg_empty_url


@pytest.fixture
def sqlite_empty_url(tmp_path: Path) -> URL:
    """A URL of a SQLite file that does not exist yet."""
    return make_url(f"sqlite:///{(tmp_path / 'bird.db').as_posix()}")


@pytest.fixture
def sqlite_url(sqlite_empty_url: URL) -> URL:
    """A URL of a fresh SQLite file migrated to head."""
    upgrade(sqlite_empty_url)
    return sqlite_empty_url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> URL:
    """A migrated database URL; tests using it run once on PostgreSQL and once on SQLite."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def db_engine(db_url: URL) -> Iterator[Engine]:
    """An engine on ``db_url`` (disposed afterwards)."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    """A session on ``db_engine`` (closed afterwards)."""
    with session_factory(db_engine)() as session:
        yield session


@pytest.fixture
def db_tenant_id(db_session: Session) -> int:
    """The id of a tenant created for the test."""
    tenant = Tenant(name=f"tenant-{uuid.uuid4().hex[:8]}")
    db_session.add(tenant)
    db_session.commit()
    return tenant.id
