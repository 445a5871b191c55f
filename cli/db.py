"""``bird db``: the jobs database (Alembic migrations)."""

from __future__ import annotations

import typer

from cli.common import fail, load_settings

__all__ = ["db_app"]

db_app = typer.Typer(help="The jobs database.", no_args_is_help=True, add_completion=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database named by BIRD_DATABASE_URL (default: SQLite under BIRD_DATA_DIR)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import current_revision, head_revision, upgrade

    url = load_settings().resolved_database_url
    try:
        before = current_revision(url)
        upgrade(url)
    except (SQLAlchemyError, OSError) as err:
        # The URL may carry a password: name the database without it.
        from sqlalchemy.engine import make_url

        safe = make_url(url).render_as_string(hide_password=True)
        fail(f"cannot migrate {safe}: {str(err).splitlines()[0]}")
    typer.echo(f"database at revision {head_revision()} (was {before or 'empty'})")
