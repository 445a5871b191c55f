"""``bird db upgrade`` against real PostgreSQL and SQLite, through the real command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

from service.db import current_revision, head_revision, make_engine, session_factory
from service.models import ApiKey


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


def test_api_only_on_postgresql_prints_no_key_of_its_own(pg_url, tmp_path: Path):
    """A production API (PostgreSQL) on a database without keys creates none: its output is
    container logs, and a working key there lets in whoever reads them. (The embedded default
    does print one: tests/e2e/test_embedded.py.)"""
    url = pg_url.render_as_string(hide_password=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "BIRD_DATABASE_URL": url,
        "BIRD_DATA_DIR": str(tmp_path),
        "BIRD_API_PORT": str(port),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--api-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the API did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"bird API:   http://127.0.0.1:{port}" in output, output
    assert "API key" not in output and "bird_" not in output, output
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            assert session.scalar(select(func.count()).select_from(ApiKey)) == 0
    finally:
        engine.dispose()
