"""The bird dataset format: columns, schema, metadata (:class:`DatasetMeta`) and errors.

A dataset is an artifact set written with :func:`service.storage.publish`: the Parquet parts
first (``part-00000.parquet``, ``part-00001.parquet``, ...), ``manifest.json`` last. One row per
sample:

=========  ==============================================================================
``id``     ``int64``, unique across the whole dataset
``image``  ``binary``: an encoded image (PNG as written here; anything Pillow decodes is read)
``x``      ``list<float32>``: tabular features (exactly one of ``image`` / ``x``)
``label``  ``int64`` class index, or ``list<int64>`` of 0/1 per attribute (multi-label)
``group``  ``int64``: the sensitive attribute, ``0 .. num_groups - 1``
``split``  ``string``: ``train``, ``val`` or ``test``
=========  ==============================================================================

The manifest's ``metadata`` describes the dataset (see :class:`DatasetMeta`)::

    {"format": "bird-dataset", "format_version": 1, "name": ..., "task": "multiclass",
     "input": "image", "image_shape": [3, 32, 32], "num_features": null, "num_classes": 10,
     "num_groups": 2, "class_names": [...], "group_names": [...],
     "counts": {"train": 45000, "val": 5000, "test": 20000}}

Readers trust only the manifest: they read the parts it lists (every ``*.parquet`` file in it),
each checked against its sha256 before use, and ignore anything else under the prefix. Any
dataset in this format works like the built-in ones, whether a bird converter wrote it or a user
wrote the Parquet files with plain pyarrow and published them with a manifest. Readers accept
the obvious variants of the column types (any integer width, ``large_binary``, ``double`` or
fixed-size feature lists, dictionary-encoded split names) and cast them to the types above
(:func:`schema_problems`, :func:`canonical_table`).

The rest of the package builds on this module: :mod:`bird_datasets.codec` (images),
:mod:`bird_datasets.writer`, :mod:`bird_datasets.reader`, :mod:`bird_datasets.validation`,
:mod:`bird_datasets.describe`. numpy and pyarrow only, never torch or ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bird_datasets.codec import CHANNEL_MODES
from service.storage import StorageError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INPUTS",
    "PART_TEMPLATE",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "TASKS",
    "DatasetError",
    "DatasetFormatError",
    "DatasetMeta",
    "DatasetNotFoundError",
    "InputKind",
    "Problem",
    "Task",
    "as_numpy",
    "canonical_table",
    "dataset_schema",
    "examples",
    "list_matrix",
    "parse_metadata",
    "schema_problems",
]

FORMAT = "bird-dataset"
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
Task = Literal["multiclass", "multilabel"]
InputKind = Literal["image", "tabular"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel")
INPUTS: tuple[str, ...] = ("image", "tabular")
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "label", "group", "split")
PART_TEMPLATE = "part-{:05d}.parquet"

# How many offending values or ids a problem message quotes.
_EXAMPLES = 5
X_TYPE = pa.list_(pa.float32())
MULTILABEL_TYPE = pa.list_(pa.int64())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DatasetError(StorageError):
    """A dataset is missing or not in the bird dataset format; ``uri`` names it."""


class DatasetNotFoundError(DatasetError):
    """No dataset at the prefix: its ``manifest.json`` does not exist."""


class DatasetFormatError(DatasetError):
    """The dataset exists but its manifest metadata or a part does not follow the format."""


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetMeta:
    """What the manifest says about a dataset (``manifest.metadata``).

    ``num_classes`` is the number of classes (multi-class) or of attributes (multi-label, where
    ``label`` is a 0/1 list of that length). ``image_shape`` is ``(C, H, W)`` for image datasets
    and ``num_features`` is ``D`` for tabular ones. ``counts`` (rows per split) is filled in by
    the writer; ``source`` records how a converter built the dataset (free-form, optional).
    """

    name: str
    task: Task
    input: InputKind
    num_classes: int
    num_groups: int
    image_shape: tuple[int, int, int] | None = None
    num_features: int | None = None
    class_names: tuple[str, ...] = ()
    group_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise what callers commonly pass (numpy ints, lists) to the declared types, so
        # equality and JSON serialisation behave.
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        if self.num_features is not None:
            object.__setattr__(self, "num_features", int(self.num_features))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "num_groups", int(self.num_groups))
        for key in ("class_names", "group_names", "feature_names"):
            object.__setattr__(self, key, tuple(str(v) for v in getattr(self, key)))
        object.__setattr__(self, "counts", {str(k): int(v) for k, v in self.counts.items()})
        object.__setattr__(self, "source", dict(self.source))
        _, problems = parse_metadata(self.to_metadata())
        if problems:
            raise ValueError("invalid dataset metadata: " + "; ".join(m for _, m in problems))

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-able ``manifest.metadata`` dict."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "task": self.task,
            "input": self.input,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "num_groups": self.num_groups,
            "class_names": list(self.class_names),
            "group_names": list(self.group_names),
            "counts": dict(self.counts),
        }
        if self.feature_names:
            meta["feature_names"] = list(self.feature_names)
        if self.source:
            meta["source"] = dict(self.source)
        return meta

    def class_label(self, index: int) -> str:
        """The name of class (or attribute) ``index``, or the index itself when unnamed."""
        return self.class_names[index] if self.class_names else str(index)

    def group_label(self, index: int) -> str:
        """The name of group ``index``, or the index itself when unnamed."""
        return self.group_names[index] if self.group_names else str(index)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _names(metadata: Mapping[str, Any], key: str, length: int | None) -> list[tuple[str, str]]:
    value = metadata.get(key)
    if value is None or value == []:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [(f"metadata.{key}", f"metadata.{key} must be a list of strings, got {value!r}")]
    if length is not None and len(value) != length:
        count_key = "num_groups" if key == "group_names" else "num_classes"
        if key == "feature_names":
            count_key = "num_features"
        return [
            (
                f"metadata.{key}",
                f"metadata.{key} has {len(value)} names but metadata.{count_key} is {length}",
            )
        ]
    return []


def parse_metadata(
    metadata: Mapping[str, Any],
) -> tuple[DatasetMeta | None, list[tuple[str, str]]]:
    """Check a manifest's metadata against the format; return it parsed plus the problems.

    Each problem is ``(field, message)``, e.g. ``("metadata.num_classes", "...")``. The parsed
    :class:`DatasetMeta` is ``None`` whenever there is a problem. Required: ``format``,
    ``format_version``, ``task``, ``input``, ``num_classes``, ``num_groups``, and
    ``image_shape`` (image) or ``num_features`` (tabular). Optional: ``name`` (default
    ``"dataset"``), ``class_names``, ``group_names``, ``feature_names``, ``counts``, ``source``.
    """
    problems: list[tuple[str, str]] = []

    def bad(key: str, message: str) -> None:
        problems.append((f"metadata.{key}", message))

    if not isinstance(metadata, Mapping):
        return None, [("metadata", f"metadata must be a JSON object, got {metadata!r}")]
    if metadata.get("format") != FORMAT:
        bad("format", f"metadata.format is {metadata.get('format')!r}, expected {FORMAT!r}")
        return None, problems  # some other artifact set: the rest would only add noise
    if metadata.get("format_version") != FORMAT_VERSION:
        bad(
            "format_version",
            f"metadata.format_version is {metadata.get('format_version')!r}; "
            f"this bird reads version {FORMAT_VERSION}",
        )
    name = metadata.get("name", "dataset")
    if not isinstance(name, str) or not name:
        bad("name", f"metadata.name must be a non-empty string, got {name!r}")
    task = metadata.get("task")
    if task not in TASKS:
        bad("task", f"metadata.task is {task!r}, expected one of {', '.join(TASKS)}")
    kind = metadata.get("input")
    if kind not in INPUTS:
        bad("input", f"metadata.input is {kind!r}, expected one of {', '.join(INPUTS)}")
    num_classes = metadata.get("num_classes")
    min_classes = 2 if task == "multiclass" else 1
    if not _is_int(num_classes) or num_classes < min_classes:
        bad(
            "num_classes",
            f"metadata.num_classes must be an integer >= {min_classes} for task {task!r}, "
            f"got {num_classes!r}",
        )
        num_classes = None
    num_groups = metadata.get("num_groups")
    if not _is_int(num_groups) or num_groups < 1:
        bad("num_groups", f"metadata.num_groups must be a positive integer, got {num_groups!r}")
        num_groups = None

    image_shape = metadata.get("image_shape")
    num_features = metadata.get("num_features")
    if kind == "image":
        if (
            not isinstance(image_shape, list)
            or len(image_shape) != 3
            or not all(_is_int(v) and v > 0 for v in image_shape)
            or image_shape[0] not in CHANNEL_MODES
        ):
            bad(
                "image_shape",
                "metadata.image_shape must be [C, H, W] with C in "
                f"{sorted(CHANNEL_MODES)} and positive H, W for image datasets, "
                f"got {image_shape!r}",
            )
        if num_features is not None:
            bad("num_features", "metadata.num_features must be null for image datasets")
    elif kind == "tabular":
        if not _is_int(num_features) or num_features < 1:
            bad(
                "num_features",
                "metadata.num_features must be a positive integer for tabular datasets, "
                f"got {num_features!r}",
            )
        if image_shape is not None:
            bad("image_shape", "metadata.image_shape must be null for tabular datasets")

    problems += _names(metadata, "class_names", num_classes)
    problems += _names(metadata, "group_names", num_groups)
    problems += _names(metadata, "feature_names", num_features if _is_int(num_features) else None)
    counts = metadata.get("counts", {})
    if counts is None:
        counts = {}
    if not isinstance(counts, Mapping) or not all(
        isinstance(k, str) and _is_int(v) and v >= 0 for k, v in counts.items()
    ):
        bad("counts", f"metadata.counts must map split names to row counts, got {counts!r}")
    elif unknown := sorted(set(counts) - set(SPLITS)):
        bad("counts", f"metadata.counts names unknown splits {unknown}; valid: {list(SPLITS)}")
    source = metadata.get("source", {})
    if not isinstance(source, Mapping):
        bad("source", f"metadata.source must be a JSON object, got {source!r}")

    if problems:
        return None, problems
    # Constructing through object.__new__ skips __post_init__, which would parse again.
    meta = object.__new__(DatasetMeta)
    values = {
        "name": name,
        "task": task,
        "input": kind,
        "num_classes": num_classes,
        "num_groups": num_groups,
        "image_shape": tuple(image_shape) if kind == "image" else None,
        "num_features": num_features if kind == "tabular" else None,
        "class_names": tuple(metadata.get("class_names") or ()),
        "group_names": tuple(metadata.get("group_names") or ()),
        "feature_names": tuple(metadata.get("feature_names") or ()),
        "counts": dict(counts),
        "source": dict(source),
    }
    for key, value in values.items():
        object.__setattr__(meta, key, value)
    return meta, []


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def dataset_schema(meta: DatasetMeta) -> pa.Schema:
    """The canonical Arrow schema of a dataset's rows (the column table above)."""
    inputs = pa.field("image", pa.binary()) if meta.input == "image" else pa.field("x", X_TYPE)
    label = MULTILABEL_TYPE if meta.task == "multilabel" else pa.int64()
    return pa.schema(
        [
            pa.field("id", pa.int64()),
            inputs,
            pa.field("label", label),
            pa.field("group", pa.int64()),
            pa.field("split", pa.string()),
        ]
    )


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One way a dataset breaks the format: in which file, which column, and what is wrong."""

    file: str
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: column {self.column!r}" if self.column else self.file
        return f"{where}: {self.message}"


def examples(values: Iterable[Any]) -> str:
    """The first few ``values`` for a problem message (``1, 2, 3, ...``)."""
    items = list(values)
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _is_list(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_list(dtype)
        or pa.types.is_large_list(dtype)
        or pa.types.is_fixed_size_list(dtype)
    )


def schema_problems(schema: pa.Schema, meta: DatasetMeta, file: str) -> list[Problem]:
    """Required columns and castable types (see the module docstring for the variants)."""
    problems: list[Problem] = []

    def bad(column: str | None, message: str) -> None:
        problems.append(Problem(file, column, message))

    names = set(schema.names)
    for column in REQUIRED_COLUMNS:
        if column not in names:
            bad(column, "required column is missing")
    has_image, has_x = "image" in names, "x" in names
    if has_image and has_x:
        bad("image", "the dataset has both 'image' and 'x' columns; it must have exactly one")
    elif not has_image and not has_x:
        bad(None, "the dataset has neither an 'image' nor an 'x' column; it needs exactly one")
    elif has_image and meta.input != "image":
        bad("image", "the metadata declares a tabular dataset, which needs an 'x' column")
    elif has_x and meta.input != "tabular":
        bad("x", "the metadata declares an image dataset, which needs an 'image' column")

    def dtype(column: str) -> pa.DataType | None:
        return schema.field(column).type if column in names else None

    for column in ("id", "group"):
        t = dtype(column)
        if t is not None and not pa.types.is_integer(t):
            bad(column, f"type is {t}, expected an integer type (int64)")
    t = dtype("label")
    if t is not None:
        if meta.task == "multiclass" and not pa.types.is_integer(t):
            bad("label", f"type is {t}, expected an integer class index (int64)")
        if meta.task == "multilabel" and not (_is_list(t) and pa.types.is_integer(t.value_type)):
            bad("label", f"type is {t}, expected a list of 0/1 integers (list<int64>)")
    t = dtype("split")
    if t is not None:
        value = t.value_type if pa.types.is_dictionary(t) else t
        if not (pa.types.is_string(value) or pa.types.is_large_string(value)):
            bad("split", f"type is {t}, expected string")
    t = dtype("image")
    if (
        t is not None
        and meta.input == "image"
        and not (pa.types.is_binary(t) or pa.types.is_large_binary(t))
    ):
        bad("image", f"type is {t}, expected binary (encoded PNG/JPEG bytes)")
    t = dtype("x")
    if (
        t is not None
        and meta.input == "tabular"
        and not (
            _is_list(t)
            and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))
        )
    ):
        bad("x", f"type is {t}, expected a list of numbers (list<float32>)")
    return problems


def canonical_table(
    table: pa.Table, meta: DatasetMeta, names: Sequence[str] | None = None
) -> pa.Table:
    """Cast an already schema-checked part to the canonical column types and order
    (only the columns ``names``, when given)."""
    target = pa.schema([f for f in dataset_schema(meta) if names is None or f.name in names])
    columns = []
    for target_field in target:
        column = table.column(target_field.name)
        if column.type != target_field.type:
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            column = column.cast(target_field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def as_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy (an empty int64 array for a column without chunks)."""
    return column.to_numpy() if column.num_chunks else np.empty(0, dtype=np.int64)


def list_matrix(column: pa.ChunkedArray, width: int, dtype: type) -> np.ndarray:
    """``[N, width]`` from a list column whose rows all have ``width`` values (checked before)."""
    flat = pc.list_flatten(column)
    values = flat.to_numpy() if len(flat) else np.empty(0, dtype=dtype)
    return values.astype(dtype, copy=False).reshape(len(column), width)
