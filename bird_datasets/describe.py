"""What a dataset holds, counted: :func:`describe_dataset` (rows per split × class × group,
JSON-able) and :func:`render_description` (the text table ``bird datasets describe`` prints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bird_datasets.format import SPLITS, as_numpy, list_matrix
from bird_datasets.reader import read_dataset
from service.storage import ObjectStore, validate_prefix

__all__ = ["describe_dataset", "render_description"]


def describe_dataset(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """Counts per split × class × group of the dataset at ``prefix`` (JSON-able).

    ``splits[s]["classes"][c][g]`` is the number of rows of split ``s`` with class ``c`` in
    group ``g`` (multi-label: rows where attribute ``c`` is 1); ``splits[s]["groups"][g]`` is
    the number of rows of group ``g``. :func:`render_description` turns it into a table.
    """
    meta, table = read_dataset(store, prefix, columns=["label", "group", "split"])
    describe: dict[str, Any] = {
        "uri": store.uri(validate_prefix(prefix)),
        "name": meta.name,
        "task": meta.task,
        "input": meta.input,
        "image_shape": list(meta.image_shape) if meta.image_shape else None,
        "num_features": meta.num_features,
        "num_classes": meta.num_classes,
        "num_groups": meta.num_groups,
        "class_names": [meta.class_label(c) for c in range(meta.num_classes)],
        "group_names": [meta.group_label(g) for g in range(meta.num_groups)],
        "rows": table.num_rows,
        "splits": {},
    }
    for split in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), split))
        groups = as_numpy(rows.column("group")).astype(np.int64, copy=False)
        valid = (groups >= 0) & (groups < meta.num_groups)
        if meta.task == "multilabel":
            labels = _safe_label_matrix(rows.column("label"), meta.num_classes)
            classes = np.zeros((meta.num_classes, meta.num_groups), dtype=np.int64)
            for g in range(meta.num_groups):
                classes[:, g] = (labels[groups == g] == 1).sum(axis=0)
        else:
            labels = as_numpy(rows.column("label")).astype(np.int64, copy=False)
            valid &= (labels >= 0) & (labels < meta.num_classes)
            flat = labels[valid] * meta.num_groups + groups[valid]
            classes = np.bincount(flat, minlength=meta.num_classes * meta.num_groups).reshape(
                meta.num_classes, meta.num_groups
            )
        in_range = (groups >= 0) & (groups < meta.num_groups)
        group_counts = np.bincount(groups[in_range], minlength=meta.num_groups)
        describe["splits"][split] = {
            "rows": rows.num_rows,
            "groups": group_counts[: meta.num_groups].tolist(),
            "classes": classes.tolist(),
        }
    return describe


def _safe_label_matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """``[N, width]`` multi-label matrix; rows of the wrong length count as all-zero."""
    lengths = as_numpy(pc.list_value_length(column)) if len(column) else np.empty(0, np.int64)
    out = np.zeros((len(column), width), dtype=np.int64)
    good = np.flatnonzero(lengths == width)
    if good.size:
        out[good] = list_matrix(column.take(pa.array(good)), width, np.int64)
    return out


def render_description(describe: Mapping[str, Any]) -> str:
    """A text table per split: rows = classes, columns = groups, plus the majority group's share.

    The last column makes the skew visible at a glance: in a balanced split every class shows
    about ``1 / num_groups``; in FashionMNIST-S train, classes 0–4 show ``colour 95%``.
    """
    groups = list(describe["group_names"])
    classes = list(describe["class_names"])
    multilabel = describe["task"] == "multilabel"
    if describe["input"] == "image":
        inputs = "images " + "x".join(str(v) for v in describe["image_shape"] or ())
    else:
        inputs = f"{describe['num_features']} features"
    lines = [
        f"{describe['name']} ({describe['uri']}): {describe['task']}, {inputs}, "
        f"{describe['num_classes']} {'attributes' if multilabel else 'classes'}, "
        f"{describe['num_groups']} groups, {describe['rows']} rows"
    ]
    row_names = [f"{c} {name}" if name != str(c) else name for c, name in enumerate(classes)]
    first = "attribute = 1" if multilabel else "class"
    name_width = max(len(first), len("all rows"), *(len(n) for n in row_names))
    widths = [max(len(g), 7) for g in groups]

    def share(counts: Sequence[int]) -> str:
        total = sum(counts)
        if not total:
            return "-"
        top = int(np.argmax(counts))
        return f"{groups[top]} {100 * counts[top] / total:.0f}%"

    def line(name: str, counts: Sequence[int]) -> str:
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(counts, widths, strict=True))
        return f"  {name:<{name_width}}  {cells}  {share(counts)}"

    for split, info in describe["splits"].items():
        lines.append("")
        lines.append(f"{split}: {info['rows']} rows")
        header = "  ".join(f"{g:>{w}}" for g, w in zip(groups, widths, strict=True))
        lines.append(f"  {first:<{name_width}}  {header}  majority group")
        for name, counts in zip(row_names, info["classes"], strict=True):
            lines.append(line(name, counts))
        lines.append(line("all rows", info["groups"]))
    return "\n".join(lines)
