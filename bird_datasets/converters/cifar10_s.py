"""CIFAR10-S (Wang et al., 2020): CIFAR-10 with a skewed colour attribute, from a local
torchvision-format CIFAR-10 root.

Group 1 is the original colour image, group 0 its grayscale version; the skew is drawn by
:func:`bird_core.data.fashion_mnist_s.skewed_colour_mask`, as for FashionMNIST-S.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bird_datasets.converters import ConverterOption, register_converter
from bird_datasets.converters.common import check_skew
from bird_datasets.format import DatasetMeta
from bird_datasets.writer import DatasetArrays, write_dataset

if TYPE_CHECKING:
    from service.storage import Manifest, ObjectStore

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_FILES",
    "check_cifar10_root",
    "luminance",
    "prepare_cifar10_s",
    "read_cifar10",
]

OPTIONS = (
    ConverterOption(
        "root",
        Path,
        None,
        "The local CIFAR-10 root (cifar-10-batches-py/ as torchvision unpacks it, or its parent).",
        required=True,
    ),
    ConverterOption("skew", float, 0.95, "Majority-group share per class, in [0.5, 1]."),
    ConverterOption("train_size", int, None, "Subsample the train split.", minimum=1),
    ConverterOption("val_size", int, None, "Subsample the val split.", minimum=1),
    ConverterOption(
        "test_size",
        int,
        None,
        "Subsample the test images (the test split holds each in both versions).",
        minimum=1,
    ),
)

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


@register_converter(
    "cifar10-s",
    options=OPTIONS,
    check=lambda options: check_cifar10_root(options["root"]),
)
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
    """CIFAR10-S (Wang et al., 2020) from a local torchvision-format CIFAR-10 folder.

    Group 1 is the original colour image, group 0 its grayscale version (the luminance on all
    three channels). Train and val: in classes 0–4 a fraction ``skew`` of the images is colour,
    in classes 5–9 a fraction ``skew`` is grayscale; val is a class-stratified ``val_fraction``
    of the 50k training images, carved out first. Test: every test image in both versions
    (grayscale block first). ``train_size``/``val_size``/``test_size`` take class-stratified
    subsamples before the versions are built (the test split then has ``2 * test_size`` rows).
    Deterministic given ``seed``; the validation split does not depend on ``train_size``.
    """
    from bird_core.data.fashion_mnist_s import (
        check_fraction,
        check_seed,
        check_size,
        gray_to_rgb,
        skewed_colour_mask,
        stratified_choice,
    )

    check_skew(skew)
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
        is_colour = skewed_colour_mask(labels, skew, rng, CIFAR10_COLOURED_CLASSES)
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
