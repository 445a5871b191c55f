"""``bird teachers``: train a teacher on a dataset and publish it for jobs to use."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import (
    DEFAULT_URL,
    JsonOption,
    KeyOption,
    UrlOption,
    api_client,
    call_api,
    check_name,
    fail,
    open_dataset_uri,
)

__all__ = ["teachers_app"]

teachers_app = typer.Typer(
    help="Teachers: train one on a dataset and publish it; push, list and delete your teachers "
    "on a bird API server.",
    no_args_is_help=True,
)


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
    metrics), manifest last. Upload a directory with `bird teachers push DIR --name NAME`; a job
    then uses it as {"kind": "model", "weights_uri": "teachers/NAME"} (the command prints both).
    """
    # torch/bird_core: imported only when this command runs, so `bird --help` stays fast.
    from bird_core.metrics import predicts_one_class
    from bird_core.models import available_models
    from bird_datasets.format import DatasetFormatError, DatasetNotFoundError
    from service.storage import StorageError, join_key

    if arch not in available_models() and not arch.startswith(("tv:", "timm:")):
        fail(
            f"unknown --arch {arch!r}; valid: {', '.join(available_models())}, "
            "tv:<torchvision arch>, timm:<timm arch>",
            2,
        )
    if lr <= 0:
        fail(f"--lr must be > 0, got {lr}", 2)

    from service.teachers import TEACHER_WEIGHTS
    from workers.teacher_training import default_options, train_teacher

    options = default_options(arch)
    if width is not None:
        options["width"] = width
    data_store, data_prefix = open_dataset_uri(dataset)
    out_store, out_prefix = open_dataset_uri(out)
    try:
        # Fail before the (possibly long) training if the destination is unusable.
        out_store.ping()
    except StorageError as exc:
        fail(str(exc), 1)
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
        fail(f"--dataset: {exc}", 2)
    except StorageError as exc:
        fail(str(exc), 1)
    except (TypeError, ValueError) as exc:
        # create_model's unknown option / bad value, or a training setting out of range.
        fail(f"--arch {arch} with options {options}: {exc}", 2)
    except FloatingPointError as exc:
        fail(f"{exc} (--lr {lr})", 2)
    except Exception as exc:  # never a traceback: one line naming what failed
        fail(f"training the teacher failed: {type(exc).__name__}: {exc}", 1)
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
    used = meta.get("test_predicted_classes")
    if predicts_one_class({"predicted_classes": used}):
        # Its accuracy is then the majority class's share and its Δ-DEO 0: it teaches nothing.
        typer.echo(
            f"warning: the teacher predicts {used} of {meta.get('num_classes')} classes on the "
            f"test split after {epochs} epoch(s), so a student learns nothing from it and its "
            "delta-mean-DEO says nothing about fairness; train it longer "
            f"(--epochs {max(epochs * 10, 30)}) or on more data",
            err=True,
        )
    if out.startswith("s3://"):
        typer.echo(
            "use it in a job spec as: "
            + json.dumps({"kind": "model", "arch": arch, "weights_uri": weights_uri})
        )
        return
    # A server refuses a file:// weights URI (BIRD_ALLOW_EXTERNAL_URIS is off by default): a
    # directory is uploaded into the tenant's space first, then named there.
    name = out_store.uri(out_prefix).rstrip("/").rsplit("/", 1)[-1]
    typer.echo(f"upload it with: bird teachers push {out} --name {name}")
    typer.echo(
        "then use it in a job spec as: "
        + json.dumps({"kind": "model", "weights_uri": f"teachers/{name}"})
    )


@teachers_app.command("push")
def teachers_push(
    directory: Annotated[
        str, typer.Argument(help="A teacher directory (bird teachers train --out DIR).")
    ],
    name: Annotated[
        str, typer.Option(help="The teacher's name on the server: jobs name it teachers/NAME.")
    ],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Upload a teacher into your space on the server; jobs then name it
    {"kind": "model", "weights_uri": "teachers/NAME"}."""
    from pathlib import Path

    check_name("teacher", name)
    root = Path(directory)
    for needed in ("manifest.json", "teacher.json"):
        if not (root / needed).is_file():
            fail(f"{directory}: not a teacher directory (no {needed})", 2)
    with api_client(url, key) as client:
        row = call_api(lambda: client.push_teacher(root, name))
    typer.echo(f"pushed {directory} as {row['uri']}: {row['files']} file(s), {row['size']} bytes")


@teachers_app.command("list")
def teachers_list(
    url: UrlOption = DEFAULT_URL, key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your teachers on the server, then the shared ones."""
    with api_client(url, key) as client:
        rows = call_api(client.list_teachers)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:  # else the command printed nothing at all
        typer.echo(
            "no teachers (yours or shared): upload one with `bird teachers push DIR --name NAME`",
            err=True,
        )
    for row in rows:
        typer.echo(f"{row['uri']:<40} {row['files']:>5} files {row['size']:>12} bytes")


@teachers_app.command("delete")
def teachers_delete(
    name: Annotated[str, typer.Argument(help="The teacher's name (teachers/NAME).")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Delete one of your teachers on the server."""
    check_name("teacher", name)
    with api_client(url, key) as client:
        call_api(lambda: client.delete_teacher(name))
    typer.echo(f"deleted teachers/{name}")
