"""A CSV or Parquet table with named label, group and feature columns, imported into the bird
format.

Every column other than the label, the group and the split is a feature (or only those named
by ``features``). Numeric columns are standardised with the mean and standard deviation of
the train split; text and boolean columns (and numeric ones named in ``categorical``) are
one-hot encoded, one feature per value. The encoding is recorded in the metadata
(``source.encoding``: per column its kind, mean and std or its categories), so new rows can be
encoded the same way (:class:`TableEncoding`) before a downloaded student sees them.

Training computes its own normalisation from the train split, as for every dataset: on
standardised columns that is the identity (mean 0, std 1), and it centres the one-hot columns,
so nothing is scaled twice in a way that matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bird_datasets.format import SPLITS, DatasetMeta
from bird_datasets.importers import (
    DatasetImportError,
    assign_splits,
    check_label_groups,
    index_column,
)
from bird_datasets.writer import DatasetArrays, DatasetWriter
from service.storage import Manifest, ObjectStore

__all__ = ["MAX_CATEGORIES", "FeatureEncoding", "TableEncoding", "import_table", "read_table"]

# A text column with more distinct values than this is an identifier, not a category.
MAX_CATEGORIES = 1000
MISSING = "<missing>"
_ROWS_PER_WRITE = 50_000


def read_table(path: str | Path) -> pa.Table:
    """A ``.csv`` (types inferred) or ``.parquet`` file as an Arrow table."""
    path = Path(path)
    if not path.is_file():
        raise DatasetImportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".csv", ".txt"):
            import pyarrow.csv as pacsv

            return pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
            )
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise DatasetImportError(f"{path}: cannot read it: {first}") from None
    raise DatasetImportError(f"{path}: expected a .csv or .parquet file")


def _where(file: str, row: int) -> str:
    """Line ``row + 2`` of a CSV (after the header), row ``row + 1`` of anything else."""
    return f"{file}: line {row + 2}" if file.lower().endswith(".csv") else f"{file}: row {row + 1}"


@dataclass(frozen=True)
class FeatureEncoding:
    """How one source column becomes features: standardised, or one-hot."""

    column: str
    kind: str  # "numeric" or "categorical"
    mean: float = 0.0
    std: float = 1.0
    categories: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """The feature names: the column, or ``column=value`` per category."""
        if self.kind == "numeric":
            return [self.column]
        return [f"{self.column}={value}" for value in self.categories]

    def to_json(self) -> dict[str, Any]:
        """The metadata form."""
        if self.kind == "numeric":
            return {"column": self.column, "kind": "numeric", "mean": self.mean, "std": self.std}
        return {"column": self.column, "kind": "categorical", "categories": list(self.categories)}


def _is_categorical_type(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_dictionary(dtype)
    )


def _as_text(column: pa.ChunkedArray) -> list[str]:
    """A column's values as text, nulls as :data:`MISSING`."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    values = column.to_pylist()
    return [MISSING if v is None else str(v) for v in values]


def _numeric(column: pa.ChunkedArray, name: str, file: str) -> np.ndarray:
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DatasetImportError(
            f"{_where(file, int(bad[0]))}: column {name!r} is empty or not a finite number "
            f"({bad.size} such row(s)); fill or drop them"
        )
    return values


def _stray_text(values: Sequence[str]) -> int | None:
    """The row of the first value that is not a number in a text column whose values are
    numbers otherwise (nine in ten or more: a numeric column with a few stray entries such as
    ``?``); None for a column of text."""
    present = [(row, value) for row, value in enumerate(values) if value != MISSING]
    bad = [row for row, value in present if not _is_number(value)]
    if bad and len(bad) <= 0.1 * len(present):
        return bad[0]
    return None


@dataclass(frozen=True)
class TableEncoding:
    """The encoding of a table's feature columns (recorded in ``source.encoding``)."""

    features: tuple[FeatureEncoding, ...]

    @property
    def names(self) -> list[str]:
        """Every feature name, in column order."""
        return [name for feature in self.features for name in feature.names()]

    @classmethod
    def from_metadata(cls, meta: DatasetMeta) -> TableEncoding:
        """The encoding an imported table's metadata records."""
        encoding = meta.source.get("encoding") if isinstance(meta.source, Mapping) else None
        if not isinstance(encoding, list):
            raise ValueError(f"dataset {meta.name!r} was not imported from a table")
        return cls(
            tuple(
                FeatureEncoding(
                    column=item["column"],
                    kind=item["kind"],
                    mean=float(item.get("mean", 0.0)),
                    std=float(item.get("std", 1.0)),
                    categories=tuple(item.get("categories", ())),
                )
                for item in encoding
            )
        )

    @classmethod
    def fit(
        cls,
        table: pa.Table,
        columns: Sequence[str],
        categorical: Sequence[str],
        train: np.ndarray,
        file: str,
    ) -> TableEncoding:
        """Learn the encoding: categories from every row, mean and std from ``train`` rows."""
        features = []
        for name in columns:
            column = table.column(name)
            if name in categorical or _is_categorical_type(column.type):
                values = _as_text(column)
                stray = None if name in categorical else _stray_text(values)
                if stray is not None:
                    raise DatasetImportError(
                        f"{_where(file, stray)}: column {name!r} holds numbers but also "
                        f"{values[stray]!r}; fix those values, or name the column as categorical"
                    )
                categories = tuple(sorted(set(values)))
                if len(categories) > MAX_CATEGORIES:
                    raise DatasetImportError(
                        f"{file}: column {name!r} has {len(categories)} distinct values, more "
                        f"than {MAX_CATEGORIES}: an identifier, not a feature; leave it out of "
                        "the features"
                    )
                features.append(FeatureEncoding(name, "categorical", categories=categories))
                continue
            values = _numeric(column, name, file)
            mean = float(values[train].mean())
            std = float(values[train].std())
            if not std > 1e-12 or not math.isfinite(std):
                std = 1.0  # a constant column: centred, not scaled by zero
            features.append(FeatureEncoding(name, "numeric", mean=mean, std=std))
        return cls(tuple(features))

    def encode(self, table: pa.Table, file: str = "<table>") -> np.ndarray:
        """``float32 [N, D]``: numeric columns standardised, categories one-hot (a value not
        seen at import gives a row of zeros for its column)."""
        blocks = []
        for feature in self.features:
            if feature.column not in table.column_names:
                raise DatasetImportError(f"{file}: no column {feature.column!r}")
            column = table.column(feature.column)
            if feature.kind == "numeric":
                values = _numeric(column, feature.column, file)
                blocks.append(((values - feature.mean) / feature.std)[:, None])
                continue
            lookup = {value: index for index, value in enumerate(feature.categories)}
            codes = np.asarray([lookup.get(v, -1) for v in _as_text(column)], dtype=np.int64)
            onehot = np.zeros((table.num_rows, len(feature.categories)), dtype=np.float64)
            known = codes >= 0
            onehot[np.flatnonzero(known), codes[known]] = 1.0
            blocks.append(onehot)
        if not blocks:
            return np.zeros((table.num_rows, 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _column(table: pa.Table, name: str, option: str, file: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DatasetImportError(
            f"{file}: unknown column {name!r} ({option}); the columns are "
            f"{', '.join(table.column_names)}"
        )
    return table.column(name)


def import_table(
    path: str | Path,
    out_store: ObjectStore,
    prefix: str,
    *,
    label: str,
    group: str,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    split: str | None = None,
    name: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    rows_per_part: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Import the table at ``path`` (CSV or Parquet) into a dataset at ``prefix``.

    ``label`` and ``group`` name their columns; ``features`` the feature columns (default:
    every other column but ``split``); ``categorical`` numeric columns to one-hot encode as
    well; ``split`` a column of ``train``/``val``/``test`` (default: a seeded stratified split).
    Returns the published manifest. Raises :class:`DatasetImportError` naming the file, the
    column or the row; storage errors of ``out_store`` propagate.
    """
    table = read_table(path)
    file = str(path)
    if table.num_rows == 0:
        raise DatasetImportError(f"{file}: the table has no rows")
    label_values = _as_text(_column(table, label, "the label", file))
    group_values = _as_text(_column(table, group, "the group", file))
    taken = {label, group} | ({split} if split else set())
    if features is None:
        features = [c for c in table.column_names if c not in taken]
    else:
        for column in features:
            _column(table, column, "a feature", file)
            if column in taken:
                raise DatasetImportError(
                    f"{file}: column {column!r} cannot be a feature and the label, group or split"
                )
    for column in categorical:
        _column(table, column, "a categorical feature", file)
        if column not in features:
            raise DatasetImportError(f"{file}: categorical column {column!r} is not a feature")
    if not features:
        raise DatasetImportError(f"{file}: no feature columns besides the label and the group")

    for values, column in ((label_values, label), (group_values, group)):
        if MISSING in values:
            row = values.index(MISSING)
            raise DatasetImportError(f"{_where(file, row)}: column {column!r} is empty")
    label_index = index_column(label_values, label, file, where=lambda row: _where(file, row))
    group_index = index_column(group_values, group, file, where=lambda row: _where(file, row))
    if split:
        split_values = np.asarray(
            [v.lower() for v in _as_text(_column(table, split, "the split", file))], dtype=object
        )
        for row, value in enumerate(split_values.tolist()):
            if value not in SPLITS:
                raise DatasetImportError(
                    f"{_where(file, row)}: column {split!r} is {value!r}; expected one of "
                    f"{', '.join(SPLITS)}"
                )
    else:
        split_values = assign_splits(
            label_index.indices,
            group_index.indices,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    check_label_groups(
        label_index,
        group_index,
        split_values,
        file=file,
        label_column=label,
        group_column=group,
    )
    encoding = TableEncoding.fit(
        table, list(features), list(categorical), split_values == "train", file
    )
    x = encoding.encode(table, file)
    if x.shape[1] == 0:
        raise DatasetImportError(f"{file}: the feature columns encode to no features")
    meta = DatasetMeta(
        name=name or Path(path).stem,
        task="multiclass",
        input="tabular",
        num_classes=label_index.count,
        num_groups=group_index.count,
        num_features=x.shape[1],
        class_names=label_index.names,
        group_names=group_index.names,
        feature_names=tuple(encoding.names),
        source={
            "importer": "table",
            "file": Path(path).name,
            "label_column": label,
            "group_column": group,
            "split": split or "stratified",
            "seed": None if split else seed,
            "val_fraction": None if split else val_fraction,
            "test_fraction": None if split else test_fraction,
            "encoding": [feature.to_json() for feature in encoding.features],
        },
    )
    with DatasetWriter(out_store, prefix, meta, rows_per_part=rows_per_part) as writer:
        for split_name in SPLITS:
            rows = np.flatnonzero(split_values == split_name)
            for start in range(0, rows.size, _ROWS_PER_WRITE):
                chunk = rows[start : start + _ROWS_PER_WRITE]
                writer.write(
                    split_name,
                    DatasetArrays(
                        label=label_index.indices[chunk],
                        group=group_index.indices[chunk],
                        x=x[chunk],
                    ),
                )
            if on_progress is not None:
                on_progress(f"{split_name}: {rows.size} rows")
        return writer.close()
