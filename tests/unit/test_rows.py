"""Row transforms of the Ray Data stages: what Ray hands over is written as plain Arrow lists."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.features import rows_as_tensors
from workers.rows import table_for_write


def _round_trip(table: pa.Table) -> dict[str, np.ndarray]:
    """The table written as a Parquet shard and read back as a numpy batch."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    read = pq.read_table(io.BytesIO(buffer.getvalue()))
    return {name: read.column(name).to_numpy(zero_copy_only=False) for name in read.column_names}


def test_tabular_features_and_multilabel_labels_arriving_2d_are_written_as_lists():
    # Ray Data turns equal-length list columns into 2-D arrays: the tabular `x`, a multi-label
    # `label`, and the teacher's outputs all arrive that way.
    rng = np.random.default_rng(0)
    batch = {
        "id": np.arange(4, dtype=np.int64),
        "x": rng.normal(size=(4, 11)).astype(np.float32),
        "label": np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=np.int64),
        "group": np.array([0, 1, 0, 1], dtype=np.int64),
        "split": np.array(["train", "train", "val", "test"], dtype=object),
        "embedding": rng.normal(size=(4, 6)),  # float64 in: written as float32
        "logits": rng.normal(size=(4, 3)).astype(np.float32),
    }
    table = table_for_write(batch)
    assert table.schema.field("x").type == pa.list_(pa.float32(), 11)
    assert table.schema.field("label").type == pa.list_(pa.int64(), 3)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 6)
    assert table.schema.field("split").type == pa.string()

    rows = _round_trip(table)
    tensors = rows_as_tensors(rows)
    np.testing.assert_array_equal(tensors["x"].numpy(), batch["x"])
    np.testing.assert_array_equal(tensors["label"].numpy(), batch["label"].astype(np.float32))
    np.testing.assert_allclose(
        tensors["teacher_embedding"].numpy(), batch["embedding"].astype(np.float32)
    )
    np.testing.assert_array_equal(tensors["group"].numpy(), batch["group"])


def test_an_empty_batch_keeps_its_list_widths():
    batch = {
        "id": np.zeros(0, dtype=np.int64),
        "x": np.zeros((0, 5), dtype=np.float32),
        "embedding": np.zeros((0, 4), dtype=np.float32),
    }
    table = table_for_write(batch)
    assert table.num_rows == 0
    assert table.schema.field("x").type == pa.list_(pa.float32(), 5)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
