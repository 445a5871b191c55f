"""Reading datasets in the bird format: :func:`read_dataset`, :func:`read_dataset_meta`,
:func:`split_arrays`, and :func:`check_table` (the row checks :mod:`bird_datasets.validation`
also runs).

Only the parts the manifest lists are read, each verified against its sha256 first; columns are
cast to the canonical types of :mod:`bird_datasets.format`; images are decoded by
:func:`bird_datasets.codec.decode_images` with the declared channel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bird_datasets.codec import decode_images
from bird_datasets.format import (
    REQUIRED_COLUMNS,
    SPLITS,
    DatasetFormatError,
    DatasetMeta,
    DatasetNotFoundError,
    Problem,
    as_numpy,
    canonical_table,
    dataset_schema,
    examples,
    list_matrix,
    parse_metadata,
    schema_problems,
)
from service.storage import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ObjectStore,
    fetch_verified,
    join_key,
    read_manifest,
    validate_prefix,
)

__all__ = [
    "check_table",
    "dataset_problems",
    "part_names",
    "read_dataset",
    "read_dataset_meta",
    "read_manifest_metadata",
    "read_part",
    "split_arrays",
    "value_problems",
]


# --------------------------------------------------------------------------------------------
# Row checks
# --------------------------------------------------------------------------------------------


def value_problems(table: pa.Table, meta: DatasetMeta, file: str) -> list[Problem]:
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
        values = as_numpy(label)
        wrong = np.unique(values[(values < 0) | (values >= meta.num_classes)])
        if wrong.size:
            bad(
                "label",
                f"{int(((values < 0) | (values >= meta.num_classes)).sum())} label(s) outside "
                f"0..{meta.num_classes - 1}: {examples(wrong.tolist())}",
            )
    else:
        lengths = as_numpy(pc.list_value_length(label))
        wrong_len = np.unique(lengths[lengths != meta.num_classes])
        if wrong_len.size:
            bad(
                "label",
                f"{int((lengths != meta.num_classes).sum())} label list(s) do not have "
                f"num_classes={meta.num_classes} entries (lengths {examples(wrong_len.tolist())})",
            )
        flat = pc.list_flatten(label)
        if flat.null_count:
            bad("label", f"{flat.null_count} null entries inside label lists")
        else:
            values = flat.to_numpy() if len(flat) else np.empty(0, dtype=np.int64)
            wrong = np.unique(values[(values != 0) & (values != 1)])
            if wrong.size:
                bad("label", f"multi-label entries must be 0/1, found {examples(wrong.tolist())}")

    groups = as_numpy(table.column("group"))
    outside = (groups < 0) | (groups >= meta.num_groups)
    if outside.any():
        bad(
            "group",
            f"{int(outside.sum())} group(s) outside 0..{meta.num_groups - 1}: "
            f"{examples(np.unique(groups[outside]).tolist())}",
        )

    splits = pc.unique(table.column("split")).to_pylist()
    if wrong_splits := sorted(set(splits) - set(SPLITS)):
        count = int(pc.sum(pc.invert(pc.is_in(table.column("split"), pa.array(SPLITS)))).as_py())
        bad(
            "split",
            f"{count} row(s) with unknown split name(s) {examples(wrong_splits)}; "
            f"valid: {', '.join(SPLITS)}",
        )

    if meta.input == "tabular":
        x = table.column("x")
        lengths = as_numpy(pc.list_value_length(x))
        wrong_len = lengths != meta.num_features
        if wrong_len.any():
            bad(
                "x",
                f"{int(wrong_len.sum())} row(s) do not have num_features={meta.num_features} "
                f"values (lengths {examples(np.unique(lengths[wrong_len]).tolist())})",
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


def dataset_problems(
    meta: DatasetMeta, light: pa.Table, files: Sequence[str], check_counts: bool = True
) -> list[Problem]:
    """Checks across all parts, on the ``id``/``group``/``split``/``file`` columns of all rows:
    duplicate ids, missing splits, groups missing from a split, metadata counts."""
    problems: list[Problem] = []
    file_index = as_numpy(light.column("file")) if "file" in light.column_names else None

    ids = as_numpy(light.column("id"))
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
                        f"{examples(sorted(values))}",
                    )
                )

    split_col = light.column("split")
    groups = as_numpy(light.column("group"))
    actual: dict[str, int] = {}
    for split in SPLITS:
        mask = as_numpy(pc.equal(split_col, split)) if len(split_col) else np.zeros(0, bool)
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
    problems = value_problems(table, meta, file)
    if problems:
        return problems
    light = table.select(["id", "group", "split"])
    return dataset_problems(meta, light, [file], check_counts=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_manifest_metadata(store: ObjectStore, prefix: str) -> tuple[Manifest, Any, str]:
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


def part_names(manifest: Manifest) -> list[str]:
    """The dataset's parts: every ``*.parquet`` file the manifest lists, in name order."""
    return sorted(name for name in manifest.files if name.endswith(".parquet"))


def _load_meta(store: ObjectStore, prefix: str) -> tuple[Manifest, DatasetMeta, str]:
    manifest, metadata, uri = read_manifest_metadata(store, prefix)
    meta, problems = parse_metadata(metadata)
    if meta is None:
        manifest_uri = store.uri(join_key(validate_prefix(prefix), MANIFEST_NAME))
        details = "; ".join(message for _, message in problems)
        raise DatasetFormatError(f"{manifest_uri} is not a valid bird dataset: {details}", uri)
    if not part_names(manifest):
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


def read_part(
    store: ObjectStore, prefix: str, name: str, manifest: Manifest
) -> tuple[pq.ParquetFile, str]:
    """Part ``name``, verified against the manifest, as a Parquet file, and its URI."""
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
    wanted = [f.name for f in dataset_schema(meta)]
    if columns is not None:
        unknown = sorted(set(columns) - set(wanted))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; this dataset has {wanted}")
        wanted = [c for c in wanted if c in columns or c == "id"]
    tables = []
    for name in part_names(manifest):
        parquet, part_uri = read_part(store, prefix, name, manifest)
        problems = schema_problems(parquet.schema_arrow, meta, name)
        if problems:
            raise DatasetFormatError(
                f"{part_uri} does not follow the bird dataset format: "
                + "; ".join(str(p) for p in problems),
                part_uri,
            )
        try:
            # Only the wanted columns are decoded (describe skips the image bytes).
            table = canonical_table(parquet.read(columns=wanted), meta, wanted)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetFormatError(f"cannot read {part_uri}: {exc}", part_uri) from None
        tables.append(table)
    table = pa.concat_tables(tables)
    ids = as_numpy(table.column("id"))
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
        out["id"] = as_numpy(rows.column("id"))
    if meta.task == "multilabel":
        out["label"] = list_matrix(rows.column("label"), meta.num_classes, np.int64)
    else:
        out["label"] = as_numpy(rows.column("label"))
    out["group"] = as_numpy(rows.column("group"))
    if meta.input == "image":
        assert meta.image_shape is not None
        out["images"] = decode_images(rows.column("image"), meta.image_shape)
    else:
        assert meta.num_features is not None
        out["x"] = list_matrix(rows.column("x"), meta.num_features, np.float32)
    # Own, writable copies: arrays from pyarrow can be read-only views of Arrow buffers, which
    # torch.from_numpy warns about and which would keep whole parts alive in memory.
    return {
        key: np.array(value, dtype=np.float32 if key == "x" else None, copy=True)
        if not value.flags.writeable or not value.flags.owndata
        else value
        for key, value in out.items()
    }
