"""Dataset converters and the ``bird datasets`` CLI against a real S3 endpoint (moto server).

FashionMNIST-S and Adult are the real data installed on this machine; CIFAR-10 and CelebA cannot
be downloaded here, so their converters run on small synthetic roots written in the exact
on-disk formats torchvision uses.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bird_core.data import load_adult, load_fashion_mnist_s
from bird_core.data.fashion_mnist_s import DEFAULT_ROOT as FASHION_MNIST_ROOT
from bird_datasets.converters import get_converter
from bird_datasets.converters.adult import prepare_adult
from bird_datasets.converters.celeba import prepare_celeba
from bird_datasets.converters.cifar10_s import CIFAR10_CLASSES, prepare_cifar10_s
from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from bird_datasets.describe import describe_dataset, render_description
from bird_datasets.reader import read_dataset, split_arrays
from bird_datasets.validation import validate_dataset
from service.settings import Settings
from service.storage import LocalStore, S3Store, publish, read_manifest, verify
from tests.integration.conftest import S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY
from workers.datasets import load_splits, load_splits_from_uri

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist provides the FashionMNIST files",
)


# ---------------------------------------------------------------------------------------------
# FashionMNIST-S into S3
# ---------------------------------------------------------------------------------------------

FMNIST_ARGS = {"skew": 0.95, "seed": 3, "train_size": 300, "test_size": 60}


@needs_fashion_mnist
def test_fashion_mnist_s_into_s3_matches_the_loader(s3_store: S3Store, s3_settings: Settings):
    manifest = prepare_fashion_mnist_s(s3_store, "datasets/fm", rows_per_part=2500, **FMNIST_ARGS)
    reference = load_fashion_mnist_s(**FMNIST_ARGS)
    counts = {"train": 300, "val": 6000, "test": 120}
    assert manifest.metadata["counts"] == counts
    assert len(manifest.files) == 3  # 6420 rows in parts of at most 2500
    # The manifest on S3 is the one returned, and every part verifies against it.
    stored = read_manifest(s3_store, "datasets/fm")
    assert stored == manifest
    verify(s3_store, "datasets/fm", stored)

    meta, table = read_dataset(s3_store, "datasets/fm")
    assert (meta.name, meta.task, meta.input) == ("fashion-mnist-s", "multiclass", "image")
    assert meta.image_shape == (3, 28, 28) and meta.group_names == ("grayscale", "colour")
    for split in SPLITS:
        got = split_arrays(meta, table, split)
        expected = getattr(reference, split)
        np.testing.assert_array_equal(got["label"], expected.label.numpy())
        np.testing.assert_array_equal(got["group"], expected.group.numpy())
        np.testing.assert_array_equal(got["images"], expected.x.numpy())

    # The training side gets the same tensors and the same preprocessing as the loader.
    data = load_splits(s3_store, "datasets/fm")
    for split in SPLITS:
        assert torch.equal(getattr(data, split).x, getattr(reference, split).x)
    np.testing.assert_allclose(data.preprocessing["mean"], reference.preprocessing["mean"])
    np.testing.assert_allclose(data.preprocessing["std"], reference.preprocessing["std"])
    # ... also when addressed by URI with the deployment's settings.
    uri = f"s3://{s3_store.bucket}/{s3_store.prefix}/datasets/fm"
    assert torch.equal(load_splits_from_uri(uri, s3_settings).test.x, reference.test.x)

    report = validate_dataset(s3_store, "datasets/fm")
    assert report.ok, report.summary()
    assert report.counts == counts

    described = describe_dataset(s3_store, "datasets/fm")
    val = np.array(described["splits"]["val"]["classes"])  # [class, group]
    share_colour = val[:, 1] / val.sum(axis=1)
    np.testing.assert_allclose(share_colour[:5], 0.95)  # classes 0-4 mostly colour
    np.testing.assert_allclose(share_colour[5:], 0.05)  # classes 5-9 mostly grayscale
    assert described["splits"]["test"]["classes"] == [[6, 6]] * 10  # balanced
    text = render_description(described)
    assert "colour 95%" in text and "grayscale 95%" in text


# ---------------------------------------------------------------------------------------------
# Adult into the local store
# ---------------------------------------------------------------------------------------------


def test_adult_into_local_store(local_store: LocalStore):
    manifest = prepare_adult(local_store, "adult", seed=1, train_size=3000)
    reference = load_adult(seed=1, train_size=3000)
    assert manifest.metadata["input"] == "tabular"
    assert manifest.metadata["num_features"] == reference.train.x.shape[1]
    assert len(manifest.metadata["feature_names"]) == reference.train.x.shape[1]
    assert manifest.metadata["group_names"] == ["female", "male"]
    data = load_splits(local_store, "adult")
    for split in SPLITS:
        got, expected = getattr(data, split), getattr(reference, split)
        assert torch.equal(got.x, expected.x)  # unnormalised features, stored exactly
        assert torch.equal(got.label, expected.label) and torch.equal(got.group, expected.group)
    # Normalisation is computed from the train split, as load_adult does.
    np.testing.assert_allclose(data.preprocessing["mean"], reference.preprocessing["mean"])
    np.testing.assert_allclose(data.preprocessing["std"], reference.preprocessing["std"])
    assert validate_dataset(local_store, "adult").ok


def test_adult_converter_honours_test_size(local_store: LocalStore):
    manifest = get_converter("adult").run(
        local_store, "adult-small", seed=1, train_size=500, test_size=300
    )
    assert manifest.metadata["counts"]["test"] == 300
    assert manifest.metadata["source"]["test_size"] == 300
    reference = load_adult(seed=1, train_size=500, test_size=300)
    assert torch.equal(load_splits(local_store, "adult-small").test.x, reference.test.x)


# ---------------------------------------------------------------------------------------------
# CIFAR10-S from a synthetic torchvision-format root
# ---------------------------------------------------------------------------------------------


def write_cifar10_root(root: Path, per_batch: int = 40, test: int = 50) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` as in cifar-10-python.tar.gz: pickled dicts with
    ``b"data"`` (uint8 [N, 3072], the R, G, B planes) and ``b"labels"``, plus batches.meta."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    batches = [(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)]
    for name, n, kind in [*batches, ("test_batch", test, "test")]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).tolist()
        entry = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        arrays[f"{kind}_x"].append(data.reshape(-1, 3, 32, 32))
        arrays[f"{kind}_y"].append(np.array(labels))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": 40}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return {key: np.concatenate(value) for key, value in arrays.items()}


def _pil_gray(image: np.ndarray) -> np.ndarray:
    """The grayscale version as Pillow makes it (luminance on three channels)."""
    gray = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).convert("L"))
    return np.repeat(gray[None], 3, axis=0)


def test_cifar10_s_from_a_synthetic_root(tmp_path: Path, s3_store: S3Store):
    source = write_cifar10_root(tmp_path / "cifar")
    prepare_cifar10_s(tmp_path / "cifar", s3_store, "c10s", skew=0.8, seed=1)
    report = validate_dataset(s3_store, "c10s")
    assert report.ok, report.summary()
    meta, table = read_dataset(s3_store, "c10s")
    assert meta.name == "cifar10-s" and meta.class_names == CIFAR10_CLASSES
    assert meta.counts == {"train": 180, "val": 20, "test": 100}

    colour_of = {img.tobytes(): i for i, img in enumerate(source["train_x"])}
    gray_of = {_pil_gray(img).tobytes(): i for i, img in enumerate(source["train_x"])}
    used: list[int] = []
    for split, per_class, coloured in (("train", 18, 14), ("val", 2, 2)):
        rows = split_arrays(meta, table, split)
        for image, label, group in zip(rows["images"], rows["label"], rows["group"], strict=True):
            # Colour rows are the original image; grayscale rows its luminance on 3 channels.
            index = (colour_of if group == 1 else gray_of)[image.tobytes()]
            assert source["train_y"][index] == label
            used.append(index)
        for c in range(10):
            in_class = rows["group"][rows["label"] == c]
            assert in_class.size == per_class  # val is a class-stratified 10 % slice
            # skew 0.8: classes 0-4 mostly colour, classes 5-9 mostly grayscale.
            expected = coloured if c < 5 else per_class - coloured
            assert int(in_class.sum()) == expected
    assert sorted(used) == list(range(200))  # train and val partition the training images

    test = split_arrays(meta, table, "test")
    np.testing.assert_array_equal(test["group"], [0] * 50 + [1] * 50)
    np.testing.assert_array_equal(test["label"], np.tile(source["test_y"], 2))
    np.testing.assert_array_equal(test["images"][50:], source["test_x"])
    gray = np.stack([_pil_gray(img) for img in source["test_x"]])
    np.testing.assert_array_equal(test["images"][:50], gray)

    data = load_splits(s3_store, "c10s")
    assert len(data.train) == 180 and data.input_shape == (3, 32, 32)


def test_cifar10_s_refuses_a_root_without_the_batches(tmp_path: Path, s3_store: S3Store):
    write_cifar10_root(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 not found"):
        prepare_cifar10_s(tmp_path / "cifar", s3_store, "c10s")
    assert not s3_store.list("c10s")


# ---------------------------------------------------------------------------------------------
# CelebA from a synthetic torchvision-format root
# ---------------------------------------------------------------------------------------------

# The header line of list_attr_celeba.txt, split as the real file is.
CELEBA_ATTRIBUTES = (  # noqa: SIM905
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split(" ")


def _celeba_colour(i: int) -> tuple[int, int, int]:
    return (10 * i, 250 - 10 * i, 60 + 5 * i)


def write_celeba_root(root: Path, n: int = 24) -> dict[str, np.ndarray]:
    """``root/celeba`` as torchvision expects it: 178x218 JPEGs in img_align_celeba/ and the
    annotation files with their real header lines. Image i is a solid colour (so a row can be
    traced back to its file); partition i % 4 → train, train, val, test."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    attrs = np.where(rng.random((n, len(CELEBA_ATTRIBUTES))) < 0.5, 1, -1)
    index = np.arange(n)
    attrs[:, CELEBA_ATTRIBUTES.index("Male")] = np.where((index // 4) % 2 == 1, 1, -1)
    # Both classes in both groups of every split; 3 rows per (class, group) cell in train.
    blond = (index % 2) ^ ((index // 8) % 2)
    attrs[:, CELEBA_ATTRIBUTES.index("Blond_Hair")] = np.where(blond == 1, 1, -1)
    partition = np.array([0, 0, 1, 2])[index % 4]
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.new("RGB", (178, 218), _celeba_colour(i)).save(folder / "img_align_celeba" / name)
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
    lines += [
        name + " " + " ".join(f"{v:2d}" for v in row)
        for name, row in zip(names, attrs, strict=True)
    ]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {p}\n" for name, p in zip(names, partition, strict=True))
    )
    (folder / "identity_CelebA.txt").write_text(
        "".join(f"{name} {i % 5 + 1}\n" for i, name in enumerate(names))
    )
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n"
        + "".join(f"{name}    95  71 226 313\n" for name in names)
    )
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        + "".join(f"{name} 69  109  106  113   77  142   73  152  108  154\n" for name in names)
    )
    return {"attrs": (attrs > 0).astype(np.int64), "partition": partition}


def test_celeba_binary_from_a_synthetic_root(tmp_path: Path, s3_store: S3Store):
    source = write_celeba_root(tmp_path)
    prepare_celeba(tmp_path, s3_store, "celeba", image_size=32)
    report = validate_dataset(s3_store, "celeba")
    assert report.ok, report.summary()
    meta, table = read_dataset(s3_store, "celeba")
    assert (meta.task, meta.num_classes, meta.image_shape) == ("multiclass", 2, (3, 32, 32))
    assert meta.class_names == ("not Blond_Hair", "Blond_Hair")
    assert meta.group_names == ("not Male", "Male")
    blond = source["attrs"][:, CELEBA_ATTRIBUTES.index("Blond_Hair")]
    male = source["attrs"][:, CELEBA_ATTRIBUTES.index("Male")]
    for code, split in enumerate(SPLITS):
        files = np.flatnonzero(source["partition"] == code)
        rows = split_arrays(meta, table, split)
        np.testing.assert_array_equal(rows["label"], blond[files])
        np.testing.assert_array_equal(rows["group"], male[files])
        # Each row's image is its file, resized: the solid colour survives (JPEG: ±3).
        means = rows["images"].reshape(len(files), 3, -1).mean(axis=2)
        expected = np.array([_celeba_colour(i) for i in files])
        np.testing.assert_allclose(means, expected, atol=3)

    # Subsamples are stratified by group and label.
    prepare_celeba(tmp_path / "celeba", s3_store, "small", image_size=16, train_size=4, seed=2)
    small = describe_dataset(s3_store, "small")["splits"]["train"]
    assert small["rows"] == 4 and small["classes"] == [[1, 1], [1, 1]]


def test_celeba_multilabel_from_a_synthetic_root(tmp_path: Path, local_store: LocalStore):
    source = write_celeba_root(tmp_path)
    attributes = ("Blond_Hair", "Smiling", "Young")
    prepare_celeba(tmp_path, local_store, "celeba", attributes=attributes, image_size=16)
    assert validate_dataset(local_store, "celeba").ok
    data = load_splits(local_store, "celeba")
    assert data.task == "multilabel" and data.class_names == attributes
    columns = [CELEBA_ATTRIBUTES.index(a) for a in attributes]
    expected = source["attrs"][np.flatnonzero(source["partition"] == 2)][:, columns]
    assert torch.equal(data.test.label, torch.from_numpy(expected).float())


def test_celeba_errors_name_the_problem(tmp_path: Path, local_store: LocalStore):
    write_celeba_root(tmp_path)
    with pytest.raises(ValueError, match=r"unknown CelebA attribute\(s\) \['Blonde'\]"):
        prepare_celeba(tmp_path, local_store, "x", attributes="Blonde")
    (tmp_path / "celeba" / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000007\.jpg not found"):
        prepare_celeba(tmp_path, local_store, "x")
    with pytest.raises(FileNotFoundError, match=r"CelebA folder .*celeba not found"):
        prepare_celeba(tmp_path / "celeba" / "img_align_celeba", local_store, "x")
    assert not local_store.list("x")  # nothing half-written is visible


# ---------------------------------------------------------------------------------------------
# The CLI, as a subprocess against the moto server
# ---------------------------------------------------------------------------------------------


def _bird(
    args: list[str], endpoint: str, timeout: float = 180, **env_overrides: str
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,  # includes the fake AWS_* variables of aws_isolated_env
        "PYTHONPATH": str(REPO_ROOT),
        "BIRD_S3_ENDPOINT_URL": endpoint,
        "BIRD_S3_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
        "BIRD_S3_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY,
        "BIRD_S3_REGION": S3_REGION,
        **env_overrides,
    }
    return subprocess.run(
        [sys.executable, "-m", "cli", "datasets", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@needs_fashion_mnist
def test_cli_prepare_validate_describe(s3_server: str, s3_bucket: str):
    uri = f"s3://{s3_bucket}/datasets/fm"
    args = ["--train-size", "100", "--test-size", "20", "--seed", "1"]
    proc = _bird(["prepare", "fashion-mnist-s", "--out", uri, *args], s3_server)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote fashion-mnist-s to {uri}: train 100, val 6000, test 40 rows" in proc.stdout

    proc = _bird(["validate", uri], s3_server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: 6140 rows (train 100, val 6000, test 40)")

    proc = _bird(["describe", uri], s3_server)
    assert proc.returncode == 0, proc.stderr
    assert "val: 6000 rows" in proc.stdout
    assert "colour 95%" in proc.stdout and "grayscale 95%" in proc.stdout


def test_cli_errors_are_one_line(s3_server: str, s3_bucket: str, tmp_path: Path):
    cases = [
        # (arguments, exit code, what the message names)
        (["prepare", "adult", "--out", "s3://no-such-bucket-bird/ds"], 1, "no-such-bucket-bird"),
        (["validate", f"s3://{s3_bucket}/missing"], 1, f"s3://{s3_bucket}/missing"),
        (["describe", f"s3://{s3_bucket}/missing"], 1, f"s3://{s3_bucket}/missing/manifest.json"),
        (["prepare", "celeba", "--out", str(tmp_path / "o")], 2, "--root"),
        (
            ["prepare", "cifar10-s", "--out", str(tmp_path / "o"), "--root", str(tmp_path)],
            2,
            str(tmp_path / "cifar-10-batches-py"),
        ),
        (["prepare", "mnist", "--out", str(tmp_path / "o")], 2, "unknown dataset 'mnist'"),
        (
            ["prepare", "adult", "--out", str(tmp_path / "o"), "--val-size", "3"],
            2,
            "adult does not take --val-size; it takes --out, --seed, --root, --train-size",
        ),
        (["validate", "gs://bucket/ds"], 2, "dataset URI 'gs://bucket/ds' is invalid"),
    ]
    for args, code, named in cases:
        proc = _bird(args, s3_server)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert named in proc.stderr and "Traceback" not in proc.stderr


def test_cli_rejected_credentials_are_one_line(
    s3_server: str, s3_bucket: str, s3_auth_enforced: tuple[str, str]
):
    key_id, _secret = s3_auth_enforced
    proc = _bird(
        ["validate", f"s3://{s3_bucket}/ds"],
        s3_server,
        BIRD_S3_ACCESS_KEY_ID=key_id,
        BIRD_S3_SECRET_ACCESS_KEY="not-the-secret",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert f"s3://{s3_bucket}/ds" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_validate_lists_problems(s3_server: str, s3_bucket: str, s3_store: S3Store):
    # A dataset written by hand with plain pyarrow, without its group column.
    n = 12
    table = pa.table(
        {
            "id": np.arange(n),
            "x": pa.array([[float(i), 1.0] for i in range(n)], pa.list_(pa.float32())),
            "label": np.arange(n) % 2,
            "split": ["train", "val", "test"] * 4,
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    metadata = {
        "format": "bird-dataset",
        "format_version": 1,
        "task": "multiclass",
        "input": "tabular",
        "num_features": 2,
        "num_classes": 2,
        "num_groups": 2,
    }
    publish(s3_store, "broken", {"rows.parquet": sink.getvalue()}, metadata=metadata)
    proc = _bird(["validate", f"s3://{s3_bucket}/bird/broken"], s3_server)
    assert proc.returncode == 1
    assert "rows.parquet: column 'group': required column is missing" in proc.stdout
