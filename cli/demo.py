"""``bird demo``: FashionMNIST-S jobs for BIRD and BKD on a running server, compared."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import fail, load_settings, split_csv

__all__ = ["demo"]

# Written straight into the store, as an operator publishes: shared, readable by every tenant.
DEMO_DATASET = "shared/datasets/fashion-mnist-s"
DEMO_COLUMNS = ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")


def demo(
    url: Annotated[
        str | None, typer.Option(help="The API (default: BIRD_URL or the BIRD_API_* address).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="API key (default: BIRD_API_KEY; embedded: a new key).")
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = "bird,bkd",
    epochs: Annotated[int, typer.Option(min=1, max=50)] = 3,
    train_size: Annotated[int, typer.Option(min=100, help="FashionMNIST-S train rows.")] = 4000,
) -> None:
    """Submit FashionMNIST-S jobs (BIRD and BKD), follow them, print the comparison table.

    Runs against a `bird serve` on this machine: the dataset is written into the same object
    store (BIRD_* settings) the server reads. Without an API key, and with the embedded SQLite
    database, a new key of tenant 'local' (the tenant of the key `bird serve` printed) is created,
    so the demo's jobs show in the dashboard too.
    """
    import os
    import time

    from bird_datasets.format import DatasetNotFoundError
    from bird_datasets.reader import read_dataset_meta
    from service.client import BirdClient, BirdConnectionError, BirdError
    from service.storage import StorageError, store_from_settings

    settings = load_settings()
    method_names = split_csv(methods) or ()
    base = url or os.environ.get("BIRD_URL") or f"http://{settings.api_host}:{settings.api_port}"
    api_key = key or os.environ.get("BIRD_API_KEY")
    if api_key is None:
        if not settings.resolved_database_url.startswith("sqlite"):
            fail("no API key: pass --key or set BIRD_API_KEY", 2)
        from service.auth import create_key
        from service.db import make_engine, session_factory

        engine = make_engine(settings.resolved_database_url)
        with session_factory(engine)() as session:
            api_key = create_key(session, "local").key
        engine.dispose()
    try:
        store = store_from_settings(settings)
        try:
            read_dataset_meta(store, DEMO_DATASET)
        except DatasetNotFoundError:
            typer.echo(f"writing FashionMNIST-S ({train_size} train rows) to {DEMO_DATASET}")
            from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s

            prepare_fashion_mnist_s(
                store, DEMO_DATASET, train_size=train_size, test_size=2000, val_fraction=0.02
            )
    except StorageError as err:
        fail(str(err))
    client = BirdClient(base, api_key)
    jobs: dict[str, int] = {}
    try:
        for name in method_names:
            spec = {
                "dataset": {"uri": DEMO_DATASET},
                "method": {"name": name},
                "training": {"epochs": epochs, "batch_size": 128},
            }
            job = client.submit(spec, idempotency_key=f"demo-{name}-{epochs}-{train_size}")
            jobs[name] = job["id"]
            typer.echo(f"{name}: job {job['id']} ({job['state']}) - {base}/ui/#/jobs/{job['id']}")
        terminal = {"succeeded", "failed", "cancelled"}
        states: dict[str, dict] = {}
        while True:
            states = {name: client.get_job(job_id) for name, job_id in jobs.items()}
            line = "  ".join(
                f"{n}: {j['state']} {j['stage'] or ''} {round(100 * j['progress'])}%"
                for n, j in states.items()
            )
            typer.echo(line)
            if all(j["state"] in terminal for j in states.values()):
                break
            time.sleep(5)
        rows = []
        for name, job_id in jobs.items():
            if states[name]["state"] != "succeeded":
                rows.append(f"{name:<8} {states[name]['state']}: {states[name]['error'] or ''}")
                continue
            test = client.metrics(job_id)["latest"].get("test", {})
            cells = " ".join(
                f"{test.get(c):>14.2f}" if test.get(c) is not None else f"{'-':>14}"
                for c in DEMO_COLUMNS
            )
            rows.append(f"{name:<8} {cells}")
    except BirdConnectionError as err:
        fail(f"{err}; is `bird serve` running at {base}?")
    except BirdError as err:
        fail(f"{base}: {err}")
    typer.echo("")
    typer.echo("test split, percent   " + " ".join(f"{c:>14}" for c in DEMO_COLUMNS))
    for row in rows:
        typer.echo(row)
