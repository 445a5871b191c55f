"""Datasets in the bird format (``bird_datasets``) as ``bird_core`` :class:`DatasetSplits`.

:func:`load_splits` is how the training side reads any dataset a job names, built-in or
uploaded: it verifies the parts against the manifest, refuses rows that break the format with
a clear error, decodes images to ``uint8`` tensors, and computes the preprocessing from the
train split exactly as the built-in loaders do.
"""

from __future__ import annotations

import numpy as np
import torch

from bird_core.data.base import DatasetSplits, Split
from bird_core.data.fashion_mnist_s import _channel_stats
from bird_datasets.format import SPLITS, DatasetFormatError, DatasetMeta
from bird_datasets.location import resolve_dataset_uri
from bird_datasets.reader import check_table, read_dataset, split_arrays
from service.settings import Settings
from service.storage import ObjectStore, validate_prefix

__all__ = ["load_splits", "load_splits_from_uri", "preprocessing_for"]

# How many problems a load error quotes before pointing at `bird datasets validate`.
_QUOTED_PROBLEMS = 5


def preprocessing_for(meta: DatasetMeta, train_x: np.ndarray) -> dict:
    """The ``Preprocessor`` config for a dataset, computed from its raw train inputs.

    Images: per-channel mean/std of ``x / 255`` (as the built-in image loaders). Tabular:
    per-feature mean/std, with constant features given std 1 (as :func:`load_adult`).
    """
    if meta.input == "image":
        mean, std = _channel_stats(train_x)
        return {"kind": "image", "mean": mean, "std": std, "size": None}
    values = train_x.astype(np.float64)
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    # A constant column (e.g. a category absent from the train split) would divide by zero.
    std[std < 1e-12] = 1.0
    return {"kind": "tabular", "mean": mean.tolist(), "std": std.tolist(), "size": None}


def load_splits(store: ObjectStore, prefix: str = "") -> DatasetSplits:
    """Load the dataset at ``prefix`` of ``store`` for training.

    ``x`` is ``uint8 [N, C, H, W]`` (images) or ``float32 [N, D]`` (tabular), unnormalised;
    ``label`` is ``int64 [N]`` or, multi-label, ``float32 [N, A]`` of 0/1; ``group`` is
    ``int64 [N]``. Raises :class:`~bird_datasets.format.DatasetFormatError` (naming the dataset and
    the first problems) when the rows break the format, and the storage errors of
    :func:`~bird_datasets.reader.read_dataset`.
    """
    meta, table = read_dataset(store, prefix)
    uri = store.uri(validate_prefix(prefix))
    problems = check_table(meta, table, file=uri)
    if problems:
        quoted = "; ".join(
            p.message if p.column is None else f"{p.column}: {p.message}"
            for p in problems[:_QUOTED_PROBLEMS]
        )
        more = (
            f" (and {len(problems) - _QUOTED_PROBLEMS} more)"
            if len(problems) > _QUOTED_PROBLEMS
            else ""
        )
        raise DatasetFormatError(
            f"the dataset at {uri} is not usable: {quoted}{more}; "
            f"run `bird datasets validate {uri}` for the full report",
            uri,
        )
    splits: dict[str, Split] = {}
    train_x: np.ndarray | None = None
    for name in SPLITS:
        arrays = split_arrays(meta, table, name)
        x = arrays["images"] if meta.input == "image" else arrays["x"]
        if name == "train":
            train_x = x
        label = arrays["label"]
        # bird_core's losses take multi-label targets as float 0/1 (BCE), classes as int64.
        label_t = (
            torch.from_numpy(label.astype(np.float32))
            if meta.task == "multilabel"
            else torch.from_numpy(label)
        )
        splits[name] = Split(torch.from_numpy(x), label_t, torch.from_numpy(arrays["group"]))
    assert train_x is not None
    return DatasetSplits(
        name=meta.name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=meta.num_classes,
        num_groups=meta.num_groups,
        task=meta.task,
        preprocessing=preprocessing_for(meta, train_x),
        group_names=tuple(meta.group_label(g) for g in range(meta.num_groups)),
        class_names=tuple(meta.class_label(c) for c in range(meta.num_classes)),
    )


def load_splits_from_uri(uri: str, settings: Settings | None = None) -> DatasetSplits:
    """:func:`load_splits` for a dataset URI (``s3://bucket/prefix`` or a local directory,
    resolved by :func:`bird_datasets.location.resolve_dataset_uri`), with the S3 endpoint and
    credentials from ``settings`` (default: the ``BIRD_*`` env)."""
    store, prefix = resolve_dataset_uri(uri, settings or Settings())
    return load_splits(store, prefix)
