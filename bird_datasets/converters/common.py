"""What several converters share: writing ``bird_core`` splits out, option checks."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bird_datasets.format import DatasetMeta
from bird_datasets.writer import DatasetArrays, write_dataset

if TYPE_CHECKING:
    from bird_core.data import DatasetSplits, Split
    from service.storage import Manifest, ObjectStore

__all__ = ["check_skew", "split_to_arrays", "write_splits"]


def split_to_arrays(split: Split, task: str) -> DatasetArrays:
    """A ``bird_core`` :class:`~bird_core.data.Split` (raw ``x``) as arrays for the writer."""
    x = split.x.numpy()
    label = split.label.numpy()
    if task == "multilabel":
        # bird_core keeps multi-label targets as float 0/1 (for BCE); the format stores ints.
        label = np.rint(label).astype(np.int64)
    images, features = (x, None) if x.dtype == np.uint8 and x.ndim == 4 else (None, x)
    return DatasetArrays(label=label, group=split.group.numpy(), images=images, x=features)


def write_splits(
    store: ObjectStore,
    prefix: str,
    data: DatasetSplits,
    *,
    source: dict[str, Any],
    feature_names: Sequence[str] = (),
    rows_per_part: int | None = None,
) -> Manifest:
    """Write a ``bird_core`` :class:`DatasetSplits` (raw ``x``, no preprocessing) as a dataset."""
    train_x = data.train.x.numpy()
    is_image = train_x.dtype == np.uint8 and train_x.ndim == 4
    shape = tuple(train_x.shape[1:])
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
        "train": split_to_arrays(data.train, data.task),
        "val": split_to_arrays(data.val, data.task),
        "test": split_to_arrays(data.test, data.task),
    }
    return write_dataset(store, prefix, splits=splits, meta=meta, rows_per_part=rows_per_part)


def check_skew(skew: float) -> None:
    """Raise ``ValueError`` unless ``skew`` (the majority group's share) lies in [0.5, 1]."""
    if isinstance(skew, bool) or not isinstance(skew, numbers.Real) or not 0.5 <= skew <= 1.0:
        raise ValueError(f"skew must be a number in [0.5, 1], got {skew!r}")
