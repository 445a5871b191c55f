"""``bird serve`` (the API, and with it a worker and a local Ray) and ``bird worker``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import configure_logging, fail, load_settings

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["serve", "worker"]


def _prepare_database(settings: Settings, migrate: bool) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import current_revision, head_revision, upgrade

    url = settings.resolved_database_url
    safe = make_url(url).render_as_string(hide_password=True)
    try:
        if url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            upgrade(url)
        elif current_revision(url) != head_revision():
            fail(f"the database at {safe} is not migrated: run 'bird db upgrade' first")
    except (SQLAlchemyError, OSError) as err:
        fail(f"cannot open the database at {safe}: {str(err).splitlines()[0]}")


def _first_start_key(settings: Settings) -> str | None:
    """On a database without any API key, create one for tenant 'local' and return it."""
    from sqlalchemy import func, select

    from service.auth import create_key
    from service.db import make_engine, session_factory
    from service.models import ApiKey

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            if session.scalar(select(func.count()).select_from(ApiKey)):
                return None
            return create_key(session, "local").key
    finally:
        engine.dispose()


def worker(
    max_jobs: Annotated[
        int | None, typer.Option(help="Exit after running this many jobs (default: never).")
    ] = None,
) -> None:
    """Claim jobs from the database and run them on Ray (BIRD_RAY_ADDRESS, default local)."""
    import signal
    import threading

    settings = load_settings()
    configure_logging(settings.log_level)
    _prepare_database(settings, migrate=settings.resolved_database_url.startswith("sqlite"))
    from workers.cluster import ClusterUnfit
    from workers.runner import Worker, connect_ray

    runner = Worker(settings)
    try:
        connect_ray(settings)
    except ClusterUnfit as error:
        fail(str(error), 1)
    stop = threading.Event()
    # SIGTERM (docker stop, Kubernetes) ends the loop once the current job is done. Installed
    # after ray.init, which sets a SIGTERM handler of its own that exits the process at once,
    # mid-job included (the job then waited for its lease to expire).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    typer.echo(f"worker {runner.worker_id} polling for jobs", err=True)
    ran = runner.run_forever(stop, max_jobs=max_jobs)
    typer.echo(f"worker {runner.worker_id} ran {ran} job(s)", err=True)


def serve(
    api_only: Annotated[
        bool, typer.Option("--api-only", help="Serve the API only; workers run elsewhere.")
    ] = False,
    workers: Annotated[int, typer.Option(min=0, max=16, help="In-process worker threads.")] = 1,
) -> None:
    """Start the API (and, unless --api-only, a worker and a local Ray) with BIRD_* settings.

    With no settings at all this is the embedded default: SQLite and an object store under
    ./bird-data/, a local Ray started here, one worker in this process. On an SQLite database
    without any API key, a key for tenant 'local' is created and printed once.
    """
    import threading

    import uvicorn

    from service.api.app import create_app

    settings = load_settings()
    configure_logging(settings.log_level)
    embedded = settings.resolved_database_url.startswith("sqlite")
    # The embedded default migrates itself; production runs `bird db upgrade` as its own step.
    _prepare_database(settings, migrate=embedded)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    if not api_only and workers:
        from workers.cluster import ClusterUnfit
        from workers.runner import Worker, connect_ray

        typer.echo("starting Ray ...", err=True)
        try:
            connect_ray(settings)  # in the main thread, before the workers need it
        except ClusterUnfit as error:
            fail(str(error), 1)
        for index in range(workers):
            # Opaque ids, as every worker's (tenants read them in job logs); the server's log
            # says which process and host each is.
            runner = Worker(settings)
            typer.echo(f"worker {runner.worker_id} polling for jobs", err=True)
            thread = threading.Thread(
                target=runner.run_forever, args=(stop,), name=f"worker-{index}", daemon=True
            )
            thread.start()
            threads.append(thread)
    # Only the embedded default makes a key of its own: a production API's output is container
    # logs, where a working key would let in anyone who reads them (keys: `bird keys create`).
    # Made once Ray is up: a start that fails before printing it must not store a key that no
    # one saw (the next start would make none).
    key = _first_start_key(settings) if embedded else None
    base = f"http://{settings.api_host}:{settings.api_port}"
    typer.echo(f"bird API:   {base}  (OpenAPI at {base}/docs)")
    typer.echo(f"dashboard:  {base}/ui/")
    if key is not None:
        typer.echo(f"API key (shown once, keep it): {key}")
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.api_host,
            port=settings.api_port,
            log_level=settings.log_level,
        )
    finally:
        stop.set()
