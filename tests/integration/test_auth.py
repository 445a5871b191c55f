"""API keys on real PostgreSQL and SQLite: created once, stored hashed, tenant-bound."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, select

from service.auth import authenticate, create_key, hash_key, key_owner
from service.db import make_engine, session_factory
from service.models import ApiKey, Tenant, utcnow


@contextmanager
def statements_on(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` sends while the block runs."""
    sent: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_keys_are_stored_hashed_and_authenticate_their_tenant(db_session):
    first = create_key(db_session, "acme")
    second = create_key(db_session, "acme")
    other = create_key(db_session, "globex")
    assert first.key != second.key and first.tenant_id == second.tenant_id != other.tenant_id

    rows = db_session.scalars(select(ApiKey)).all()
    stored = {r.key_hash for r in rows} | {r.key_prefix for r in rows}
    assert first.key not in stored and hash_key(first.key) in stored  # never in plaintext

    assert authenticate(db_session, first.key).name == "acme"
    assert authenticate(db_session, other.key).name == "globex"
    assert authenticate(db_session, first.key[:-1] + "x") is None
    assert authenticate(db_session, "not-a-key") is None

    row = db_session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(first.key)))
    row.revoked_at = utcnow()
    db_session.commit()
    assert authenticate(db_session, first.key) is None
    assert authenticate(db_session, second.key).name == "acme"
    assert db_session.scalar(select(Tenant).where(Tenant.name == "acme")) is not None


def test_a_key_is_checked_with_one_query_and_revocation_counts_at_once(db_engine, db_session):
    first = create_key(db_session, "acme")
    other = create_key(db_session, "globex")
    with statements_on(db_engine) as sent:
        assert authenticate(db_session, first.key).name == "acme"
    assert len(sent) == 1, sent  # the key and its tenant together, not a lookup per table
    with db_engine.connect() as connection, statements_on(db_engine) as sent:
        assert key_owner(connection, first.key) == (first.tenant_id, "acme")
        assert key_owner(connection, other.key) == (other.tenant_id, "globex")
        assert key_owner(connection, first.key[:-1] + "x") is None
    assert len(sent) == 3, sent
    with statements_on(db_engine) as sent:
        # What cannot be a key is refused without asking the database.
        assert key_owner(db_session, "not-a-key") is None
        assert key_owner(db_session, "bird_" + "x" * 300) is None
    assert sent == []

    row = db_session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(first.key)))
    row.revoked_at = utcnow()
    db_session.commit()
    with db_engine.connect() as connection:
        assert key_owner(connection, first.key) is None  # nothing is cached anywhere
    assert authenticate(db_session, first.key) is None
    assert key_owner(db_session, other.key) == (other.tenant_id, "globex")


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "bad\nname"])
def test_bad_tenant_names_are_refused(db_session, name):
    with pytest.raises(ValueError, match="tenant name"):
        create_key(db_session, name)


def test_cli_prints_the_key_once_and_it_authenticates(pg_url, tmp_path: Path):
    url = pg_url.render_as_string(hide_password=False)
    env = {**os.environ, "BIRD_DATABASE_URL": url, "BIRD_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--tenant", "initech"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert key.startswith("bird_") and "shown only once" in proc.stderr
    assert key not in proc.stderr
    with session_factory(make_engine(url))() as session:
        assert authenticate(session, key).name == "initech"
