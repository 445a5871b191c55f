"""The bird dataset format (bird_datasets) on a local store: write/read round trips,
validation of deliberately broken datasets, describe, and user-written datasets."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bird_datasets.codec import decode_images, encode_images
from bird_datasets.describe import describe_dataset, render_description
from bird_datasets.format import DatasetFormatError, DatasetMeta, DatasetNotFoundError
from bird_datasets.reader import read_dataset, split_arrays
from bird_datasets.validation import validate_dataset
from bird_datasets.writer import DatasetArrays, write_dataset
from service.storage import (
    ChecksumMismatchError,
    LocalStore,
    ObjectStore,
    publish,
    read_manifest,
    verify,
)
from workers.datasets import load_splits

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLIT_SIZES = {"train": 48, "val": 24, "test": 24}
NUM_CLASSES = 3
NUM_GROUPS = 2
SHAPE = (3, 6, 5)  # non-square, to catch H/W mix-ups


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _labels_groups(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Every (class, group) cell is populated: labels cycle, groups alternate every 3 rows.
    rows = np.arange(n)
    return rows % NUM_CLASSES, (rows // NUM_CLASSES) % NUM_GROUPS


def image_splits(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> dict[str, DatasetArrays]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SPLIT_SIZES.items():
        label, group = _labels_groups(n)
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        out[split] = DatasetArrays(label=label, group=group, images=images)
    return out


def tabular_splits(seed: int = 0, features: int = 4) -> dict[str, DatasetArrays]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SPLIT_SIZES.items():
        label, group = _labels_groups(n)
        x = rng.normal(size=(n, features)).astype(np.float32) * 1000
        out[split] = DatasetArrays(label=label, group=group, x=x)
    return out


def image_meta(**changes) -> DatasetMeta:
    values = dict(
        name="tiny",
        task="multiclass",
        input="image",
        num_classes=NUM_CLASSES,
        num_groups=NUM_GROUPS,
        image_shape=SHAPE,
        class_names=("a", "b", "c"),
        group_names=("g0", "g1"),
    )
    values.update(changes)
    return DatasetMeta(**values)


def tabular_meta(**changes) -> DatasetMeta:
    values = dict(
        name="tab",
        task="multiclass",
        input="tabular",
        num_classes=NUM_CLASSES,
        num_groups=NUM_GROUPS,
        num_features=4,
    )
    values.update(changes)
    return DatasetMeta(**values)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_image_round_trip_across_parts(store):
    splits = image_splits()
    manifest = write_dataset(store, "ds/img", splits=splits, meta=image_meta(), rows_per_part=20)
    parts = sorted(manifest.files)
    assert parts == [f"part-{i:05d}.parquet" for i in range(5)]  # 96 rows / 20 per part
    verify(store, "ds/img", read_manifest(store, "ds/img"))
    metadata = manifest.metadata
    assert metadata["format"] == "bird-dataset" and metadata["format_version"] == 1
    assert metadata["image_shape"] == list(SHAPE) and metadata["num_features"] is None
    assert metadata["counts"] == SPLIT_SIZES
    assert (metadata["class_names"], metadata["group_names"]) == (["a", "b", "c"], ["g0", "g1"])

    meta, table = read_dataset(store, "ds/img")
    assert meta == image_meta(counts=SPLIT_SIZES)
    assert table.column_names == ["id", "image", "label", "group", "split"]
    assert table.column("id").to_pylist() == list(range(96))  # contiguous: train, val, test
    assert table.column("split").to_pylist() == ["train"] * 48 + ["val"] * 24 + ["test"] * 24
    for split, arrays in splits.items():
        got = split_arrays(meta, table, split)
        np.testing.assert_array_equal(got["images"], arrays.images)
        np.testing.assert_array_equal(got["label"], arrays.label)
        np.testing.assert_array_equal(got["group"], arrays.group)
    # The parts are ordinary Parquet with the documented types.
    schema = pq.read_schema(store.root / "ds/img/part-00000.parquet")
    assert schema.field("image").type == pa.binary() and schema.field("id").type == pa.int64()
    assert validate_dataset(store, "ds/img").ok


def test_tabular_round_trip_is_exact(store):
    splits = tabular_splits()
    write_dataset(store, "tab", splits=splits, meta=tabular_meta())
    meta, table = read_dataset(store, "tab")
    assert table.schema.field("x").type == pa.list_(pa.float32())
    for split, arrays in splits.items():
        got = split_arrays(meta, table, split)
        assert got["x"].dtype == np.float32
        np.testing.assert_array_equal(got["x"], arrays.x)
        np.testing.assert_array_equal(got["label"], arrays.label)
    report = validate_dataset(store, "tab")
    assert report.ok, report.summary()
    assert report.summary().startswith("OK: 96 rows (train 48, val 24, test 24)")


def test_multilabel_round_trip_and_load_splits(store):
    rng = np.random.default_rng(3)
    splits = {}
    for split, n in SPLIT_SIZES.items():
        _, group = _labels_groups(n)
        label = rng.integers(0, 2, (n, 4))
        images = rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)  # single channel
        splits[split] = DatasetArrays(label=label, group=group, images=images)
    meta = DatasetMeta(
        name="ml",
        task="multilabel",
        input="image",
        num_classes=4,
        num_groups=2,
        image_shape=(1, 4, 4),
        class_names=("w", "x", "y", "z"),
    )
    write_dataset(store, "ml", splits=splits, meta=meta)
    got_meta, table = read_dataset(store, "ml")
    assert table.schema.field("label").type == pa.list_(pa.int64())
    for split, arrays in splits.items():
        got = split_arrays(got_meta, table, split)
        np.testing.assert_array_equal(got["label"], arrays.label)
        np.testing.assert_array_equal(got["images"], arrays.images)
    assert validate_dataset(store, "ml").ok
    data = load_splits(store, "ml")
    assert data.task == "multilabel" and data.num_classes == 4
    assert data.train.label.dtype == torch.float32 and data.train.label.shape == (48, 4)
    assert torch.equal(data.test.label, torch.from_numpy(splits["test"].label).float())
    assert data.preprocessing["kind"] == "image" and len(data.preprocessing["mean"]) == 1
    described = describe_dataset(store, "ml")
    train = splits["train"]
    for g in range(2):
        expected = train.label[train.group == g].sum(axis=0).tolist()
        assert [row[g] for row in described["splits"]["train"]["classes"]] == expected


def test_load_splits_matches_builtin_preprocessing(store):
    write_dataset(store, "img", splits=image_splits(), meta=image_meta())
    data = load_splits(store, "img")
    x = data.train.x.numpy().astype(np.float64) / 255
    assert data.train.x.dtype == torch.uint8 and data.input_shape == SHAPE
    np.testing.assert_allclose(data.preprocessing["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(data.preprocessing["std"], x.std(axis=(0, 2, 3)), rtol=1e-9)
    assert data.class_names == ("a", "b", "c") and data.group_names == ("g0", "g1")

    splits = tabular_splits()
    splits["train"].x[:, 2] = 7.0  # a constant feature gets std 1, as in load_adult
    write_dataset(store, "tab", splits=splits, meta=tabular_meta())
    data = load_splits(store, "tab")
    x = splits["train"].x.astype(np.float64)
    np.testing.assert_allclose(data.preprocessing["mean"], x.mean(axis=0))
    expected_std = x.std(axis=0)
    expected_std[2] = 1.0
    np.testing.assert_allclose(data.preprocessing["std"], expected_std)
    assert data.class_names == ("0", "1", "2")  # unnamed classes fall back to their index


def test_write_rejects_arrays_that_break_the_metadata(store):
    splits = image_splits()
    bad = DatasetArrays(
        label=np.full(48, 3), group=splits["train"].group, images=splits["train"].images
    )
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        write_dataset(store, "bad", splits={**splits, "train": bad}, meta=image_meta())
    with pytest.raises(ValueError, match="image_shape"):
        write_dataset(store, "bad", splits=image_splits(shape=(3, 5, 6)), meta=image_meta())
    with pytest.raises(ValueError, match="unknown split"):
        write_dataset(store, "bad", splits={"training": splits["train"]}, meta=image_meta())
    with pytest.raises(ValueError, match="num_classes"):
        image_meta(num_classes=1)
    with pytest.raises(ValueError, match="exactly one of images and x"):
        DatasetArrays(label=np.zeros(2, int), group=np.zeros(2, int))
    assert not store.list("bad")  # nothing was published


def test_republish_replaces_the_dataset_and_drops_stale_parts(store):
    write_dataset(store, "ds", splits=image_splits(), meta=image_meta(), rows_per_part=10)
    assert len(store.list("ds")) == 11  # 10 parts + manifest
    write_dataset(store, "ds", splits=image_splits(seed=1), meta=image_meta())
    assert [info.key for info in store.list("ds")] == ["ds/manifest.json", "ds/part-00000.parquet"]
    meta, table = read_dataset(store, "ds")
    np.testing.assert_array_equal(
        split_arrays(meta, table, "val")["images"], image_splits(seed=1)["val"].images
    )


def test_encode_decode_images():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 7, 9), dtype=np.uint8)
    encoded = encode_images(images)
    assert all(blob.startswith(b"\x89PNG") for blob in encoded)
    np.testing.assert_array_equal(decode_images(pa.array(encoded, pa.binary()), (3, 7, 9)), images)
    np.testing.assert_array_equal(decode_images(encoded), images)  # shape from the first image
    with pytest.raises(ValueError, match=r"row 2: the image cannot be decoded"):
        decode_images([*encoded[:2], b"junk"], (3, 7, 9))
    with pytest.raises(ValueError, match=r"row 0: the image is 7x9 \(HxW\), expected 9x7"):
        decode_images(encoded, (3, 9, 7))


# ---------------------------------------------------------------------------------------------
# Missing or foreign datasets
# ---------------------------------------------------------------------------------------------


def test_missing_dataset_names_the_uri(store):
    uri = store.uri("nothing/here")
    for call in (read_dataset, validate_dataset, describe_dataset, load_splits):
        with pytest.raises(DatasetNotFoundError, match="no dataset at") as info:
            call(store, "nothing/here")
        assert uri in str(info.value) and info.value.uri == uri


def test_other_artifact_sets_are_not_datasets(store):
    publish(store, "ckpt", {"model.safetensors": b"x"}, metadata={"epoch": 3})
    with pytest.raises(DatasetFormatError, match=r"not a valid bird dataset.*metadata\.format"):
        read_dataset(store, "ckpt")
    report = validate_dataset(store, "ckpt")
    assert not report.ok and report.problems[0].file == "manifest.json"


def test_a_tampered_part_fails_its_checksum(store):
    write_dataset(store, "ds", splits=image_splits(), meta=image_meta())
    path = store.root / "ds" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"part-00000\.parquet"):
        read_dataset(store, "ds")
    report = validate_dataset(store, "ds")
    assert [p.file for p in report.problems] == ["part-00000.parquet"]
    assert "sha256 mismatch" in report.problems[0].message


# ---------------------------------------------------------------------------------------------
# Datasets written by hand (plain pyarrow + publish), good and broken
# ---------------------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def user_rows(seed: int = 0) -> dict[str, list]:
    """A small image dataset as plain Python lists, the way a user might build one."""
    rows: dict[str, list] = {"id": [], "image": [], "label": [], "group": [], "split": []}
    rng = np.random.default_rng(seed)
    next_id = 1000  # ids need not start at 0 or be contiguous
    for split, n in SPLIT_SIZES.items():
        label, group = _labels_groups(n)
        for i in range(n):
            rows["id"].append(next_id)
            next_id += 7
            rows["image"].append(_png(rng.integers(0, 256, SHAPE, dtype=np.uint8)))
            rows["label"].append(int(label[i]))
            rows["group"].append(int(group[i]))
            rows["split"].append(split)
    return rows


def user_metadata(**changes) -> dict:
    metadata = {
        "format": "bird-dataset",
        "format_version": 1,
        "name": "user",
        "task": "multiclass",
        "input": "image",
        "image_shape": list(SHAPE),
        "num_features": None,
        "num_classes": NUM_CLASSES,
        "num_groups": NUM_GROUPS,
        "class_names": ["a", "b", "c"],
        "group_names": ["g0", "g1"],
        "counts": dict(SPLIT_SIZES),
    }
    metadata.update(changes)
    return metadata


def publish_tables(
    store: ObjectStore, prefix: str, tables: list[pa.Table], metadata: dict
) -> list[str]:
    """Write each table as one Parquet part with plain pyarrow, then publish with a manifest."""
    files = {}
    for i, table in enumerate(tables):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        files[f"data-{i}.parquet"] = sink.getvalue()
    publish(store, prefix, files, metadata=metadata)
    return sorted(files)


def test_user_written_dataset_works_like_a_builtin_one(store):
    rows = user_rows()
    # Types a user is likely to produce: int32 labels, large_binary images, int16 groups,
    # a dictionary-encoded split column, rows out of id order, two parts.
    table = pa.table(
        {
            "id": pa.array(rows["id"], pa.int64()),
            "image": pa.array(rows["image"], pa.large_binary()),
            "label": pa.array(rows["label"], pa.int32()),
            "group": pa.array(rows["group"], pa.int16()),
            "split": pa.array(rows["split"]).dictionary_encode(),
        }
    )
    order = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))
    publish_tables(store, "user", [shuffled.slice(0, 50), shuffled.slice(50)], user_metadata())

    report = validate_dataset(store, "user")
    assert report.ok, report.summary()
    assert report.images_checked == 96
    _, got = read_dataset(store, "user")
    assert got.column("id").to_pylist() == rows["id"]  # sorted by id again
    assert got.schema.field("label").type == pa.int64()

    # The same arrays written by write_dataset (the built-in path) load identically.
    arrays = {}
    for split in SPLIT_SIZES:
        mask = np.array(rows["split"]) == split
        arrays[split] = DatasetArrays(
            label=np.array(rows["label"])[mask],
            group=np.array(rows["group"])[mask],
            images=decode_images([b for b, m in zip(rows["image"], mask, strict=True) if m]),
        )
    write_dataset(store, "builtin", splits=arrays, meta=image_meta(name="user"))
    user, builtin = load_splits(store, "user"), load_splits(store, "builtin")
    for split in SPLIT_SIZES:
        a, b = getattr(user, split), getattr(builtin, split)
        assert torch.equal(a.x, b.x) and torch.equal(a.label, b.label)
        assert torch.equal(a.group, b.group)
    assert user.preprocessing == builtin.preprocessing
    assert (user.name, user.num_classes, user.num_groups) == ("user", 3, 2)
    assert describe_dataset(store, "user")["splits"] == describe_dataset(store, "builtin")["splits"]


def test_user_written_tabular_dataset_with_double_features(store):
    rng = np.random.default_rng(0)
    n = sum(SPLIT_SIZES.values())
    label = np.concatenate([_labels_groups(k)[0] for k in SPLIT_SIZES.values()])
    group = np.concatenate([_labels_groups(k)[1] for k in SPLIT_SIZES.values()])
    x = rng.normal(size=(n, 4))
    table = pa.table(
        {
            "id": np.arange(n),
            "x": pa.array(list(x)),  # list<double>, as pa.array makes from float64 rows
            "label": label,
            "group": group,
            "split": [s for s, k in SPLIT_SIZES.items() for _ in range(k)],
        }
    )
    meta = user_metadata(input="tabular", image_shape=None, num_features=4)
    publish_tables(store, "tab", [table], meta)
    assert validate_dataset(store, "tab").ok
    data = load_splits(store, "tab")
    assert data.train.x.dtype == torch.float32
    np.testing.assert_array_equal(data.train.x.numpy(), x[:48].astype(np.float32))


def _good_table() -> pa.Table:
    rows = user_rows()
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.int64()),
            "image": pa.array(rows["image"], pa.binary()),
            "label": pa.array(rows["label"], pa.int64()),
            "group": pa.array(rows["group"], pa.int64()),
            "split": pa.array(rows["split"], pa.string()),
        }
    )


def _set(table: pa.Table, column: str, values: list) -> pa.Table:
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array(values, table.schema.field(column).type))


def _replace_rows(table: pa.Table, column: str, rows: dict[int, object]) -> pa.Table:
    values = table.column(column).to_pylist()
    for row, value in rows.items():
        values[row] = value
    return _set(table, column, values)


def _drop_group_from_val(table: pa.Table) -> pa.Table:
    splits = table.column("split").to_pylist()
    groups = [
        0 if s == "val" else g
        for s, g in zip(splits, table.column("group").to_pylist(), strict=True)
    ]
    return _set(table, "group", groups)


Broken = Callable[[pa.Table], list[pa.Table]]

BROKEN: dict[str, tuple[Broken, dict, str, str | None, str]] = {
    # name: (make parts from the good table, metadata changes, file, column, message part)
    "missing column": (
        lambda t: [t.drop_columns(["group"])],
        {},
        "data-0.parquet",
        "group",
        "required column is missing",
    ),
    "label out of range": (
        lambda t: [_replace_rows(t, "label", {5: 3, 9: -1})],
        {},
        "data-0.parquet",
        "label",
        "2 label(s) outside 0..2: -1, 3",
    ),
    "group out of range": (
        lambda t: [_replace_rows(t, "group", {0: 2})],
        {},
        "data-0.parquet",
        "group",
        "outside 0..1",
    ),
    "group missing from a split": (
        lambda t: [_drop_group_from_val(t)],
        {},
        "data-0.parquet",
        "group",
        "group(s) 1 (g1) have no rows in the 'val' split",
    ),
    "duplicate ids across parts": (
        lambda t: [t.slice(0, 50), _replace_rows(t.slice(50), "id", {0: 1000, 1: 1007})],
        {},
        "data-1.parquet",
        "id",
        "2 id(s) used by more than one row (also in data-0.parquet): 1000, 1007",
    ),
    "undecodable image": (
        lambda t: [_replace_rows(t, "image", {3: b"\x89PNG not really"})],
        {},
        "data-0.parquet",
        "image",
        "ids 1021",
    ),
    "image of the wrong size": (
        lambda t: [_replace_rows(t, "image", {1: _png(np.zeros((3, 5, 5), np.uint8))})],
        {},
        "data-0.parquet",
        "image",
        "expected 6x5",
    ),
    "wrong split name": (
        lambda t: [_replace_rows(t, "split", {0: "training", 1: "training"})],
        {},
        "data-0.parquet",
        "split",
        "2 row(s) with unknown split name(s) 'training'",
    ),
    "wrong label type": (
        lambda t: [
            t.set_column(2, "label", pa.array([str(v) for v in t.column("label").to_pylist()]))
        ],
        {},
        "data-0.parquet",
        "label",
        "type is string, expected an integer class index",
    ),
    "both image and x": (
        lambda t: [t.append_column("x", pa.array([[0.0]] * t.num_rows))],
        {},
        "data-0.parquet",
        "image",
        "must have exactly one",
    ),
    "null labels": (
        lambda t: [_replace_rows(t, "label", {4: None})],
        {},
        "data-0.parquet",
        "label",
        "1 null value(s)",
    ),
    "counts disagree with the rows": (
        lambda t: [t],
        {"counts": {"train": 48, "val": 20, "test": 24}},
        "manifest.json",
        "metadata.counts",
        "val: metadata 20, rows 24",
    ),
    "a split with no rows": (
        lambda t: [t.filter(pc.not_equal(t.column("split"), "test"))],
        {"counts": {}},
        "data-0.parquet",
        "split",
        "the 'test' split has no rows",
    ),
    "class names of the wrong length": (
        lambda t: [t],
        {"class_names": ["a", "b"]},
        "manifest.json",
        "metadata.class_names",
        "has 2 names but metadata.num_classes is 3",
    ),
    "tabular metadata for an image table": (
        lambda t: [t],
        {"input": "tabular", "image_shape": None, "num_features": 3},
        "data-0.parquet",
        "image",
        "needs an 'x' column",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_validation_reports_each_problem(store, case):
    make_parts, metadata_changes, file, column, message = BROKEN[case]
    publish_tables(store, "broken", make_parts(_good_table()), user_metadata(**metadata_changes))
    report = validate_dataset(store, "broken")
    assert not report.ok
    matching = [p for p in report.problems if p.file == file and p.column == column]
    assert matching, report.summary()
    assert any(message in p.message for p in matching), report.summary()
    assert file in report.summary() and report.summary().startswith(f"{len(report.problems)} ")


def test_validation_of_multilabel_lists(store):
    table = _good_table()
    lists = [[1, 0], [0, 1], [1, 1, 0], [0, 2]] + [[0, 0]] * (table.num_rows - 4)
    table = table.set_column(2, "label", pa.array(lists, pa.list_(pa.int64())))
    metadata = user_metadata(task="multilabel", num_classes=2, class_names=["p", "q"])
    publish_tables(store, "ml", [table], metadata)
    messages = [str(p) for p in validate_dataset(store, "ml").problems]
    assert any(
        "1 label list(s) do not have num_classes=2 entries (lengths 3)" in m for m in messages
    )
    assert any("multi-label entries must be 0/1, found 2" in m for m in messages)


def test_read_dataset_refuses_a_broken_schema_and_load_splits_broken_rows(store):
    publish_tables(store, "a", [_good_table().drop_columns(["split"])], user_metadata())
    with pytest.raises(DatasetFormatError, match=r"data-0\.parquet.*'split': required column"):
        read_dataset(store, "a")
    publish_tables(store, "b", [_replace_rows(_good_table(), "label", {0: 7})], user_metadata())
    with pytest.raises(DatasetFormatError, match=r"not usable: label: 1 label\(s\) outside"):
        load_splits(store, "b")


def test_validation_samples_images_of_large_splits(store):
    write_dataset(store, "ds", splits=image_splits(), meta=image_meta())
    report = validate_dataset(store, "ds", max_images_per_split=5)
    assert report.ok and report.images_checked <= 15


# ---------------------------------------------------------------------------------------------
# Describe
# ---------------------------------------------------------------------------------------------


def test_describe_counts_and_rendering(store):
    splits = image_splits()
    # Skew the train split: class 0 is 90 % group 1.
    train = splits["train"]
    label = np.array([0] * 20 + [1] * 16 + [2] * 12)
    group = np.array([1] * 18 + [0] * 2 + [0, 1] * 8 + [0] * 12)
    splits["train"] = DatasetArrays(label=label, group=group, images=train.images)
    write_dataset(store, "ds", splits=splits, meta=image_meta())
    described = describe_dataset(store, "ds")
    assert described["rows"] == 96
    assert described["class_names"] == ["a", "b", "c"]
    assert described["splits"]["train"] == {
        "rows": 48,
        "groups": [2 + 8 + 12, 18 + 8],
        "classes": [[2, 18], [8, 8], [12, 0]],
    }
    assert described["splits"]["val"]["classes"] == [[4, 4], [4, 4], [4, 4]]
    json.dumps(described)  # JSON-able for --json

    text = render_description(described)
    lines = text.splitlines()
    assert lines[0].startswith("tiny (file://") and "96 rows" in lines[0]
    train_block = lines[lines.index("train: 48 rows") :]
    assert train_block[2].split() == ["0", "a", "2", "18", "g1", "90%"]
    assert train_block[4].split() == ["2", "c", "12", "0", "g0", "100%"]
    assert train_block[5].split() == ["all", "rows", "22", "26", "g1", "54%"]
