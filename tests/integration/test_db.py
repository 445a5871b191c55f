"""service.db and service.models on real PostgreSQL and SQLite: migrations, types, constraints."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Engine, Index, MetaData, inspect, select, text
from sqlalchemy.exc import DataError, IntegrityError, StatementError
from sqlalchemy.orm import Session

from service import queue
from service.db import (
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    session_factory,
    upgrade,
)
from service.models import Base, Job, JobState, Tenant


def schema_diff(engine: Engine, metadata: MetaData = Base.metadata) -> list:
    """Alembic's autogenerate diff between the live database and ``metadata`` (types included,
    server defaults included)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(context, metadata)


def test_migrated_schema_equals_the_models(db_engine: Engine) -> None:
    assert schema_diff(db_engine) == []
    tables = set(inspect(db_engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_schema_comparison_is_not_vacuous(db_engine: Engine) -> None:
    """The comparison above would see a missing index or column (so an empty diff means
    something), including one on the descending claim index's table."""
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    jobs = changed.tables["jobs"]
    Index("ix_jobs_extra", jobs.c.priority, jobs.c.id)
    changed.remove(changed.tables["job_logs"])
    kinds = {entry[0] for entry in schema_diff(db_engine, changed) if isinstance(entry, tuple)}
    assert {"add_index", "remove_table"} <= kinds


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrade_is_idempotent(backend: str, request: pytest.FixtureRequest) -> None:
    url: URL = request.getfixturevalue(f"{'pg' if backend == 'postgresql' else 'sqlite'}_empty_url")
    assert current_revision(url) is None
    upgrade(url)
    assert current_revision(url) == head_revision() == "0003_fair_claim"
    upgrade(url)  # already at head: nothing to do, no error
    assert current_revision(url) == head_revision()
    engine = make_engine(url)
    try:
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_upgrade_accepts_an_engine(sqlite_empty_url: URL) -> None:
    engine = make_engine(sqlite_empty_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_json_spec_round_trips(db_engine: Engine, db_tenant_id: int) -> None:
    spec = {
        "dataset": {"uri": "s3://bucket/datasets/fmnist/", "splits": ["train", "val"]},
        "method": {"name": "bird", "phi_lr": 100.0, "gamma": 5, "meta_fraction": 0.1},
        "search": None,
        "flags": [True, False],
        "note": "σ(φ) ≈ 1 — ünïcode",
        "big": 2**40,
    }
    with session_factory(db_engine)() as session:
        job_id = queue.submit(session, db_tenant_id, spec).id
    # A fresh session reads what the database holds, not the identity map.
    with session_factory(db_engine)() as session:
        assert session.get(Job, job_id).spec == spec


def test_timestamps_are_aware_utc(db_engine: Engine, db_tenant_id: int) -> None:
    before = datetime.now(timezone.utc)
    with session_factory(db_engine)() as session:
        job = queue.submit(session, db_tenant_id, {"x": 1})
        queue.claim(session, "w1", 30)
        job_id = job.id
    with session_factory(db_engine)() as session:
        job = session.get(Job, job_id)
        for value in (job.created_at, job.updated_at, job.started_at, job.lease_expires_at):
            assert value.tzinfo is not None
            assert value.utcoffset() == timedelta(0)
        # Same clock within a second (PostgreSQL uses the server's clock, same machine here).
        assert abs(job.created_at - before) < timedelta(seconds=5)
        assert timedelta(seconds=25) < job.lease_expires_at - job.started_at < timedelta(seconds=35)


def test_aware_timestamps_in_other_zones_are_stored_as_utc(
    db_session: Session, db_tenant_id: int
) -> None:
    plus_two = timezone(timedelta(hours=2))
    tenant = db_session.get(Tenant, db_tenant_id)
    tenant.created_at = datetime(2024, 5, 1, 12, 0, tzinfo=plus_two)
    db_session.commit()
    db_session.expire_all()
    assert db_session.get(Tenant, db_tenant_id).created_at == datetime(
        2024, 5, 1, 10, 0, tzinfo=timezone.utc
    )
    assert db_session.get(Tenant, db_tenant_id).created_at.tzinfo == timezone.utc


def test_naive_timestamps_are_refused(db_session: Session) -> None:
    db_session.add(Tenant(name="naive", created_at=datetime(2024, 1, 1)))
    with pytest.raises(StatementError, match="naive datetime"):
        db_session.commit()
    db_session.rollback()


def test_state_check_constraint_rejects_unknown_states(
    db_engine: Engine, db_tenant_id: int
) -> None:
    """The CHECK constraint holds for writers that bypass the Python enum (raw SQL)."""
    with db_engine.connect() as connection:
        with pytest.raises(IntegrityError):
            connection.execute(
                text(
                    "INSERT INTO jobs (tenant_id, spec, state, created_at, updated_at) "
                    "VALUES (:tenant, '{}', 'paused', :now, :now)"
                ),
                {"tenant": db_tenant_id, "now": datetime(2024, 1, 1)},
            )
        connection.rollback()


def _insert_job_with_stage(connection: Any, tenant_id: int, stage: str) -> None:
    connection.execute(
        text(
            "INSERT INTO jobs (tenant_id, spec, state, stage, created_at, updated_at) "
            "VALUES (:tenant, '{}', 'running', :stage, :now, :now)"
        ),
        {"tenant": tenant_id, "stage": stage, "now": datetime(2024, 1, 1)},
    )


def test_stage_check_constraint_allows_waiting_for_resources_only_among_new_stages(
    db_engine: Engine, db_tenant_id: int
) -> None:
    """The migrated column holds the longest stage, and its CHECK still refuses unknown ones
    (SQLite rebuilt the table in the migration: the constraint must have come along)."""
    with db_engine.connect() as connection:
        _insert_job_with_stage(connection, db_tenant_id, "waiting_for_resources")
        connection.commit()
        with pytest.raises(IntegrityError):
            _insert_job_with_stage(connection, db_tenant_id, "napping")
        connection.rollback()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_stage_migration_downgrades_and_upgrades_again(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url: URL = request.getfixturevalue(f"{'pg' if backend == 'postgresql' else 'sqlite'}_empty_url")
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            tenant = Tenant(name="t")
            session.add(tenant)
            session.commit()
            tenant_id = tenant.id
        with engine.connect() as connection:
            _insert_job_with_stage(connection, tenant_id, "waiting_for_resources")
            connection.commit()
        command.downgrade(alembic_config(engine), "0001_initial")
        with engine.connect() as connection:
            # The waiting job lost its stage; the old column refuses the new stage again
            # (PostgreSQL: too long for it; SQLite: its CHECK).
            assert connection.execute(text("SELECT stage FROM jobs")).scalar_one() is None
            with pytest.raises((IntegrityError, DataError)):
                _insert_job_with_stage(connection, tenant_id, "waiting_for_resources")
            connection.rollback()
        upgrade(engine)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_progress_and_foreign_keys_are_enforced(db_engine: Engine, db_tenant_id: int) -> None:
    with session_factory(db_engine)() as session:
        job = queue.submit(session, db_tenant_id, {})
        job.progress = 1.5
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
    with session_factory(db_engine)() as session, pytest.raises(IntegrityError):
        queue.submit(session, db_tenant_id + 1000, {})  # no such tenant


def test_enum_columns_reject_unknown_values_in_python(db_session: Session) -> None:
    with pytest.raises(ValueError):
        JobState("paused")
    job = Job(tenant_id=1, spec={}, state="paused")
    db_session.add(job)
    with pytest.raises(StatementError):
        db_session.flush()
    db_session.rollback()


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(sqlite_url: URL) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    finally:
        engine.dispose()


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'bird-data' / 'nested' / 'bird.db').as_posix()}"
    upgrade(url)
    assert (tmp_path / "bird-data" / "nested" / "bird.db").is_file()
    assert current_revision(url) == head_revision()


def test_postgresql_engine_pings_its_pool(pg_url: URL) -> None:
    engine = make_engine(pg_url)
    try:
        assert engine.pool._pre_ping
        with engine.connect() as connection:
            # The per-test schema, not public, is where the tables live.
            schema = connection.execute(text("SELECT current_schema()")).scalar()
            assert schema.startswith("t_")
            assert connection.execute(select(Job.id)).all() == []
    finally:
        engine.dispose()


def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        make_engine("mysql://user@localhost/db")
