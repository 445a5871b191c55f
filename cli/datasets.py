"""``bird datasets``: prepare, validate and describe datasets in the bird format.

``bird datasets prepare <name>`` has one subcommand per converter of
:mod:`bird_datasets.converters`, its flags built from the options the converter declares: a
new converter file shows up here with its options and help, nothing to add to this module.
The registry is imported only when ``prepare`` itself is used, so ``bird --help`` stays fast.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

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
    split_csv,
)

if TYPE_CHECKING:
    from bird_datasets.converters import Converter, ConverterOption

__all__ = ["datasets_app"]

datasets_app = typer.Typer(
    help="Prepare, validate and describe datasets in the bird format (Parquet + manifest); "
    "push, list and delete your datasets on a bird API server.",
    no_args_is_help=True,
)


# --------------------------------------------------------------------------------------------
# prepare: one subcommand per registered converter
# --------------------------------------------------------------------------------------------


def _option_parameter(option: ConverterOption) -> inspect.Parameter:
    """The Typer parameter of one declared converter option."""
    if option.type is list:
        # A list of names on the command line: comma-separated, split before the call.
        annotation: Any = str | None
        default = ",".join(option.default) if option.default is not None else None
    else:
        annotation = option.type | None
        default = option.default
    info = typer.Option(
        option.flag,
        help=f"{option.help} (required)" if option.required else option.help,
        min=option.minimum,
        show_default=default is not None,
    )
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, info],
    )


def _prepare(converter: Converter, out: str, seed: int, values: dict[str, Any]) -> None:
    """Check the options, open --out, run the converter, print what it wrote."""
    from service.storage import StorageError

    lists = {o.name for o in converter.options if o.type is list}
    options = {
        name: split_csv(value) if name in lists and value is not None else value
        for name, value in values.items()
    }
    try:
        # Fails in milliseconds, naming the flag or the missing file, before anything is read.
        given = converter.check_options(options)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    store, prefix = open_dataset_uri(out)
    try:
        # Fail before the (possibly long) conversion if the destination is unusable.
        store.ping()
    except StorageError as exc:
        fail(str(exc), 1)
    try:
        manifest = converter.run(store, prefix, seed=seed, **given)
    except StorageError as exc:
        fail(str(exc), 1)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    counts = manifest.metadata.get("counts", {})
    rows = ", ".join(f"{split} {n}" for split, n in counts.items())
    typer.echo(
        f"wrote {converter.name} to {store.uri(prefix)}: {rows} rows in "
        f"{len(manifest.files)} part(s)"
    )


def _converter_command(converter: Converter) -> TyperCommand:
    """The ``bird datasets prepare <name>`` command of ``converter``."""

    def command(ctx: typer.Context, out: str, seed: int, **values: Any) -> None:
        # Flags the converter does not declare arrive here (ignore_unknown_options below), so
        # that they get a one-line error listing the flags it takes, like every error of bird.
        if ctx.args:
            takes = ", ".join(["--out", "--seed", *(o.flag for o in converter.options)])
            extra = next((a for a in ctx.args if a.startswith("-")), ctx.args[0])
            fail(f"{converter.name} does not take {extra}; it takes {takes}", 2)
        _prepare(converter, out, seed, values)

    parameters = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[
                str, typer.Option(help="Where to write: s3://bucket/prefix or a local directory.")
            ],
        ),
        inspect.Parameter(
            "seed",
            inspect.Parameter.KEYWORD_ONLY,
            default=0,
            annotation=Annotated[
                int, typer.Option(help="Seed for splits, subsamples and versions.", min=0)
            ],
        ),
        *(_option_parameter(option) for option in converter.options),
    ]
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    command.__doc__ = converter.summary
    app = typer.Typer(add_completion=False)
    app.command(
        converter.name,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(command)
    return typer.main.get_command(app)  # type: ignore[return-value]


class _ConverterGroup(TyperGroup):
    """``bird datasets prepare``: its subcommands are the converters of the registry."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        from bird_datasets.converters import available_converters

        return list(available_converters())

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | None:
        from bird_datasets.converters import UnknownConverterError, get_converter

        try:
            return _converter_command(get_converter(cmd_name))
        except UnknownConverterError:
            return None

    def resolve_command(
        self, ctx: typer.Context, args: list[str]
    ) -> tuple[str | None, Any, list[str]]:
        from bird_datasets.converters import UnknownConverterError, get_converter

        if args and not args[0].startswith("-"):
            try:
                converter = get_converter(args[0])
            except UnknownConverterError as exc:
                fail(str(exc), 2)
            return converter.name, _converter_command(converter), args[1:]
        return super().resolve_command(ctx, args)


prepare_app = typer.Typer(
    cls=_ConverterGroup,
    help="Convert a dataset to the bird format and publish it at --out (manifest written last).",
    no_args_is_help=True,
)
datasets_app.add_typer(prepare_app, name="prepare")


# --------------------------------------------------------------------------------------------
# validate, describe
# --------------------------------------------------------------------------------------------


@datasets_app.command("validate")
def datasets_validate(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local directory.")],
    max_images: Annotated[
        int, typer.Option(help="Images decoded per split at most.", min=0)
    ] = 2000,
) -> None:
    """Check a dataset against the format: exit 0 and 'OK: ...', or exit 1 listing the problems."""
    from bird_datasets.validation import validate_dataset
    from service.storage import StorageError

    store, prefix = open_dataset_uri(uri)
    try:
        report = validate_dataset(store, prefix, max_images_per_split=max_images)
    except StorageError as exc:
        fail(str(exc), 1)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@datasets_app.command("describe")
def datasets_describe(
    uri: Annotated[
        str,
        typer.Argument(
            help="s3://bucket/prefix, a local directory, or datasets/NAME (yours on the server)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Print the rows per split × class × group, with each class's majority-group share."""
    from pathlib import Path

    from bird_datasets.describe import describe_dataset, render_description
    from service.storage import StorageError

    if uri.startswith("datasets/") and not Path(uri).exists():
        # The name jobs use: the dataset is on the server (a local directory of that path wins).
        name = uri.removeprefix("datasets/")
        check_name("dataset", name)
        with api_client(url, key) as client:
            served = call_api(lambda: client.describe_dataset(name))
        table = served.pop("table")
        typer.echo(json.dumps(served, indent=2) if as_json else table)
        return
    store, prefix = open_dataset_uri(uri)
    try:
        description = describe_dataset(store, prefix)
    except StorageError as exc:
        fail(str(exc), 1)
    typer.echo(json.dumps(description, indent=2) if as_json else render_description(description))


# --------------------------------------------------------------------------------------------
# push, list, delete: the caller's datasets on a bird API server
# --------------------------------------------------------------------------------------------


@datasets_app.command("push")
def datasets_push(
    directory: Annotated[
        str, typer.Argument(help="A local dataset directory (bird datasets prepare --out DIR).")
    ],
    name: Annotated[
        str, typer.Option(help="The dataset's name on the server: jobs name it datasets/NAME.")
    ],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    max_images: Annotated[
        int, typer.Option(help="Images decoded per split when checking it first.", min=0)
    ] = 2000,
) -> None:
    """Upload a dataset into your space on the server (checked locally first); jobs then name
    it datasets/NAME."""
    from pathlib import Path

    from bird_datasets.validation import validate_dataset
    from service.storage import LocalStore, StorageError

    check_name("dataset", name)
    root = Path(directory)
    if not (root / "manifest.json").is_file():
        fail(f"{directory}: not a dataset directory (no manifest.json)", 2)
    try:
        report = validate_dataset(LocalStore(root), "", max_images_per_split=max_images)
    except StorageError as exc:
        fail(f"{directory}: {exc}", 1)
    if not report.ok:
        typer.echo(report.summary(), err=True)
        fail(f"{directory} is not a valid bird dataset; nothing was uploaded", 1)
    with api_client(url, key) as client:
        row = call_api(lambda: client.push_dataset(root, name))
    typer.echo(f"pushed {directory} as {row['uri']}: {row['files']} file(s), {row['size']} bytes")


@datasets_app.command("list")
def datasets_list(
    url: UrlOption = DEFAULT_URL, key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your datasets on the server, then the shared ones."""
    with api_client(url, key) as client:
        rows = call_api(client.list_datasets)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:  # else the command printed nothing at all
        typer.echo(
            "no datasets (yours or shared): upload one with `bird datasets push DIR --name NAME`",
            err=True,
        )
    for row in rows:
        typer.echo(f"{row['uri']:<40} {row['files']:>5} files {row['size']:>12} bytes")


@datasets_app.command("delete")
def datasets_delete(
    name: Annotated[str, typer.Argument(help="The dataset's name (datasets/NAME).")],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Delete one of your datasets on the server."""
    check_name("dataset", name)
    with api_client(url, key) as client:
        call_api(lambda: client.delete_dataset(name))
    typer.echo(f"deleted datasets/{name}")


# --------------------------------------------------------------------------------------------
# import: your own images or table
# --------------------------------------------------------------------------------------------

import_app = typer.Typer(
    help="Import your own data: a folder of images with a CSV, or a CSV/Parquet table. "
    "Writes the bird format at --out, validates it and prints what it holds.",
    no_args_is_help=True,
)
datasets_app.add_typer(import_app, name="import")

OutOption = Annotated[
    str, typer.Option(help="Where to write: s3://bucket/prefix or a local directory.")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the split (without a split column).", min=0)]
ValFraction = Annotated[
    float, typer.Option(help="Share of each class and group for val (without a split column).")
]
TestFraction = Annotated[
    float, typer.Option(help="Share of each class and group for test (without a split column).")
]
NameOption = Annotated[
    str | None, typer.Option(help="The dataset's name (default: the file's name).")
]


def _image_size(value: str | None) -> tuple[int, int] | None:
    """``32`` → (32, 32); ``24x32`` → (24, 32) (height x width)."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        fail(f"--image-size must be N or HxW (e.g. 32 or 24x32), got {value!r}", 2)
    return parts[0], parts[1]


def _run_import(out: str, write: Any) -> None:
    """Open --out, run ``write(store, prefix)``, validate what it wrote, print the summary."""
    from bird_datasets.describe import describe_dataset, render_description
    from bird_datasets.importers import DatasetImportError
    from bird_datasets.validation import validate_dataset
    from service.storage import StorageError

    store, prefix = open_dataset_uri(out)
    try:
        store.ping()
        manifest = write(store, prefix)
        report = validate_dataset(store, prefix)
        description = describe_dataset(store, prefix)
    except DatasetImportError as exc:
        fail(str(exc), 2)
    except StorageError as exc:
        fail(str(exc), 1)
    if not report.ok:  # the importer wrote something the format refuses: a bug, say so
        fail(f"the imported dataset at {store.uri(prefix)} does not validate: {report.summary()}")
    del manifest  # the validation report below says what was written, and where
    typer.echo(f"imported, validated: {report.summary()}")
    typer.echo(render_description(description))


@import_app.command("images")
def import_images(
    csv_file: Annotated[
        str,
        typer.Argument(
            help="CSV with a header: path,label,group[,split] (paths relative to --root).",
            show_default=False,
        ),
    ],
    out: OutOption,
    root: Annotated[
        str | None, typer.Option(help="Folder the CSV's paths are in (default: the CSV's).")
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(help="Resize every image: N or HxW (default: keep the first's size)."),
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(help="1 (grayscale), 3 (RGB) or 4 (RGBA); default: the first image's."),
    ] = None,
    name: NameOption = None,
    seed: SeedOption = 0,
    val_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.2,
) -> None:
    """Import a folder of images listed in a CSV with their label and group.

    Labels and groups are names (mapped to indices in sorted order, the names kept in the
    metadata) or integer indices; without a split column the rows are split at random,
    stratified by class and group.
    """
    from bird_datasets.importers.images import import_image_folder

    size = _image_size(image_size)
    _run_import(
        out,
        lambda store, prefix: import_image_folder(
            csv_file,
            store,
            prefix,
            root=root,
            image_size=size,
            channels=channels,
            name=name,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        ),
    )


@import_app.command("table")
def import_table_command(
    table_file: Annotated[
        str, typer.Argument(help="A .csv or .parquet file, one row per sample.", show_default=False)
    ],
    out: OutOption,
    label: Annotated[str, typer.Option(help="The label column.", show_default=False)],
    group: Annotated[str, typer.Option(help="The sensitive-group column.", show_default=False)],
    features: Annotated[
        str | None,
        typer.Option(help="Comma-separated feature columns (default: every other column)."),
    ] = None,
    categorical: Annotated[
        str | None,
        typer.Option(help="Comma-separated numeric columns to one-hot encode as well."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="A column of train/val/test (default: a seeded split).")
    ] = None,
    name: NameOption = None,
    seed: SeedOption = 0,
    val_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.2,
) -> None:
    """Import a CSV or Parquet table: text columns one-hot, numbers standardised.

    The numeric columns are standardised with the train split's mean and standard deviation,
    recorded in the metadata with the categories of every one-hot column.
    """
    from bird_datasets.importers.table import import_table

    _run_import(
        out,
        lambda store, prefix: import_table(
            table_file,
            store,
            prefix,
            label=label,
            group=group,
            features=split_csv(features),
            categorical=split_csv(categorical) or (),
            split=split,
            name=name,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        ),
    )
