"""Datasets as in-memory train/val/test splits, and a small registry to load them by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from bird_core.data.adult import load_adult
from bird_core.data.base import DatasetSplits, Split
from bird_core.data.fashion_mnist_s import colourise, gray_to_rgb, load_fashion_mnist_s

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "Split",
    "colourise",
    "dataset_options",
    "gray_to_rgb",
    "load_adult",
    "load_dataset",
    "load_fashion_mnist_s",
]

# Name → loader. Each loader takes its options as keyword arguments and returns DatasetSplits.
DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "fashion-mnist-s": load_fashion_mnist_s,
    "adult": load_adult,
}


def dataset_options(name: str) -> tuple[str, ...]:
    """The option names :func:`load_dataset` accepts for dataset ``name``."""
    loader = _loader(name)
    return tuple(inspect.signature(loader).parameters)


def _loader(name: str) -> Callable[..., DatasetSplits]:
    # Tolerate "Fashion_MNIST_S" from config files and CLIs, which commonly use underscores.
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def load_dataset(name: str, **options: Any) -> DatasetSplits:
    """Load dataset ``name`` (see :data:`DATASETS`) with the loader's keyword ``options``.

    Unknown names raise ``ValueError`` and unknown options ``TypeError``, each listing what is
    valid, so a typo in a config fails loudly instead of silently using a default.
    """
    loader = _loader(name)
    valid = tuple(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return loader(**options)
