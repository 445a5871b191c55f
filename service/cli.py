"""The ``bird`` command line.

This module belongs to the service layer, which never imports torch or ray at module level:
commands that need the training library import it inside their own function, so ``bird --help``
and the service commands start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from service.cli_jobs import jobs_app

if TYPE_CHECKING:
    from service.settings import Settings
    from service.storage import ObjectStore

app = typer.Typer(
    help="bird: fair knowledge distillation (BIRD and published baselines).",
    no_args_is_help=True,
    add_completion=False,
)


def _split_csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise typer.BadParameter("expected a comma-separated list")
    return items


@app.command()
def experiment(
    quick: Annotated[
        bool, typer.Option("--quick", help="Every method for a few steps (smoke test).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for results.json and results.md.")] = Path(
        "runs/experiment"
    ),
    preset: Annotated[
        str,
        typer.Option(
            help="paper (every method, 3 seeds) or gate-ablation (BIRD, its frozen-gate and "
            "λ_fair = 0 ablations, BKD and AD; 5 paired seeds)."
        ),
    ] = "paper",
    dataset: Annotated[str, typer.Option(help="fashion-mnist-s or adult.")] = "fashion-mnist-s",
    teachers: Annotated[
        str | None,
        typer.Option(help="Comma-separated teacher settings (cnn,efficientnet; adult: mlp)."),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods or named variants (bird-frozen, bird-nofair, "
            "bird-nofair-frozen); default: the preset's."
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Define and run a variant: NAME=METHOD:key=value,... (repeatable), "
            "e.g. bird-adam=bird:phi_optimizer=adam,phi_lr=0.05."
        ),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="Report the paired difference A − B: A:B (repeatable)."),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds (0..N-1).", min=1)] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Train rows to subsample (default 20000).", min=10)
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Student epochs.", min=1)] = None,
) -> None:
    """Run the offline experiment: methods and variants with paired seeds, biased teachers."""
    from bird_core.experiment import build_config, format_markdown, run_experiment

    try:
        config = build_config(
            preset_name="quick" if quick else preset,
            dataset=dataset,
            teachers=_split_csv(teachers),
            variants=_split_csv(methods),
            variant_definitions=variant or (),
            comparisons=compare,
            seeds=seeds,
            train_size=train_size,
            epochs=epochs,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    results = run_experiment(config, out_dir=out)
    typer.echo(format_markdown(results))
    typer.echo(
        f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['seconds']:.0f} s"
    )


@app.command("methods")
def list_methods() -> None:
    """List the distillation methods and their options with defaults."""
    from bird_core.methods import available_methods, method_options

    for name in available_methods():
        typer.echo(f"{name}: {json.dumps(method_options(name))}")


# --------------------------------------------------------------------------------------------
# bird datasets: prepare / validate / describe datasets in the bird format
# --------------------------------------------------------------------------------------------

datasets_app = typer.Typer(
    help="Prepare, validate and describe datasets in the bird format (Parquet + manifest).",
    no_args_is_help=True,
)
app.add_typer(datasets_app, name="datasets")

# Converters by name, and the options each accepts beyond --out/--seed.
_PREPARE_OPTIONS: dict[str, frozenset[str]] = {
    "fashion-mnist-s": frozenset({"skew", "train_size", "test_size", "root"}),
    "adult": frozenset({"train_size", "root"}),
    "cifar10-s": frozenset({"root", "skew", "train_size", "val_size", "test_size"}),
    "celeba": frozenset(
        {
            "root",
            "train_size",
            "val_size",
            "test_size",
            "attributes",
            "group_attribute",
            "image_size",
        }
    ),
}
_NEEDS_ROOT = frozenset({"cifar10-s", "celeba"})


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def _open_uri(uri: str) -> tuple[ObjectStore, str]:
    """The store at ``uri`` (S3 endpoint and credentials from the BIRD_* environment) and the
    dataset's prefix inside it (the store root: the URI names the dataset itself)."""
    from pydantic import ValidationError

    from service.settings import Settings
    from service.storage import StorageError, open_store

    try:
        settings = Settings()
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
        _fail(f"invalid BIRD_* settings ({fields}): {exc.errors()[0]['msg']}", 2)
    try:
        return open_store(uri, settings), ""
    except StorageError as exc:
        _fail(str(exc), 2)


@datasets_app.command("prepare")
def datasets_prepare(
    name: Annotated[
        str, typer.Argument(help="fashion-mnist-s, adult, cifar10-s or celeba.", show_default=False)
    ],
    out: Annotated[
        str, typer.Option(help="Where to write: s3://bucket/prefix or a local directory.")
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            help="Local source root (required for cifar10-s and celeba).", show_default=False
        ),
    ] = None,
    skew: Annotated[
        float | None, typer.Option(help="Majority-group share per class (default 0.95).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, subsamples and versions.", min=0)] = 0,
    train_size: Annotated[
        int | None, typer.Option(help="Subsample the train split.", min=1)
    ] = None,
    val_size: Annotated[
        int | None, typer.Option(help="Subsample the val split (cifar10-s, celeba).", min=1)
    ] = None,
    test_size: Annotated[int | None, typer.Option(help="Subsample the test split.", min=1)] = None,
    attributes: Annotated[
        str | None,
        typer.Option(help="celeba: comma-separated label attribute(s) (default Blond_Hair)."),
    ] = None,
    group_attribute: Annotated[
        str | None, typer.Option(help="celeba: the sensitive attribute (default Male).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="celeba: image side in pixels (default 64).", min=8)
    ] = None,
) -> None:
    """Convert a dataset to the bird format and publish it at --out (manifest written last)."""
    key = name.strip().lower().replace("_", "-")
    if key not in _PREPARE_OPTIONS:
        _fail(f"unknown dataset {name!r}; choose one of: {', '.join(_PREPARE_OPTIONS)}", 2)
    given = {
        "root": root,
        "skew": skew,
        "train_size": train_size,
        "val_size": val_size,
        "test_size": test_size,
        "attributes": attributes,
        "group_attribute": group_attribute,
        "image_size": image_size,
    }
    unsupported = [k for k, v in given.items() if v is not None and k not in _PREPARE_OPTIONS[key]]
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        _fail(f"{key} does not take {flags}", 2)
    if key in _NEEDS_ROOT:
        if root is None:
            _fail(f"{key} needs --root, the local torchvision-format {key.split('-')[0]} folder", 2)
        if not root.is_dir():
            _fail(f"--root {root} does not exist or is not a directory", 2)

    from service.storage import StorageError

    store, prefix = _open_uri(out)
    try:
        # Fail before the (possibly long) conversion if the destination is unusable.
        store.ping()
    except StorageError as exc:
        _fail(str(exc), 1)

    from workers import converters  # torch: imported only when a conversion runs

    options = {k: v for k, v in given.items() if v is not None and k != "root"}
    if "attributes" in options:
        options["attributes"] = _split_csv(options["attributes"])
    try:
        if key in _NEEDS_ROOT:
            # Check the layout first, so a wrong root fails in milliseconds with the file named.
            check = (
                converters.check_cifar10_root
                if key == "cifar10-s"
                else converters.check_celeba_root
            )
            check(root)
            convert = (
                converters.prepare_cifar10_s if key == "cifar10-s" else converters.prepare_celeba
            )
            manifest = convert(root, store, prefix, seed=seed, **options)
        elif key == "fashion-mnist-s":
            if root is not None:
                options["root"] = root
            manifest = converters.prepare_fashion_mnist_s(store, prefix, seed=seed, **options)
        else:
            if root is not None:
                options["root"] = root
            manifest = converters.prepare_adult(store, prefix, seed=seed, **options)
    except StorageError as exc:
        _fail(str(exc), 1)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), 2)
    counts = manifest.metadata.get("counts", {})
    rows = ", ".join(f"{split} {n}" for split, n in counts.items())
    typer.echo(f"wrote {key} to {store.uri(prefix)}: {rows} rows in {len(manifest.files)} part(s)")


@datasets_app.command("validate")
def datasets_validate(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local directory.")],
    max_images: Annotated[
        int, typer.Option(help="Images decoded per split at most.", min=0)
    ] = 2000,
) -> None:
    """Check a dataset against the format: exit 0 and 'OK: ...', or exit 1 listing the problems."""
    from service.datasets import validate_dataset
    from service.storage import StorageError

    store, prefix = _open_uri(uri)
    try:
        report = validate_dataset(store, prefix, max_images_per_split=max_images)
    except StorageError as exc:
        _fail(str(exc), 1)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@datasets_app.command("describe")
def datasets_describe(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Print the rows per split × class × group, with each class's majority-group share."""
    from service.datasets import describe_dataset, render_description
    from service.storage import StorageError

    store, prefix = _open_uri(uri)
    try:
        description = describe_dataset(store, prefix)
    except StorageError as exc:
        _fail(str(exc), 1)
    typer.echo(json.dumps(description, indent=2) if as_json else render_description(description))


# --------------------------------------------------------------------------------------------
# bird teachers: train a teacher on a dataset and publish it for jobs to use
# --------------------------------------------------------------------------------------------

teachers_app = typer.Typer(
    help="Teachers: train one with bird on a dataset and publish it to the object store.",
    no_args_is_help=True,
)
app.add_typer(teachers_app, name="teachers")


@teachers_app.command("train")
def teachers_train(
    dataset: Annotated[
        str, typer.Option(help="The dataset: s3://bucket/prefix or a local directory.")
    ],
    out: Annotated[
        str, typer.Option(help="Where to publish the teacher: s3://bucket/prefix or a directory.")
    ],
    arch: Annotated[
        str, typer.Option(help="bird_core architecture (resnet18, small_cnn, mlp, tv:<arch>).")
    ] = "resnet18",
    width: Annotated[
        int | None,
        typer.Option(help="Width multiplier (default 16 for resnet18 and small_cnn).", min=1),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.", min=1)] = 3,
    lr: Annotated[float, typer.Option(help="Adam learning rate.", min=0.0)] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1)] = 128,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batch order.", min=0)] = 0,
    max_steps_per_epoch: Annotated[
        int | None, typer.Option(help="Cap the steps per epoch (quick runs).", min=1)
    ] = None,
) -> None:
    """Train a teacher with cross-entropy on --dataset and publish it at --out.

    Writes model.safetensors and teacher.json (architecture, options, preprocessing, test
    metrics), manifest last. A job uses it as {"kind": "model", "arch": "<arch>",
    "weights_uri": "<out>/model.safetensors"} (the command prints it).
    """
    # torch/bird_core: imported only when this command runs (service/ never imports torch).
    from bird_core.models import available_models
    from service.datasets import DatasetFormatError, DatasetNotFoundError
    from service.storage import StorageError, join_key

    if arch not in available_models() and not arch.startswith(("tv:", "timm:")):
        _fail(
            f"unknown --arch {arch!r}; valid: {', '.join(available_models())}, "
            "tv:<torchvision arch>, timm:<timm arch>",
            2,
        )
    if lr <= 0:
        _fail(f"--lr must be > 0, got {lr}", 2)

    from workers.teacher_training import default_options, train_teacher
    from workers.teachers import TEACHER_WEIGHTS

    options = default_options(arch)
    if width is not None:
        options["width"] = width
    data_store, data_prefix = _open_uri(dataset)
    out_store, out_prefix = _open_uri(out)
    try:
        # Fail before the (possibly long) training if the destination is unusable.
        out_store.ping()
    except StorageError as exc:
        _fail(str(exc), 1)
    try:
        manifest = train_teacher(
            data_store,
            data_prefix,
            out_prefix,
            arch=arch,
            options=options,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            max_steps_per_epoch=max_steps_per_epoch,
            out_store=out_store,
            on_progress=typer.echo,
        )
    except (DatasetNotFoundError, DatasetFormatError) as exc:
        _fail(f"--dataset: {exc}", 2)
    except StorageError as exc:
        _fail(str(exc), 1)
    except (TypeError, ValueError) as exc:
        # create_model's unknown option / bad value, or a training setting out of range.
        _fail(f"--arch {arch} with options {options}: {exc}", 2)
    except FloatingPointError as exc:
        _fail(f"{exc} (--lr {lr})", 2)
    except Exception as exc:  # never a traceback: one line naming what failed
        _fail(f"training the teacher failed: {type(exc).__name__}: {exc}", 1)
    meta = manifest.metadata
    accuracy = meta.get("test_accuracy")
    deo = meta.get("test_delta_mean_deo")
    scores = (
        f"test accuracy {accuracy:.1f} %, delta-mean-DEO {deo:.1f}"
        if isinstance(accuracy, int | float) and isinstance(deo, int | float)
        else "test metrics unavailable"
    )
    weights_uri = out_store.uri(join_key(out_prefix, TEACHER_WEIGHTS))
    typer.echo(f"published teacher {arch} {options} to {out_store.uri(out_prefix)}: {scores}")
    typer.echo(
        "use it in a job spec as: "
        + json.dumps({"kind": "model", "arch": arch, "weights_uri": weights_uri})
    )


db_app = typer.Typer(help="The jobs database.", no_args_is_help=True, add_completion=False)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database named by BIRD_DATABASE_URL (default: SQLite under BIRD_DATA_DIR)."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import current_revision, head_revision, upgrade
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as err:
        first = err.errors()[0]
        _fail(f"invalid setting BIRD_{str(first['loc'][0]).upper()}: {first['msg']}", 2)
    url = settings.resolved_database_url
    try:
        before = current_revision(url)
        upgrade(url)
    except (SQLAlchemyError, OSError) as err:
        # The URL may carry a password: name the database without it.
        from sqlalchemy.engine import make_url

        safe = make_url(url).render_as_string(hide_password=True)
        _fail(f"cannot migrate {safe}: {str(err).splitlines()[0]}")
    typer.echo(f"database at revision {head_revision()} (was {before or 'empty'})")


keys_app = typer.Typer(help="API keys.", no_args_is_help=True, add_completion=False)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant (created if new) the key belongs to.")],
) -> None:
    """Create an API key for TENANT and print it once (only its hash is stored)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.auth import create_key
    from service.db import make_engine, session_factory, upgrade

    url = _settings().resolved_database_url
    try:
        if url.startswith("sqlite"):
            upgrade(url)  # the embedded default migrates itself
        engine = make_engine(url)
        with session_factory(engine)() as session:
            created = create_key(session, tenant)
    except ValueError as err:
        _fail(str(err), 2)
    except SQLAlchemyError as err:
        _fail(f"cannot create a key: {str(err).splitlines()[0]} (run 'bird db upgrade' first?)")
    typer.echo(created.key)
    typer.echo(
        f"key {created.key_prefix}… for tenant {created.tenant_name!r}; it is shown only once",
        err=True,
    )


def _settings() -> Settings:
    """The deployment settings from BIRD_* variables, or a one-line error naming the bad one."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        _fail(f"invalid setting BIRD_{str(first['loc'][0]).upper()}: {first['msg']}", 2)


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
            _fail(f"the database at {safe} is not migrated: run 'bird db upgrade' first")
    except (SQLAlchemyError, OSError) as err:
        _fail(f"cannot open the database at {safe}: {str(err).splitlines()[0]}")


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


@app.command()
def worker(
    max_jobs: Annotated[
        int | None, typer.Option(help="Exit after running this many jobs (default: never).")
    ] = None,
) -> None:
    """Claim jobs from the database and run them on Ray (BIRD_RAY_ADDRESS, default local)."""
    import signal
    import threading

    settings = _settings()
    _prepare_database(settings, migrate=settings.resolved_database_url.startswith("sqlite"))
    from workers.runner import Worker

    stop = threading.Event()
    # SIGTERM (docker stop, Kubernetes) ends the loop after the current job's next check.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runner = Worker(settings)
    typer.echo(f"worker {runner.worker_id} polling for jobs", err=True)
    ran = runner.run_forever(stop, max_jobs=max_jobs)
    typer.echo(f"worker {runner.worker_id} ran {ran} job(s)", err=True)


@app.command()
def serve(
    api_only: Annotated[
        bool, typer.Option("--api-only", help="Serve the API only; workers run elsewhere.")
    ] = False,
    workers: Annotated[int, typer.Option(min=0, max=16, help="In-process worker threads.")] = 1,
) -> None:
    """Start the API (and, unless --api-only, a worker and a local Ray) with BIRD_* settings.

    With no settings at all this is the embedded default: SQLite and an object store under
    ./bird-data/, a local Ray started here, one worker in this process. On a database without
    any API key, a key for tenant 'local' is created and printed once.
    """
    import threading

    import uvicorn

    from service.api.app import create_app

    settings = _settings()
    embedded = settings.resolved_database_url.startswith("sqlite")
    # The embedded default migrates itself; production runs `bird db upgrade` as its own step.
    _prepare_database(settings, migrate=embedded)
    key = _first_start_key(settings)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    if not api_only and workers:
        from workers.runner import Worker, connect_ray

        typer.echo("starting Ray ...", err=True)
        connect_ray(settings)  # in the main thread, before the workers need it
        for index in range(workers):
            runner = Worker(settings, worker_id=f"serve-{index}-{threading.get_native_id()}")
            thread = threading.Thread(
                target=runner.run_forever, args=(stop,), name=f"worker-{index}", daemon=True
            )
            thread.start()
            threads.append(thread)
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


DEMO_DATASET = "datasets/fashion-mnist-s"
DEMO_COLUMNS = ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")


@app.command()
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

    from service.client import BirdClient, BirdConnectionError, BirdError
    from service.datasets import DatasetNotFoundError, read_dataset_meta
    from service.storage import StorageError, store_from_settings

    settings = _settings()
    method_names = _split_csv(methods) or ()
    base = url or os.environ.get("BIRD_URL") or f"http://{settings.api_host}:{settings.api_port}"
    api_key = key or os.environ.get("BIRD_API_KEY")
    if api_key is None:
        if not settings.resolved_database_url.startswith("sqlite"):
            _fail("no API key: pass --key or set BIRD_API_KEY", 2)
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
            from workers.converters import prepare_fashion_mnist_s

            prepare_fashion_mnist_s(
                store, DEMO_DATASET, train_size=train_size, test_size=2000, val_fraction=0.02
            )
    except StorageError as err:
        _fail(str(err))
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
        _fail(f"{err}; is `bird serve` running at {base}?")
    except BirdError as err:
        _fail(f"{base}: {err}")
    typer.echo("")
    typer.echo("test split, percent   " + " ".join(f"{c:>14}" for c in DEMO_COLUMNS))
    for row in rows:
        typer.echo(row)


if __name__ == "__main__":
    app()
