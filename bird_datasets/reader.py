"""The bird dataset format: Parquet parts plus a manifest, under a prefix of an object store.

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
fixed-size feature lists, dictionary-encoded split names) and cast them to the types above.

This module is part of the service layer: numpy, pyarrow and Pillow only, never torch or ray.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from service.storage import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    Manifest,
    ManifestError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    fetch_verified,
    join_key,
    publish,
    read_manifest,
    validate_prefix,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SPLITS",
    "DatasetArrays",
    "DatasetError",
    "DatasetFormatError",
    "DatasetMeta",
    "DatasetNotFoundError",
    "DatasetWriter",
    "Problem",
    "ValidationReport",
    "check_table",
    "decode_images",
    "describe_dataset",
    "encode_images",
    "parse_metadata",
    "read_dataset",
    "read_dataset_meta",
    "render_description",
    "split_arrays",
    "validate_dataset",
    "write_dataset",
]

FORMAT = "bird-dataset"
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
Task = Literal["multiclass", "multilabel"]
InputKind = Literal["image", "tabular"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel")
INPUTS: tuple[str, ...] = ("image", "tabular")
# Pillow modes for the channel counts an image dataset may declare.
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "label", "group", "split")
PART_TEMPLATE = "part-{:05d}.parquet"

MiB = 1024 * 1024
# A part is closed once it holds this many (uncompressed Arrow) bytes: large enough that a
# dataset is a handful of objects, small enough that a reader (or a Ray Data task) can hold one
# part in memory and that parts upload and verify in parallel-friendly pieces.
DEFAULT_PART_BYTES = 128 * MiB
# Row groups are the unit Parquet readers (Ray Data included) can skip to or read in parallel;
# a few MiB each keeps per-group overhead negligible while still giving many groups per part.
ROW_GROUP_BYTES = 8 * MiB
ROW_GROUP_MAX_ROWS = 16_384
# Rows encoded (PNG) and converted to Arrow at a time, bounding the temporary copies.
_ENCODE_CHUNK = 1024
# Validation decodes at most this many images per split: enough to catch a systematically
# wrong shape or a broken encoder, cheap even for datasets with millions of rows.
MAX_IMAGES_CHECKED = 2000
# How many offending values or ids a problem message quotes.
_EXAMPLES = 5
_COMPRESSION = "zstd" if pa.Codec.is_available("zstd") else "snappy"
_X_TYPE = pa.list_(pa.float32())
_MULTILABEL_TYPE = pa.list_(pa.int64())


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
            or image_shape[0] not in _MODES
        ):
            bad(
                "image_shape",
                "metadata.image_shape must be [C, H, W] with C in "
                f"{sorted(_MODES)} and positive H, W for image datasets, got {image_shape!r}",
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
# Arrays in, images encoded
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetArrays:
    """One split (or a chunk of one) as numpy arrays, ready to be written.

    Exactly one of ``images`` (``uint8 [N, C, H, W]``) and ``x`` (``float32 [N, D]``) is given.
    ``label`` is ``int [N]`` (multi-class) or ``int [N, A]`` of 0/1 (multi-label); ``group`` is
    ``int [N]``.
    """

    label: np.ndarray
    group: np.ndarray
    images: np.ndarray | None = None
    x: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.x is None):
            raise ValueError("DatasetArrays needs exactly one of images and x")
        label = np.asarray(self.label)
        group = np.asarray(self.group)
        if label.ndim not in (1, 2) or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"label must be an integer [N] or [N, A] array, got {label.dtype}")
        if group.ndim != 1 or not np.issubdtype(group.dtype, np.integer):
            raise ValueError(f"group must be an integer [N] array, got {group.dtype}")
        object.__setattr__(self, "label", label.astype(np.int64, copy=False))
        object.__setattr__(self, "group", group.astype(np.int64, copy=False))
        if self.images is not None:
            images = np.asarray(self.images)
            if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in _MODES:
                raise ValueError(
                    f"images must be uint8 [N, C, H, W] with C in {sorted(_MODES)}, "
                    f"got {images.dtype} {images.shape}"
                )
            object.__setattr__(self, "images", images)
            n = images.shape[0]
        else:
            x = np.asarray(self.x)
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
                raise ValueError(f"x must be a numeric [N, D] array, got {x.dtype} {x.shape}")
            object.__setattr__(self, "x", x.astype(np.float32, copy=False))
            n = x.shape[0]
        if label.shape[0] != n or group.shape[0] != n:
            raise ValueError(
                f"arrays disagree on the number of rows: inputs {n}, label {label.shape[0]}, "
                f"group {group.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.group.shape[0])

    def slice(self, start: int, stop: int) -> DatasetArrays:
        """Rows ``start:stop`` (views, no copies)."""
        return DatasetArrays(
            label=self.label[start:stop],
            group=self.group[start:stop],
            images=None if self.images is None else self.images[start:stop],
            x=None if self.x is None else self.x[start:stop],
        )


def encode_images(images: np.ndarray) -> list[bytes]:
    """PNG-encode ``uint8 [N, C, H, W]`` images (C = 1, 3 or 4), one ``bytes`` per image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in _MODES:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    # One vectorised transpose to the HWC layout Pillow wants, instead of one per image.
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    if images.shape[1] == 1:
        hwc = hwc[..., 0]
    mode = _MODES[images.shape[1]]
    out: list[bytes] = []
    for image in hwc:
        buffer = io.BytesIO()
        # compress_level 6 is zlib's default: about as small as 9 for these small images at a
        # fraction of the time.
        Image.fromarray(image, mode=mode).save(buffer, format="PNG", compress_level=6)
        out.append(buffer.getvalue())
    return out


def _decode_one(data: bytes | None, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one encoded image to ``uint8 [H, W, C]``; ValueError with the reason if not."""
    if data is None:
        raise ValueError("the image is null")
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Check the header before decoding pixels, so a huge or wrong image costs nothing.
            if image.size != (width, height):
                raise ValueError(
                    f"the image is {image.size[1]}x{image.size[0]} (HxW), expected {height}x{width}"
                )
            array = np.asarray(image.convert(_MODES[channels]))
    except UnidentifiedImageError:
        raise ValueError("the image cannot be decoded (not a format Pillow reads)") from None
    except (OSError, SyntaxError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError depending on codec.
        raise ValueError(f"the image cannot be decoded ({exc})") from None
    return array if channels != 1 else array[..., None]


def decode_images(
    column: pa.Array | pa.ChunkedArray | Sequence[bytes], shape: Sequence[int] | None = None
) -> np.ndarray:
    """Decode a column of encoded images (PNG, JPEG, ...) to ``uint8 [N, C, H, W]``.

    ``shape`` is the declared ``(C, H, W)``; images are converted to its channel count (L, RGB,
    RGBA) and must have its height and width. Without ``shape`` the first image sets it (RGB
    unless that image is single-channel). Raises ``ValueError`` naming the row of the first
    image that is null, undecodable or of the wrong size.
    """
    values: Iterable[Any]
    if isinstance(column, pa.ChunkedArray | pa.Array):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        # One chunk (row group) of Python bytes at a time: bounded memory, no per-row scalars.
        values = (value for chunk in chunks for value in chunk.to_pylist())
    else:
        values = column
    n = len(column)
    if shape is None:
        if n == 0:
            raise ValueError("cannot infer the image shape of an empty column; pass shape")
        first = column[0].as_py() if isinstance(column, pa.ChunkedArray | pa.Array) else column[0]
        if first is None:
            raise ValueError("row 0: the image is null")
        try:
            with Image.open(io.BytesIO(first)) as image:
                shape = (1 if image.mode in ("L", "1", "I;16") else 3, image.size[1], image.size[0])
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise ValueError("row 0: the image cannot be decoded") from None
    c, h, w = (int(v) for v in shape)
    if c not in _MODES:
        raise ValueError(f"shape must be (C, H, W) with C in {sorted(_MODES)}, got {shape}")
    out = np.empty((n, h, w, c), dtype=np.uint8)
    for row, data in enumerate(values):
        try:
            out[row] = _decode_one(data, (c, h, w))
        except ValueError as exc:
            raise ValueError(f"row {row}: {exc}") from None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _list_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A ``list<value_type>`` array from a dense ``[N, K]`` matrix, without Python loops."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), value_type))


def _schema(meta: DatasetMeta) -> pa.Schema:
    inputs = pa.field("image", pa.binary()) if meta.input == "image" else pa.field("x", _X_TYPE)
    label = _MULTILABEL_TYPE if meta.task == "multilabel" else pa.int64()
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
# Writing
# --------------------------------------------------------------------------------------------


class DatasetWriter:
    """Stream rows into a dataset: ``write(split, arrays)`` any number of times, then ``close``.

    Rows get contiguous ids in the order they are written. Parts are written to a local
    temporary directory (memory stays bounded by one row group, whatever the dataset size) and
    published by :meth:`close` — data files first, the manifest last — so the dataset appears
    at once and complete, or not at all. Used as a context manager, an exception aborts the
    write and publishes nothing.

    ``rows_per_part`` caps the rows of each part (default: parts of about 128 MiB).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        meta: DatasetMeta,
        *,
        rows_per_part: int | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> None:
        if rows_per_part is not None and rows_per_part < 1:
            raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
        self.store = store
        self.prefix = validate_prefix(prefix)
        self.meta = meta
        self.rows_per_part = rows_per_part
        self.part_bytes = part_bytes
        self._schema = _schema(meta)
        self._tmp = tempfile.TemporaryDirectory(prefix="bird-dataset-")
        self._parts: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._part_rows = 0
        self._part_size = 0
        self._buffer: list[pa.Table] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._next_id = 0
        self._counts: dict[str, int] = {}
        self._closed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # -- rows in ------------------------------------------------------------------------------

    def _check(self, split: str, arrays: DatasetArrays) -> None:
        meta = self.meta
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if meta.input == "image":
            if arrays.images is None:
                raise ValueError(f"{meta.name} is an image dataset: pass images, not x")
            if tuple(arrays.images.shape[1:]) != meta.image_shape:
                raise ValueError(
                    f"images are {tuple(arrays.images.shape[1:])}, the metadata declares "
                    f"image_shape {meta.image_shape}"
                )
        else:
            if arrays.x is None:
                raise ValueError(f"{meta.name} is a tabular dataset: pass x, not images")
            if arrays.x.shape[1] != meta.num_features:
                raise ValueError(
                    f"x has {arrays.x.shape[1]} features, the metadata declares "
                    f"num_features {meta.num_features}"
                )
        label = arrays.label
        if meta.task == "multiclass":
            if label.ndim != 1:
                raise ValueError(f"multiclass labels must be [N], got shape {label.shape}")
            if label.size and (label.min() < 0 or label.max() >= meta.num_classes):
                raise ValueError(
                    f"{split} labels must lie in 0..{meta.num_classes - 1}, "
                    f"got {label.min()}..{label.max()}"
                )
        else:
            if label.ndim != 2 or label.shape[1] != meta.num_classes:
                raise ValueError(
                    f"multilabel labels must be [N, {meta.num_classes}], got shape {label.shape}"
                )
            if label.size and not np.isin(label, (0, 1)).all():
                raise ValueError(f"{split} multilabel labels must be 0/1")
        group = arrays.group
        if group.size and (group.min() < 0 or group.max() >= meta.num_groups):
            raise ValueError(
                f"{split} groups must lie in 0..{meta.num_groups - 1}, "
                f"got {group.min()}..{group.max()}"
            )

    def write(self, split: str, arrays: DatasetArrays) -> None:
        """Append ``arrays`` as rows of ``split`` (checked against the metadata first)."""
        if self._closed:
            raise ValueError("this DatasetWriter is closed")
        self._check(split, arrays)
        for start in range(0, len(arrays), _ENCODE_CHUNK):
            chunk = arrays.slice(start, start + _ENCODE_CHUNK)
            self._add(self._table(split, chunk))
        self._counts[split] = self._counts.get(split, 0) + len(arrays)

    def _table(self, split: str, arrays: DatasetArrays) -> pa.Table:
        n = len(arrays)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        if arrays.images is not None:
            inputs = pa.array(encode_images(arrays.images), pa.binary())
        else:
            assert arrays.x is not None
            inputs = _list_array(arrays.x, pa.float32())
        if self.meta.task == "multilabel":
            label = _list_array(arrays.label, pa.int64())
        else:
            label = pa.array(arrays.label, pa.int64())
        columns = [
            pa.array(ids, pa.int64()),
            inputs,
            label,
            pa.array(arrays.group, pa.int64()),
            pa.repeat(pa.scalar(split, pa.string()), n),
        ]
        return pa.Table.from_arrays(columns, schema=self._schema)

    def _add(self, table: pa.Table) -> None:
        while table.num_rows:
            room = table.num_rows
            if self.rows_per_part is not None:
                room = self.rows_per_part - self._part_rows - self._buffer_rows
            take = min(room, table.num_rows)
            piece = table.slice(0, take)
            table = table.slice(take)
            self._buffer.append(piece)
            self._buffer_rows += piece.num_rows
            self._buffer_bytes += piece.nbytes
            part_full = (
                self.rows_per_part is not None
                and self._part_rows + self._buffer_rows >= self.rows_per_part
            )
            if (
                part_full
                or self._buffer_bytes >= ROW_GROUP_BYTES
                or self._buffer_rows >= ROW_GROUP_MAX_ROWS
            ):
                self._flush_row_group()
            if part_full or self._part_size >= self.part_bytes:
                self._close_part()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        group = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffer_rows, self._buffer_bytes = [], 0, 0
        if self._writer is None:
            path = Path(self._tmp.name) / PART_TEMPLATE.format(len(self._parts))
            self._parts.append(path)
            self._writer = pq.ParquetWriter(path, self._schema, compression=_COMPRESSION)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._part_rows += group.num_rows
        self._part_size += group.nbytes

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._part_rows = 0
        self._part_size = 0

    # -- publish ------------------------------------------------------------------------------

    def close(self) -> Manifest:
        """Finish the last part and publish the dataset (parts first, manifest last)."""
        if self._closed:
            raise ValueError("this DatasetWriter is closed")
        try:
            self._flush_row_group()
            self._close_part()
            if not self._parts:
                raise ValueError(
                    f"refusing to publish an empty dataset at {self.store.uri(self.prefix)}"
                )
            meta = replace(
                self.meta, counts={s: self._counts[s] for s in SPLITS if s in self._counts}
            )
            files = {path.name: path for path in self._parts}
            manifest = publish(self.store, self.prefix, files, metadata=meta.to_metadata())
            self._remove_stale_parts(set(files))
            return manifest
        finally:
            self._closed = True
            self._tmp.cleanup()

    def _remove_stale_parts(self, current: set[str]) -> None:
        # A re-publish with fewer parts leaves the old tail behind. Readers ignore it (only the
        # manifest counts), but it would waste space and confuse anyone listing the prefix.
        # Removing it after the new manifest is in place never affects a reader.
        for info in self.store.list(self.prefix):
            name = info.key[len(self.prefix) + 1 :] if self.prefix else info.key
            is_part = "/" not in name and name.startswith("part-") and name.endswith(".parquet")
            if is_part and name not in current:
                self.store.delete(info.key)

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True
        self._tmp.cleanup()


def write_dataset(
    store: ObjectStore,
    prefix: str,
    *,
    splits: Mapping[str, DatasetArrays],
    meta: DatasetMeta,
    rows_per_part: int | None = None,
) -> Manifest:
    """Write ``splits`` (``{"train": ..., "val": ..., "test": ...}``) as a dataset at ``prefix``.

    Images are PNG-encoded; ids are assigned contiguously across splits in the order train,
    val, test. ``meta.counts`` is replaced by the actual row counts. Returns the manifest.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {', '.join(SPLITS)}")
    with DatasetWriter(store, prefix, meta, rows_per_part=rows_per_part) as writer:
        for split in SPLITS:
            if split in splits:
                writer.write(split, splits[split])
        return writer.close()


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


def _examples(values: Iterable[Any]) -> str:
    items = list(values)
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _is_list(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_list(dtype)
        or pa.types.is_large_list(dtype)
        or pa.types.is_fixed_size_list(dtype)
    )


def _schema_problems(schema: pa.Schema, meta: DatasetMeta, file: str) -> list[Problem]:
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


def _canonical(table: pa.Table, meta: DatasetMeta, names: Sequence[str] | None = None) -> pa.Table:
    """Cast an already schema-checked part to the canonical column types and order
    (only the columns ``names``, when given)."""
    target = pa.schema([f for f in _schema(meta) if names is None or f.name in names])
    columns = []
    for target_field in target:
        column = table.column(target_field.name)
        if column.type != target_field.type:
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            column = column.cast(target_field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def _as_numpy(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy() if column.num_chunks else np.empty(0, dtype=np.int64)


def _list_matrix(column: pa.ChunkedArray, width: int, dtype: type) -> np.ndarray:
    """``[N, width]`` from a list column whose rows all have ``width`` values (checked before)."""
    flat = pc.list_flatten(column)
    values = flat.to_numpy() if len(flat) else np.empty(0, dtype=dtype)
    return values.astype(dtype, copy=False).reshape(len(column), width)


def _value_problems(table: pa.Table, meta: DatasetMeta, file: str) -> list[Problem]:
    """Per-part value checks on a canonical table: nulls, ranges, list lengths, split names."""
    problems: list[Problem] = []

    def bad(column: str, message: str) -> None:
        problems.append(Problem(file, column, message))

    inputs = "image" if meta.input == "image" else "x"
    for column in (*REQUIRED_COLUMNS, inputs):
        nulls = table.column(column).null_count
        if nulls:
            bad(column, f"{nulls} null value(s)")
    if problems:
        return problems  # ranges over columns with nulls would be misleading

    label = table.column("label")
    if meta.task == "multiclass":
        values = _as_numpy(label)
        wrong = np.unique(values[(values < 0) | (values >= meta.num_classes)])
        if wrong.size:
            bad(
                "label",
                f"{int(((values < 0) | (values >= meta.num_classes)).sum())} label(s) outside "
                f"0..{meta.num_classes - 1}: {_examples(wrong.tolist())}",
            )
    else:
        lengths = _as_numpy(pc.list_value_length(label))
        wrong_len = np.unique(lengths[lengths != meta.num_classes])
        if wrong_len.size:
            bad(
                "label",
                f"{int((lengths != meta.num_classes).sum())} label list(s) do not have "
                f"num_classes={meta.num_classes} entries (lengths {_examples(wrong_len.tolist())})",
            )
        flat = pc.list_flatten(label)
        if flat.null_count:
            bad("label", f"{flat.null_count} null entries inside label lists")
        else:
            values = flat.to_numpy() if len(flat) else np.empty(0, dtype=np.int64)
            wrong = np.unique(values[(values != 0) & (values != 1)])
            if wrong.size:
                bad("label", f"multi-label entries must be 0/1, found {_examples(wrong.tolist())}")

    groups = _as_numpy(table.column("group"))
    outside = (groups < 0) | (groups >= meta.num_groups)
    if outside.any():
        bad(
            "group",
            f"{int(outside.sum())} group(s) outside 0..{meta.num_groups - 1}: "
            f"{_examples(np.unique(groups[outside]).tolist())}",
        )

    splits = pc.unique(table.column("split")).to_pylist()
    if wrong_splits := sorted(set(splits) - set(SPLITS)):
        count = int(pc.sum(pc.invert(pc.is_in(table.column("split"), pa.array(SPLITS)))).as_py())
        bad(
            "split",
            f"{count} row(s) with unknown split name(s) {_examples(wrong_splits)}; "
            f"valid: {', '.join(SPLITS)}",
        )

    if meta.input == "tabular":
        x = table.column("x")
        lengths = _as_numpy(pc.list_value_length(x))
        wrong_len = lengths != meta.num_features
        if wrong_len.any():
            bad(
                "x",
                f"{int(wrong_len.sum())} row(s) do not have num_features={meta.num_features} "
                f"values (lengths {_examples(np.unique(lengths[wrong_len]).tolist())})",
            )
        flat = pc.list_flatten(x)
        if flat.null_count:
            bad("x", f"{flat.null_count} null feature value(s)")
        elif len(flat) and not np.isfinite(flat.to_numpy()).all():
            bad("x", f"{int((~np.isfinite(flat.to_numpy())).sum())} NaN or infinite value(s)")
    return problems


def _files_label(files: Sequence[str]) -> str:
    if not files:
        return MANIFEST_NAME
    if len(files) <= 3:
        return ", ".join(files)
    return f"{files[0]} ... {files[-1]} ({len(files)} parts)"


def _dataset_problems(
    meta: DatasetMeta, light: pa.Table, files: Sequence[str], check_counts: bool = True
) -> list[Problem]:
    """Checks across all parts, on the ``id``/``group``/``split``/``file`` columns of all rows:
    duplicate ids, missing splits, groups missing from a split, metadata counts."""
    problems: list[Problem] = []
    file_index = _as_numpy(light.column("file")) if "file" in light.column_names else None

    ids = _as_numpy(light.column("id"))
    if ids.size:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup_sorted = np.zeros(ids.size, dtype=bool)
        same = sorted_ids[1:] == sorted_ids[:-1]
        dup_sorted[1:] |= same
        dup_sorted[:-1] |= same
        dup_rows = order[dup_sorted]
        if dup_rows.size:
            # For each part: its duplicated ids, and the parts holding the other copies.
            dup_files: dict[int, set[int]] = {}
            for row in dup_rows.tolist():
                key = int(file_index[row]) if file_index is not None else 0
                dup_files.setdefault(int(ids[row]), set()).add(key)
            by_file: dict[int, tuple[set[int], set[int]]] = {}
            for value, keys in dup_files.items():
                for key in keys:
                    values, others = by_file.setdefault(key, (set(), set()))
                    values.add(value)
                    others.update(keys - {key})
            for key, (values, others) in sorted(by_file.items()):
                where = (
                    "also in " + ", ".join(files[k] for k in sorted(others))
                    if others and file_index is not None
                    else "within this part"
                )
                problems.append(
                    Problem(
                        files[key] if file_index is not None else _files_label(files),
                        "id",
                        f"{len(values)} id(s) used by more than one row ({where}): "
                        f"{_examples(sorted(values))}",
                    )
                )

    split_col = light.column("split")
    groups = _as_numpy(light.column("group"))
    actual: dict[str, int] = {}
    for split in SPLITS:
        mask = _as_numpy(pc.equal(split_col, split)) if len(split_col) else np.zeros(0, bool)
        mask = mask.astype(bool)
        actual[split] = int(mask.sum())
        split_files = (
            [files[i] for i in np.unique(file_index[mask]).tolist()]
            if file_index is not None
            else list(files)
        )
        if not mask.any():
            problems.append(
                Problem(_files_label(files), "split", f"the {split!r} split has no rows")
            )
            continue
        present = set(np.unique(groups[mask]).tolist())
        missing = [g for g in range(meta.num_groups) if g not in present]
        if missing:
            names = ", ".join(f"{g} ({meta.group_label(g)})" for g in missing)
            problems.append(
                Problem(
                    _files_label(split_files),
                    "group",
                    f"group(s) {names} have no rows in the {split!r} split; every group must "
                    "appear in every split for the fairness metrics",
                )
            )
    if check_counts and meta.counts:
        wrong = {
            s: (meta.counts.get(s, 0), actual[s])
            for s in SPLITS
            if meta.counts.get(s, 0) != actual[s]
        }
        if wrong:
            detail = ", ".join(f"{s}: metadata {m}, rows {a}" for s, (m, a) in wrong.items())
            problems.append(
                Problem(
                    MANIFEST_NAME,
                    "metadata.counts",
                    f"metadata.counts disagrees with the rows: {detail}",
                )
            )
    return problems


def check_table(meta: DatasetMeta, table: pa.Table, file: str = "<table>") -> list[Problem]:
    """Every check :func:`validate_dataset` makes on rows (except image decoding), on one
    canonical table as returned by :func:`read_dataset`. Empty list: the rows are usable."""
    problems = _value_problems(table, meta, file)
    if problems:
        return problems
    light = table.select(["id", "group", "split"])
    return _dataset_problems(meta, light, [file], check_counts=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_meta(store: ObjectStore, prefix: str) -> tuple[Manifest, Any, str]:
    """The manifest and its raw metadata; DatasetNotFoundError/DatasetFormatError otherwise."""
    prefix = validate_prefix(prefix)
    uri = store.uri(prefix)
    manifest_key = join_key(prefix, MANIFEST_NAME)
    try:
        manifest = read_manifest(store, prefix)
    except ManifestError as exc:
        if not store.exists(manifest_key):
            raise DatasetNotFoundError(
                f"no dataset at {uri}: {store.uri(manifest_key)} does not exist "
                "(a dataset exists once its manifest is written)",
                uri,
            ) from None
        raise DatasetFormatError(str(exc), exc.uri) from None
    return manifest, manifest.metadata, uri


def _part_names(manifest: Manifest) -> list[str]:
    return sorted(name for name in manifest.files if name.endswith(".parquet"))


def _load_meta(store: ObjectStore, prefix: str) -> tuple[Manifest, DatasetMeta, str]:
    manifest, metadata, uri = _read_meta(store, prefix)
    meta, problems = parse_metadata(metadata)
    if meta is None:
        manifest_uri = store.uri(join_key(validate_prefix(prefix), MANIFEST_NAME))
        details = "; ".join(message for _, message in problems)
        raise DatasetFormatError(f"{manifest_uri} is not a valid bird dataset: {details}", uri)
    if not _part_names(manifest):
        raise DatasetFormatError(f"the manifest of {uri} lists no .parquet parts", uri)
    return manifest, meta, uri


def read_dataset_meta(store: ObjectStore, prefix: str) -> DatasetMeta:
    """What the dataset's manifest says (task, classes, groups, shapes), without reading rows.

    Raises :class:`DatasetNotFoundError` when no manifest exists at ``prefix`` and
    :class:`DatasetFormatError` when it is not a valid bird dataset manifest.
    """
    return _load_meta(store, prefix)[1]


def _arrow_buffer(data: bytes) -> pa.Buffer:
    """``data`` copied into Arrow-owned memory.

    A buffer that wraps a Python ``bytes`` needs the GIL to be released; Arrow's decoding
    threads can drop their last reference after the interpreter has started shutting down,
    and taking the GIL then kills the process ("terminate called without an active
    exception"). One memcpy per part avoids that.
    """
    buffer = pa.allocate_buffer(len(data))
    np.frombuffer(buffer, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    return buffer


def _read_part(
    store: ObjectStore, prefix: str, name: str, manifest: Manifest
) -> tuple[pq.ParquetFile, str]:
    key = join_key(validate_prefix(prefix), name)
    data = fetch_verified(store, key, manifest.files[name])
    try:
        return pq.ParquetFile(pa.BufferReader(_arrow_buffer(data))), store.uri(key)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(
            f"{store.uri(key)} is not a readable Parquet file: {exc}", store.uri(key)
        ) from None


def read_dataset(
    store: ObjectStore, prefix: str, *, columns: Sequence[str] | None = None
) -> tuple[DatasetMeta, pa.Table]:
    """Read the dataset at ``prefix``: its metadata and all rows, sorted by ``id``.

    Only the parts listed in the manifest are read, each verified against its sha256 first.
    Columns are cast to the canonical types (``id``, ``image``/``x``, ``label``, ``group``,
    ``split``); ``columns`` selects a subset. Raises :class:`DatasetNotFoundError` when there is
    no manifest, :class:`DatasetFormatError` for metadata or a part that breaks the format (use
    :func:`validate_dataset` for the full list of problems), and the storage errors of
    :mod:`service.storage` (checksum mismatch, missing part, missing bucket...).
    """
    manifest, meta, _uri = _load_meta(store, prefix)
    wanted = [f.name for f in _schema(meta)]
    if columns is not None:
        unknown = sorted(set(columns) - set(wanted))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; this dataset has {wanted}")
        wanted = [c for c in wanted if c in columns or c == "id"]
    tables = []
    for name in _part_names(manifest):
        parquet, part_uri = _read_part(store, prefix, name, manifest)
        problems = _schema_problems(parquet.schema_arrow, meta, name)
        if problems:
            raise DatasetFormatError(
                f"{part_uri} does not follow the bird dataset format: "
                + "; ".join(str(p) for p in problems),
                part_uri,
            )
        try:
            # Only the wanted columns are decoded (describe skips the image bytes).
            table = _canonical(parquet.read(columns=wanted), meta, wanted)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetFormatError(f"cannot read {part_uri}: {exc}", part_uri) from None
        tables.append(table)
    table = pa.concat_tables(tables)
    ids = _as_numpy(table.column("id"))
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        table = table.take(pa.array(np.argsort(ids, kind="stable")))
    if columns is not None and "id" not in columns:
        table = table.drop_columns(["id"])
    return meta, table


def split_arrays(meta: DatasetMeta, table: pa.Table, split: str) -> dict[str, np.ndarray]:
    """The rows of ``split`` as numpy arrays: ``id``, ``label``, ``group`` and ``images``
    (``uint8 [N, C, H, W]``, decoded) or ``x`` (``float32 [N, D]``).

    ``label`` is ``int64 [N]`` (multi-class) or ``int64 [N, A]`` (multi-label). ``table`` is a
    canonical table from :func:`read_dataset`; run :func:`check_table` first for a clear error
    on bad rows.
    """
    rows = table.filter(pc.equal(table.column("split"), split))
    out: dict[str, np.ndarray] = {}
    if "id" in rows.column_names:
        out["id"] = _as_numpy(rows.column("id"))
    if meta.task == "multilabel":
        out["label"] = _list_matrix(rows.column("label"), meta.num_classes, np.int64)
    else:
        out["label"] = _as_numpy(rows.column("label"))
    out["group"] = _as_numpy(rows.column("group"))
    if meta.input == "image":
        assert meta.image_shape is not None
        out["images"] = decode_images(rows.column("image"), meta.image_shape)
    else:
        assert meta.num_features is not None
        out["x"] = _list_matrix(rows.column("x"), meta.num_features, np.float32)
    # Own, writable copies: arrays from pyarrow can be read-only views of Arrow buffers, which
    # torch.from_numpy warns about and which would keep whole parts alive in memory.
    return {
        key: np.array(value, dtype=np.float32 if key == "x" else None, copy=True)
        if not value.flags.writeable or not value.flags.owndata
        else value
        for key, value in out.items()
    }


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found: the problems (empty when the dataset is valid)."""

    uri: str
    meta: DatasetMeta | None
    problems: list[Problem]
    counts: dict[str, int] = field(default_factory=dict)
    images_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def rows(self) -> int:
        """Rows read across all parts."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """``OK: N rows, ...`` or the list of problems, one per line."""
        if not self.ok:
            lines = [f"{len(self.problems)} problem(s) in {self.uri}:"]
            lines += [f"  - {p}" for p in self.problems]
            return "\n".join(lines)
        assert self.meta is not None
        meta = self.meta
        split_counts = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in SPLITS)
        if meta.input == "image":
            inputs = "images " + "x".join(str(v) for v in meta.image_shape or ())
        else:
            inputs = f"{meta.num_features} features"
        checked = f", {self.images_checked} images decoded" if meta.input == "image" else ""
        return (
            f"OK: {self.rows} rows ({split_counts}), {meta.name}, {meta.task}, {inputs}, "
            f"{meta.num_classes} classes, {meta.num_groups} groups{checked}: {self.uri}"
        )


def _check_images(
    table: pa.Table,
    meta: DatasetMeta,
    file: str,
    budget: dict[str, int],
    fraction: dict[str, float],
    rng: np.random.Generator,
) -> tuple[list[Problem], int]:
    """Decode a sample of the images of one part; report the rows that fail."""
    assert meta.image_shape is not None
    splits = _as_numpy(table.column("split").cast(pa.string())).astype(object)
    ids = _as_numpy(table.column("id"))
    images = table.column("image")
    failures: list[tuple[int, str]] = []
    checked = 0
    for split in SPLITS:
        rows = np.flatnonzero(splits == split)
        if not rows.size or budget[split] <= 0:
            continue
        # Bernoulli sampling at the split's overall rate spreads the sample over all parts;
        # the budget caps the total even when the metadata counts are missing or wrong.
        picked = rows[rng.random(rows.size) < fraction[split]][: budget[split]]
        budget[split] -= picked.size
        for row in picked.tolist():
            checked += 1
            try:
                _decode_one(images[row].as_py(), meta.image_shape)
            except ValueError as exc:
                failures.append((int(ids[row]), str(exc)))
    if not failures:
        return [], checked
    reasons = sorted({reason for _, reason in failures})
    message = (
        f"{len(failures)} of {checked} decoded image(s) are unusable (ids "
        f"{_examples(i for i, _ in failures)}): {'; '.join(reasons[:3])}"
    )
    return [Problem(file, "image", message)], checked


def validate_dataset(
    store: ObjectStore,
    prefix: str,
    *,
    max_images_per_split: int = MAX_IMAGES_CHECKED,
    seed: int = 0,
) -> ValidationReport:
    """Check the dataset at ``prefix`` against the format and report every problem found.

    Checked: the manifest metadata; every part's presence and sha256; each part's schema
    (required columns, types, exactly one of ``image``/``x``); label range (or 0/1 lists of
    ``num_classes`` entries), group range, split names, feature-vector lengths and finiteness,
    nulls; across parts: duplicate ids, all three splits present, every group present in every
    split, ``metadata.counts`` equal to the rows; and up to ``max_images_per_split`` images per
    split decoded with the declared shape (all of them for small datasets).

    Raises :class:`DatasetNotFoundError` when there is no manifest (nothing to validate) and
    storage errors when the store itself fails (missing bucket, bad credentials).
    """
    manifest, metadata, uri = _read_meta(store, prefix)
    meta, meta_problems = parse_metadata(metadata)
    problems = [Problem(MANIFEST_NAME, column, message) for column, message in meta_problems]
    if meta is None:
        return ValidationReport(uri=uri, meta=None, problems=problems)
    parts = _part_names(manifest)
    if not parts:
        problems.append(Problem(MANIFEST_NAME, None, "the manifest lists no .parquet parts"))
        return ValidationReport(uri=uri, meta=meta, problems=problems)

    rng = np.random.default_rng(seed)
    budget = dict.fromkeys(SPLITS, max_images_per_split)
    fraction = {
        s: min(1.0, max_images_per_split / meta.counts[s]) if meta.counts.get(s) else 1.0
        for s in SPLITS
    }
    lights: list[pa.Table] = []
    readable: list[str] = []
    images_checked = 0
    for name in parts:
        try:
            parquet, _ = _read_part(store, prefix, name, manifest)
            schema_problems = _schema_problems(parquet.schema_arrow, meta, name)
            if schema_problems:
                problems += schema_problems
                continue
            table = _canonical(parquet.read(), meta)
        except (ChecksumMismatchError, ObjectNotFoundError, DatasetFormatError) as exc:
            problems.append(Problem(name, None, str(exc)))
            continue
        except (pa.ArrowException, OSError) as exc:
            problems.append(Problem(name, None, f"cannot read the part: {exc}"))
            continue
        value_problems = _value_problems(table, meta, name)
        problems += value_problems
        if meta.input == "image" and max_images_per_split > 0:
            image_problems, checked = _check_images(table, meta, name, budget, fraction, rng)
            problems += image_problems
            images_checked += checked
        if not any(p.column in ("id", "group", "split") for p in value_problems):
            light = table.select(["id", "group", "split"])
            index = len(readable)
            readable.append(name)
            lights.append(
                light.append_column("file", pa.repeat(pa.scalar(index, pa.int32()), light.num_rows))
            )

    counts: dict[str, int] = {}
    if lights:
        light = pa.concat_tables(lights)
        split_col = light.column("split")
        for split in SPLITS:
            counts[split] = int(pc.sum(pc.equal(split_col, split)).as_py() or 0)
        # Counts can only be compared when every part was readable.
        problems += _dataset_problems(
            meta, light, readable, check_counts=len(readable) == len(parts)
        )
    return ValidationReport(
        uri=uri, meta=meta, problems=problems, counts=counts, images_checked=images_checked
    )


# --------------------------------------------------------------------------------------------
# Describe
# --------------------------------------------------------------------------------------------


def describe_dataset(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """Counts per split × class × group of the dataset at ``prefix`` (JSON-able).

    ``splits[s]["classes"][c][g]`` is the number of rows of split ``s`` with class ``c`` in
    group ``g`` (multi-label: rows where attribute ``c`` is 1); ``splits[s]["groups"][g]`` is
    the number of rows of group ``g``. :func:`render_description` turns it into a table.
    """
    meta, table = read_dataset(store, prefix, columns=["label", "group", "split"])
    describe: dict[str, Any] = {
        "uri": store.uri(validate_prefix(prefix)),
        "name": meta.name,
        "task": meta.task,
        "input": meta.input,
        "image_shape": list(meta.image_shape) if meta.image_shape else None,
        "num_features": meta.num_features,
        "num_classes": meta.num_classes,
        "num_groups": meta.num_groups,
        "class_names": [meta.class_label(c) for c in range(meta.num_classes)],
        "group_names": [meta.group_label(g) for g in range(meta.num_groups)],
        "rows": table.num_rows,
        "splits": {},
    }
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split))
        groups = _as_numpy(rows.column("group")).astype(np.int64, copy=False)
        valid = (groups >= 0) & (groups < meta.num_groups)
        if meta.task == "multilabel":
            labels = _safe_label_matrix(rows.column("label"), meta.num_classes)
            classes = np.zeros((meta.num_classes, meta.num_groups), dtype=np.int64)
            for g in range(meta.num_groups):
                classes[:, g] = (labels[groups == g] == 1).sum(axis=0)
        else:
            labels = _as_numpy(rows.column("label")).astype(np.int64, copy=False)
            valid &= (labels >= 0) & (labels < meta.num_classes)
            flat = labels[valid] * meta.num_groups + groups[valid]
            classes = np.bincount(flat, minlength=meta.num_classes * meta.num_groups).reshape(
                meta.num_classes, meta.num_groups
            )
        in_range = (groups >= 0) & (groups < meta.num_groups)
        group_counts = np.bincount(groups[in_range], minlength=meta.num_groups)
        describe["splits"][split] = {
            "rows": rows.num_rows,
            "groups": group_counts[: meta.num_groups].tolist(),
            "classes": classes.tolist(),
        }
    return describe


def _safe_label_matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """``[N, width]`` multi-label matrix; rows of the wrong length count as all-zero."""
    lengths = _as_numpy(pc.list_value_length(column)) if len(column) else np.empty(0, np.int64)
    out = np.zeros((len(column), width), dtype=np.int64)
    good = np.flatnonzero(lengths == width)
    if good.size:
        out[good] = _list_matrix(column.take(pa.array(good)), width, np.int64)
    return out


def render_description(describe: Mapping[str, Any]) -> str:
    """A text table per split: rows = classes, columns = groups, plus the majority group's share.

    The last column makes the skew visible at a glance: in a balanced split every class shows
    about ``1 / num_groups``; in FashionMNIST-S train, classes 0–4 show ``colour 95%``.
    """
    groups = list(describe["group_names"])
    classes = list(describe["class_names"])
    multilabel = describe["task"] == "multilabel"
    if describe["input"] == "image":
        inputs = "images " + "x".join(str(v) for v in describe["image_shape"] or ())
    else:
        inputs = f"{describe['num_features']} features"
    lines = [
        f"{describe['name']} ({describe['uri']}): {describe['task']}, {inputs}, "
        f"{describe['num_classes']} {'attributes' if multilabel else 'classes'}, "
        f"{describe['num_groups']} groups, {describe['rows']} rows"
    ]
    row_names = [f"{c} {name}" if name != str(c) else name for c, name in enumerate(classes)]
    first = "attribute = 1" if multilabel else "class"
    name_width = max(len(first), len("all rows"), *(len(n) for n in row_names))
    widths = [max(len(g), 7) for g in groups]

    def share(counts: Sequence[int]) -> str:
        total = sum(counts)
        if not total:
            return "-"
        top = int(np.argmax(counts))
        return f"{groups[top]} {100 * counts[top] / total:.0f}%"

    def line(name: str, counts: Sequence[int]) -> str:
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(counts, widths, strict=True))
        return f"  {name:<{name_width}}  {cells}  {share(counts)}"

    for split, info in describe["splits"].items():
        lines.append("")
        lines.append(f"{split}: {info['rows']} rows")
        header = "  ".join(f"{g:>{w}}" for g, w in zip(groups, widths, strict=True))
        lines.append(f"  {first:<{name_width}}  {header}  majority group")
        for name, counts in zip(row_names, info["classes"], strict=True):
            lines.append(line(name, counts))
        lines.append(line("all rows", info["groups"]))
    return "\n".join(lines)
