"""FashionMNIST-S: FashionMNIST with a skewed colour attribute, as ``bird_core`` builds it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bird_datasets.converters import ConverterOption, register_converter
from bird_datasets.converters.common import write_splits

if TYPE_CHECKING:
    from service.storage import Manifest, ObjectStore

__all__ = ["prepare_fashion_mnist_s"]

OPTIONS = (
    ConverterOption(
        "root",
        Path,
        None,
        "The folder of the FashionMNIST IDX files (default: /usr/share/datasets/fashion-mnist, "
        "from the Debian package dataset-fashion-mnist).",
    ),
    ConverterOption("skew", float, 0.95, "Majority-group share per class, in [0.5, 1]."),
    ConverterOption("train_size", int, None, "Subsample the train split.", minimum=1),
    ConverterOption(
        "test_size",
        int,
        None,
        "Subsample the test images (the test split holds each in both versions).",
        minimum=1,
    ),
)


@register_converter("fashion-mnist-s", options=OPTIONS)
def prepare_fashion_mnist_s(
    out_store: ObjectStore,
    prefix: str = "",
    *,
    skew: float = 0.95,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    root: str | Path | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """FashionMNIST-S: classes 0-4 mostly colour, 5-9 mostly grayscale (group = colour).

    Written as :func:`bird_core.data.load_fashion_mnist_s` builds it: same arguments, same
    splits, same rows in the same order (ids are contiguous: train, then val, then test),
    images PNG-encoded losslessly. ``root`` defaults to the Debian package's folder.
    """
    from bird_core.data.fashion_mnist_s import DEFAULT_ROOT, load_fashion_mnist_s

    data = load_fashion_mnist_s(
        DEFAULT_ROOT if root is None else root,
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
    return write_splits(out_store, prefix, data, source=source, rows_per_part=rows_per_part)
