"""The one image codec of the bird dataset format: PNG out, anything Pillow reads in.

One channel rule for every reader: an image is decoded to the channel count the dataset
declares (``image_shape[0]``: 1 = ``L``, 3 = ``RGB``, 4 = ``RGBA``), whatever mode it was
stored in, and must have the declared height and width. Validation, the training loader and
the Ray Data row transforms (``workers/rows.py``) all decode through :func:`decode_images`, so
a grayscale, palette or RGBA PNG gives the same pixels everywhere.

numpy, pyarrow and Pillow only: Ray Data tasks import this module, and must not pay for torch,
boto3 or the rest of the package.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

__all__ = ["CHANNEL_MODES", "decode_image", "decode_images", "encode_images"]

# Pillow modes for the channel counts an image dataset may declare.
CHANNEL_MODES: dict[int, str] = {1: "L", 3: "RGB", 4: "RGBA"}


def encode_images(images: np.ndarray) -> list[bytes]:
    """PNG-encode ``uint8 [N, C, H, W]`` images (C = 1, 3 or 4), one ``bytes`` per image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in CHANNEL_MODES:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    # One vectorised transpose to the HWC layout Pillow wants, instead of one per image.
    hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    if images.shape[1] == 1:
        hwc = hwc[..., 0]
    mode = CHANNEL_MODES[images.shape[1]]
    out: list[bytes] = []
    for image in hwc:
        buffer = io.BytesIO()
        # compress_level 6 is zlib's default: about as small as 9 for these small images at a
        # fraction of the time.
        Image.fromarray(image, mode=mode).save(buffer, format="PNG", compress_level=6)
        out.append(buffer.getvalue())
    return out


def decode_image(data: bytes | None, shape: Sequence[int]) -> np.ndarray:
    """Decode one encoded image to ``uint8 [H, W, C]`` for the declared ``shape`` ``(C, H, W)``.

    Raises ``ValueError`` with the reason when the image is null, cannot be decoded or is not
    ``H x W``.
    """
    if data is None:
        raise ValueError("the image is null")
    channels, height, width = (int(v) for v in shape)
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Check the header before decoding pixels, so a huge or wrong image costs nothing.
            if image.size != (width, height):
                raise ValueError(
                    f"the image is {image.size[1]}x{image.size[0]} (HxW), expected {height}x{width}"
                )
            array = np.asarray(image.convert(CHANNEL_MODES[channels]))
    except UnidentifiedImageError:
        raise ValueError("the image cannot be decoded (not a format Pillow reads)") from None
    except (OSError, SyntaxError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError depending on codec.
        raise ValueError(f"the image cannot be decoded ({exc})") from None
    return array if channels != 1 else array[..., None]


def _first_shape(first: bytes | None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` an undeclared column takes from its first image: RGB unless that
    image is single-channel."""
    if first is None:
        raise ValueError("row 0: the image is null")
    try:
        with Image.open(io.BytesIO(first)) as image:
            return (1 if image.mode in ("L", "1", "I;16") else 3, image.size[1], image.size[0])
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError("row 0: the image cannot be decoded") from None


def decode_images(
    column: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[bytes],
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Decode a column of encoded images (PNG, JPEG, ...) to ``uint8 [N, C, H, W]``.

    ``column`` is an Arrow binary column, a numpy object array of ``bytes`` (a Ray Data batch)
    or any sequence of ``bytes``. ``shape`` is the declared ``(C, H, W)``: every image is
    converted to its channel count (L, RGB, RGBA) and must have its height and width. Without
    ``shape`` the first image sets it (RGB unless that image is single-channel). Raises
    ``ValueError`` naming the row of the first image that is null, undecodable or of the wrong
    size.
    """
    values: Iterable[Any]
    is_arrow = isinstance(column, pa.ChunkedArray | pa.Array)
    if is_arrow:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        # One chunk (row group) of Python bytes at a time: bounded memory, no per-row scalars.
        values = (value for chunk in chunks for value in chunk.to_pylist())
    else:
        values = column
    n = len(column)
    if shape is None:
        if n == 0:
            raise ValueError("cannot infer the image shape of an empty column; pass shape")
        shape = _first_shape(column[0].as_py() if is_arrow else column[0])
    c, h, w = (int(v) for v in shape)
    if c not in CHANNEL_MODES:
        raise ValueError(f"shape must be (C, H, W) with C in {sorted(CHANNEL_MODES)}, got {shape}")
    out = np.empty((n, h, w, c), dtype=np.uint8)
    for row, data in enumerate(values):
        try:
            out[row] = decode_image(data, (c, h, w))
        except ValueError as exc:
            raise ValueError(f"row {row}: {exc}") from None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
