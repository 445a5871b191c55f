"""``bird keys``: API keys, created once and shown once."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import fail, load_settings

__all__ = ["keys_app"]

keys_app = typer.Typer(help="API keys.", no_args_is_help=True, add_completion=False)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant (created if new) the key belongs to.")],
) -> None:
    """Create an API key for TENANT and print it once (only its hash is stored)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.auth import create_key
    from service.db import make_engine, session_factory, upgrade

    url = load_settings().resolved_database_url
    try:
        if url.startswith("sqlite"):
            upgrade(url)  # the embedded default migrates itself
        engine = make_engine(url)
        with session_factory(engine)() as session:
            created = create_key(session, tenant)
    except ValueError as err:
        fail(str(err), 2)
    except SQLAlchemyError as err:
        fail(f"cannot create a key: {str(err).splitlines()[0]} (run 'bird db upgrade' first?)")
    typer.echo(created.key)
    typer.echo(
        f"key {created.key_prefix}… for tenant {created.tenant_name!r}; it is shown only once",
        err=True,
    )
