"""What every command group shares: one-line errors, settings, dataset URIs, CSV options.

Every failure a command reports is one line on stderr, ``error: ...``, and a non-zero exit
status (1: the server, store or database refused or failed; 2: the command line, a setting or
an input file is wrong). No tracebacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from service.settings import Settings
    from service.storage import ObjectStore

__all__ = ["fail", "load_settings", "open_dataset_uri", "split_csv"]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def split_csv(value: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` → ``("a", "b")``; None stays None; an empty list is a bad parameter."""
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise typer.BadParameter("expected a comma-separated list")
    return items


def load_settings() -> Settings:
    """The deployment settings from BIRD_* variables, or a one-line error naming the bad one."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        fail(f"invalid setting BIRD_{str(first['loc'][0]).upper()}: {first['msg']}", 2)


def open_dataset_uri(uri: str) -> tuple[ObjectStore, str]:
    """The store and prefix of a dataset URI given on the command line: ``s3://bucket/prefix``
    (endpoint and credentials from the BIRD_* environment) or a local directory.

    Resolved by :func:`bird_datasets.location.resolve_dataset_uri`, as the API and the worker
    resolve a job's dataset; a URI it refuses exits 2 with its message.
    """
    from bird_datasets.location import resolve_dataset_uri
    from service.storage import StorageError

    try:
        return resolve_dataset_uri(uri, load_settings())
    except StorageError as exc:
        fail(str(exc), 2)
