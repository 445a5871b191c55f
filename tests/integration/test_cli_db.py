"""``bird db upgrade`` against real PostgreSQL and SQLite, through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.db import current_revision, head_revision


def _bird(*args: str, database_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIRD_DATABASE_URL": database_url, "BIRD_DATA_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_db_upgrade_migrates_postgresql_and_is_idempotent(pg_empty_url, tmp_path: Path):
    url = pg_empty_url.render_as_string(hide_password=False)
    assert current_revision(url) is None
    first = _bird("db", "upgrade", database_url=url, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert current_revision(url) == head_revision()
    assert "(was empty)" in first.stdout
    again = _bird("db", "upgrade", database_url=url, tmp_path=tmp_path)
    assert again.returncode == 0 and f"(was {head_revision()})" in again.stdout


def test_db_upgrade_on_sqlite_creates_the_file(tmp_path: Path):
    db = tmp_path / "nested" / "bird.db"
    result = _bird("db", "upgrade", database_url=f"sqlite:///{db}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert db.is_file() and current_revision(f"sqlite:///{db}") == head_revision()


def test_db_upgrade_errors_are_one_line_and_hide_the_password(tmp_path: Path):
    bad = _bird("db", "upgrade", database_url="mysql://x", tmp_path=tmp_path)
    assert bad.returncode == 2
    assert "BIRD_DATABASE_URL" in bad.stderr and "Traceback" not in bad.stderr
    down = _bird(
        "db",
        "upgrade",
        database_url="postgresql+psycopg://u:s3cret@127.0.0.1:1/x",
        tmp_path=tmp_path,
    )
    assert down.returncode == 1
    assert "s3cret" not in down.stderr and "127.0.0.1:1" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
