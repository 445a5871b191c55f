"""Bring your own data: a team's own files written in the bird format.

* :func:`~bird_datasets.importers.images.import_image_folder` — a folder of images and a CSV
  that names each image's label and group (``path,label,group[,split]``);
* :func:`~bird_datasets.importers.table.import_table` — a CSV or Parquet table with named label,
  group and feature columns (categorical features one-hot, numeric ones standardised with the
  train split's statistics, which the metadata records).

Both write through :class:`bird_datasets.writer.DatasetWriter` (parts first, manifest last) to
any store, after checking the source: a missing file, an unknown column, a bad row or a class
that only one group has raises :class:`DatasetImportError` naming the file, the line or the
column. Labels and groups may be integers (class indices) or names (mapped to indices in sorted
order; the names go to the metadata). Without a split column the rows are split at random,
stratified by class and group, with a seed (:func:`assign_splits`). ``bird datasets import``
is the command line of this package (``cli/datasets.py``); docs/datasets.md documents the
formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bird_datasets.format import SPLITS

__all__ = [
    "DatasetImportError",
    "IndexedColumn",
    "assign_splits",
    "check_label_groups",
    "csv_line",
    "index_column",
]


class DatasetImportError(ValueError):
    """A source file cannot be imported; the message names the file, the line or the column."""


@dataclass(frozen=True)
class IndexedColumn:
    """A label or group column as indices ``0 .. len(names) - 1`` (or ``0 .. count - 1``)."""

    indices: np.ndarray
    names: tuple[str, ...]  # empty when the column held class indices already
    count: int


def _as_int(value: str) -> int | None:
    try:
        number = int(value, 10)
    except ValueError:
        return None
    return number


def csv_line(file: str) -> Callable[[int], str]:
    """``where(row)`` for messages about a CSV file: data row 0 is line 2 (after the header)."""
    return lambda row: f"{file}: line {row + 2}"


def index_column(
    values: Sequence[str],
    column: str,
    file: str,
    *,
    where: Callable[[int], str] | None = None,
) -> IndexedColumn:
    """Map a label or group column to indices.

    Integer values (``0``, ``1``, ...) are indices already: there are ``max + 1`` of them and
    every one must occur. Any other values are names, mapped to indices in sorted order.
    ``where(row)`` says where a row is in ``file`` (default: a CSV's line).
    """
    where = where or csv_line(file)
    cleaned = [str(v).strip() for v in values]
    for row, value in enumerate(cleaned):
        if value == "":
            raise DatasetImportError(f"{where(row)}: column {column!r} is empty")
    if not cleaned:
        raise DatasetImportError(f"{file}: no rows")
    numbers = [_as_int(v) for v in cleaned]
    if all(n is not None for n in numbers):
        indices = np.asarray(numbers, dtype=np.int64)
        if indices.min() < 0:
            row = int(np.argmin(indices))
            raise DatasetImportError(
                f"{where(row)}: column {column!r} is {indices[row]}; "
                "integer values are indices and must be >= 0"
            )
        count = int(indices.max()) + 1
        missing = sorted(set(range(count)) - set(indices.tolist()))
        if missing:
            raise DatasetImportError(
                f"{file}: column {column!r} holds indices up to {count - 1} but never "
                f"{', '.join(map(str, missing[:5]))}: every index needs rows (or use names)"
            )
        return IndexedColumn(indices, (), count)
    names = tuple(sorted(set(cleaned)))
    lookup = {name: index for index, name in enumerate(names)}
    return IndexedColumn(
        np.asarray([lookup[v] for v in cleaned], dtype=np.int64), names, len(names)
    )


def assign_splits(
    label: np.ndarray,
    group: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> np.ndarray:
    """A seeded split per row (``train``/``val``/``test``), stratified by (class, group).

    Each (class, group) cell of at least three rows gives at least one row to val and to
    test, so every group reaches every split wherever the data allow it.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise DatasetImportError(f"{name} must lie strictly between 0 and 1, got {value}")
    if val_fraction + test_fraction >= 1:
        raise DatasetImportError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}"
        )
    rng = np.random.default_rng(seed)
    split = np.full(label.shape[0], "train", dtype=object)
    cells = label.astype(np.int64) * (int(group.max()) + 1) + group.astype(np.int64)
    for cell in np.unique(cells):
        rows = rng.permutation(np.flatnonzero(cells == cell))
        n = rows.size
        if n < 3:
            continue
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        n_test = min(n_test, n - 2)
        n_val = min(n_val, n - n_test - 1)
        split[rows[:n_test]] = "test"
        split[rows[n_test : n_test + n_val]] = "val"
    return split


def check_label_groups(
    label: IndexedColumn,
    group: IndexedColumn,
    split: np.ndarray,
    *,
    file: str,
    label_column: str,
    group_column: str,
) -> None:
    """Refuse data the fairness metrics cannot be computed on: fewer than two groups or
    classes, a class that only one group has, a split without rows of every group, or a
    class missing from the train split."""
    if label.count < 2:
        raise DatasetImportError(
            f"{file}: column {label_column!r} has a single class; a task needs at least two"
        )
    if group.count < 2:
        raise DatasetImportError(
            f"{file}: column {group_column!r} has a single group; fairness needs at least two"
        )

    def label_name(index: int) -> str:
        return repr(label.names[index]) if label.names else str(index)

    def group_name(index: int) -> str:
        return repr(group.names[index]) if group.names else str(index)

    for index in range(label.count):
        groups = np.unique(group.indices[label.indices == index])
        if groups.size < 2:
            raise DatasetImportError(
                f"{file}: class {label_name(index)} of column {label_column!r} has rows of one "
                f"group only ({group_name(int(groups[0]))} in column {group_column!r}): "
                "fairness across groups cannot be measured for it; add rows of another group "
                "or leave the class out"
            )
    for name in SPLITS:
        in_split = split == name
        if not in_split.any():
            raise DatasetImportError(
                f"{file}: the {name} split has no rows (too few rows to split, or the split "
                "column never names it)"
            )
        present = set(np.unique(group.indices[in_split]).tolist())
        absent = [g for g in range(group.count) if g not in present]
        if absent:
            raise DatasetImportError(
                f"{file}: the {name} split has no rows of group {group_name(absent[0])} "
                f"(column {group_column!r}): every split needs every group; add rows or give a "
                "split column"
            )
    in_train = set(np.unique(label.indices[split == "train"]).tolist())
    absent = [c for c in range(label.count) if c not in in_train]
    if absent:
        raise DatasetImportError(
            f"{file}: the train split has no rows of class {label_name(absent[0])} "
            f"(column {label_column!r})"
        )
