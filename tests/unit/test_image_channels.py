"""One channel rule for images: decoded to the channels the dataset declares, everywhere.

A dataset declared with C channels may store PNGs of any mode (grayscale, palette, RGBA, ...).
Validation, the training loader (``split_arrays``/``load_splits``) and the Ray Data row
transforms (``workers/rows.py``) must all decode them to the same ``uint8 [N, C, H, W]``; the
student is built for C input channels, and a pretrained RGB teacher gets three.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bird_datasets.codec import decode_image, decode_images
from bird_datasets.format import DatasetMeta
from bird_datasets.reader import read_dataset, split_arrays
from bird_datasets.validation import validate_dataset
from service.settings import Settings
from service.storage import LocalStore, Manifest, publish
from workers.datasets import load_splits
from workers.features import FeatureSet, match_teacher_channels
from workers.rows import decode_images_once, decode_stage

H, W = 5, 7  # non-square, to catch H/W mix-ups
ROWS_PER_SPLIT = 4


def _stored_png(mode: str, rng: np.random.Generator) -> bytes:
    """A PNG of Pillow ``mode`` with random pixels."""
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 8, (H, W), dtype=np.uint8), mode="P")
        image.putpalette(rng.integers(0, 256, 8 * 3, dtype=np.uint8).tolist())
    else:
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (H, W, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _publish(store: LocalStore, prefix: str, channels: int, images: list[bytes]) -> None:
    """A dataset written by hand (as a user would), declaring ``channels`` channels."""
    n = len(images)
    splits = ["train", "val", "test"] * (n // 3)
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "image": pa.array(images, pa.binary()),
            "label": np.arange(n, dtype=np.int64) % 2,
            "group": (np.arange(n, dtype=np.int64) // 3) % 2,
            "split": splits,
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    metadata = DatasetMeta(
        name="modes",
        task="multiclass",
        input="image",
        num_classes=2,
        num_groups=2,
        image_shape=(channels, H, W),
    ).to_metadata()
    publish(store, prefix, {"part-00000.parquet": sink.getvalue()}, metadata=metadata)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("stored", ["L", "P", "RGB", "RGBA", "LA"])
def test_every_reader_decodes_to_the_declared_channels(tmp_path: Path, channels: int, stored):
    rng = np.random.default_rng(channels * 10 + len(stored))
    images = [_stored_png(stored, rng) for _ in range(3 * ROWS_PER_SPLIT)]
    store = LocalStore(tmp_path / "store")
    _publish(store, "ds", channels, images)
    shape = (channels, H, W)

    # What Pillow's conversion to the declared mode gives: the reference.
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    expected = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(b)).convert(mode)).reshape(H, W, channels)
            for b in images
        ]
    ).transpose(0, 3, 1, 2)

    # Validation decodes each image with decode_image and accepts the dataset.
    report = validate_dataset(store, "ds")
    assert report.ok and report.images_checked == len(images), report.summary()
    validated = np.stack([decode_image(b, shape) for b in images]).transpose(0, 3, 1, 2)

    # The training loader (through read_dataset/split_arrays).
    meta, table = read_dataset(store, "ds")
    loaded = {s: split_arrays(meta, table, s)["images"] for s in ("train", "val", "test")}
    data = load_splits(store, "ds")

    # The Ray Data row transforms, on a batch as Ray Data hands it over (object array of bytes).
    batch = {"id": np.arange(len(images)), "image": np.array(images, dtype=object)}
    staged = decode_stage(batch, image_shape=meta.image_shape)["pixels"]
    once = decode_images_once(batch, image_shape=meta.image_shape)["pixels"]

    for got in (validated, staged, once):
        assert got.dtype == np.uint8 and got.shape == (len(images), channels, H, W)
        np.testing.assert_array_equal(got, expected)
    for split, rows in (("train", slice(0, None, 3)), ("val", slice(1, None, 3))):
        np.testing.assert_array_equal(loaded[split], expected[rows])
        assert getattr(data, split).x.shape[1] == channels
    assert len(data.preprocessing["mean"]) == channels


def test_an_image_of_the_wrong_size_names_its_row():
    rng = np.random.default_rng(0)
    good = _stored_png("RGB", rng)
    small = io.BytesIO()
    Image.new("RGB", (W, H + 1)).save(small, format="PNG")
    column = np.array([good, small.getvalue()], dtype=object)
    with pytest.raises(ValueError, match=r"row 1: the image is 6x7 \(HxW\), expected 5x7"):
        decode_stage({"image": column}, image_shape=(3, H, W))
    # Without a declared shape, the first image sets it (RGB unless it is single-channel).
    gray = _stored_png("L", rng)
    assert decode_images([gray, gray]).shape == (2, 1, H, W)
    assert decode_images(pa.array([good, good], pa.binary())).shape == (2, 3, H, W)


def test_a_pretrained_rgb_teacher_gets_three_channels():
    gray = torch.randint(0, 256, (2, 1, H, W), dtype=torch.uint8)
    rgba = torch.randint(0, 256, (2, 4, H, W), dtype=torch.uint8)
    # As Pillow's convert("RGB"): gray on three equal channels, RGBA without its alpha.
    assert torch.equal(match_teacher_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    assert torch.equal(match_teacher_channels(rgba, 3), rgba[:, :3])
    # A teacher trained by bird on the dataset itself takes its channels as they are.
    assert match_teacher_channels(gray, 1) is gray
    assert match_teacher_channels(rgba, 4) is rgba


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_the_student_is_built_for_the_declared_channels(channels: int):
    from service.spec import JobSpec
    from workers.train import plan_training

    meta = DatasetMeta(
        name="modes",
        task="multiclass",
        input="image",
        num_classes=2,
        num_groups=2,
        image_shape=(channels, H, W),
    )
    preprocessing = {"kind": "image", "mean": [0.5] * channels, "std": [0.25] * channels}
    manifest = Manifest(
        created_at=datetime.now(timezone.utc),
        files={},
        metadata={"preprocessing": {**preprocessing, "size": None}, "counts": {"train": 8}},
    )
    spec = JobSpec.model_validate(
        {"dataset": {"uri": "datasets/x"}, "student": {"model": "small_cnn"}}
    )
    plan = plan_training(
        spec,
        store_url="file:///tmp/unused",
        settings=Settings(),
        features=FeatureSet("key", "features/key", manifest),
        dataset_meta=meta,
        checkpoint_base=None,
    )
    assert plan.student_options["in_channels"] == channels
    assert plan.image_shape == (channels, H, W)
