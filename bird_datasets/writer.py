"""Writing datasets in the bird format: :class:`DatasetWriter` (streaming) and
:func:`write_dataset` (whole splits at once).

Parts first, manifest last (:func:`service.storage.publish`): a dataset appears at once and
complete, or not at all. Images are PNG-encoded by :func:`bird_datasets.codec.encode_images`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bird_datasets.codec import CHANNEL_MODES, encode_images
from bird_datasets.format import PART_TEMPLATE, SPLITS, DatasetMeta, dataset_schema
from service.storage import Manifest, ObjectStore, publish, validate_prefix

__all__ = [
    "DEFAULT_PART_BYTES",
    "ROW_GROUP_BYTES",
    "ROW_GROUP_MAX_ROWS",
    "DatasetArrays",
    "DatasetWriter",
    "write_dataset",
]

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
_COMPRESSION = "zstd" if pa.Codec.is_available("zstd") else "snappy"


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
            if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in CHANNEL_MODES:
                raise ValueError(
                    f"images must be uint8 [N, C, H, W] with C in {sorted(CHANNEL_MODES)}, "
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


def _list_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A ``list<value_type>`` array from a dense ``[N, K]`` matrix, without Python loops."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), value_type))


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
        self._schema = dataset_schema(meta)
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
