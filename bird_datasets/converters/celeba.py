"""Converters from the usual on-disk datasets to the bird dataset format (``service.datasets``).

* :func:`prepare_fashion_mnist_s` — FashionMNIST-S exactly as ``bird_core.data`` builds it.
* :func:`prepare_adult` — UCI Adult, unnormalised features (the training side normalises with
  statistics of the train split).
* :func:`prepare_cifar10_s` — CIFAR10-S (Wang et al., 2020) from a local torchvision-format
  CIFAR-10 root.
* :func:`prepare_celeba` — CelebA from a local torchvision-format root, one or several binary
  attributes as the task and another attribute (``Male`` by default) as the group.

Every converter writes through :class:`service.datasets.DatasetWriter`: parts first, manifest
last, so an interrupted conversion leaves no dataset behind. Each returns the manifest.
"""

from __future__ import annotations

import numbers
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bird_core.data import DatasetSplits, Split, load_adult, load_fashion_mnist_s
from bird_core.data.adult import adult_feature_names
from bird_core.data.fashion_mnist_s import (
    DEFAULT_ROOT as FASHION_MNIST_ROOT,
)
from bird_core.data.fashion_mnist_s import (
    check_fraction,
    check_seed,
    check_size,
    gray_to_rgb,
    stratified_choice,
)
from service.datasets import DatasetArrays, DatasetMeta, DatasetWriter, write_dataset
from service.storage import Manifest, ObjectStore

__all__ = [
    "CELEBA_FILES",
    "CIFAR10_FILES",
    "check_celeba_root",
    "check_cifar10_root",
    "luminance",
    "prepare_adult",
    "prepare_celeba",
    "prepare_cifar10_s",
    "prepare_fashion_mnist_s",
    "read_celeba_index",
    "read_cifar10",
]

# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------


def _split_arrays(split: Split, task: str) -> DatasetArrays:
    x = split.x.numpy()
    label = split.label.numpy()
    if task == "multilabel":
        # bird_core keeps multi-label targets as float 0/1 (for BCE); the format stores ints.
        label = np.rint(label).astype(np.int64)
    images, features = (x, None) if x.dtype == np.uint8 and x.ndim == 4 else (None, x)
    return DatasetArrays(label=label, group=split.group.numpy(), images=images, x=features)


def _write_splits(
    store: ObjectStore,
    prefix: str,
    data: DatasetSplits,
    *,
    source: dict[str, Any],
    feature_names: Sequence[str] = (),
    rows_per_part: int | None = None,
) -> Manifest:
    """Write a ``bird_core`` :class:`DatasetSplits` (raw ``x``, no preprocessing) as a dataset."""
    is_image = data.train.x.dtype == torch.uint8 and data.train.x.dim() == 4
    shape = tuple(data.train.x.shape[1:])
    meta = DatasetMeta(
        name=data.name,
        task=data.task,
        input="image" if is_image else "tabular",
        num_classes=data.num_classes,
        num_groups=data.num_groups,
        image_shape=shape if is_image else None,  # type: ignore[arg-type]
        num_features=None if is_image else shape[0],
        class_names=data.class_names,
        group_names=data.group_names,
        feature_names=tuple(feature_names),
        source=source,
    )
    splits = {
        "train": _split_arrays(data.train, data.task),
        "val": _split_arrays(data.val, data.task),
        "test": _split_arrays(data.test, data.task),
    }
    return write_dataset(store, prefix, splits=splits, meta=meta, rows_per_part=rows_per_part)


def _check_skew(skew: float) -> None:
    if isinstance(skew, bool) or not isinstance(skew, numbers.Real) or not 0.5 <= skew <= 1.0:
        raise ValueError(f"skew must be a number in [0.5, 1], got {skew!r}")


# --------------------------------------------------------------------------------------------
# FashionMNIST-S and Adult: the bird_core loaders, written out
# --------------------------------------------------------------------------------------------


def prepare_fashion_mnist_s(
    out_store: ObjectStore,
    prefix: str = "",
    *,
    skew: float = 0.95,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    root: str | Path = FASHION_MNIST_ROOT,
    rows_per_part: int | None = None,
) -> Manifest:
    """Write FashionMNIST-S as :func:`bird_core.data.load_fashion_mnist_s` builds it.

    Same arguments, same splits, same rows in the same order (ids are contiguous: train, then
    val, then test), images PNG-encoded losslessly.
    """
    data = load_fashion_mnist_s(
        root,
        skew=skew,
        val_fraction=val_fraction,
        seed=seed,
        train_size=train_size,
        test_size=test_size,
    )
    source = {
        "converter": "fashion-mnist-s",
        "skew": skew,
        "seed": seed,
        "train_size": train_size,
        "test_size": test_size,
        "val_fraction": val_fraction,
    }
    return _write_splits(out_store, prefix, data, source=source, rows_per_part=rows_per_part)


def prepare_adult(
    out_store: ObjectStore,
    prefix: str = "",
    *,
    seed: int = 0,
    train_size: int | None = None,
    val_fraction: float = 0.1,
    root: str | Path | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """Write UCI Adult as :func:`bird_core.data.load_adult` builds it (sex as the group).

    The features are stored unnormalised (``log1p`` capital gain/loss and one-hot categories,
    as the loader encodes them); readers compute the normalisation from the train split.
    """
    data = load_adult(root, val_fraction=val_fraction, seed=seed, train_size=train_size)
    source = {
        "converter": "adult",
        "seed": seed,
        "train_size": train_size,
        "val_fraction": val_fraction,
    }
    return _write_splits(
        out_store,
        prefix,
        data,
        source=source,
        feature_names=adult_feature_names(root),
        rows_per_part=rows_per_part,
    )


# --------------------------------------------------------------------------------------------
# CIFAR10-S
# --------------------------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST = ("test_batch",)
CIFAR10_FILES = (*CIFAR10_TRAIN, *CIFAR10_TEST)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# As in CIFAR10-S: these classes are mostly colour in train/val, the others mostly grayscale.
CIFAR10_COLOURED_CLASSES = (0, 1, 2, 3, 4)
CIFAR10S_GROUP_NAMES = ("grayscale", "colour")
_CIFAR_HINT = (
    "expected the torchvision CIFAR-10 layout (cifar-10-batches-py/ from "
    "cifar-10-python.tar.gz, as torchvision.datasets.CIFAR10 unpacks it)"
)

# The CIFAR batches are Python pickles holding a dict of a numpy array and lists. Only the
# globals such a file needs are allowed, so a planted file cannot run code when it is read.
_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        return super().find_class(module, name)


def check_cifar10_root(root: str | Path) -> Path:
    """The ``cifar-10-batches-py`` folder under ``root`` (or ``root`` itself if it is that
    folder), with every batch file present; ``FileNotFoundError`` naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root {root} does not exist or is not a directory")
    folder = root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {folder} not found; {_CIFAR_HINT}")
    for name in CIFAR10_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CIFAR-10 file {folder / name} not found; {_CIFAR_HINT}")
    return folder


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            # latin1 is how torchvision reads the Python 2 pickles of the official archive.
            entry = _SafeUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a CIFAR-10 batch file ({exc}); {_CIFAR_HINT}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} holds a {type(entry).__name__}, expected a dict; {_CIFAR_HINT}")
    # Keys are str in the official (Python 2) files read with latin1, bytes when a batch was
    # written by Python 3 with bytes keys; accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = folder / name
        entry = _unpickle(path)
        if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
            raise ValueError(f"{path} lacks the 'data' or 'labels' entry; {_CIFAR_HINT}")
        data = np.asarray(entry["data"])
        label = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
            )
        if label.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but {label.size} labels")
        if label.size and (label.min() < 0 or label.max() >= len(CIFAR10_CLASSES)):
            raise ValueError(f"{path}: labels must lie in 0..9")
        # Rows are the red, green and blue 32x32 planes, as torchvision reshapes them.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 from a torchvision-format root: ``uint8 [N, 3, 32, 32]`` images and ``int64``
    labels of train (50k) and test (10k).

    Reads the same files in the same way as ``torchvision.datasets.CIFAR10(root,
    download=False)``, without its md5 check against the official archive (so that a
    re-packed or synthetic root works too) and with a restricted unpickler.
    """
    folder = check_cifar10_root(root)
    train_x, train_y = _read_batches(folder, CIFAR10_TRAIN)
    test_x, test_y = _read_batches(folder, CIFAR10_TEST)
    return train_x, train_y, test_x, test_y


def luminance(images: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``uint8 [N, 3, H, W]`` RGB images → ``uint8 [N, H, W]``.

    The same integer arithmetic as Pillow's ``convert("L")``, so the grayscale versions match
    what most image pipelines (torchvision's ``Grayscale`` on PIL images) produce.
    """
    rgb = images.astype(np.uint32)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def _colour_mask(
    labels: np.ndarray, skew: float, coloured: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Exactly ``round(skew * n_c)`` colour rows in each class of ``coloured`` and exactly
    ``round(skew * n_c)`` grayscale rows in every other class (as FashionMNIST-S does)."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels).tolist():
        rows = np.flatnonzero(labels == c)
        majority = round(skew * rows.size)
        n_colour = majority if c in coloured else rows.size - majority
        mask[rng.choice(rows, n_colour, replace=False)] = True
    return mask


def prepare_cifar10_s(
    root: str | Path,
    out_store: ObjectStore,
    prefix: str = "",
    *,
    skew: float = 0.95,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """Write CIFAR10-S from the local CIFAR-10 at ``root``.

    Group 1 is the original colour image, group 0 its grayscale version (the luminance on all
    three channels). Train and val: in classes 0–4 a fraction ``skew`` of the images is colour,
    in classes 5–9 a fraction ``skew`` is grayscale; val is a class-stratified ``val_fraction``
    of the 50k training images, carved out first. Test: every test image in both versions
    (grayscale block first). ``train_size``/``val_size``/``test_size`` take class-stratified
    subsamples before the versions are built (the test split then has ``2 * test_size`` rows).
    Deterministic given ``seed``; the validation split does not depend on ``train_size``.
    """
    _check_skew(skew)
    check_fraction("val_fraction", val_fraction)
    check_seed(seed)
    train_x, train_y, test_x, test_y = read_cifar10(root)

    n_val = round(val_fraction * train_y.size)
    if not 0 < n_val < train_y.size:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty train or validation split of "
            f"{train_y.size} images"
        )
    check_size("train_size", train_size, train_y.size - n_val)
    check_size("val_size", val_size, n_val)
    check_size("test_size", test_size, test_y.size)
    # One independent stream per step, so a subsample size never moves the other splits.
    rng_val, rng_train_sub, rng_val_sub, rng_train_ver, rng_val_ver, rng_test_sub = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )
    val_idx = stratified_choice(train_y, n_val, rng_val)
    train_idx = np.setdiff1d(np.arange(train_y.size), val_idx, assume_unique=True)
    if train_size is not None:
        train_idx = train_idx[stratified_choice(train_y[train_idx], train_size, rng_train_sub)]
    if val_size is not None:
        val_idx = val_idx[stratified_choice(train_y[val_idx], val_size, rng_val_sub)]
    test_idx = np.arange(test_y.size)
    if test_size is not None:
        test_idx = stratified_choice(test_y, test_size, rng_test_sub)

    def skewed(idx: np.ndarray, rng: np.random.Generator) -> DatasetArrays:
        colour = train_x[idx]
        labels = train_y[idx]
        is_colour = _colour_mask(labels, skew, CIFAR10_COLOURED_CLASSES, rng)
        images = gray_to_rgb(luminance(colour))
        images[is_colour] = colour[is_colour]
        return DatasetArrays(label=labels, group=is_colour.astype(np.int64), images=images)

    colour = test_x[test_idx]
    labels = test_y[test_idx]
    n = labels.size
    test = DatasetArrays(
        label=np.concatenate([labels, labels]),
        group=np.repeat(np.array([0, 1], dtype=np.int64), n),
        images=np.concatenate([gray_to_rgb(luminance(colour)), colour]),
    )
    meta = DatasetMeta(
        name="cifar10-s",
        task="multiclass",
        input="image",
        num_classes=len(CIFAR10_CLASSES),
        num_groups=len(CIFAR10S_GROUP_NAMES),
        image_shape=(3, 32, 32),
        class_names=CIFAR10_CLASSES,
        group_names=CIFAR10S_GROUP_NAMES,
        source={
            "converter": "cifar10-s",
            "skew": skew,
            "seed": seed,
            "val_fraction": val_fraction,
            "train_size": train_size,
            "val_size": val_size,
            "test_size": test_size,
        },
    )
    splits = {
        "train": skewed(train_idx, rng_train_ver),
        "val": skewed(val_idx, rng_val_ver),
        "test": test,
    }
    return write_dataset(out_store, prefix, splits=splits, meta=meta, rows_per_part=rows_per_part)


# --------------------------------------------------------------------------------------------
# CelebA
# --------------------------------------------------------------------------------------------

CELEBA_FOLDER = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR = "list_attr_celeba.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
# What this converter reads. torchvision's CelebA also wants identity_CelebA.txt,
# list_bbox_celeba.txt and list_landmarks_align_celeba.txt; none of them is needed here.
CELEBA_FILES = (CELEBA_ATTR, CELEBA_PARTITION)
_CELEBA_SPLITS = {0: "train", 1: "val", 2: "test"}
_CELEBA_HINT = (
    "expected the torchvision CelebA layout (celeba/img_align_celeba/*.jpg, "
    "celeba/list_attr_celeba.txt, celeba/list_eval_partition.txt)"
)
# Images decoded, cropped and resized per batch written: bounds memory for the 200k images.
_CELEBA_CHUNK = 2048


def check_celeba_root(root: str | Path) -> Path:
    """The ``celeba`` folder under ``root`` (or ``root`` itself if it is that folder) with the
    attribute and partition lists and the image folder; ``FileNotFoundError`` naming what is
    missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} does not exist or is not a directory")
    if (root / CELEBA_FOLDER).is_dir():
        folder = root / CELEBA_FOLDER
    elif (root / CELEBA_ATTR).is_file():
        folder = root  # the celeba folder itself
    else:
        raise FileNotFoundError(f"CelebA folder {root / CELEBA_FOLDER} not found; {_CELEBA_HINT}")
    for name in CELEBA_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CelebA file {folder / name} not found; {_CELEBA_HINT}")
    if not (folder / CELEBA_IMAGES).is_dir():
        raise FileNotFoundError(
            f"CelebA image folder {folder / CELEBA_IMAGES} not found; {_CELEBA_HINT}"
        )
    return folder


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def read_celeba_index(
    root: str | Path,
) -> tuple[Path, list[str], tuple[str, ...], np.ndarray, np.ndarray]:
    """Parse the CelebA attribute and partition lists.

    Returns the ``celeba`` folder, the image file names, the 40 attribute names, the attributes
    as ``int8 [N, 40]`` of 0/1 (the files use -1/1), and the partition ``int8 [N]`` (0 train,
    1 val, 2 test). ``list_attr_celeba.txt`` is: the image count, the attribute names, then one
    line per image (``000001.jpg -1 1 ...``); ``list_eval_partition.txt`` is one
    ``000001.jpg 0`` line per image. Errors name the file and line.
    """
    folder = check_celeba_root(root)
    attr_path = folder / CELEBA_ATTR
    lines = [line for line in _read_lines(attr_path) if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{attr_path} is too short: expected a count line and a header line")
    try:
        count = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise ValueError(f"{attr_path} line 1: expected the number of images") from None
    names = tuple(lines[1].split())
    rows = lines[2:]
    if count != len(rows):
        raise ValueError(f"{attr_path} announces {count} images but lists {len(rows)}")
    files: list[str] = []
    attrs = np.empty((len(rows), len(names)), dtype=np.int8)
    for i, line in enumerate(rows):
        fields = line.split()
        if len(fields) != len(names) + 1:
            raise ValueError(
                f"{attr_path} line {i + 3}: expected a file name and {len(names)} values, "
                f"got {len(fields)} fields"
            )
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{attr_path} line {i + 3}: attribute values must be -1/1") from None
        if any(v not in (-1, 1) for v in values):
            raise ValueError(f"{attr_path} line {i + 3}: attribute values must be -1/1")
        files.append(fields[0])
        attrs[i] = np.asarray(values) > 0

    part_path = folder / CELEBA_PARTITION
    partition_of: dict[str, int] = {}
    for i, line in enumerate(_read_lines(part_path)):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{part_path} line {i + 1}: expected '<image> <0|1|2>', got {line!r}")
        partition_of[fields[0]] = int(fields[1])
    missing = [name for name in files if name not in partition_of]
    if missing:
        raise ValueError(
            f"{part_path} has no partition for {len(missing)} image(s) of {attr_path}, "
            f"e.g. {missing[0]}"
        )
    partition = np.asarray([partition_of[name] for name in files], dtype=np.int8)
    return folder, files, names, attrs, partition


def _load_celeba_image(path: Path, size: int) -> np.ndarray:
    """Centre square crop, resize to ``size`` (antialiased bilinear) → ``uint8 [3, size, size]``."""
    if not path.is_file():
        raise FileNotFoundError(f"CelebA image {path} not found; {_CELEBA_HINT}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            # The aligned faces are 178x218; the centre square keeps the face, as the usual
            # CelebA pipelines (CenterCrop then Resize) do.
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode CelebA image {path}: {exc}") from None


def _chunks(index: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, index.size, size):
        yield index[start : start + size]


def prepare_celeba(
    root: str | Path,
    out_store: ObjectStore,
    prefix: str = "",
    *,
    attributes: str | Sequence[str] = ("Blond_Hair",),
    group_attribute: str = "Male",
    image_size: int = 64,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """Write CelebA from the local torchvision-format root ``root``.

    One attribute → a binary task (class 1 = the attribute is present); several → a
    multi-label task whose ``label`` is the 0/1 list of ``attributes``. The group is
    ``group_attribute`` (1 = present, so ``Male``: female 0, male 1). Splits are the official
    partition. Images are centre-cropped to a square and resized to ``image_size``.
    ``train_size``/``val_size``/``test_size`` take subsamples stratified by group and the first
    attribute, deterministic given ``seed``.
    """
    attrs_wanted = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    if not attrs_wanted:
        raise ValueError("attributes must name at least one CelebA attribute")
    if len(set(attrs_wanted)) != len(attrs_wanted):
        raise ValueError(f"attributes {list(attrs_wanted)} name an attribute twice")
    if group_attribute in attrs_wanted:
        raise ValueError(f"the group attribute {group_attribute!r} cannot also be a label")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    check_seed(seed)
    folder, files, names, attrs, partition = read_celeba_index(root)
    unknown = [a for a in (*attrs_wanted, group_attribute) if a not in names]
    if unknown:
        raise ValueError(
            f"unknown CelebA attribute(s) {unknown}; {folder / CELEBA_ATTR} has: {', '.join(names)}"
        )
    label_all = attrs[:, [names.index(a) for a in attrs_wanted]].astype(np.int64)
    group_all = attrs[:, names.index(group_attribute)].astype(np.int64)
    multilabel = len(attrs_wanted) > 1

    sizes = {"train": train_size, "val": val_size, "test": test_size}
    rngs = dict(
        zip(
            sizes,
            (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)),
            strict=True,
        )
    )
    selected: dict[str, np.ndarray] = {}
    for code, split in _CELEBA_SPLITS.items():
        idx = np.flatnonzero(partition == code)
        check_size(f"{split}_size", sizes[split], idx.size)
        if sizes[split] is not None:
            strata = group_all[idx] * 2 + label_all[idx, 0]
            idx = idx[stratified_choice(strata, int(sizes[split]), rngs[split])]
        if idx.size == 0:
            raise ValueError(f"{folder / CELEBA_PARTITION} assigns no image to the {split} split")
        selected[split] = idx

    attr_names = (attrs_wanted[0],) if not multilabel else attrs_wanted
    meta = DatasetMeta(
        name="celeba",
        task="multilabel" if multilabel else "multiclass",
        input="image",
        num_classes=len(attrs_wanted) if multilabel else 2,
        num_groups=2,
        image_shape=(3, image_size, image_size),
        class_names=attrs_wanted if multilabel else (f"not {attr_names[0]}", attr_names[0]),
        group_names=(f"not {group_attribute}", group_attribute),
        source={
            "converter": "celeba",
            "attributes": list(attrs_wanted),
            "group_attribute": group_attribute,
            "image_size": image_size,
            "seed": seed,
            "train_size": train_size,
            "val_size": val_size,
            "test_size": test_size,
        },
    )
    with DatasetWriter(out_store, prefix, meta, rows_per_part=rows_per_part) as writer:
        for split, idx in selected.items():
            for chunk in _chunks(idx, _CELEBA_CHUNK):
                images = np.stack(
                    [
                        _load_celeba_image(folder / CELEBA_IMAGES / files[i], image_size)
                        for i in chunk.tolist()
                    ]
                )
                label = label_all[chunk] if multilabel else label_all[chunk, 0]
                writer.write(
                    split, DatasetArrays(label=label, group=group_all[chunk], images=images)
                )
        return writer.close()
