"""The search over method options (φ learning rate, loss weights) with Ray Tune and ASHA.

Train V2 pattern: the Tuner runs a *driver function* per trial; the function builds a
``TorchTrainer`` whose ``RunConfig`` carries ``TuneReportCallback`` (metrics reach Tune, which
ASHA reads to stop weak trials early) and the job's metrics sink (each trial's epochs reach the
jobs database with its trial index).

The objective is fairness-aware and stated in the spec (``search.objective``):

* ``constrained``: maximise val AUROC among epochs whose Δ_mean-DEO ≤ the bound; an epoch over
  the bound scores below every epoch within it (−1000 − Δ_mean-DEO).
* ``weighted``: maximise AUROC − weight · Δ_mean-DEO.

Each trial publishes its own ``best``/``last`` under ``<job>/trials/<i>/checkpoints``; the best
trial's ``best`` becomes the job's ``best``. The Pareto front of (AUROC ↑, Δ_mean-DEO ↓) over the
trials' best epochs is recorded with the trials.

With a job's :class:`~workers.control.RunControl`, a stop ends the search: Tune starts no more
trials and stops the running ones (whose training loops stop within a step), and ``run_search``
returns the trials so far. Each trial registers its placement group (Tune's) and its
``TorchTrainer``'s controller with the control, so that a search killed outright, or a trial
stopped while its workers were starting, leaves nothing reserved
(:func:`workers.control.release_placement_groups`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from bird_core.methods import create_method
from service.spec import Distribution, JobSpec, SearchSpec
from service.storage import open_store
from workers.features import FeatureSet
from workers.sinks import MetricsSink
from workers.train import RayStorage, TrainPlan, build_datasets, run_training, search_score

__all__ = [
    "SEARCH_METRIC",
    "SearchOutcome",
    "TrialOutcome",
    "check_space",
    "pareto_front",
    "run_search",
    "search_job_run",
    "search_score",
    "tune_space",
]

# What ASHA and the best-trial choice read: the loop's objective, which under a search is
# workers.train.search_score of the spec's search objective.
SEARCH_METRIC = "objective"


def tune_space(space: dict[str, Distribution]) -> dict[str, Any]:
    """The spec's search space as Ray Tune sampling domains."""
    domains: dict[str, Any] = {}
    for name, dist in space.items():
        if dist.kind == "loguniform":
            domains[name] = tune.loguniform(dist.low, dist.high)
        elif dist.kind == "uniform":
            domains[name] = tune.uniform(dist.low, dist.high)
        else:
            domains[name] = tune.choice(list(dist.values or []))
    return domains


def check_space(spec: JobSpec, base_options: dict[str, Any]) -> None:
    """Raise a ValueError naming the dimension when a value the space can give is invalid.

    Each range's ends and each choice are tried on the method's own option checks, so a bad
    space fails the job before any trial starts instead of failing trials one by one.
    """
    if spec.search is None:
        return
    for name, dist in spec.search.space.items():
        candidates = dist.values if dist.kind == "choice" else [dist.low, dist.high]
        for value in candidates or []:
            try:
                create_method(spec.method.name, **{**base_options, name: value})
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"search space {name!r}: value {value!r} is invalid: {error}"
                ) from None


def pareto_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Keys of the points no other point beats on both AUROC (higher) and Δ-DEO (lower)."""
    front = set()
    for key, (auroc, deo) in points.items():
        dominated = any(
            (a >= auroc and d <= deo) and (a > auroc or d < deo)
            for other, (a, d) in points.items()
            if other != key
        )
        if not dominated:
            front.add(key)
    return front


@dataclass
class TrialOutcome:
    """One trial: its parameters, epochs run, best epoch's metrics, state."""

    index: int
    params: dict[str, Any]
    epochs: int
    best_objective: float
    best_val: dict[str, Any]
    state: str  # "completed", "early_stopped" or "error"
    checkpoint_base: str
    error: str | None = None
    pareto: bool = False


@dataclass
class SearchOutcome:
    """The search's trials and which one won."""

    trials: list[TrialOutcome] = field(default_factory=list)
    best: TrialOutcome | None = None


def _trial_index() -> int:
    # Tune names trials <experiment>_<5-digit counter>; the counter is the trial's index.
    return int(tune.get_context().get_trial_id().rsplit("_", 1)[-1])


def _control(name: str | None) -> Any:
    """The job's RunControl actor, or None (none named, or gone)."""
    if name is None:
        return None
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


class _StopOnRequest(tune.Stopper):
    """Ends the whole search when the job's RunControl asks for a stop (or is gone: the
    attempt that owned the search no longer does). Polled by Tune's loop; asks at most twice a
    second."""

    def __init__(self, control_name: str) -> None:
        self.control_name = control_name
        self._stop = False
        self._next = 0.0

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Trials are stopped only all together (stop_all)."""
        return False

    def stop_all(self) -> bool:
        """Whether the search must end now."""
        if not self._stop and time.monotonic() >= self._next:
            self._next = time.monotonic() + 0.5
            control = _control(self.control_name)
            try:
                self._stop = control is None or bool(ray.get(control.is_set.remote(), timeout=5))
            except ray.exceptions.RayActorError:
                self._stop = True
            except ray.exceptions.GetTimeoutError:
                # A slow answer (a loaded machine) is no stop: asked again at the next poll.
                # Raised, it failed the whole search (the chaos bench saw an attempt lost).
                pass
        return self._stop


def _trial_driver(
    config: dict[str, Any],
    plan: TrainPlan,
    datasets: dict[str, Any],
    storage_path: str,
    storage_filesystem: Any,
    trial_base: str,
    make_sink: Callable[[int], MetricsSink | None],
) -> None:
    """A Tune trial: one ``TorchTrainer`` with the sampled options, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    index = _trial_index()
    control = _control(plan.run_control)
    if control is not None:
        if ray.get(control.is_set.remote()):
            return  # the search is ending: no new training run
        group = ray.util.get_current_placement_group()
        if group is not None:
            control.register.remote("trial", index, group)
    trial_plan = replace(
        plan,
        method_options={**plan.method_options, **config},
        trial=index,
        checkpoint_base=f"{trial_base}/{index}/checkpoints",
    )
    run_training(
        trial_plan,
        datasets,
        storage=RayStorage(storage_path, storage_filesystem),
        run_name=f"trial-{index}",
        sink=make_sink(index),
        callbacks=[TuneReportCallback()],
    )


def run_search(
    plan: TrainPlan,
    datasets: dict[str, Any],
    *,
    storage: RayStorage,
    run_name: str,
    trial_base: str,
    make_sink: Callable[[int], MetricsSink | None] = lambda index: None,
    max_concurrent: int | None = None,
) -> SearchOutcome:
    """Run the spec's search, or continue it where ``storage``/``run_name`` hold its state;
    return every trial's outcome and the best one.

    ``trial_base`` is the store prefix under which trial ``i`` publishes its checkpoints
    (``<trial_base>/<i>/checkpoints/{best,last}``). ``make_sink(i)`` gives trial ``i``'s sink.
    ``max_concurrent`` (default: the spec's) caps the trials that run at once.
    """
    spec: JobSpec = plan.job
    search = spec.search
    if search is None:
        raise ValueError("the job spec has no search section")
    check_space(spec, plan.method_options)
    driver = tune.with_parameters(
        _trial_driver,
        plan=plan,
        datasets=datasets,
        storage_path=storage.path,
        storage_filesystem=storage.filesystem,
        trial_base=trial_base,
        make_sink=make_sink,
    )
    # The driver only waits on its TorchTrainer: a sliver of a CPU (Tune refuses none).
    trainable = tune.with_resources(driver, {"CPU": 0.01})
    param_space = tune_space(search.space)
    experiment = f"{storage.path}/{run_name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage.filesystem):
        # The same search again (a retried job whose worker died): finished trials keep their
        # results and are not run again; unfinished ones, and ones that errored with the lost
        # worker, continue, and each trial's TorchTrainer resumes from its own last checkpoint.
        tuner = tune.Tuner.restore(
            experiment,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space,
            storage_filesystem=storage.filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=SEARCH_METRIC,
                mode="max",
                scheduler=ASHAScheduler(
                    time_attr="epoch",
                    max_t=spec.training.epochs,
                    grace_period=min(search.grace_period, spec.training.epochs),
                    reduction_factor=search.reduction_factor,
                ),
                num_samples=search.num_samples,
                # Seeded so a job's trials are reproducible; the generator enforces the limit
                # on concurrent trials itself (TuneConfig's is ignored beside a generator).
                search_alg=tune.search.BasicVariantGenerator(
                    random_state=spec.seed,
                    max_concurrent=max_concurrent or search.max_concurrent_trials,
                ),
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=storage.path,
                storage_filesystem=storage.filesystem,
                # Saved with the experiment: a restored search finds the control under the
                # same (per-job) name.
                stop=_StopOnRequest(plan.run_control) if plan.run_control else None,
            ),
        )
    return _outcome(tuner.fit(), search, spec.training.epochs, trial_base)


def _outcome(grid: Any, search: SearchSpec, max_epochs: int, trial_base: str) -> SearchOutcome:
    """Every trial's parameters, epochs, best epoch and state; the Pareto front; the winner."""
    outcome = SearchOutcome()
    for result in grid:
        history = result.metrics_dataframe
        params = {k: result.config[k] for k in search.space}
        trial_id = (result.metrics or {}).get("trial_id") or ""
        index = int(str(trial_id).rsplit("_", 1)[-1]) if trial_id else len(outcome.trials)
        epochs = int(history["epoch"].max()) if history is not None and len(history) else 0
        best_objective, best_val = -math.inf, {}
        if history is not None and len(history):
            row = history.loc[history[SEARCH_METRIC].idxmax()]
            best_objective = float(row[SEARCH_METRIC])
            best_val = {
                "auroc": float(row["val_auroc"]),
                "delta_mean_deo": float(row["val_delta_mean_deo"]),
                "epoch": int(row["epoch"]),
            }
        if result.error is not None:
            state = "error"
        elif epochs < max_epochs:
            state = "early_stopped"
        else:
            state = "completed"
        outcome.trials.append(
            TrialOutcome(
                index=index,
                params=params,
                epochs=epochs,
                best_objective=best_objective,
                best_val=best_val,
                state=state,
                checkpoint_base=f"{trial_base}/{index}/checkpoints",
                error=None if result.error is None else str(result.error),
            )
        )
    outcome.trials.sort(key=lambda t: t.index)
    scored = {t.index: t for t in outcome.trials if math.isfinite(t.best_objective)}
    front = pareto_front(
        {i: (t.best_val["auroc"], t.best_val["delta_mean_deo"]) for i, t in scored.items()}
    )
    for trial in outcome.trials:
        trial.pareto = trial.index in front
    if scored:
        outcome.best = max(scored.values(), key=lambda t: (t.best_objective, -t.index))
    return outcome


def search_job_run(
    plan: TrainPlan,
    data_store_url: str,
    features: FeatureSet,
    *,
    storage: RayStorage,
    run_name: str,
    trial_base: str,
    make_sink: Callable[[int], MetricsSink | None],
    max_concurrent: int,
) -> SearchOutcome:
    """A job's search as its Ray task runs it: the datasets, then :func:`run_search`."""
    store = open_store(data_store_url, plan.settings)
    datasets = build_datasets(store, features, plan)
    return run_search(
        plan,
        datasets,
        storage=storage,
        run_name=run_name,
        trial_base=trial_base,
        make_sink=make_sink,
        max_concurrent=max_concurrent,
    )
