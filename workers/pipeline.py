"""One job end to end: dataset → teacher features → training or search → test evaluation.

:func:`run_job` is what a worker runs for a claimed job. It reports its stage through
:class:`~workers.control.JobControl` (the runner turns that into heartbeats), writes per-epoch
metrics through the database sink (fenced with the attempt number), and leaves in the object
store, under ``jobs/<id>/``:

* ``checkpoints/{best,last}/`` and ``checkpoints/{best,last}.tar`` (published as training goes);
* ``ray/`` (Ray Train's and Tune's own run state: re-running the job resumes from it);
* ``result.json`` (test metrics of ``best``), written last: a job's result exists once it does.

Stages: ``precomputing`` (check the request against the cluster, read and validate the
dataset, load the teacher, compute or reuse its features), ``waiting_for_resources`` (only if
the cluster has no room for the run now; bounded by ``resource_wait_s``), ``training`` or
``tuning``, ``evaluating``, ``uploading``. Every Ray run (the feature precompute, the training
or the search) is a Ray task the worker can kill (:func:`~workers.control.run_on_ray`), so a
cancel ends every stage within seconds.

Errors in the job's own inputs (a request the cluster can never hold, a dataset that is not in
the bird format or whose part does not match its manifest, teacher weights that do not fit,
options out of range) raise :class:`JobInputError` with a message for the user; the runner fails
the job at once instead of retrying it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bird_core.checkpoint import CheckpointError, load_student
from bird_core.train import evaluate
from bird_datasets.format import DatasetError
from bird_datasets.location import (
    external_refused,
    is_external_uri,
    resolve_dataset_uri,
    resolve_tenant_key,
)
from bird_datasets.reader import read_dataset_meta
from service.compat import resolve_spec
from service.models import JobStage
from service.settings import Settings
from service.spec import JobSpec
from service.storage import (
    BucketNotFoundError,
    ChecksumMismatchError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStore,
    join_key,
)
from workers.checkpoints import download_checkpoint, publish_checkpoint
from workers.cluster import (
    RunDemand,
    check_feasible,
    cluster_capacity,
    fit_concurrency,
    wait_for_room,
)
from workers.control import JobControl, run_on_ray
from workers.datasets import load_splits
from workers.errors import JobCancelled, JobInputError
from workers.features import FeatureSet, compute_features_at, precompute_features
from workers.sinks import DatabaseSink, report_rows
from workers.teachers import TeacherLoadError, teacher_source_from_spec
from workers.train import RayStorage, plan_training, train_job_run

__all__ = [
    "SLOW_STAGE_ENV",
    "JobCancelled",
    "JobControl",
    "JobInputError",
    "JobResult",
    "job_prefix",
    "run_job",
    "search_summary",
]

RESULT_NAME = "result.json"
# Test-only: "evaluating=5" makes that stage's work take 5 s longer (evaluating or uploading),
# so that a test can act while a job is in a stage that is otherwise over in a moment.
SLOW_STAGE_ENV = "BIRD_TEST_SLOW_STAGE"


@dataclass
class JobResult:
    """What a finished job produced."""

    cancelled: bool = False
    test: dict[str, Any] | None = None
    best_epoch: int | None = None
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


def job_prefix(job_id: int) -> str:
    """Where a job's artifacts live in the deployment's store."""
    return f"jobs/{job_id}"


def _tenant_teacher(spec: JobSpec, settings: Settings, tenant_id: int | None) -> Any:
    """The spec's teacher with ``weights_uri`` made a key of the tenant's space (or refused
    by its form, as the API does, unless ``settings.allow_external_uris``)."""
    uri = spec.teacher.weights_uri
    if uri is None:
        return spec.teacher
    if is_external_uri(uri):
        if settings.allow_external_uris:
            return spec.teacher
        raise TeacherLoadError(
            external_refused("teacher weights URI", uri, "teachers/<name>/model.safetensors")
        )
    try:
        key = resolve_tenant_key(uri, tenant_id)
    except InvalidKeyError as error:
        raise TeacherLoadError(f"invalid teacher weights URI {uri!r}: {error}") from error
    return spec.teacher.model_copy(update={"weights_uri": key})


@contextmanager
def _inputs_at_fault(spec: JobSpec, dataset_uri: Callable[[], str | None]) -> Iterator[None]:
    """Turn the errors of reading the job's inputs into :class:`JobInputError`.

    Other storage errors (an unreachable store) are about the deployment, not the job's inputs:
    they pass as they are, and the job is retried.
    """
    try:
        yield
    except JobInputError:
        raise
    except ChecksumMismatchError as error:
        root = dataset_uri()
        part = error.uri or ""
        if root is not None and part.startswith(root):
            name = part[len(root) :].strip("/")
            raise JobInputError(
                f"dataset {spec.dataset.uri}: part {name} does not match the dataset's manifest "
                "(its size or sha256 differs): the part is corrupt; write the dataset again"
            ) from error
        raise JobInputError(str(error)) from error
    except (
        DatasetError,
        TeacherLoadError,
        CheckpointError,
        ObjectNotFoundError,
        BucketNotFoundError,
    ) as error:
        raise JobInputError(str(error)) from error
    except (TypeError, ValueError) as error:
        raise JobInputError(f"invalid job options: {error}") from error


def _slow_stage(stage: JobStage) -> None:
    """The test-only delay of :data:`SLOW_STAGE_ENV` for ``stage`` (none when unset)."""
    text = os.environ.get(SLOW_STAGE_ENV, "")
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name.strip() == stage.value:
            time.sleep(float(seconds))


def _interruptible(work: Callable[[], Any], control: JobControl, poll_s: float = 0.2) -> Any:
    """``work()`` in a thread of its own; :class:`JobCancelled` as soon as the job must stop.

    For work in this process that cannot be interrupted (the test evaluation): a cancel does
    not wait for it; the abandoned thread finishes in the background and its result is dropped.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as error:  # handed to the caller
            box["error"] = error
        finally:
            done.set()

    threading.Thread(target=target, name=f"job-{control.job_id}-work", daemon=True).start()
    while not done.wait(poll_s):
        control.check()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_job(
    job_id: int,
    spec: JobSpec,
    *,
    settings: Settings,
    store: ObjectStore,
    control: JobControl,
    log: Callable[[str, str], None] = lambda level, message: None,
    tenant_id: int | None = None,
) -> JobResult:
    """Run job ``job_id`` of tenant ``tenant_id`` to the end (or to a cancellation); see the
    module docstring.

    The spec's dataset and teacher are names in the tenant's space
    (:mod:`bird_datasets.location`); ``tenant_id`` None reads them from the store's root.
    ``log(level, message)`` writes to the job's log.
    """
    base = job_prefix(job_id)
    database_url = settings.resolved_database_url
    attempt = control.attempt
    # A request the cluster can never hold fails now, before anything is read or computed,
    # and before any stage is entered: it never started precomputing.
    demand = RunDemand.of(spec)
    capacity = cluster_capacity()
    problem = check_feasible(demand, capacity)
    if problem is not None:
        raise JobInputError(problem)

    control.enter(JobStage.PRECOMPUTING, 0.01)

    data: dict[str, Any] = {}
    with _inputs_at_fault(spec, lambda: data.get("uri")):
        data_store, prefix = resolve_dataset_uri(
            spec.dataset.uri, settings, store, tenant_id=tenant_id
        )
        data["uri"] = data_store.uri(prefix)
        meta = read_dataset_meta(data_store, prefix)
        # The API resolved the stored spec already; a spec from elsewhere gets the same defaults.
        spec, problems = resolve_spec(spec, meta)
        if problems:
            raise JobInputError("; ".join(f"{'.'.join(p.loc)}: {p.message}" for p in problems))
        splits = load_splits(data_store, prefix)  # validates every part and row
        teacher = teacher_source_from_spec(
            store, _tenant_teacher(spec, settings, tenant_id), meta.num_classes
        )
    features = _teacher_features(
        job_id, spec, settings, store, data_store, prefix, teacher, splits, control, log
    )
    with _inputs_at_fault(spec, lambda: data.get("uri")):
        plan = plan_training(
            spec,
            # The store's own URI is absolute (a relative directory would mean something else
            # in Ray's worker processes, which run elsewhere).
            store_url=store.uri(""),
            settings=settings,
            features=features,
            dataset_meta=meta,
            checkpoint_base=join_key(base, "checkpoints"),
            run_control=control.run_control,
        )

    _wait_for_room(demand, settings, control, log)
    control.enter(JobStage.TUNING if spec.search else JobStage.TRAINING, 0.1)
    storage = RayStorage.on_store(store, join_key(base, "ray"))
    run = {"control": control, "grace_s": settings.stop_grace_s}
    result = JobResult()
    if spec.search is None:
        # Ray Train takes a while to start its workers (about a minute on a busy machine)
        # before the first epoch moves the progress: say what is happening meanwhile.
        log("info", f"training: starting Ray Train with {demand.describe()}")
        try:
            outcome = run_on_ray(
                train_job_run,
                plan,
                data_store.uri(""),
                features,
                storage=storage,
                run_name="train",
                sink=DatabaseSink(database_url, job_id, attempt=attempt),
                name=f"bird-job-{job_id}-train",
                **run,
            )
        except JobCancelled:  # killed after its grace: nothing more to record
            result.cancelled = True
            return result
        if outcome.stopped and outcome.last is not None:
            # The stop's final checkpoint replaced `last` in the store; its record follows (the
            # sink records the checkpoints of whole epochs only), or the record would describe
            # the previous epoch's archive and downloads would fail their checksum.
            _record_checkpoint(database_url, job_id, outcome.last, attempt)
        if outcome.stopped or control.stopping():
            result.cancelled = True
            return result
    else:
        from workers.tune import search_job_run

        wanted = spec.search.max_concurrent_trials
        concurrency = fit_concurrency(wanted, demand, capacity)
        reduced = (
            f" ({concurrency} trial(s) at a time instead of {wanted}: the Ray cluster has "
            f"{capacity.describe()})"
            if concurrency < wanted
            else ""
        )
        log(
            "info",
            f"search: starting Ray Tune with {spec.search.num_samples} trial(s), "
            f"{concurrency} at a time, each {demand.describe()}{reduced}",
        )
        search = None
        # Killed after its grace (JobCancelled): the trials so far are in the database.
        with contextlib.suppress(JobCancelled):
            search = run_on_ray(
                search_job_run,
                plan,
                data_store.uri(""),
                features,
                storage=storage,
                run_name="search",
                trial_base=join_key(base, "trials"),
                make_sink=_TrialSinks(database_url, job_id, attempt),
                max_concurrent=concurrency,
                name=f"bird-job-{job_id}-search",
                **run,
            )
        if search is not None:
            _record_trials(database_url, job_id, search, attempt)
        if control.stopping():
            # Cancelling a search keeps the best trial's best checkpoint so far.
            _keep_best_trial(store, database_url, job_id, attempt, log)
            result.cancelled = True
            return result
        assert search is not None
        if search.best is None:
            raise RuntimeError("no trial of the search produced a result")
        log("info", search_summary(search))
        _adopt_trial_best(store, database_url, job_id, search.best.checkpoint_base, attempt)

    control.enter(JobStage.EVALUATING, 0.92)

    def evaluate_best() -> tuple[dict[str, Any], int | None]:
        _slow_stage(JobStage.EVALUATING)
        with tempfile.TemporaryDirectory(prefix="bird-eval-") as directory:
            local = download_checkpoint(store, join_key(base, "checkpoints"), "best", directory)
            student = load_student(local)
            test = evaluate(student.model, student.preprocess, splits.test, splits.task)
        return test, student.meta.get("epoch")

    test, best_epoch = _interruptible(evaluate_best, control)
    result.test, result.best_epoch = test, best_epoch
    _record_test_metrics(database_url, job_id, test, best_epoch, attempt)

    control.enter(JobStage.UPLOADING, 0.97)
    _slow_stage(JobStage.UPLOADING)
    result.checkpoints = _checkpoint_records(database_url, job_id)
    summary = {
        "job_id": job_id,
        "test": test,
        "best_epoch": best_epoch,
        "checkpoints": result.checkpoints,
        "spec": spec.model_dump(mode="json"),
    }
    control.check()  # a cancel that arrived during the upload: no result
    # Written last: the job's result exists once this object does.
    store.put_bytes(
        join_key(base, RESULT_NAME), json.dumps(summary, default=_json_default).encode()
    )
    control.progress = 1.0
    return result


def _teacher_features(
    job_id: int,
    spec: JobSpec,
    settings: Settings,
    store: ObjectStore,
    data_store: ObjectStore,
    prefix: str,
    teacher: Any,
    splits: Any,
    control: JobControl,
    log: Callable[[str, str], None],
) -> FeatureSet:
    """The teacher's features: reused when cached and intact, else computed in a Ray task
    (killed at once on a cancel); a corrupt cache is invalidated and computed again, once.

    Derived data lives in the deployment's ``store``, keyed by content, never in the dataset's
    location (which may be shared, or not the deployment's at all)."""

    def compute(*args: Any, **kwargs: Any) -> FeatureSet:
        log("info", "computing the teacher's features")
        return run_on_ray(
            compute_features_at,
            store.uri(""),
            data_store.uri(""),
            settings,
            *args,
            control=control,
            grace_s=0,
            name=f"bird-job-{job_id}-features",
            **kwargs,
        )

    return precompute_features(
        data_store,
        prefix,
        teacher,
        dataset_preprocessing=splits.preprocessing,
        probe_epochs=spec.teacher.probe_epochs,
        seed=spec.seed,
        recompute_corrupt=True,
        on_progress=lambda message: log("info", message),
        should_stop=control.stopping,
        compute=compute,
        cache_store=store,
    )


def _wait_for_room(
    demand: RunDemand,
    settings: Settings,
    control: JobControl,
    log: Callable[[str, str], None],
) -> None:
    """Wait (stage ``waiting_for_resources``) until the cluster has room for one run."""

    def waiting(capacity: Any) -> None:
        control.enter(JobStage.WAITING_FOR_RESOURCES, 0.05)
        log(
            "info",
            f"waiting up to {settings.resource_wait_s} s for room for {demand.describe()}: "
            f"the Ray cluster has {capacity.describe_free()}",
        )

    if not wait_for_room(
        demand,
        timeout_s=settings.resource_wait_s,
        should_stop=control.stopping,
        on_wait=waiting,
    ):
        raise JobCancelled()


class _TrialSinks:
    """``make_sink`` of a job's search: trial ``i``'s database sink (picklable)."""

    def __init__(self, database_url: str, job_id: int, attempt: int | None) -> None:
        self.database_url, self.job_id, self.attempt = database_url, job_id, attempt

    def __call__(self, index: int) -> DatabaseSink:
        return DatabaseSink(self.database_url, self.job_id, trial=index, attempt=self.attempt)


def _adopt_trial_best(
    store: ObjectStore, database_url: str, job_id: int, trial_base: str, attempt: int | None
) -> None:
    """Publish a trial's ``best`` as the job's ``best`` and record it."""
    with tempfile.TemporaryDirectory(prefix="bird-best-") as directory:
        local = download_checkpoint(store, trial_base, "best", directory)
        published = publish_checkpoint(
            store, local, join_key(job_prefix(job_id), "checkpoints"), "best"
        )
    _record_checkpoint(database_url, job_id, published.as_dict(), attempt)


def _keep_best_trial(
    store: ObjectStore,
    database_url: str,
    job_id: int,
    attempt: int | None,
    log: Callable[[str, str], None],
) -> None:
    """After a cancelled search: the best checkpoint of the trials so far becomes the job's
    ``best`` (chosen by the val objective each trial reported; nothing if none reported)."""
    best = _best_trial_so_far(database_url, job_id)
    if best is None:
        log("info", "search cancelled before any trial finished an epoch: no best checkpoint")
        return
    index, objective = best
    try:
        _adopt_trial_best(
            store, database_url, job_id, f"{job_prefix(job_id)}/trials/{index}/checkpoints", attempt
        )
    except (ObjectNotFoundError, CheckpointError) as error:
        log("warning", f"search cancelled: trial {index}'s best checkpoint is unusable ({error})")
        return
    log("info", f"search cancelled: kept trial {index}'s best checkpoint (objective {objective:g})")


def _best_trial_so_far(database_url: str, job_id: int) -> tuple[int, float] | None:
    """(trial, objective) of the best val objective any trial of the job reported."""
    from sqlalchemy import select

    from service.models import Metric

    engine, session = _session(database_url)
    try:
        with session:
            row = session.execute(
                select(Metric.trial, Metric.value)
                .where(
                    Metric.job_id == job_id,
                    Metric.split == "val",
                    Metric.name == "objective",
                    Metric.trial.is_not(None),
                    Metric.value.is_not(None),
                )
                .order_by(Metric.value.desc(), Metric.trial)
                .limit(1)
            ).first()
    finally:
        engine.dispose()
    return None if row is None else (int(row.trial), float(row.value))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _session(database_url: str) -> Any:
    from service.db import make_engine, session_factory

    engine = make_engine(database_url)
    return engine, session_factory(engine)()


def _record_test_metrics(
    database_url: str,
    job_id: int,
    test: dict[str, Any],
    epoch: int | None,
    attempt: int | None,
) -> None:
    from service import queue

    engine, session = _session(database_url)
    try:
        with session:
            queue.record_metrics(
                session,
                job_id,
                report_rows(test, "test", epoch=epoch, trial=None),
                attempt=attempt,
                # A job's test metrics once, even after an attempt killed while uploading.
                replace_split="test",
            )
    finally:
        engine.dispose()


def _record_checkpoint(
    database_url: str, job_id: int, info: dict[str, Any], attempt: int | None
) -> None:
    from service import queue

    engine, session = _session(database_url)
    try:
        with session:
            queue.add_checkpoint(
                session,
                job_id,
                info["name"],
                info["uri"],
                size=info["size"],
                sha256=info["sha256"],
                attempt=attempt,
            )
    finally:
        engine.dispose()


def _checkpoint_records(database_url: str, job_id: int) -> dict[str, dict[str, Any]]:
    from sqlalchemy import select

    from service.models import Checkpoint

    engine, session = _session(database_url)
    try:
        with session:
            rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
            return {
                row.name: {"uri": row.uri, "size": row.size, "sha256": row.sha256} for row in rows
            }
    finally:
        engine.dispose()


def search_summary(search: Any) -> str:
    """One log line after a search: its trials by outcome and the winner with its parameters and
    best val metrics (the job's log said nothing between the features and the finish before)."""
    outcomes = Counter(trial.state for trial in search.trials)
    counted = ", ".join(
        f"{count} {state.replace('_', ' ')}" for state, count in sorted(outcomes.items())
    )
    best = search.best
    params = ", ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in sorted(best.params.items())
    )
    val = best.best_val
    return (
        f"search: {len(search.trials)} trial(s) ({counted}); best trial {best.index} "
        f"({params}) at epoch {val.get('epoch')}: val AUROC {val.get('auroc', float('nan')):.2f}, "
        f"Δ_mean-DEO {val.get('delta_mean_deo', float('nan')):.2f}"
    )


def _record_trials(database_url: str, job_id: int, search: Any, attempt: int | None) -> None:
    from service import queue

    engine, session = _session(database_url)
    try:
        with session:
            for trial in search.trials:
                queue.upsert_trial(
                    session,
                    job_id,
                    trial.index,
                    state=trial.state,
                    params=trial.params,
                    metrics={
                        **trial.best_val,
                        "objective": trial.best_objective,
                        "epochs": trial.epochs,
                        "pareto": trial.pareto,
                        "best": search.best is not None and trial.index == search.best.index,
                    },
                    attempt=attempt,
                )
    finally:
        engine.dispose()


def load_result(store: ObjectStore, job_id: int) -> dict[str, Any] | None:
    """The job's ``result.json`` (None while it does not exist)."""
    try:
        return json.loads(store.get_bytes(join_key(job_prefix(job_id), RESULT_NAME)))
    except ObjectNotFoundError:
        return None
