"""Tests for bird_core.metrics: sklearn as the reference, plus small cases worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from bird_core.metrics import (
    accuracy,
    auroc,
    delta_deo,
    demographic_parity_difference,
    deo_per_class,
    equalized_odds_difference,
    fairness_report,
    group_table,
    macro_f1,
)

SEEDS = [0, 1, 2, 3, 4]


def _softmax_pool(rng: np.random.Generator, n: int, c: int, pool: int = 12) -> np.ndarray:
    """Probability rows drawn from a small pool, so every column has many tied scores."""
    logits = rng.normal(size=(pool, c))
    rows = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return rows[rng.integers(0, pool, size=n)]


# ---------------------------------------------------------------------------- AUROC vs sklearn


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_binary_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=300)
    # Rounded to one decimal: only 11 distinct values, so ties between classes are frequent.
    p1 = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, size=300), 0, 1), 1)
    scores = np.stack([1 - p1, p1], axis=1)
    assert auroc(scores, y) == pytest.approx(100 * roc_auc_score(y, p1), abs=1e-10)


def test_auroc_all_tied_is_50():
    y = np.array([0, 1, 0, 1, 1])
    scores = np.full((5, 2), 0.5)
    assert auroc(scores, y) == pytest.approx(50.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_multiclass_ovr_macro_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = _softmax_pool(rng, 400, 4)
    y = rng.integers(0, 4, size=400)
    assert set(np.unique(y)) == {0, 1, 2, 3}  # sklearn needs every class present
    expected = roc_auc_score(y, scores, multi_class="ovr", average="macro")
    assert auroc(scores, y) == pytest.approx(100 * expected, abs=1e-10)


def test_auroc_multiclass_skips_absent_class():
    rng = np.random.default_rng(7)
    scores = _softmax_pool(rng, 200, 4)
    y = rng.integers(0, 3, size=200)  # class 3 never occurs: it cannot have an AUROC
    expected = np.mean([roc_auc_score(y == c, scores[:, c]) for c in range(3)])
    assert auroc(scores, y) == pytest.approx(100 * expected, abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_multilabel_macro_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.1, 0.3, 0.5, 0.8, 0.6])
    y = (rng.uniform(size=(300, 5)) < prevalence).astype(np.float32)  # float 0/1, as stored
    scores = np.round(np.clip(0.2 * y + rng.uniform(0, 0.8, size=y.shape), 0, 1), 1)
    expected = roc_auc_score(y, scores, average="macro")
    assert auroc(scores, y, task="multilabel") == pytest.approx(100 * expected, abs=1e-10)


def test_auroc_accepts_torch_tensors():
    rng = np.random.default_rng(0)
    scores = _softmax_pool(rng, 100, 3)
    y = rng.integers(0, 3, size=100)
    expected = auroc(scores, y)
    assert auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(y)) == pytest.approx(
        expected, abs=1e-9
    )


def test_auroc_undefined_raises():
    scores = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match="no class has both positive and negative"):
        auroc(scores, np.array([1, 1, 1]))


# ------------------------------------------------------------------ F1 and accuracy vs sklearn


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_multiclass_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    # Classes 4 and 5 never occur in labels or preds; class 3 only in preds.
    y = rng.integers(0, 3, size=200)
    p = np.where(rng.uniform(size=200) < 0.6, y, rng.integers(0, 4, size=200))
    expected = f1_score(y, p, average="macro", labels=range(6), zero_division=0)
    assert macro_f1(p, y, 6) == pytest.approx(100 * expected, abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(150, 4)) < [0.2, 0.5, 0.7, 0.0]).astype(int)
    p = (rng.uniform(size=(150, 4)) < [0.3, 0.5, 0.6, 0.0]).astype(int)
    # Attribute 3 has no positives at all: F1 0 by zero_division, still in the mean.
    expected = f1_score(y, p, average="macro", zero_division=0)
    assert macro_f1(p, y, 4) == pytest.approx(100 * expected, abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=120)
    p = np.where(rng.uniform(size=120) < 0.5, y, rng.integers(0, 5, size=120))
    assert accuracy(p, y) == pytest.approx(100 * accuracy_score(y, p))

    ym = rng.integers(0, 2, size=(120, 3))
    pm = rng.integers(0, 2, size=(120, 3))
    # sklearn's multi-label accuracy is subset accuracy; ours is the per-attribute mean.
    expected = np.mean([accuracy_score(ym[:, a], pm[:, a]) for a in range(3)])
    assert accuracy(pm, ym) == pytest.approx(100 * expected)


# ------------------------------------------------------------------ hand-computed binary case

# 8 samples, 2 classes, 2 groups.
#   group 0: y = 1 1 1 0   p1 = .9 .7 .4 .2   ŷ = 1 1 0 0
#   group 1: y = 1 0 0 0   p1 = .8 .6 .3 .7   ŷ = 1 1 0 1
# group 0: TPR = 2/3, FPR = 0/1 (TNR 1), accuracy 3/4, P(ŷ=1) = 2/4
# group 1: TPR = 1/1, FPR = 2/3 (TNR 1/3), accuracy 2/4, P(ŷ=1) = 3/4
# DEO class 0 = TNR gap = 1 − 1/3 = 2/3;  DEO class 1 = TPR gap = 1 − 2/3 = 1/3
# Δ_mean = (2/3 + 1/3)/2 = 1/2;  Δ_max = 2/3
# EOD = max(TPR gap 1/3, FPR gap 2/3) = 2/3;  DPD = 3/4 − 2/4 = 1/4
# accuracy 5/8. F1: class 1 tp 3 fp 2 fn 1 → 6/9; class 0 tp 2 fp 1 fn 2 → 4/7; macro 13/21.
# AUROC of p1: positives .9 .7 .4 .8 vs negatives .2 .6 .3 .7 → 4 + 3.5 + 2 + 4 = 13.5 of 16.
HAND_Y = np.array([1, 1, 1, 0, 1, 0, 0, 0])
HAND_G = np.array([0, 0, 0, 0, 1, 1, 1, 1])
HAND_P1 = np.array([0.9, 0.7, 0.4, 0.2, 0.8, 0.6, 0.3, 0.7])
HAND_PRED = np.array([1, 1, 0, 0, 1, 1, 0, 1])


def test_hand_binary_metrics():
    np.testing.assert_allclose(
        deo_per_class(HAND_PRED, HAND_Y, HAND_G, 2), [200 / 3, 100 / 3], rtol=1e-12
    )
    assert delta_deo(deo_per_class(HAND_PRED, HAND_Y, HAND_G, 2)) == pytest.approx((50.0, 200 / 3))
    assert equalized_odds_difference(HAND_PRED, HAND_Y, HAND_G, 2) == pytest.approx(200 / 3)
    assert demographic_parity_difference(HAND_PRED, HAND_Y, HAND_G, 2) == pytest.approx(25.0)
    assert accuracy(HAND_PRED, HAND_Y) == pytest.approx(62.5)
    assert macro_f1(HAND_PRED, HAND_Y, 2) == pytest.approx(100 * 13 / 21)
    assert group_table(HAND_PRED, HAND_Y, HAND_G, 2) == [
        {"group": 0, "count": 4, "accuracy": 75.0, "tpr": pytest.approx(200 / 3), "fpr": 0.0},
        {
            "group": 1,
            "count": 4,
            "accuracy": 50.0,
            "tpr": 100.0,
            "fpr": pytest.approx(200 / 3),
        },
    ]


def test_hand_binary_report_is_json_and_consistent():
    scores = np.stack([1 - HAND_P1, HAND_P1], axis=1)
    report = fairness_report(scores, HAND_Y, HAND_G)
    # Round-trips through strict JSON: plain Python numbers only, no NaN.
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["auroc"] == pytest.approx(100 * 13.5 / 16)
    assert report["f1"] == pytest.approx(100 * 13 / 21)
    assert report["accuracy"] == pytest.approx(62.5)
    assert report["deo"] == pytest.approx([200 / 3, 100 / 3])
    assert report["delta_mean_deo"] == pytest.approx(50.0)
    assert report["delta_max_deo"] == pytest.approx(200 / 3)
    assert report["equalized_odds_difference"] == pytest.approx(200 / 3)
    assert report["demographic_parity_difference"] == pytest.approx(25.0)
    assert report["groups"] == group_table(HAND_PRED, HAND_Y, HAND_G, 2)
    assert report["num_samples"] == 8


# ------------------------------------------------------- multi-class case with an absent class

# 3 classes, groups 3 and 7 (not contiguous). Class 2 only ever occurs in group 3.
#   group 3: y = 0 1 2 2     ŷ = 0 1 2 0
#   group 7: y = 0 0 0 1 1   ŷ = 0 0 1 1 0
# recall per class: group 3 → (1, 1, 1/2); group 7 → (2/3, 1/2, undefined)
# DEO = (1/3, 1/2, NaN) → Δ_mean = (1/3 + 1/2)/2 = 5/12 (NaN skipped), Δ_max = 1/2
# FPR per class: group 3 → (1/3, 0, 0); group 7 → (1/2, 1/3, 0)
# group 3: TPR macro (1 + 1 + 1/2)/3 = 5/6, FPR macro 1/9, accuracy 3/4
# group 7: TPR macro (2/3 + 1/2)/2 = 7/12 (class 2 skipped), FPR macro 5/18, accuracy 3/5
# EOD per class: c0 max(1/3, 1/6) = 1/3; c1 max(1/2, 1/3) = 1/2; c2 max(0, 0) = 0 → 1/2
# P(ŷ = c): group 3 → (2/4, 1/4, 1/4); group 7 → (3/5, 2/5, 0) → gaps .1 .15 .25 → DPD 1/4
MC_Y = np.array([0, 1, 2, 2, 0, 0, 0, 1, 1])
MC_PRED = np.array([0, 1, 2, 0, 0, 0, 1, 1, 0])
MC_G = np.array([3, 3, 3, 3, 7, 7, 7, 7, 7])


def test_multiclass_class_missing_from_a_group():
    deo = deo_per_class(MC_PRED, MC_Y, MC_G, 3)
    assert deo[:2] == pytest.approx([100 / 3, 50.0])
    assert math.isnan(deo[2])
    assert delta_deo(deo) == pytest.approx((100 * 5 / 12, 50.0))
    assert group_table(MC_PRED, MC_Y, MC_G, 3) == [
        {
            "group": 3,
            "count": 4,
            "accuracy": 75.0,
            "tpr": pytest.approx(100 * 5 / 6),
            "fpr": pytest.approx(100 / 9),
        },
        {
            "group": 7,
            "count": 5,
            "accuracy": pytest.approx(60.0),
            "tpr": pytest.approx(100 * 7 / 12),
            "fpr": pytest.approx(100 * 5 / 18),
        },
    ]
    assert equalized_odds_difference(MC_PRED, MC_Y, MC_G, 3) == pytest.approx(50.0)
    assert demographic_parity_difference(MC_PRED, MC_Y, MC_G, 3) == pytest.approx(25.0)


def test_report_turns_nan_deo_into_none():
    scores = np.full((9, 3), 0.1)
    scores[np.arange(9), MC_PRED] = 0.8
    report = fairness_report(scores, MC_Y, MC_G)
    json.dumps(report, allow_nan=False)
    assert report["deo"][:2] == pytest.approx([100 / 3, 50.0])
    assert report["deo"][2] is None
    assert report["delta_mean_deo"] == pytest.approx(100 * 5 / 12)


def test_single_group_report():
    # One group: nothing to compare, so DEO is undefined but EOD/DPD are 0 (as in fairlearn).
    scores = np.stack([1 - HAND_P1, HAND_P1], axis=1)
    report = fairness_report(scores, HAND_Y, np.zeros(8, dtype=int))
    json.dumps(report, allow_nan=False)
    assert report["deo"] == [None, None]
    assert report["delta_mean_deo"] is None
    assert report["delta_max_deo"] is None
    assert report["equalized_odds_difference"] == 0.0
    assert report["demographic_parity_difference"] == 0.0
    assert len(report["groups"]) == 1


def test_delta_deo_all_nan_is_nan_without_warning():
    with np.errstate(all="raise"):
        mean, worst = delta_deo(np.array([np.nan, np.nan]))
    assert math.isnan(mean) and math.isnan(worst)


# ------------------------------------------------------------------ hand-computed multi-label

# 2 attributes, 6 samples, groups 0 and 1.
#   group 0: Y = [1,0] [1,1] [0,1]   P = [1,0] [0,1] [0,0]
#   group 1: Y = [1,0] [0,0] [0,1]   P = [1,0] [1,0] [0,1]
# attribute 0: group 0 TPR 1/2, TNR 1 (FPR 0); group 1 TPR 1, TNR 1/2 (FPR 1/2)
#   DEO = mean(1/2, 1/2) = 1/2; EOD = max(1/2, 1/2) = 1/2; P(ŷ=1): 1/3 vs 2/3 → 1/3
# attribute 1: group 0 TPR 1/2, TNR 1 (FPR 0); group 1 TPR 1, TNR 1 (FPR 0)
#   DEO = mean(1/2, 0) = 1/4; EOD = 1/2; P(ŷ=1): 1/3 vs 1/3 → 0
# DEO = (50, 25) → Δ_mean 37.5, Δ_max 50; EOD 50; DPD 100/3
# accuracy: group 0 4/6, group 1 5/6, overall 9/12
# group TPR/FPR macro over attributes: group 0 (1/2, 0); group 1 (1, 1/4)
# F1: attribute 0 tp 2 fp 1 fn 1 → 2/3; attribute 1 tp 2 fp 0 fn 1 → 4/5; macro 11/15
ML_Y = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0], [0, 1]])
ML_PRED = np.array([[1, 0], [0, 1], [0, 0], [1, 0], [1, 0], [0, 1]])
ML_G = np.array([0, 0, 0, 1, 1, 1])


def test_hand_multilabel():
    deo = deo_per_class(ML_PRED, ML_Y, ML_G, 2)
    assert deo == pytest.approx([50.0, 25.0])
    assert delta_deo(deo) == pytest.approx((37.5, 50.0))
    assert equalized_odds_difference(ML_PRED, ML_Y, ML_G, 2) == pytest.approx(50.0)
    assert demographic_parity_difference(ML_PRED, ML_Y, ML_G, 2) == pytest.approx(100 / 3)
    assert accuracy(ML_PRED, ML_Y) == pytest.approx(75.0)
    assert macro_f1(ML_PRED, ML_Y, 2) == pytest.approx(100 * 11 / 15)
    assert group_table(ML_PRED, ML_Y, ML_G, 2) == [
        {"group": 0, "count": 3, "accuracy": pytest.approx(200 / 3), "tpr": 50.0, "fpr": 0.0},
        {"group": 1, "count": 3, "accuracy": pytest.approx(500 / 6), "tpr": 100.0, "fpr": 25.0},
    ]


def test_multilabel_report_thresholds_at_half():
    scores = np.where(ML_PRED == 1, 0.9, 0.1)
    scores[2, 0] = 0.5  # exactly 0.5 is a negative (score > 0.5 rule); ML_PRED[2, 0] is 0
    report = fairness_report(scores, ML_Y.astype(np.float32), ML_G, task="multilabel")
    json.dumps(report, allow_nan=False)
    assert report["auroc"] == pytest.approx(100 * roc_auc_score(ML_Y, scores, average="macro"))
    assert report["accuracy"] == pytest.approx(75.0)
    assert report["deo"] == pytest.approx([50.0, 25.0])
    assert report["equalized_odds_difference"] == pytest.approx(50.0)
    assert report["demographic_parity_difference"] == pytest.approx(100 / 3)


# ------------------------------------------------ per-group rates and fairlearn-style gaps


def _binary_reference(y, p, g):
    """fairlearn's binary EOD and DPD, written out by hand (fairlearn is not installed)."""
    tprs, fprs, sel = [], [], []
    for v in np.unique(g):
        yy, pp = y[g == v], p[g == v]
        tprs.append(np.mean(pp[yy == 1] == 1))
        fprs.append(np.mean(pp[yy == 0] == 1))
        sel.append(np.mean(pp == 1))
    eod = max(max(tprs) - min(tprs), max(fprs) - min(fprs))
    return 100 * eod, 100 * (max(sel) - min(sel))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_group_rates_and_gaps_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 500
    g = rng.choice([0, 2, 5], size=n)
    y = rng.integers(0, 2, size=n)
    p = np.where(rng.uniform(size=n) < 0.7 - 0.1 * (g == 5), y, 1 - y)
    rows = group_table(p, y, g, 2)
    assert [r["group"] for r in rows] == [0, 2, 5]
    for row in rows:
        m = g == row["group"]
        tn, fp, fn, tp = confusion_matrix(y[m], p[m], labels=[0, 1]).ravel()
        assert row["count"] == m.sum()
        assert row["tpr"] == pytest.approx(100 * recall_score(y[m], p[m]))
        assert row["tpr"] == pytest.approx(100 * tp / (tp + fn))
        assert row["fpr"] == pytest.approx(100 * fp / (fp + tn))
        assert row["accuracy"] == pytest.approx(100 * accuracy_score(y[m], p[m]))
    eod, dpd = _binary_reference(y, p, g)
    assert equalized_odds_difference(p, y, g, 2) == pytest.approx(eod)
    assert demographic_parity_difference(p, y, g, 2) == pytest.approx(dpd)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_group_rates_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 600, 4
    g = rng.integers(0, 3, size=n)
    y = rng.integers(0, c, size=n)
    p = np.where(rng.uniform(size=n) < 0.6, y, rng.integers(0, c, size=n))
    rows = group_table(p, y, g, c)
    recalls = []
    for row in rows:
        m = g == row["group"]
        cm = confusion_matrix(y[m], p[m], labels=range(c))
        positives = cm.sum(axis=1)
        fpr = (cm.sum(axis=0) - np.diag(cm)) / (m.sum() - positives)
        recall = recall_score(y[m], p[m], labels=range(c), average=None, zero_division=0)
        recalls.append(recall)
        assert row["tpr"] == pytest.approx(100 * recall.mean())
        assert row["fpr"] == pytest.approx(100 * fpr.mean())
    # DEO is the per-class spread of the same per-group recalls.
    recalls = np.array(recalls)
    deo = deo_per_class(p, y, g, c)
    np.testing.assert_allclose(deo, 100 * (recalls.max(axis=0) - recalls.min(axis=0)))
    # Multi-class EOD/DPD are the max over classes of the one-vs-rest binary versions.
    per_class = [_binary_reference((y == k).astype(int), (p == k).astype(int), g) for k in range(c)]
    assert equalized_odds_difference(p, y, g, c) == pytest.approx(max(e for e, _ in per_class))
    assert demographic_parity_difference(p, y, g, c) == pytest.approx(max(d for _, d in per_class))


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, size=50)
    p = rng.integers(0, 3, size=50)
    g = rng.integers(0, 2, size=50)
    expected = group_table(p, y, g, 3)
    got = group_table(torch.tensor(p), torch.tensor(y), torch.tensor(g), 3)
    assert got == expected
    scores = torch.softmax(torch.tensor(rng.normal(size=(50, 3))), dim=1).to(torch.bfloat16)
    report = fairness_report(scores, torch.tensor(y), torch.tensor(g))
    assert report["num_samples"] == 50


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: accuracy(np.zeros(10, int), np.zeros(9, int)),
            r"preds has shape \(10,\) but labels has shape \(9,\)",
        ),
        (lambda: accuracy(np.zeros(0, int), np.zeros(0, int)), r"empty input.*\(0,\)"),
        (lambda: accuracy(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), r"got shape \(2, 2, 2\)"),
        (lambda: macro_f1(np.array([0, 1]), np.array([0, 3]), 3), r"labels out of range.*\[3\]"),
        (lambda: macro_f1(np.array([0, -1]), np.array([0, 1]), 3), r"preds out of range.*\[-1\]"),
        (lambda: macro_f1(np.zeros((4, 3)), np.zeros((4, 3)), 2), r"num_classes=2.*3 attributes"),
        (lambda: macro_f1(np.zeros((4, 2)), np.full((4, 2), 2), 2), r"labels must be 0/1.*\[2\]"),
        (lambda: accuracy(np.zeros(3), np.array([0.0, 0.5, 1.0])), r"whole numbers.*0\.5"),
        (lambda: macro_f1(np.zeros(3, int), np.zeros(3, int), 0), r"at least 1, got 0"),
        (
            lambda: deo_per_class(np.zeros(4, int), np.zeros(4, int), np.zeros(3, int), 2),
            r"groups has shape \(3,\) but labels have 4 rows",
        ),
        (
            lambda: group_table(np.zeros(4, int), np.zeros(4, int), np.zeros((4, 1), int), 2),
            r"groups must be 1-D \[N\], got shape \(4, 1\)",
        ),
        (lambda: auroc(np.array([[2.0, -1.0]]), np.array([0])), r"\[0, 1\].*softmax"),
        (lambda: auroc(np.array([[0.2, 0.2]]), np.array([0])), r"sum to 1.*0\.4.*softmax"),
        (lambda: auroc(np.full((3, 2), 0.5), np.zeros(4, int)), r"\(3, 2\).*labels.*\(4,\)"),
        (lambda: auroc(np.full(3, 0.5), np.zeros(3, int)), r"2-D.*got shape \(3,\)"),
        (lambda: auroc(np.full((2, 2), 0.5), np.array([0, 2])), r"labels out of range.*\[2\]"),
        (lambda: auroc(np.full((2, 2), 0.5), np.zeros((2, 2))), r"task='multilabel'"),
        (
            lambda: auroc(np.full((2, 2), 0.5), np.zeros((2, 3)), task="multilabel"),
            r"\(2, 2\).*\(2, 3\)",
        ),
        (lambda: auroc(np.full((2, 2), 0.5), np.zeros(2, int), task="binary"), r"'binary'"),
        (lambda: auroc(np.array([[np.nan, 1.0]]), np.zeros(1, int)), r"NaN"),
        (lambda: delta_deo(np.array([])), r"non-empty 1-D.*\(0,\)"),
        (
            lambda: fairness_report(np.full((2, 2), 0.5), np.zeros(2, int), np.zeros(5, int)),
            r"groups has shape \(5,\) but labels have 2 rows",
        ),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
