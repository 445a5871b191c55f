"""Accuracy and fairness metrics, reported in percent (0–100) as fairness-distillation papers do.

Two task shapes are supported:

* **multi-class** (binary is multi-class with ``C = 2``): ``scores`` are probabilities
  ``[N, C]`` whose rows sum to 1, ``labels`` and ``preds`` are class indices ``[N]``, and a
  prediction is the arg-max of a row;
* **multi-label** (several binary attributes): ``scores`` are sigmoid probabilities ``[N, A]``,
  ``labels`` and ``preds`` are 0/1 ``[N, A]``, and a prediction is ``score > 0.5``.

Functions that take ``preds``/``labels`` but no ``task`` tell the two apart by the shape of
``labels``: 1-D means multi-class, 2-D means multi-label (``num_classes`` is then the number of
attributes ``A``). ``groups`` is the sensitive attribute, integer ``[N]`` with any values.

Every input may be a numpy array, anything ``np.asarray`` accepts, or a torch tensor (on any
device); torch is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Task = Literal["multiclass", "multilabel"]

_TASKS = ("multiclass", "multilabel")
# Multi-label decision rule: strictly above one half, i.e. ``logit > 0`` — the same rule as
# ``sklearn``'s ``predict`` for logistic models, so a score of exactly 0.5 is a negative.
_THRESHOLD = 0.5
# Only a guard against passing logits where probabilities are expected; loose enough that
# float16/bfloat16 softmax outputs still pass.
_ROW_SUM_ATOL = 1e-2


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        # numpy has no bfloat16, so widen floating tensors before handing them over.
        if t.is_floating_point():
            t = t.double()
        x = t.numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got ragged or object data")
    return arr


def _as_int(x: Any, name: str) -> np.ndarray:
    """``x`` as ``int64``; floats are accepted only when every value is a whole number."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        # Multi-label targets are usually stored as float 0/1 (they feed BCE losses).
        finite = np.isfinite(arr)
        if not finite.all() or np.any(arr != np.round(arr)):
            bad = arr[~finite | (arr != np.round(arr))][:5]
            raise ValueError(
                f"{name} must hold whole numbers, got values such as {bad.tolist()} "
                f"(shape {arr.shape})"
            )
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be integers, got dtype {arr.dtype} (shape {arr.shape})")


def _check_num_classes(num_classes: int) -> int:
    # bool is an int subclass; True as a class count is always a mistake.
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return int(num_classes)


def _check_binary(arr: np.ndarray, name: str) -> None:
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(
            f"{name} must be 0/1 for multi-label data, got values such as "
            f"{np.unique(arr[bad])[:5].tolist()} (shape {arr.shape})"
        )


def _check_class_range(arr: np.ndarray, name: str, num_classes: int) -> None:
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name} out of range for num_classes={num_classes}: expected values in "
            f"[0, {num_classes}), got {np.unique(arr[bad])[:5].tolist()} (shape {arr.shape})"
        )


def _validate_preds_labels(
    preds: Any, labels: Any, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated ``(preds, labels, multilabel)``; range checks need ``num_classes``."""
    p = _as_int(preds, "preds")
    y = _as_int(labels, "labels")
    if y.ndim not in (1, 2):
        raise ValueError(
            f"labels must be 1-D class indices [N] or 2-D 0/1 attributes [N, A], "
            f"got shape {y.shape}"
        )
    multilabel = y.ndim == 2
    if p.shape != y.shape:
        kind = "[N, A] (multi-label)" if multilabel else "[N] (multi-class)"
        raise ValueError(
            f"preds has shape {p.shape} but labels has shape {y.shape}; both must be {kind}"
        )
    if y.shape[0] == 0:
        raise ValueError(f"empty input: labels has shape {y.shape}")
    if multilabel:
        if y.shape[1] == 0:
            raise ValueError(f"multi-label labels have no attributes: shape {y.shape}")
        if num_classes is not None and _check_num_classes(num_classes) != y.shape[1]:
            raise ValueError(
                f"num_classes={num_classes} but multi-label labels have {y.shape[1]} "
                f"attributes (shape {y.shape}); pass the number of attributes"
            )
        _check_binary(p, "preds")
        _check_binary(y, "labels")
    else:
        if num_classes is not None:
            c = _check_num_classes(num_classes)
            _check_class_range(p, "preds", c)
            _check_class_range(y, "labels", c)
        elif (p < 0).any() or (y < 0).any():
            raise ValueError("preds and labels must be non-negative class indices")
    return p, y, multilabel


def _validate_groups(groups: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values, index)``: the sorted distinct groups and each sample's position among them."""
    g = _as_int(groups, "groups")
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D [N], got shape {g.shape}")
    if g.shape[0] != n:
        raise ValueError(f"groups has shape {g.shape} but labels have {n} rows")
    values, index = np.unique(g, return_inverse=True)
    return values, index.reshape(-1)


def _validate_scores(scores: Any, labels: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores float64, labels int64)`` for ``task``."""
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    s = _to_numpy(scores, "scores")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be numeric, got dtype {s.dtype} (shape {s.shape})")
    s = s.astype(np.float64)
    y = _as_int(labels, "labels")
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C] or [N, A], got shape {s.shape}")
    if y.ndim == 0 or y.shape[0] != s.shape[0]:
        raise ValueError(f"scores has shape {s.shape} but labels has shape {y.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"empty input: scores has shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain NaN or infinite values (shape {s.shape})")
    if s.min() < 0 or s.max() > 1:
        hint = "softmax" if task == "multiclass" else "sigmoid"
        raise ValueError(
            f"scores must be probabilities in [0, 1], got range [{s.min():.4g}, {s.max():.4g}] "
            f"(shape {s.shape}); apply {hint} to logits first"
        )
    if task == "multiclass":
        if y.ndim != 1:
            raise ValueError(
                f"multi-class labels must be 1-D [N], got shape {y.shape}; "
                f"use task='multilabel' for [N, A] 0/1 labels"
            )
        sums = s.sum(axis=1)
        if not np.allclose(sums, 1.0, rtol=0.0, atol=_ROW_SUM_ATOL):
            worst = sums[np.argmax(np.abs(sums - 1.0))]
            raise ValueError(
                f"multi-class scores must be probabilities whose rows sum to 1, found a row "
                f"summing to {worst:.4g} (shape {s.shape}); apply softmax to logits first"
            )
        _check_class_range(y, "labels", s.shape[1])
    else:
        if y.shape != s.shape:
            raise ValueError(
                f"multi-label scores has shape {s.shape} but labels has shape {y.shape}; "
                f"both must be [N, A]"
            )
        _check_binary(y, "labels")
    return s, y


def _predict(scores: np.ndarray, task: str) -> np.ndarray:
    if task == "multiclass":
        # np.argmax breaks ties towards the lowest class index, deterministically.
        return np.argmax(scores, axis=1).astype(np.int64)
    return (scores > _THRESHOLD).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0`` (an undefined rate, not a rate of zero)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _quiet_nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without the all-NaN RuntimeWarning (all-NaN slices give NaN)."""
    defined = ~np.isnan(x)
    count = defined.sum(axis=axis)
    total = np.where(defined, x, 0.0).sum(axis=axis)
    return _ratio(total, count)


def _quiet_nanmax(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmax`` without the all-NaN RuntimeWarning (all-NaN slices give NaN)."""
    defined = ~np.isnan(x)
    best = np.where(defined, x, -np.inf).max(axis=axis)
    return np.where(defined.any(axis=axis), best, np.nan)


def _gap(rates: np.ndarray, min_groups: int) -> np.ndarray:
    """Max − min over groups (axis 0) of the defined rates, per column.

    NaN where fewer than ``min_groups`` groups have a defined rate. Groups whose rate is
    undefined (no sample to condition on) are left out rather than counted as a rate of zero.
    """
    defined = ~np.isnan(rates)
    hi = np.where(defined, rates, -np.inf).max(axis=0)
    lo = np.where(defined, rates, np.inf).min(axis=0)
    # With no defined group hi - lo is -inf (no warning); np.where then masks it to NaN.
    return np.where(defined.sum(axis=0) >= min_groups, hi - lo, np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values all get the mean of the ranks they span."""
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]
    # A tie block occupies ranks starts+1 .. ends, whose mean is (starts + 1 + ends) / 2.
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann–Whitney AUROC: P(score_pos > score_neg) + ½ P(score_pos = score_neg)."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    rank_sum = _average_ranks(score)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------
# Per-group counts shared by every fairness metric
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroupCounts:
    """Counts per group × unit, where a unit is a class (one-vs-rest) or an attribute."""

    values: np.ndarray  # [G] the distinct group values, sorted
    n: np.ndarray  # [G] samples per group
    pos: np.ndarray  # [G, K] samples whose true unit is positive
    tp: np.ndarray  # [G, K] ... and predicted positive
    pred_pos: np.ndarray  # [G, K] samples predicted positive
    correct: np.ndarray  # [G] correct decisions (multi-label: summed over attributes)
    multilabel: bool

    @property
    def neg(self) -> np.ndarray:
        return self.n[:, None] - self.pos

    @property
    def fp(self) -> np.ndarray:
        return self.pred_pos - self.tp

    @property
    def tpr(self) -> np.ndarray:
        return _ratio(self.tp, self.pos)

    @property
    def fpr(self) -> np.ndarray:
        return _ratio(self.fp, self.neg)

    @property
    def tnr(self) -> np.ndarray:
        return _ratio(self.neg - self.fp, self.neg)

    @property
    def selection(self) -> np.ndarray:
        return _ratio(self.pred_pos, self.n[:, None])


def _group_counts(
    p: np.ndarray, y: np.ndarray, values: np.ndarray, index: np.ndarray, num_units: int
) -> _GroupCounts:
    num_groups = values.shape[0]
    n = np.bincount(index, minlength=num_groups)
    if y.ndim == 1:
        # bincount over (group, class) cells keeps memory at O(N + G·C), even for many classes.
        hit = (p == y).astype(np.float64)
        size = num_groups * num_units
        pos = np.bincount(index * num_units + y, minlength=size).reshape(num_groups, -1)
        tp = np.bincount(index * num_units + y, weights=hit, minlength=size)
        pred_pos = np.bincount(index * num_units + p, minlength=size).reshape(num_groups, -1)
        correct = np.bincount(index, weights=hit, minlength=num_groups)
        tp = tp.reshape(num_groups, -1)
        multilabel = False
    else:
        # Every group in ``values`` has at least one sample, so segment starts are increasing
        # and reduceat sums each group's rows in one pass.
        order = np.argsort(index, kind="stable")
        starts = np.r_[0, np.cumsum(n)[:-1]]
        ys, ps = y[order], p[order]
        pos = np.add.reduceat(ys, starts, axis=0)
        tp = np.add.reduceat(ys * ps, starts, axis=0)
        pred_pos = np.add.reduceat(ps, starts, axis=0)
        correct = np.add.reduceat((ys == ps).sum(axis=1), starts)
        multilabel = True
    return _GroupCounts(
        values=values,
        n=n.astype(np.float64),
        pos=np.asarray(pos, dtype=np.float64),
        tp=np.asarray(tp, dtype=np.float64),
        pred_pos=np.asarray(pred_pos, dtype=np.float64),
        correct=np.asarray(correct, dtype=np.float64),
        multilabel=multilabel,
    )


def _counts_from_inputs(preds: Any, labels: Any, groups: Any, num_classes: int) -> _GroupCounts:
    p, y, _ = _validate_preds_labels(preds, labels, num_classes)
    values, index = _validate_groups(groups, y.shape[0])
    return _group_counts(p, y, values, index, _check_num_classes(num_classes))


def _deo(c: _GroupCounts) -> np.ndarray:
    tpr_gap = _gap(c.tpr, min_groups=2)
    if not c.multilabel:
        return tpr_gap * 100.0
    # An attribute is a two-class problem: its DEO is the mean of the recall gaps of its
    # positive class (TPR) and its negative class (TNR), over whichever of the two is defined.
    tnr_gap = _gap(c.tnr, min_groups=2)
    return _quiet_nanmean(np.stack([tpr_gap, tnr_gap]), axis=0) * 100.0


def _eod(c: _GroupCounts) -> float:
    # A rate compared across a single group has a gap of 0, as in fairlearn's between-groups
    # difference; groups where the rate is undefined are left out.
    per_unit = np.fmax(_gap(c.tpr, min_groups=1), _gap(c.fpr, min_groups=1))
    return float(_quiet_nanmax(per_unit, axis=0)) * 100.0


def _dpd(c: _GroupCounts) -> float:
    return float(_quiet_nanmax(_gap(c.selection, min_groups=1), axis=0)) * 100.0


def _group_rows(c: _GroupCounts) -> list[dict[str, Any]]:
    binary = not c.multilabel and c.pos.shape[1] == 2
    if binary:
        # Binary classification: the usual rates of class 1, not a macro over both classes
        # (which would be the balanced accuracy, a different quantity).
        tpr, fpr = c.tpr[:, 1], c.fpr[:, 1]
    else:
        tpr, fpr = _quiet_nanmean(c.tpr, axis=1), _quiet_nanmean(c.fpr, axis=1)
    decisions = c.n * (c.pos.shape[1] if c.multilabel else 1)
    acc = c.correct / decisions
    return [
        {
            "group": int(c.values[i]),
            "count": int(c.n[i]),
            "accuracy": float(acc[i]) * 100.0,
            "tpr": float(tpr[i]) * 100.0,
            "fpr": float(fpr[i]) * 100.0,
        }
        for i in range(c.values.shape[0])
    ]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def auroc(scores: Any, labels: Any, task: Task = "multiclass") -> float:
    """Area under the ROC curve, in percent.

    Binary (``C = 2``): AUROC of ``scores[:, 1]``. Multi-class: one-vs-rest macro average over
    the classes that have both positive and negative samples (as sklearn's
    ``roc_auc_score(multi_class="ovr", average="macro")`` when every class occurs). Multi-label:
    macro average over attributes with both positives and negatives.

    Computed with the Mann–Whitney rank statistic, ties counting one half.

    Raises:
        ValueError: on malformed input, or when no class/attribute has both positives and
            negatives, so the AUROC is undefined.
    """
    s, y = _validate_scores(scores, labels, task)
    if task == "multiclass":
        positives = y[:, None] == np.arange(s.shape[1])[None, :]
        if s.shape[1] == 2:
            # Only class 1's column: recomputing 1 - p for class 0 could perturb ties.
            positives, s = positives[:, 1:], s[:, 1:]
    else:
        positives = y.astype(bool)
    n_pos = positives.sum(axis=0)
    usable = np.flatnonzero((n_pos > 0) & (n_pos < s.shape[0]))
    if usable.size == 0:
        unit = "class" if task == "multiclass" else "attribute"
        raise ValueError(
            f"AUROC is undefined: no {unit} has both positive and negative samples "
            f"(labels shape {y.shape}, positives per {unit}: {n_pos.tolist()[:10]})"
        )
    return float(np.mean([_binary_auc(s[:, k], positives[:, k]) for k in usable])) * 100.0


def macro_f1(preds: Any, labels: Any, num_classes: int) -> float:
    """Macro-averaged F1, in percent.

    Multi-class (1-D labels): mean over classes ``0..num_classes-1`` of the one-vs-rest F1; a
    class with no true and no predicted samples scores 0 and still counts in the mean, exactly
    as ``sklearn.metrics.f1_score(average="macro", labels=range(C), zero_division=0)``.
    Multi-label (2-D 0/1 labels, ``num_classes == A``): mean over attributes of the F1 of the
    positive class, as ``f1_score(labels, preds, average="macro", zero_division=0)``.
    """
    p, y, multilabel = _validate_preds_labels(preds, labels, num_classes)
    if multilabel:
        tp = (p * y).sum(axis=0).astype(np.float64)
        fp = (p * (1 - y)).sum(axis=0)
        fn = ((1 - p) * y).sum(axis=0)
    else:
        c = _check_num_classes(num_classes)
        tp = np.bincount(y, weights=(p == y).astype(np.float64), minlength=c)
        fp = np.bincount(p, minlength=c) - tp
        fn = np.bincount(y, minlength=c) - tp
    f1 = np.nan_to_num(_ratio(2.0 * tp, 2.0 * tp + fp + fn), nan=0.0)
    return float(f1.mean()) * 100.0


def accuracy(preds: Any, labels: Any) -> float:
    """Accuracy in percent; multi-label: mean over attributes of each attribute's accuracy."""
    p, y, _ = _validate_preds_labels(preds, labels, None)
    # Every attribute has the same N, so the mean of per-attribute accuracies is the mean over
    # all entries.
    return float(np.mean(p == y)) * 100.0


def deo_per_class(preds: Any, labels: Any, groups: Any, num_classes: int) -> np.ndarray:
    """Difference of equal opportunity per class (multi-class) or per attribute, in percent.

    Multi-class: for class ``c``, max − min over groups of ``P(ŷ = c | y = c, s = g)``, over
    the groups with at least one sample of class ``c``; NaN when fewer than two groups have one.
    Multi-label: for attribute ``a``, the mean of its TPR gap and TNR gap (the recall gaps of its
    two classes), each taken as above; NaN only when both are undefined.

    Returns:
        float64 array of length ``num_classes`` (or ``A``).
    """
    counts = _counts_from_inputs(preds, labels, groups, num_classes)
    return _deo(counts)


def delta_deo(deo: Any) -> tuple[float, float]:
    """``(Δ_mean-DEO, Δ_max-DEO)``: NaN-skipping mean and max of :func:`deo_per_class`.

    The input is already in percent, so the outputs are too. Both are NaN when every entry is
    NaN (e.g. a single sensitive group).
    """
    d = _to_numpy(deo, "deo").astype(np.float64)
    if d.ndim != 1 or d.shape[0] == 0:
        raise ValueError(f"deo must be a non-empty 1-D array, got shape {d.shape}")
    return float(_quiet_nanmean(d, axis=0)), float(_quiet_nanmax(d, axis=0))


def group_table(preds: Any, labels: Any, groups: Any, num_classes: int) -> list[dict[str, Any]]:
    """One row per sensitive group, sorted by group value.

    Each row is ``{"group", "count", "accuracy", "tpr", "fpr"}`` (rates in percent). Binary:
    TPR/FPR of class 1. Multi-class: macro over classes of the one-vs-rest TPR (classes with no
    positives in the group skipped) and FPR (classes with no negatives skipped). Multi-label:
    macro over attributes likewise. A rate with nothing to average is NaN.
    """
    counts = _counts_from_inputs(preds, labels, groups, num_classes)
    return _group_rows(counts)


def equalized_odds_difference(preds: Any, labels: Any, groups: Any, num_classes: int) -> float:
    """Equalized-odds difference, in percent.

    Binary: ``max(TPR gap, FPR gap)`` with gaps max − min across groups, fairlearn's
    definition. Multi-class: the max over classes of the one-vs-rest value (for ``C = 2`` this
    equals the binary one). Multi-label: max over attributes. A group where a rate is undefined
    (no positives for the TPR, no negatives for the FPR) is left out of that rate's gap, where
    fairlearn would count it as 0.
    """
    counts = _counts_from_inputs(preds, labels, groups, num_classes)
    return _eod(counts)


def demographic_parity_difference(preds: Any, labels: Any, groups: Any, num_classes: int) -> float:
    """Demographic-parity difference, in percent.

    Binary: max − min across groups of ``P(ŷ = 1 | s = g)`` (fairlearn's definition).
    Multi-class: max over classes of the gap in ``P(ŷ = c | s = g)``. Multi-label: max over
    attributes. ``labels`` is used only for validation and to tell the task shape.
    """
    counts = _counts_from_inputs(preds, labels, groups, num_classes)
    return _dpd(counts)


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def fairness_report(
    scores: Any, labels: Any, groups: Any, *, task: Task = "multiclass"
) -> dict[str, Any]:
    """Every metric of this module for one set of scores, as a JSON-able dict.

    Predictions are the arg-max (multi-class) or ``score > 0.5`` (multi-label). Keys:
    ``auroc, f1, accuracy, deo, delta_mean_deo, delta_max_deo, equalized_odds_difference,
    demographic_parity_difference, groups, num_samples, predicted_classes`` (how many classes
    the predictions use: with one, every group gets the same rates and the Δ-DEO of 0 says
    nothing about fairness). Values are plain Python numbers and
    lists; an undefined value (a DEO entry, a Δ-DEO when every DEO entry is undefined, or a
    group's TPR/FPR) is ``None``.

    Raises:
        ValueError: on malformed input or when the AUROC is undefined (see :func:`auroc`).
    """
    s, y = _validate_scores(scores, labels, task)
    values, index = _validate_groups(groups, y.shape[0])
    p = _predict(s, task)
    num_units = s.shape[1]
    counts = _group_counts(p, y, values, index, num_units)
    deo = _deo(counts)
    mean_deo, max_deo = delta_deo(deo)
    rows = [
        {**row, "tpr": _json_float(row["tpr"]), "fpr": _json_float(row["fpr"])}
        for row in _group_rows(counts)
    ]
    return {
        "auroc": auroc(s, y, task=task),
        "f1": macro_f1(p, y, num_units),
        "accuracy": accuracy(p, y),
        "deo": [_json_float(v) for v in deo],
        "delta_mean_deo": _json_float(mean_deo),
        "delta_max_deo": _json_float(max_deo),
        "equalized_odds_difference": _eod(counts),
        "demographic_parity_difference": _dpd(counts),
        "groups": rows,
        "num_samples": int(y.shape[0]),
        "predicted_classes": predicted_classes(p, task),
    }


def predicted_classes(preds: Any, task: Task = "multiclass") -> int:
    """How many classes ``preds`` use: distinct labels (multi-class) or labels predicted for at
    least one row (multi-label, a 0/1 matrix)."""
    p = _to_numpy(preds, "preds")
    if task == "multilabel":
        return int((p.reshape(p.shape[0], -1) > 0).any(axis=0).sum())
    return int(np.unique(p).size)


def predicts_one_class(report: dict[str, Any]) -> bool:
    """Whether a :func:`fairness_report` is of predictions that use a single class (a report
    without ``predicted_classes``, from before it was recorded, is taken as not)."""
    used = report.get("predicted_classes")
    return isinstance(used, int) and not isinstance(used, bool) and used < 2
