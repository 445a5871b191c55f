"""CelebA from a local torchvision-format root: one or several binary attributes as the
task, another attribute (``Male`` by default) as the group, the official partition as splits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from bird_datasets.converters import ConverterOption, register_converter
from bird_datasets.format import DatasetMeta
from bird_datasets.writer import DatasetArrays, DatasetWriter

if TYPE_CHECKING:
    from service.storage import Manifest, ObjectStore

__all__ = ["CELEBA_FILES", "check_celeba_root", "prepare_celeba", "read_celeba_index"]

OPTIONS = (
    ConverterOption(
        "root",
        Path,
        None,
        "The local CelebA root (celeba/ as torchvision unpacks it, or its parent).",
        required=True,
    ),
    ConverterOption("train_size", int, None, "Subsample the train split.", minimum=1),
    ConverterOption("val_size", int, None, "Subsample the val split.", minimum=1),
    ConverterOption("test_size", int, None, "Subsample the test split.", minimum=1),
    ConverterOption(
        "attributes",
        list,
        ("Blond_Hair",),
        "The label attribute(s); several make a multi-label task.",
    ),
    ConverterOption("group_attribute", str, "Male", "The sensitive attribute (the group)."),
    ConverterOption("image_size", int, 64, "Image side in pixels.", minimum=8),
)

CELEBA_FOLDER = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR = "list_attr_celeba.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
# What this converter reads. torchvision's CelebA also wants identity_CelebA.txt,
# list_bbox_celeba.txt and list_landmarks_align_celeba.txt; none of them is needed here.
CELEBA_FILES = (CELEBA_ATTR, CELEBA_PARTITION)
_CELEBA_SPLITS = {0: "train", 1: "val", 2: "test"}
_CELEBA_HINT = (
    "expected the torchvision CelebA layout (celeba/img_align_celeba/*.jpg, "
    "celeba/list_attr_celeba.txt, celeba/list_eval_partition.txt)"
)
# Images decoded, cropped and resized per batch written: bounds memory for the 200k images.
_CELEBA_CHUNK = 2048


def check_celeba_root(root: str | Path) -> Path:
    """The ``celeba`` folder under ``root`` (or ``root`` itself if it is that folder) with the
    attribute and partition lists and the image folder; ``FileNotFoundError`` naming what is
    missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} does not exist or is not a directory")
    if (root / CELEBA_FOLDER).is_dir():
        folder = root / CELEBA_FOLDER
    elif (root / CELEBA_ATTR).is_file():
        folder = root  # the celeba folder itself
    else:
        raise FileNotFoundError(f"CelebA folder {root / CELEBA_FOLDER} not found; {_CELEBA_HINT}")
    for name in CELEBA_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CelebA file {folder / name} not found; {_CELEBA_HINT}")
    if not (folder / CELEBA_IMAGES).is_dir():
        raise FileNotFoundError(
            f"CelebA image folder {folder / CELEBA_IMAGES} not found; {_CELEBA_HINT}"
        )
    return folder


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def read_celeba_index(
    root: str | Path,
) -> tuple[Path, list[str], tuple[str, ...], np.ndarray, np.ndarray]:
    """Parse the CelebA attribute and partition lists.

    Returns the ``celeba`` folder, the image file names, the 40 attribute names, the attributes
    as ``int8 [N, 40]`` of 0/1 (the files use -1/1), and the partition ``int8 [N]`` (0 train,
    1 val, 2 test). ``list_attr_celeba.txt`` is: the image count, the attribute names, then one
    line per image (``000001.jpg -1 1 ...``); ``list_eval_partition.txt`` is one
    ``000001.jpg 0`` line per image. Errors name the file and line.
    """
    folder = check_celeba_root(root)
    attr_path = folder / CELEBA_ATTR
    lines = [line for line in _read_lines(attr_path) if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{attr_path} is too short: expected a count line and a header line")
    try:
        count = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise ValueError(f"{attr_path} line 1: expected the number of images") from None
    names = tuple(lines[1].split())
    rows = lines[2:]
    if count != len(rows):
        raise ValueError(f"{attr_path} announces {count} images but lists {len(rows)}")
    files: list[str] = []
    attrs = np.empty((len(rows), len(names)), dtype=np.int8)
    for i, line in enumerate(rows):
        fields = line.split()
        if len(fields) != len(names) + 1:
            raise ValueError(
                f"{attr_path} line {i + 3}: expected a file name and {len(names)} values, "
                f"got {len(fields)} fields"
            )
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{attr_path} line {i + 3}: attribute values must be -1/1") from None
        if any(v not in (-1, 1) for v in values):
            raise ValueError(f"{attr_path} line {i + 3}: attribute values must be -1/1")
        files.append(fields[0])
        attrs[i] = np.asarray(values) > 0

    part_path = folder / CELEBA_PARTITION
    partition_of: dict[str, int] = {}
    for i, line in enumerate(_read_lines(part_path)):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{part_path} line {i + 1}: expected '<image> <0|1|2>', got {line!r}")
        partition_of[fields[0]] = int(fields[1])
    missing = [name for name in files if name not in partition_of]
    if missing:
        raise ValueError(
            f"{part_path} has no partition for {len(missing)} image(s) of {attr_path}, "
            f"e.g. {missing[0]}"
        )
    partition = np.asarray([partition_of[name] for name in files], dtype=np.int8)
    return folder, files, names, attrs, partition


def _load_celeba_image(path: Path, size: int) -> np.ndarray:
    """Centre square crop, resize to ``size`` (antialiased bilinear) → ``uint8 [3, size, size]``."""
    if not path.is_file():
        raise FileNotFoundError(f"CelebA image {path} not found; {_CELEBA_HINT}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            # The aligned faces are 178x218; the centre square keeps the face, as the usual
            # CelebA pipelines (CenterCrop then Resize) do.
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode CelebA image {path}: {exc}") from None


def _chunks(index: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, index.size, size):
        yield index[start : start + size]


@register_converter(
    "celeba",
    options=OPTIONS,
    check=lambda options: check_celeba_root(options["root"]),
)
def prepare_celeba(
    root: str | Path,
    out_store: ObjectStore,
    prefix: str = "",
    *,
    attributes: str | Sequence[str] = ("Blond_Hair",),
    group_attribute: str = "Male",
    image_size: int = 64,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """CelebA from a local torchvision-format root: binary attribute(s) as the task, another
    attribute (Male by default) as the group.

    One attribute → a binary task (class 1 = the attribute is present); several → a
    multi-label task whose ``label`` is the 0/1 list of ``attributes``. The group is
    ``group_attribute`` (1 = present, so ``Male``: female 0, male 1). Splits are the official
    partition. Images are centre-cropped to a square and resized to ``image_size``.
    ``train_size``/``val_size``/``test_size`` take subsamples stratified by group and the first
    attribute, deterministic given ``seed``.
    """
    attrs_wanted = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    if not attrs_wanted:
        raise ValueError("attributes must name at least one CelebA attribute")
    if len(set(attrs_wanted)) != len(attrs_wanted):
        raise ValueError(f"attributes {list(attrs_wanted)} name an attribute twice")
    if group_attribute in attrs_wanted:
        raise ValueError(f"the group attribute {group_attribute!r} cannot also be a label")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    from bird_core.data.fashion_mnist_s import check_seed, check_size, stratified_choice

    check_seed(seed)
    folder, files, names, attrs, partition = read_celeba_index(root)
    unknown = [a for a in (*attrs_wanted, group_attribute) if a not in names]
    if unknown:
        raise ValueError(
            f"unknown CelebA attribute(s) {unknown}; {folder / CELEBA_ATTR} has: {', '.join(names)}"
        )
    label_all = attrs[:, [names.index(a) for a in attrs_wanted]].astype(np.int64)
    group_all = attrs[:, names.index(group_attribute)].astype(np.int64)
    multilabel = len(attrs_wanted) > 1

    sizes = {"train": train_size, "val": val_size, "test": test_size}
    rngs = dict(
        zip(
            sizes,
            (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)),
            strict=True,
        )
    )
    selected: dict[str, np.ndarray] = {}
    for code, split in _CELEBA_SPLITS.items():
        idx = np.flatnonzero(partition == code)
        check_size(f"{split}_size", sizes[split], idx.size)
        if sizes[split] is not None:
            strata = group_all[idx] * 2 + label_all[idx, 0]
            idx = idx[stratified_choice(strata, int(sizes[split]), rngs[split])]
        if idx.size == 0:
            raise ValueError(f"{folder / CELEBA_PARTITION} assigns no image to the {split} split")
        selected[split] = idx

    attr_names = (attrs_wanted[0],) if not multilabel else attrs_wanted
    meta = DatasetMeta(
        name="celeba",
        task="multilabel" if multilabel else "multiclass",
        input="image",
        num_classes=len(attrs_wanted) if multilabel else 2,
        num_groups=2,
        image_shape=(3, image_size, image_size),
        class_names=attrs_wanted if multilabel else (f"not {attr_names[0]}", attr_names[0]),
        group_names=(f"not {group_attribute}", group_attribute),
        source={
            "converter": "celeba",
            "attributes": list(attrs_wanted),
            "group_attribute": group_attribute,
            "image_size": image_size,
            "seed": seed,
            "train_size": train_size,
            "val_size": val_size,
            "test_size": test_size,
        },
    )
    with DatasetWriter(out_store, prefix, meta, rows_per_part=rows_per_part) as writer:
        for split, idx in selected.items():
            for chunk in _chunks(idx, _CELEBA_CHUNK):
                images = np.stack(
                    [
                        _load_celeba_image(folder / CELEBA_IMAGES / files[i], image_size)
                        for i in chunk.tolist()
                    ]
                )
                label = label_all[chunk] if multilabel else label_all[chunk, 0]
                writer.write(
                    split, DatasetArrays(label=label, group=group_all[chunk], images=images)
                )
        return writer.close()
