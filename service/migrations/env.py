"""Alembic environment for bird's schema, driven from code by ``service.db`` (no ini file).

``service.db.alembic_config`` hands over either an engine (``config.attributes["engine"]``) or a
URL (``config.attributes["url"]``); the Alembic command line is not needed.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, text

from service.db import make_engine
from service.models import Base

# Any 64-bit constant unique to bird: the advisory lock that serialises concurrent upgrades.
_PG_MIGRATION_LOCK = 0x6269_7264_6D69_67  # "birdmig"

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables for later migrations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit the migration SQL for ``config.attributes["url"]`` without connecting."""
    context.configure(
        url=config.attributes["url"],
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the configured engine (or one made from the configured URL)."""
    engine: Engine | None = config.attributes.get("engine")
    owned = engine is None
    if engine is None:
        engine = make_engine(config.attributes["url"])
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Several API replicas may upgrade at start-up at once; the second waits
                    # here, then finds the schema at head and does nothing.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                    )
                context.run_migrations()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
