"""``bird demo``: FashionMNIST-S jobs for BIRD and BKD on a running server, compared."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import fail, load_settings, split_csv

__all__ = ["demo"]

# Written straight into the store, as an operator publishes: shared, readable by every tenant.
DEMO_DATASET = "shared/datasets/fashion-mnist-s"
DEMO_COLUMNS = ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")
# Enough rows that the first epoch already trains the student (with 4,000 it stayed near
# chance, and the fairness-aware choice of the best epoch took that near-chance, "fair"
# epoch), and a validation split large enough for per-group rates (10 classes x 2 groups).
DEMO_TRAIN_SIZE = 12_000
DEMO_TEST_SIZE = 2_000
DEMO_VAL_FRACTION = 0.1
POLL_S = 2.0


def demo(
    url: Annotated[
        str | None, typer.Option(help="The API (default: BIRD_URL or the BIRD_API_* address).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="API key (default: BIRD_API_KEY; embedded: a new key).")
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = "bird,bkd",
    epochs: Annotated[int, typer.Option(min=1, max=50)] = 3,
    train_size: Annotated[
        int, typer.Option(min=1000, help="FashionMNIST-S train rows (a tenth for validation).")
    ] = DEMO_TRAIN_SIZE,
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
    from cli.progress import JobBars
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
    # One dataset per size: a store keeps the demo datasets of earlier runs.
    dataset = f"{DEMO_DATASET}-{train_size}"
    try:
        store = store_from_settings(settings)
        try:
            read_dataset_meta(store, dataset)
        except DatasetNotFoundError:
            typer.echo(f"writing FashionMNIST-S ({train_size} train rows) to {dataset}")
            from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s

            prepare_fashion_mnist_s(
                store,
                dataset,
                train_size=train_size,
                test_size=DEMO_TEST_SIZE,
                val_fraction=DEMO_VAL_FRACTION,
            )
    except StorageError as err:
        fail(str(err))
    client = BirdClient(base, api_key)
    jobs: dict[str, int] = {}
    try:
        for name in method_names:
            spec = {
                "dataset": {"uri": dataset},
                "method": {"name": name},
                "training": {"epochs": epochs, "batch_size": 128},
            }
            job = client.submit(spec, idempotency_key=f"demo-{name}-{epochs}-{train_size}")
            jobs[name] = job["id"]
            typer.echo(f"{name}: job {job['id']} ({job['state']}) - {base}/ui/#/jobs/{job['id']}")
        terminal = {"succeeded", "failed", "cancelled"}
        states: dict[str, dict] = {}
        # One bar per job, redrawn in place (on a terminal), not a line per poll.
        with JobBars() as bars:
            while True:
                states = {name: client.get_job(job_id) for name, job_id in jobs.items()}
                for name, job in states.items():
                    bars.update(f"{name:<5} job {jobs[name]}", job)
                if all(j["state"] in terminal for j in states.values()):
                    break
                time.sleep(POLL_S)
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
