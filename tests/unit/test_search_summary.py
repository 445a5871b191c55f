"""The job-log line after a search (workers/pipeline.py)."""

from __future__ import annotations

from workers.pipeline import search_summary
from workers.tune import SearchOutcome, TrialOutcome


def _trial(index: int, state: str, auroc: float) -> TrialOutcome:
    return TrialOutcome(
        index=index,
        params={"phi_lr": 0.18789852661, "gamma": "none"},
        epochs=3,
        best_objective=auroc,
        best_val={"auroc": auroc, "delta_mean_deo": 4.25, "epoch": 2},
        state=state,
        checkpoint_base=f"jobs/1/trials/{index}/checkpoints",
    )


def test_the_search_summary_counts_trials_by_outcome_and_names_the_winner() -> None:
    trials = [_trial(0, "completed", 81.0), _trial(1, "early_stopped", 70.0)]
    trials.append(_trial(2, "completed", 84.5))
    line = search_summary(SearchOutcome(trials=trials, best=trials[2]))
    assert line == (
        "search: 3 trial(s) (2 completed, 1 early stopped); best trial 2 "
        "(gamma=none, phi_lr=0.1879) at epoch 2: val AUROC 84.50, Δ_mean-DEO 4.25"
    )
