"""FashionMNIST-S: FashionMNIST with a spurious colour attribute, built like CIFAR10-S.

CIFAR10-S (Wang et al., 2020, "Towards Fairness in Visual Recognition") skews the colour of the
images per class so that colour becomes a shortcut for the label; the sensitive group is the
colour version. We do the same on FashionMNIST, which ships on disk as a Debian package, so that
experiments need no download:

* group 0, **grayscale**: the gray image replicated on three channels;
* group 1, **colour**: the gray intensity multiplied by a random per-image RGB tint (a random hue,
  saturation in :data:`SATURATION_RANGE`, value 1), so the object is coloured and the black
  background stays black.

Train and validation: in classes 0–4 a fraction ``skew`` of the images is coloured, in classes
5–9 a fraction ``skew`` is grayscale. Test: every test image appears in both versions (grayscale
block first, then the colour block in the same image order), so the test set is balanced over
class × group.
"""

from __future__ import annotations

import functools
import gzip
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bird_core.data.base import DatasetSplits, Split

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "GROUP_NAMES",
    "SATURATION_RANGE",
    "colourise",
    "gray_to_rgb",
    "hsv_to_rgb",
    "load_fashion_mnist_s",
    "read_fashion_mnist",
    "read_idx",
    "skewed_colour_mask",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
GROUP_NAMES: tuple[str, ...] = ("grayscale", "colour")
# Saturation of the tint, drawn uniformly per image. Below ~0.7 the tint gets close to white and
# the "colour" version becomes hard to tell from the grayscale one, which would blur the groups.
SATURATION_RANGE: tuple[float, float] = (0.7, 1.0)
# Classes whose images are mostly coloured in train/val; the other classes are mostly grayscale.
COLOURED_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)

_INSTALL_HINT = (
    "the Debian package providing it is installed with `apt-get install dataset-fashion-mnist`"
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of dims.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
# Images are colourised this many at a time so the float32 temporaries stay around 40 MB instead
# of growing with the dataset (60k images would need ~0.6 GB at once).
_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Raw IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed if its name ends in ``.gz``).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` (naming the file)
    when it is not a valid IDX file, or its magic number is not ``expected_magic``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FashionMNIST file {path} not found; {_INSTALL_HINT}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise ValueError(f"cannot read {path} ({err}); it looks corrupt, {_INSTALL_HINT}") from err
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file; {_INSTALL_HINT}")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or ndim == 0:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file (magic {magic:#010x}); {_INSTALL_HINT}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path} has IDX magic {magic:#010x}, expected {expected_magic:#010x}; {_INSTALL_HINT}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its IDX header; {_INSTALL_HINT}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header} data bytes but its header {shape} needs "
            f"{expected}; the file looks corrupt, {_INSTALL_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    """``root/stem.gz``, or the uncompressed ``root/stem`` (torchvision's raw layout) if only
    that one exists; the ``.gz`` path otherwise, so the error names the expected file."""
    gz = root / f"{stem}.gz"
    plain = root / stem
    return plain if not gz.exists() and plain.is_file() else gz


@functools.lru_cache(maxsize=4)
def _read_cached(
    images_path: str, labels_path: str, _stamp: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    # Decompressing the 26 MB training file is most of the load time; repeated loads (tests,
    # sweeps over seeds or skews) reuse it. ``_stamp`` (mtime/size) invalidates on change.
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{images_path} must be [N, H, W] and {labels_path} must be [N]; got "
            f"{images.shape} and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path} has labels outside 0..{len(CLASS_NAMES) - 1}")
    # The arrays are cached and shared: keep them read-only (np.frombuffer already is).
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def read_fashion_mnist(
    root: str | Path = DEFAULT_ROOT, split: Literal["train", "test"] = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """The raw FashionMNIST ``split``: read-only ``uint8 [N, 28, 28]`` images and ``int64 [N]``
    labels, read from the IDX files under ``root``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FashionMNIST folder {root} does not exist; {_INSTALL_HINT}")
    paths = [_find(root, stem) for stem in _FILES[split]]
    stamp: list[int] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"FashionMNIST file {path} not found; {_INSTALL_HINT}")
        st = os.stat(path)
        stamp += [st.st_mtime_ns, st.st_size]
    return _read_cached(str(paths[0]), str(paths[1]), tuple(stamp))


# --------------------------------------------------------------------------------------------
# Colour versions
# --------------------------------------------------------------------------------------------


def hsv_to_rgb(
    hues: np.ndarray | float, saturations: np.ndarray | float, values: np.ndarray | float = 1.0
) -> np.ndarray:
    """Vectorised HSV → RGB: ``float32 [N, 3]`` in [0, 1] (hue is cyclic, taken modulo 1)."""
    h, s, v = np.broadcast_arrays(
        np.atleast_1d(np.asarray(hues, dtype=np.float64)) % 1.0,
        np.atleast_1d(np.asarray(saturations, dtype=np.float64)),
        np.atleast_1d(np.asarray(values, dtype=np.float64)),
    )
    # Closed form of the piecewise HSV hexcone: channel n in (R, G, B) = (5, 3, 1).
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v[:, None] * (1.0 - s[:, None] * ramp)).astype(np.float32)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """The grayscale version: ``uint8 [N, H, W]`` → ``uint8 [N, 3, H, W]``, equal channels."""
    gray = np.asarray(gray)
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be uint8 [N, H, W], got {gray.dtype} {gray.shape}")
    return np.repeat(gray[:, None], 3, axis=1)


def colourise(
    gray: np.ndarray, hues: np.ndarray | float, saturations: np.ndarray | float
) -> np.ndarray:
    """The colour version: gray intensity times the RGB tint ``HSV(hue, saturation, 1)``.

    ``gray`` is ``uint8 [N, H, W]``; ``hues`` and ``saturations`` are scalars or ``[N]`` arrays
    (hue in [0, 1), cyclic; saturation in [0, 1]). Returns ``uint8 [N, 3, H, W]``. Because the
    value is 1, the brightest channel of every pixel equals its gray intensity, so the channel
    maximum of a colour image gives back the gray image exactly.
    """
    gray = np.asarray(gray)
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be uint8 [N, H, W], got {gray.dtype} {gray.shape}")
    n = gray.shape[0]
    try:
        h = np.broadcast_to(np.asarray(hues, dtype=np.float64), (n,))
        s = np.broadcast_to(np.asarray(saturations, dtype=np.float64), (n,))
    except ValueError as err:
        raise ValueError(f"hues and saturations must be scalars or [{n}] arrays: {err}") from err
    if not np.all(np.isfinite(h)):
        raise ValueError("hues must be finite")
    if np.any((s < 0) | (s > 1)) or not np.all(np.isfinite(s)):
        raise ValueError("saturations must lie in [0, 1]")
    tint = hsv_to_rgb(h, s)[:, :, None, None]  # [N, 3, 1, 1]
    out = np.empty((n, 3, *gray.shape[1:]), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        scaled = gray[start:stop, None].astype(np.float32) * tint[start:stop]
        # tint <= 1, so the product never exceeds 255 and the cast cannot wrap.
        out[start:stop] = np.rint(scaled, out=scaled).astype(np.uint8)
    return out


def _build_versions(
    gray: np.ndarray, is_colour: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Grayscale rows where ``is_colour`` is false, randomly tinted rows where it is true."""
    out = gray_to_rgb(gray)
    idx = np.flatnonzero(is_colour)
    hues = rng.random(idx.size)
    sats = rng.uniform(SATURATION_RANGE[0], SATURATION_RANGE[1], idx.size)
    out[idx] = colourise(gray[idx], hues, sats)
    return out


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Split ``size`` over strata proportionally to ``counts`` (largest remainder, exact total)."""
    quota = counts * (size / counts.sum())
    take = np.floor(quota).astype(np.int64)
    # Ties go to the earlier stratum (stable sort) so the allocation is deterministic.
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: size - int(take.sum())]] += 1
    return np.minimum(take, counts)


def stratified_choice(strata: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``size`` rows drawn without replacement, proportionally per stratum."""
    _, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    take = _allocate(counts, size)
    chosen = [
        rng.choice(np.flatnonzero(inverse == i), int(k), replace=False)
        for i, k in enumerate(take)
        if k > 0
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def skewed_colour_mask(
    labels: np.ndarray,
    skew: float,
    rng: np.random.Generator,
    coloured: Sequence[int] = COLOURED_CLASSES,
) -> np.ndarray:
    """Which rows get the colour version: exactly ``round(skew * n_c)`` rows of each class c in
    ``coloured`` and exactly ``round(skew * n_c)`` grayscale rows of every other class.

    The skew of FashionMNIST-S and CIFAR10-S alike (the CIFAR10-S converter calls this too).
    """
    # Exact per-class counts instead of independent coin flips: the skew is then what was asked
    # for even on small subsamples, and the split stays reproducible across numpy versions.
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels).tolist():
        rows = np.flatnonzero(labels == c)
        majority = round(skew * rows.size)
        n_colour = majority if c in coloured else rows.size - majority
        mask[rng.choice(rows, n_colour, replace=False)] = True
    return mask


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``x / 255`` for ``uint8 [N, C, H, W]``, exact and cheap."""
    # A 256-bin histogram per channel gives exact moments without a float copy of the data.
    means: list[float] = []
    stds: list[float] = []
    levels = np.arange(256, dtype=np.float64) / 255.0
    for c in range(x.shape[1]):
        hist = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        mean = float(hist @ levels / total)
        var = float(hist @ (levels - mean) ** 2 / total)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5 or 1.0)
    return means, stds


def check_size(name: str, value: int | None, available: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is None or an int in [1, available]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if value > available:
        raise ValueError(f"{name}={value} is larger than the {available} rows available")


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 < value < 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def check_seed(seed: int) -> None:
    """Raise ``ValueError`` unless ``seed`` is a non-negative integer (numpy's requirement)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def load_fashion_mnist_s(
    root: str | Path = DEFAULT_ROOT,
    *,
    skew: float = 0.95,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> DatasetSplits:
    """Load FashionMNIST-S from the IDX files under ``root``.

    ``skew`` (in [0.5, 1]) is the fraction of coloured images in classes 0–4 and of grayscale
    images in classes 5–9, in train and validation. ``val_fraction`` of the 60k training images
    (stratified by class) form the validation split, carved out first. ``train_size`` and
    ``test_size`` take class-stratified subsamples of the remaining train images and of the 10k
    test images before the versions are built (the test split then has ``2 * test_size`` rows).
    Everything is deterministic given ``seed``; the validation split depends on ``seed`` and
    ``val_fraction`` only, not on the subsample sizes.

    ``x`` is ``uint8 [N, 3, 28, 28]``; ``group`` is 0 for grayscale and 1 for colour.
    """
    if isinstance(skew, bool) or not isinstance(skew, numbers.Real) or not 0.5 <= skew <= 1.0:
        raise ValueError(f"skew must be a number in [0.5, 1], got {skew!r}")
    check_fraction("val_fraction", val_fraction)
    check_seed(seed)

    train_images, train_labels = read_fashion_mnist(root, "train")
    test_images, test_labels = read_fashion_mnist(root, "test")

    n_val = round(val_fraction * train_labels.size)
    if not 0 < n_val < train_labels.size:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty train or validation split "
            f"of {train_labels.size} images"
        )
    check_size("train_size", train_size, train_labels.size - n_val)
    check_size("test_size", test_size, test_labels.size)

    # One independent stream per step, so e.g. changing train_size leaves val and test unchanged.
    (
        rng_val,
        rng_train_sub,
        rng_train_ver,
        rng_val_ver,
        rng_test_sub,
        rng_test_ver,
    ) = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6))

    val_idx = stratified_choice(train_labels, n_val, rng_val)
    train_idx = np.setdiff1d(np.arange(train_labels.size), val_idx, assume_unique=True)
    if train_size is not None:
        train_idx = train_idx[stratified_choice(train_labels[train_idx], train_size, rng_train_sub)]
    test_idx = np.arange(test_labels.size)
    if test_size is not None:
        test_idx = stratified_choice(test_labels, test_size, rng_test_sub)

    def skewed(idx: np.ndarray, rng: np.random.Generator) -> Split:
        labels = train_labels[idx]
        is_colour = skewed_colour_mask(labels, skew, rng)
        x = _build_versions(train_images[idx], is_colour, rng)
        return Split(
            torch.from_numpy(x),
            torch.from_numpy(labels),
            torch.from_numpy(is_colour.astype(np.int64)),
        )

    train = skewed(train_idx, rng_train_ver)
    val = skewed(val_idx, rng_val_ver)

    gray = test_images[test_idx]
    labels = test_labels[test_idx]
    n = labels.size
    colour = colourise(
        gray, rng_test_ver.random(n), rng_test_ver.uniform(*SATURATION_RANGE, size=n)
    )
    test = Split(
        torch.from_numpy(np.concatenate([gray_to_rgb(gray), colour])),
        torch.from_numpy(np.concatenate([labels, labels])),
        torch.from_numpy(np.repeat(np.array([0, 1], dtype=np.int64), n)),
    )

    mean, std = _channel_stats(train.x.numpy())
    return DatasetSplits(
        name="fashion-mnist-s",
        train=train,
        val=val,
        test=test,
        num_classes=len(CLASS_NAMES),
        num_groups=len(GROUP_NAMES),
        task="multiclass",
        preprocessing={"kind": "image", "mean": mean, "std": std, "size": None},
        group_names=GROUP_NAMES,
        class_names=CLASS_NAMES,
    )
