"""How the `best` checkpoint and a search's trials are ranked (workers/train.py): a student that
predicts one class has Δ-DEO 0 by construction, and must not win on it."""

from __future__ import annotations

import numpy as np
import pytest

from bird_core.metrics import fairness_report, predicts_one_class
from service.spec import JobSpec, ObjectiveSpec
from workers.train import objective_score, search_score

# A real student on a skewed val split: good AUROC, a large gap between the groups.
BIASED = {"auroc": 88.0, "delta_mean_deo": 30.0, "predicted_classes": 3}
# A student that predicts the majority class for every row: its scores still rank (AUROC 75),
# and every group gets the same rates (Δ 0).
ONE_CLASS = {"auroc": 75.0, "delta_mean_deo": 0.0, "predicted_classes": 1}


def _spec(**overrides: object) -> JobSpec:
    return JobSpec.model_validate({"dataset": {"uri": "datasets/x"}, **overrides})


def test_the_report_counts_the_classes_the_predictions_use() -> None:
    labels, groups = [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]
    # Class 0 always has the highest score, yet the scores still rank the rows (AUROC > 50).
    shift = np.linspace(0, 0.05, 6)[:, None] * np.array([[-1.0, 1.0, 0.0]])
    majority = np.tile([0.5, 0.3, 0.2], (6, 1)) + shift
    report = fairness_report(majority, labels, groups)
    assert report["predicted_classes"] == 1 and report["delta_mean_deo"] == 0.0
    assert predicts_one_class(report)
    assert fairness_report(np.eye(3)[labels], labels, groups)["predicted_classes"] == 3
    assert not predicts_one_class({"auroc": 80.0})  # a report from before the count existed


@pytest.mark.parametrize(
    "objective",
    [
        {"kind": "constrained", "max_delta_mean_deo": 10},
        {"kind": "weighted", "fairness_weight": 2},
    ],
)
def test_a_search_ranks_a_one_class_student_below_every_other(objective: dict) -> None:
    spec = ObjectiveSpec.model_validate(objective)
    assert search_score(BIASED, spec) > search_score(ONE_CLASS, spec)
    # Among one-class epochs, the better AUROC still ranks first.
    better = {**ONE_CLASS, "auroc": 80.0}
    assert search_score(better, spec) > search_score(ONE_CLASS, spec)


def test_fair_score_never_picks_a_one_class_epoch_as_best() -> None:
    spec = _spec()  # objective fair_score: AUROC − fairness_weight · Δ_mean-DEO
    weight = spec.training.fairness_weight
    assert objective_score(BIASED, spec) == pytest.approx(88.0 - weight * 30.0)
    assert objective_score(BIASED, spec) > objective_score(ONE_CLASS, spec)
    # Plain AUROC does not look at Δ-DEO, so it has nothing to be fooled by.
    auroc_only = _spec(training={"objective": "auroc"})
    assert objective_score(ONE_CLASS, auroc_only) == 75.0
