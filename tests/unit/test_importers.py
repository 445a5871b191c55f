"""Bring your own data: image folders and tables imported into the bird format, and every way
a source file can be wrong named by file, line or column."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from bird_datasets.format import DatasetMeta
from bird_datasets.importers import DatasetImportError, assign_splits
from bird_datasets.importers.images import import_image_folder
from bird_datasets.importers.table import TableEncoding, import_table
from bird_datasets.reader import read_dataset, read_dataset_meta, split_arrays
from bird_datasets.validation import validate_dataset
from cli.app import app
from service.storage import LocalStore
from workers.datasets import load_splits

CLASSES = ("circle", "cross", "square")
GROUPS = ("dark", "light")


def write_images(folder: Path, n: int = 60, size: tuple[int, int] = (10, 12), mode: str = "RGB"):
    """``n`` PNG images under ``folder`` and their CSV rows (path, label, group): class and
    group cycle so every (class, group) cell has ``n / 6`` rows."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        label, group = CLASSES[i % 3], GROUPS[(i // 3) % 2]
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 255, (size[0], size[1], channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
        path = Path(label) / f"{i:03d}.png"
        (folder / label).mkdir(parents=True, exist_ok=True)
        image.save(folder / path)
        rows.append({"path": path.as_posix(), "label": label, "group": group})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_an_image_folder_becomes_a_valid_dataset_with_named_classes_and_groups(tmp_path):
    images = tmp_path / "photos"
    rows = write_images(images)
    csv_path = write_csv(images / "labels.csv", rows)
    store = LocalStore(tmp_path / "store")
    manifest = import_image_folder(csv_path, store, "datasets/photos", seed=3)

    report = validate_dataset(store, "datasets/photos")
    assert report.ok, report.summary()
    meta = read_dataset_meta(store, "datasets/photos")
    assert meta.name == "photos"
    assert meta.image_shape == (3, 10, 12)
    assert meta.class_names == CLASSES and meta.group_names == GROUPS
    assert sum(manifest.metadata["counts"].values()) == 60
    # Stratified by class and group: every cell of 10 rows gives 2 to test and 1 to val.
    assert manifest.metadata["counts"] == {"train": 42, "val": 6, "test": 12}
    # The pixels are the files' pixels, under the names' indices.
    _, table = read_dataset(store, "datasets/photos")
    train = split_arrays(meta, table, "train")
    label = int(train["label"][0])
    source = [r for r in rows if r["label"] == CLASSES[label]]
    stored = train["images"][0].transpose(1, 2, 0)
    assert any(np.array_equal(np.asarray(Image.open(images / r["path"])), stored) for r in source)


def test_a_split_column_is_kept_and_images_are_resized_and_converted(tmp_path):
    rows = write_images(tmp_path, n=36, size=(9, 9), mode="RGBA")
    for i, row in enumerate(rows):
        row["split"] = ("train", "train", "train", "train", "val", "test")[(i // 6) % 6]
    # Integer labels and groups are indices already; the CSV is elsewhere, with a --root.
    for row in rows:
        row["label"] = str(CLASSES.index(row["label"]))
    csv_path = (
        write_csv(tmp_path / "meta" / "list.csv", rows)
        if ((tmp_path / "meta").mkdir() or True)
        else None
    )
    store = LocalStore(tmp_path / "store")
    import_image_folder(
        csv_path, store, "d", root=tmp_path, image_size=(16, 16), channels=1, name="gray"
    )
    meta = read_dataset_meta(store, "d")
    assert meta.image_shape == (1, 16, 16)
    assert meta.class_names == () and meta.group_names == GROUPS
    assert meta.counts == {"train": 24, "val": 6, "test": 6}
    assert validate_dataset(store, "d").ok


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: rows[5].update(path="circle/none.png"),
            r"line 7: image .*none\.png does not exist",
        ),
        (lambda rows: rows[4].update(split="holdout"), r"line 6: column 'split' is 'holdout'"),
        (lambda rows: rows[2].update(label=""), r"line 4: column 'label' is empty"),
        (
            lambda rows: [r.update(group="dark") for r in rows if r["label"] == "cross"],
            r"class 'cross' of column 'label' has rows of one group only \('dark'",
        ),
        (lambda rows: [r.update(group="g") for r in rows], "has a single group"),
    ],
)
def test_bad_image_rows_are_named_by_line(tmp_path, edit, message):
    rows = write_images(tmp_path)
    for row in rows:
        row["split"] = "train" if int(row["path"][-7:-4]) % 5 else "test"
    rows[1]["split"] = rows[7]["split"] = rows[10]["split"] = "val"
    rows[4]["split"] = rows[13]["split"] = "val"
    edit(rows)
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DatasetImportError, match=message):
        import_image_folder(csv_path, LocalStore(tmp_path / "store"), "d")
    assert not (tmp_path / "store" / "d" / "manifest.json").exists()


def test_images_of_another_size_unknown_columns_and_bad_files_are_named(tmp_path):
    rows = write_images(tmp_path)
    Image.new("RGB", (5, 5)).save(tmp_path / rows[8]["path"])
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DatasetImportError, match=r"line 10: .* is 5x5 .*--image-size"):
        import_image_folder(csv_path, LocalStore(tmp_path / "s"), "d")
    (tmp_path / rows[9]["path"]).write_bytes(b"not a png")
    with pytest.raises(DatasetImportError, match=r"line 11: .* not an image Pillow can read"):
        import_image_folder(csv_path, LocalStore(tmp_path / "s"), "d", image_size=(8, 8))
    extra = write_csv(tmp_path / "extra.csv", [{**r, "colour": "red"} for r in rows])
    with pytest.raises(DatasetImportError, match=r"unknown column 'colour'"):
        import_image_folder(extra, LocalStore(tmp_path / "s"), "d")
    with pytest.raises(DatasetImportError, match=r"nothing\.csv: no such file"):
        import_image_folder(tmp_path / "nothing.csv", LocalStore(tmp_path / "s"), "d")


def _loans(n: int = 300, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], n)
    income = rng.normal(40, 12, n) + (sex == "male") * 8
    employment = rng.choice(["salaried", "self-employed", "none"], n)
    approved = np.where(income + rng.normal(0, 5, n) > 45, "yes", "no")
    return pa.table(
        {
            "age": rng.integers(18, 80, n),
            "income": income,
            "employment": employment,
            "sex": sex,
            "approved": approved,
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_is_one_hot_and_standardised_with_train_statistics(tmp_path, suffix):
    table = _loans()
    path = tmp_path / f"loans{suffix}"
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    store = LocalStore(tmp_path / "store")
    import_table(path, store, "loans", label="approved", group="sex", seed=1)
    assert validate_dataset(store, "loans").ok
    meta = read_dataset_meta(store, "loans")
    assert meta.feature_names == (
        "age",
        "income",
        "employment=none",
        "employment=salaried",
        "employment=self-employed",
    )
    assert meta.class_names == ("no", "yes") and meta.group_names == ("female", "male")

    _, stored = read_dataset(store, "loans")
    train = split_arrays(meta, stored, "train")["x"]
    # Numeric columns are standardised with the train split's statistics, recorded in the
    # metadata; the one-hot columns are 0/1.
    np.testing.assert_allclose(train[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train[:, :2].std(axis=0), 1, atol=1e-4)
    assert set(np.unique(train[:, 2:])) == {0.0, 1.0}
    encoding = TableEncoding.from_metadata(meta)
    income = next(f for f in encoding.features if f.column == "income")
    assert income.kind == "numeric" and 40 < income.mean < 50

    # New rows encode exactly as the imported ones were (the dataset holds the rows split by
    # split, so both sides are compared in sorted order).
    x = np.concatenate([split_arrays(meta, stored, s)["x"] for s in ("train", "val", "test")])
    encoded = encoding.encode(table)
    assert encoded.shape == x.shape

    def in_order(rows: np.ndarray) -> np.ndarray:
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_allclose(in_order(encoded), in_order(x), atol=1e-6)

    # Training normalises with the train split's statistics again: on standardised columns
    # that is the identity, so nothing is scaled twice.
    preprocessing = load_splits(store, "loans").preprocessing
    np.testing.assert_allclose(preprocessing["mean"][:2], 0, atol=1e-5)
    np.testing.assert_allclose(preprocessing["std"][:2], 1, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "edit", "message"),
    [
        ({"label": "approve"}, None, r"unknown column 'approve' \(the label\); the columns are"),
        ({"features": ["age", "wage"]}, None, r"unknown column 'wage' \(a feature\)"),
        ({"categorical": ["income"], "features": ["age"]}, None, "'income' is not a feature"),
        ({"split": "fold"}, None, r"unknown column 'fold' \(the split\)"),
        ({}, ("income", 17, None), r"line 19: column 'income' is empty or not a finite number"),
        ({}, ("sex", 3, None), r"line 5: column 'sex' is empty"),
        ({}, ("age", 40, "?"), r"line 42: column 'age' holds numbers but also '\?'"),
    ],
)
def test_bad_tables_name_the_column_and_line(tmp_path, kwargs, edit, message):
    table = _loans()
    if edit is not None:
        column, row, value = edit
        values = table.column(column).to_pylist()
        values[row] = value
        if value == "?":
            values = [str(v) for v in values]
        table = table.set_column(table.column_names.index(column), column, pa.array(values))
    path = tmp_path / "t.csv"
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
    arguments = {"label": "approved", "group": "sex", **kwargs}
    with pytest.raises(DatasetImportError, match=message):
        import_table(path, LocalStore(tmp_path / "s"), "d", **arguments)


def test_the_stratified_split_gives_every_group_to_every_split():
    label = np.repeat(np.arange(3), 20)
    group = np.tile(np.arange(2), 30)
    split = assign_splits(label, group, seed=0, val_fraction=0.1, test_fraction=0.2)
    again = assign_splits(label, group, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert (split == again).all()
    for name in ("train", "val", "test"):
        for cls in range(3):
            for g in range(2):
                assert ((split == name) & (label == cls) & (group == g)).any()
    with pytest.raises(DatasetImportError, match="below 1"):
        assign_splits(label, group, seed=0, val_fraction=0.5, test_fraction=0.5)


def test_the_command_imports_prints_the_description_and_fails_in_one_line(tmp_path):
    runner = CliRunner()
    table = _loans()
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, tmp_path / "loans.csv")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "datasets",
            "import",
            "table",
            str(tmp_path / "loans.csv"),
            "--out",
            str(out),
            "--label",
            "approved",
            "--group",
            "sex",
            "--categorical",
            "age",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "imported, validated: OK:" in result.output
    assert "majority group" in result.output  # the describe table
    meta = read_dataset_meta(LocalStore(out), "")
    assert isinstance(meta, DatasetMeta) and len(meta.feature_names) > 60  # age one-hot

    result = runner.invoke(
        app,
        [
            "datasets",
            "import",
            "table",
            str(tmp_path / "loans.csv"),
            "--out",
            str(out),
            "--label",
            "approved",
            "--group",
            "gender",
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "unknown column 'gender' (the group)" in result.output

    rows = write_images(tmp_path / "img", n=30)
    write_csv(tmp_path / "img" / "labels.csv", rows)
    result = runner.invoke(
        app,
        [
            "datasets",
            "import",
            "images",
            str(tmp_path / "img" / "labels.csv"),
            "--out",
            str(tmp_path / "imgs"),
            "--image-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "images 3x8x8" in result.output
    result = runner.invoke(
        app,
        [
            "datasets",
            "import",
            "images",
            str(tmp_path / "img" / "labels.csv"),
            "--out",
            str(tmp_path / "imgs"),
            "--image-size",
            "big",
        ],
    )
    assert result.exit_code == 2 and "--image-size must be N or HxW" in result.output
