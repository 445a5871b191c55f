"""A folder of images plus a CSV of labels and groups, imported into the bird format.

The CSV has a header and one row per image::

    path,label,group,split
    cats/001.png,cat,female,train
    dogs/017.jpg,dog,male,test

``path`` is relative to the image folder (default: the CSV's own folder), ``label`` and
``group`` are names or integer indices, ``split`` (optional) is ``train``, ``val`` or ``test``;
without it the rows are split at random, stratified by class and group. Images may be anything
Pillow reads; they are converted to the channel count of the first image (grayscale 1, RGBA 4,
anything else 3) or to ``channels``, and must all have the first image's size unless
``image_size`` resizes them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bird_datasets.codec import CHANNEL_MODES
from bird_datasets.format import SPLITS, DatasetMeta
from bird_datasets.importers import (
    DatasetImportError,
    assign_splits,
    check_label_groups,
    index_column,
)
from bird_datasets.writer import DatasetArrays, DatasetWriter
from service.storage import Manifest, ObjectStore

__all__ = ["IMAGE_CSV_COLUMNS", "import_image_folder"]

IMAGE_CSV_COLUMNS = ("path", "label", "group", "split")
_REQUIRED = ("path", "label", "group")
# Images decoded and written at a time: bounded memory whatever the dataset's size.
_CHUNK = 512
# The largest side an imported image may be resized to or have (a guard against a typo).
MAX_SIDE = 4096


def _read_csv(path: Path) -> tuple[list[dict[str, str]], bool]:
    """The CSV's rows and whether it has a split column; errors name the file and line."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetImportError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetImportError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with handle:
        try:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            if not header:
                raise DatasetImportError(f"{path}: empty file: it needs a header line")
            unknown = [name for name in header if name not in IMAGE_CSV_COLUMNS]
            if unknown:
                raise DatasetImportError(
                    f"{path}: unknown column {unknown[0]!r} in the header; the columns are "
                    f"{', '.join(_REQUIRED)} and optionally split"
                )
            missing = [name for name in _REQUIRED if name not in header]
            if missing:
                raise DatasetImportError(
                    f"{path}: the header lacks column {missing[0]!r} (it has {', '.join(header)})"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise DatasetImportError(f"{path}: line {line}: expected {len(header)} fields")
                rows.append({k.strip(): v.strip() for k, v in row.items()})
        except UnicodeDecodeError:
            raise DatasetImportError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DatasetImportError(f"{path}: not a valid CSV file: {exc}") from None
    if not rows:
        raise DatasetImportError(f"{path}: no rows after the header")
    return rows, "split" in header


def _image_path(root: Path, value: str, csv_path: Path, line: int) -> Path:
    if not value:
        raise DatasetImportError(f"{csv_path}: line {line}: column 'path' is empty")
    path = Path(value)
    return path if path.is_absolute() else root / path


def _channels_of(image: Image.Image) -> int:
    if image.mode in ("L", "1", "I;16", "I", "F"):
        return 1
    return 4 if image.mode in ("RGBA", "LA", "PA") else 3


def _load(
    path: Path, csv_path: Path, line: int, shape: tuple[int, int, int], resize: bool
) -> np.ndarray:
    """One image as ``uint8 [C, H, W]`` for ``shape``; errors name the file and the line."""
    channels, height, width = shape
    try:
        with Image.open(path) as image:
            if image.size != (width, height):
                if not resize:
                    raise DatasetImportError(
                        f"{csv_path}: line {line}: {path} is {image.size[1]}x{image.size[0]} "
                        f"(HxW), the first image is {height}x{width}; give --image-size to "
                        "resize every image"
                    )
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image.convert(CHANNEL_MODES[channels]), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetImportError(f"{csv_path}: line {line}: image {path} does not exist") from None
    except UnidentifiedImageError:
        raise DatasetImportError(
            f"{csv_path}: line {line}: {path} is not an image Pillow can read"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DatasetImportError):
            raise
        raise DatasetImportError(f"{csv_path}: line {line}: cannot read {path}: {exc}") from None
    if channels == 1:
        array = array[..., None]
    return array.transpose(2, 0, 1)


def _first_shape(
    path: Path, csv_path: Path, image_size: tuple[int, int] | None, channels: int | None
) -> tuple[int, int, int]:
    try:
        with Image.open(path) as image:
            found = (_channels_of(image), image.size[1], image.size[0])
    except FileNotFoundError:
        raise DatasetImportError(f"{csv_path}: line 2: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise DatasetImportError(
            f"{csv_path}: line 2: {path} is not an image Pillow can read"
        ) from None
    c = channels or found[0]
    h, w = image_size or found[1:]
    if max(h, w) > MAX_SIDE:
        raise DatasetImportError(
            f"{path}: images of {h}x{w} are larger than {MAX_SIDE} pixels a side; give "
            "--image-size to resize them"
        )
    return c, h, w


def import_image_folder(
    csv_path: str | Path,
    out_store: ObjectStore,
    prefix: str,
    *,
    root: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    name: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    rows_per_part: int | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Import the images the CSV at ``csv_path`` lists into a dataset at ``prefix``.

    ``root`` is the folder the CSV's paths are relative to (default: the CSV's folder);
    ``image_size`` ``(H, W)`` resizes every image (default: all must have the first one's
    size); ``channels`` (1, 3 or 4) converts them (default: the first image's). Returns the
    published manifest. Raises :class:`DatasetImportError` naming the file and line for a
    missing or unreadable image, a bad row or data the fairness metrics cannot use; storage
    errors of ``out_store`` propagate.
    """
    csv_path = Path(csv_path)
    rows, has_split = _read_csv(csv_path)
    folder = Path(root) if root is not None else csv_path.parent
    if not folder.is_dir():
        raise DatasetImportError(f"{folder}: no such folder (the images' root)")
    if channels is not None and channels not in CHANNEL_MODES:
        raise DatasetImportError(f"channels must be 1, 3 or 4, got {channels}")
    if image_size is not None and not all(0 < side <= MAX_SIDE for side in image_size):
        raise DatasetImportError(f"image size must be 1..{MAX_SIDE} a side, got {image_size}")
    file = str(csv_path)
    label = index_column([r["label"] for r in rows], "label", file)
    group = index_column([r["group"] for r in rows], "group", file)
    if has_split:
        split = np.asarray([r["split"].lower() for r in rows], dtype=object)
        for line, value in enumerate(split.tolist(), start=2):
            if value not in SPLITS:
                raise DatasetImportError(
                    f"{file}: line {line}: column 'split' is {rows[line - 2]['split']!r}; "
                    f"expected one of {', '.join(SPLITS)}"
                )
    else:
        split = assign_splits(
            label.indices,
            group.indices,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    check_label_groups(label, group, split, file=file, label_column="label", group_column="group")
    paths = [_image_path(folder, r["path"], csv_path, line) for line, r in enumerate(rows, start=2)]
    shape = _first_shape(paths[0], csv_path, image_size, channels)
    meta = DatasetMeta(
        name=name or folder.resolve().name or csv_path.stem,
        task="multiclass",
        input="image",
        num_classes=label.count,
        num_groups=group.count,
        image_shape=shape,
        class_names=label.names,
        group_names=group.names,
        source={
            "importer": "image-folder",
            "csv": csv_path.name,
            "split": "column" if has_split else "stratified",
            "seed": None if has_split else seed,
            "val_fraction": None if has_split else val_fraction,
            "test_fraction": None if has_split else test_fraction,
            "resized": image_size is not None,
        },
    )
    resize = image_size is not None
    with DatasetWriter(out_store, prefix, meta, rows_per_part=rows_per_part) as writer:
        for split_name in SPLITS:
            members = np.flatnonzero(split == split_name)
            for start in range(0, members.size, _CHUNK):
                chunk = members[start : start + _CHUNK]
                images = np.stack(
                    [_load(paths[i], csv_path, int(i) + 2, shape, resize) for i in chunk]
                )
                writer.write(
                    split_name,
                    DatasetArrays(
                        label=label.indices[chunk], group=group.indices[chunk], images=images
                    ),
                )
                if on_progress is not None:
                    on_progress(f"{split_name}: {start + chunk.size} of {members.size} images")
        return writer.close()
