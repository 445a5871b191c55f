"""What every command group shares: one-line errors, settings, dataset URIs, CSV options.

Every failure a command reports is one line on stderr, ``error: ...``, and a non-zero exit
status (1: the server, store or database refused or failed; 2: the command line, a setting or
an input file is wrong). No tracebacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from service.client import DEFAULT_URL

if TYPE_CHECKING:
    from service.client import BirdClient
    from service.settings import Settings
    from service.storage import ObjectStore

__all__ = [
    "DEFAULT_URL",
    "JsonOption",
    "KeyOption",
    "UrlOption",
    "api_client",
    "call_api",
    "check_name",
    "configure_logging",
    "explain_and_exit",
    "fail",
    "load_settings",
    "open_dataset_uri",
    "split_csv",
]

T = TypeVar("T")

# The options of every command that talks to a bird API server (DEFAULT_URL: the client's).
UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="BIRD_URL", help="Base URL of the bird API.", show_envvar=True),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="BIRD_API_KEY",
        help="API key (bird keys create).",
        show_default=False,
        show_envvar=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]


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


def configure_logging(level: str) -> None:
    """Write bird's own log records (loggers ``bird.*``) at ``level`` and above to stderr,
    with time and source.

    The long-running commands (``bird worker``, ``bird serve``) call it: without a handler
    Python prints warnings only, bare, so a worker never said which job it claimed or how the
    job ended. Other libraries (Ray, boto3, ...) stay at warning, whatever ``level`` says.
    """
    import logging

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("bird").setLevel(level.upper())  # bird.worker, bird.api


def check_name(kind: str, name: str) -> None:
    """Exit 2 unless ``name`` can name a dataset or teacher (``kind``) on the server.

    The API refuses such a name too, but with its pattern, and a name with a '/' never reaches
    the route that would name it ('Not Found'): this says what a name may hold, in words.
    """
    import re

    from service.tenant_data import DATASET_NAME_PATTERN

    if not re.fullmatch(DATASET_NAME_PATTERN, name):
        fail(
            f"invalid {kind} name {name!r}: a name is 1 to 63 lower-case letters, digits, '.', "
            "'_' or '-', and starts with a letter or a digit",
            2,
        )


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


def api_client(url: str, key: str | None) -> BirdClient:
    """A client for the API at ``url`` with ``key``; a missing key or a bad URL exits 2."""
    from service.client import BirdClient

    if not key:
        fail("no API key: pass --key or set BIRD_API_KEY", 2)
    if not url.startswith(("http://", "https://")):
        fail(f"--url must be an http:// or https:// URL, got {url!r}", 2)
    return BirdClient(url, key)


def explain_and_exit(exc: Exception) -> NoReturn:
    """Exit with one line saying what went wrong: the server's detail for an HTTP error."""
    from service.client import BirdAPIError

    if isinstance(exc, BirdAPIError):
        from service.client import format_detail

        fail(f"{format_detail(exc.detail)} (HTTP {exc.status})")
    if isinstance(exc, OSError) and exc.filename:  # the download directory, say
        fail(f"{exc.strerror or exc}: {exc.filename}")
    fail(str(exc))


def call_api(action: Callable[[], T]) -> T:
    """Run a client call; any client error becomes one line and exit status 1."""
    from service.client import BirdError

    try:
        return action()
    except (BirdError, OSError) as exc:
        explain_and_exit(exc)
