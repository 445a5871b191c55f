"""The message a finished job's event and last log line carry (workers/runner.py)."""

from __future__ import annotations

from workers.runner import finish_summary


def test_the_test_auroc_is_rounded_like_every_other_figure_a_user_reads() -> None:
    assert finish_summary({"auroc": 82.55728011825573, "f1": 39.4}) == "test AUROC 82.56"
    assert finish_summary({"auroc": 100}) == "test AUROC 100.00"


def test_a_run_without_test_metrics_says_so() -> None:
    assert finish_summary(None) == "no test AUROC"
    assert finish_summary({"auroc": None}) == "no test AUROC"


def test_a_student_that_predicts_one_class_is_called_out() -> None:
    summary = finish_summary({"auroc": 75.2, "delta_mean_deo": 0.0, "predicted_classes": 1})
    assert summary.startswith("test AUROC 75.20; the student predicts one class")
    assert "Δ-DEO says nothing" in summary
    assert finish_summary({"auroc": 75.2, "predicted_classes": 3}) == "test AUROC 75.20"
