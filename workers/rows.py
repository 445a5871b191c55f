"""Row-level transforms of feature and dataset batches, run inside Ray Data tasks.

Kept apart from :mod:`workers.features` on purpose: a Ray Data task imports the module of the
function it runs, and this one needs only numpy, pyarrow and Pillow (no torch, no bird_core, no
boto3), so a fresh task worker is ready in a fraction of a second instead of several. Images are
decoded by the dataset format's one decoder, :func:`bird_datasets.codec.decode_images`, to the
channel count the dataset declares (``image_shape``), exactly as validation and
:func:`workers.datasets.load_splits` decode them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from bird_datasets.codec import decode_images


def dense(column: np.ndarray) -> np.ndarray:
    """A column of equal-length float lists (an object array of arrays) as float32 ``[N, D]``."""
    if column.dtype != object and column.ndim == 2:
        return column.astype(np.float32, copy=False)
    return np.stack(column).astype(np.float32)


def decode_images_once(
    batch: dict[str, np.ndarray], image_shape: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Decode ``image`` into ``pixels`` (uint8 ``[N, C, H, W]`` for the declared
    ``image_shape``) and make the teacher's outputs dense ``[N, D]`` arrays.

    For datasets kept in memory across epochs: decoding PNGs and stacking list columns in every
    batch of every epoch of every rank would otherwise cost as much as a small student's steps.
    """
    prepared = {k: v for k, v in batch.items() if k != "image"}
    if "image" in batch:
        prepared["pixels"] = decode_images(batch["image"], image_shape)
    for name in ("embedding", "logits", "attention", "x"):
        if name in prepared:
            prepared[name] = dense(prepared[name])
    return prepared


def decode_stage(
    batch: dict[str, np.ndarray], image_shape: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Ray Data task: decode images into a ``pixels`` column ahead of the teacher actor
    (``uint8 [N, C, H, W]`` for the declared ``image_shape``).

    Decoding in stateless tasks overlaps it with the teacher's forward pass in the actor,
    instead of the actor doing both in turn.
    """
    if "image" in batch:
        batch = dict(batch)
        batch["pixels"] = decode_images(batch["image"], image_shape)
    return batch


# Columns written as float32 lists whatever dtype they arrive in: the teacher's outputs.
_FLOAT_COLUMNS = frozenset({"embedding", "logits", "attention"})


def _fixed_size_list(values: np.ndarray, dtype: type | None = None) -> pa.FixedSizeListArray:
    """``[N, D, ...]`` as a column of ``N`` fixed-size lists of ``D·...`` values."""
    arr = np.ascontiguousarray(values, dtype=dtype)
    width = int(np.prod(arr.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)


def table_for_write(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch as an Arrow table with plain fixed-size lists for every multi-dimensional column.

    Ray Data hands list columns of equal length over as 2-D arrays: the teacher's outputs, but
    also a tabular dataset's features ``x`` and multi-label ``label``. Returning Arrow (not
    numpy) keeps Ray Data from writing its own tensor extension type, so the shards read back
    with plain pyarrow anywhere.
    """
    columns: dict[str, pa.Array] = {}
    for name, values in batch.items():
        if name in _FLOAT_COLUMNS:
            columns[name] = _fixed_size_list(values, np.float32)
        elif values.dtype == object:
            columns[name] = pa.array(list(values))
        elif values.ndim > 1:
            columns[name] = _fixed_size_list(values)
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def select_ids(batch: dict[str, np.ndarray], ids: np.ndarray, keep: bool) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose ``id`` is in ``ids`` (``keep``) or is not (not ``keep``)."""
    mask = np.isin(batch["id"], ids)
    if not keep:
        mask = ~mask
    return {k: v[mask] for k, v in batch.items()}
