"""Checking a dataset against the bird format: :func:`validate_dataset` reports every
problem it finds (:class:`ValidationReport`), naming the file, the column and the rows.

What ``bird datasets validate`` runs. The row checks are those of
:func:`bird_datasets.reader.check_table`, plus a sample of images decoded with the declared
shape by :func:`bird_datasets.codec.decode_image`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bird_datasets.codec import decode_image
from bird_datasets.format import (
    SPLITS,
    DatasetFormatError,
    DatasetMeta,
    Problem,
    as_numpy,
    canonical_table,
    examples,
    parse_metadata,
    schema_problems,
)
from bird_datasets.reader import (
    dataset_problems,
    part_names,
    read_manifest_metadata,
    read_part,
    value_problems,
)
from service.storage import MANIFEST_NAME, ChecksumMismatchError, ObjectNotFoundError, ObjectStore

__all__ = ["MAX_IMAGES_CHECKED", "ValidationReport", "validate_dataset"]

# Validation decodes at most this many images per split: enough to catch a systematically
# wrong shape or a broken encoder, cheap even for datasets with millions of rows.
MAX_IMAGES_CHECKED = 2000


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
    splits = as_numpy(table.column("split").cast(pa.string())).astype(object)
    ids = as_numpy(table.column("id"))
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
                decode_image(images[row].as_py(), meta.image_shape)
            except ValueError as exc:
                failures.append((int(ids[row]), str(exc)))
    if not failures:
        return [], checked
    reasons = sorted({reason for _, reason in failures})
    message = (
        f"{len(failures)} of {checked} decoded image(s) are unusable (ids "
        f"{examples(i for i, _ in failures)}): {'; '.join(reasons[:3])}"
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
    manifest, metadata, uri = read_manifest_metadata(store, prefix)
    meta, meta_problems = parse_metadata(metadata)
    problems = [Problem(MANIFEST_NAME, column, message) for column, message in meta_problems]
    if meta is None:
        return ValidationReport(uri=uri, meta=None, problems=problems)
    parts = part_names(manifest)
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
            parquet, _ = read_part(store, prefix, name, manifest)
            part_schema_problems = schema_problems(parquet.schema_arrow, meta, name)
            if part_schema_problems:
                problems += part_schema_problems
                continue
            table = canonical_table(parquet.read(), meta)
        except (ChecksumMismatchError, ObjectNotFoundError, DatasetFormatError) as exc:
            problems.append(Problem(name, None, str(exc)))
            continue
        except (pa.ArrowException, OSError) as exc:
            problems.append(Problem(name, None, f"cannot read the part: {exc}"))
            continue
        part_value_problems = value_problems(table, meta, name)
        problems += part_value_problems
        if meta.input == "image" and max_images_per_split > 0:
            image_problems, checked = _check_images(table, meta, name, budget, fraction, rng)
            problems += image_problems
            images_checked += checked
        if not any(p.column in ("id", "group", "split") for p in part_value_problems):
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
        problems += dataset_problems(
            meta, light, readable, check_counts=len(readable) == len(parts)
        )
    return ValidationReport(
        uri=uri, meta=meta, problems=problems, counts=counts, images_checked=images_checked
    )
