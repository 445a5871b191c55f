"""Database engines, sessions and schema migrations (PostgreSQL in production, SQLite embedded).

``upgrade(url)`` runs the Alembic migrations in ``service/migrations`` to head; the Alembic
configuration is built in code, so no ``alembic.ini`` is needed anywhere (``bird db upgrade``
calls this function).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "make_engine",
    "session_factory",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# How long a SQLite connection waits for another writer before giving up ("database is locked").
# SQLite serialises writers; queue operations are short, so waiting is always the right answer.
SQLITE_BUSY_TIMEOUT_S = 30.0


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory and ``file:`` URI databases."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine for a ``sqlite://`` or ``postgresql://`` URL with bird's settings.

    SQLite: foreign keys on, WAL journal (readers never block the writer), a busy timeout so
    concurrent writers wait instead of failing, and the parent directory of the file created.
    PostgreSQL: ``pool_pre_ping`` so connections dropped by a restart or an idle timeout are
    replaced transparently. ``kwargs`` go to :func:`sqlalchemy.create_engine`.
    """
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            # The embedded default lives in ./bird-data/, which need not exist yet.
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        # Worker threads share the pool; each connection is used by one thread at a time.
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    raise ValueError(
        f"unsupported database URL {url.render_as_string()!r}: use sqlite or postgresql"
    )


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    """Per-connection SQLite settings (they are not stored in the database file)."""
    cursor = dbapi_connection.cursor()
    try:
        # SQLite ignores FOREIGN KEY clauses unless asked, on every connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets the API read while a worker writes; it is persistent, so setting it again is
        # free. In-memory databases answer "memory" and stay as they are.
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL is still crash-safe for the database; it only risks the last
        # transactions on power loss, and it saves an fsync per commit of every heartbeat.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``.

    ``expire_on_commit=False``: the queue operations commit, and their callers (the API, the
    worker) keep using the returned objects afterwards without another round trip.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | URL | Engine | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` for bird's migrations, built without an ini file.

    The database travels in ``config.attributes`` rather than in ``sqlalchemy.url``, because the
    ini option goes through ConfigParser interpolation and would mangle a ``%`` in a password.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if isinstance(url, Engine):
        config.attributes["engine"] = url
    elif url is not None:
        config.attributes["url"] = make_url(url)
    return config


def _engine_for(url: str | URL | Engine) -> tuple[Engine, bool]:
    """The engine to migrate with, and whether this module created it (and must dispose it)."""
    if isinstance(url, Engine):
        return url, False
    return make_engine(url), True


def upgrade(url: str | URL | Engine, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` (default: the newest). Idempotent."""
    engine, owned = _engine_for(url)
    try:
        command.upgrade(alembic_config(engine), revision)
    finally:
        if owned:
            engine.dispose()


def current_revision(url: str | URL | Engine) -> str | None:
    """The migration revision the database at ``url`` is at, or None if it was never migrated."""
    engine, owned = _engine_for(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def head_revision() -> str | None:
    """The newest migration revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
