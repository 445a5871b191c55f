"""One job end to end: dataset → teacher features → training or search → test evaluation.

:func:`run_job` is what a worker runs for a claimed job. It reports its stage through
``JobControl`` (the runner turns that into heartbeats), writes per-epoch metrics through the
database sink, and leaves in the object store, under ``jobs/<id>/``:

* ``checkpoints/{best,last}/`` and ``checkpoints/{best,last}.tar`` (published as training goes);
* ``ray/`` (Ray Train's own run state: re-running the job resumes from its last checkpoint);
* ``result.json`` (test metrics of ``best``), written last: a job's result exists once it does.

Errors in the job's own inputs (a dataset that is not in the bird format, teacher weights that
do not fit, options out of range) raise :class:`JobInputError` with a message for the user; the
runner fails the job at once instead of retrying it.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
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
from service.models import JobStage
from service.settings import Settings
from service.spec import JobSpec
from service.storage import (
    BucketNotFoundError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStore,
    join_key,
)
from workers.checkpoints import download_checkpoint, publish_checkpoint
from workers.datasets import load_splits
from workers.features import FeatureError, precompute_features
from workers.sinks import DatabaseSink, report_rows
from workers.teachers import TeacherLoadError, teacher_source_from_spec
from workers.train import (
    RayStorage,
    build_datasets,
    plan_training,
    run_training,
)

__all__ = [
    "JobCancelled",
    "JobControl",
    "JobInputError",
    "JobResult",
    "job_prefix",
    "run_job",
]

RESULT_NAME = "result.json"


class JobInputError(ValueError):
    """The job cannot succeed as specified (bad dataset, teacher, options); no retry helps."""


class JobCancelled(Exception):
    """Cancellation was requested; raised between stages."""


@dataclass
class JobControl:
    """What the pipeline and the runner share while a job runs."""

    stage: JobStage | None = None
    progress: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    stop_flag_name: str | None = None  # the StopFlag actor the training loop polls
    changed: threading.Event = field(default_factory=threading.Event)  # report now, not later

    def enter(self, stage: JobStage, progress: float) -> None:
        """Move to ``stage``; raise :class:`JobCancelled` if a cancel arrived meanwhile."""
        if self.cancel.is_set():
            raise JobCancelled()
        self.stage = stage
        self.progress = max(self.progress, progress)
        self.changed.set()


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


def run_job(
    job_id: int,
    spec: JobSpec,
    *,
    settings: Settings,
    store: ObjectStore,
    control: JobControl,
    tenant_id: int | None = None,
) -> JobResult:
    """Run job ``job_id`` of tenant ``tenant_id`` to the end (or to a cancellation); see the
    module docstring. The spec's dataset and teacher are names in the tenant's space
    (:mod:`bird_datasets.location`); ``tenant_id`` None reads them from the store's root."""
    base = job_prefix(job_id)
    database_url = settings.resolved_database_url
    try:
        control.enter(JobStage.PRECOMPUTING, 0.01)
        data_store, prefix = resolve_dataset_uri(
            spec.dataset.uri, settings, store, tenant_id=tenant_id
        )
        meta = read_dataset_meta(data_store, prefix)
        splits = load_splits(data_store, prefix)  # validates every row against the format
        teacher = teacher_source_from_spec(
            store, _tenant_teacher(spec, settings, tenant_id), meta.num_classes
        )
        features = precompute_features(
            data_store,
            prefix,
            teacher,
            # Derived data lives in the deployment's store, keyed by content, never in the
            # dataset's location (which may be shared, or not the deployment's at all).
            cache_store=store,
            dataset_preprocessing=splits.preprocessing,
            probe_epochs=spec.teacher.probe_epochs,
            seed=spec.seed,
        )
        control.enter(JobStage.TUNING if spec.search else JobStage.TRAINING, 0.1)
        plan = plan_training(
            spec,
            # The store's own URI is absolute (a relative directory would mean something else
            # in Ray's worker processes, which run elsewhere).
            store_url=store.uri(""),
            settings=settings,
            features=features,
            dataset_meta=meta,
            checkpoint_base=join_key(base, "checkpoints"),
            stop_flag=control.stop_flag_name,
        )
    except (
        DatasetError,
        TeacherLoadError,
        FeatureError,
        CheckpointError,
        ObjectNotFoundError,
        BucketNotFoundError,
    ) as error:
        # Other storage errors (an unreachable store) are about the deployment, not the job's
        # inputs: they reach the runner as they are, and the job is retried.
        raise JobInputError(str(error)) from error
    except (TypeError, ValueError) as error:
        if isinstance(error, JobInputError):
            raise
        raise JobInputError(f"invalid job options: {error}") from error

    datasets = build_datasets(data_store, features, plan)
    storage = RayStorage.on_store(store, join_key(base, "ray"))
    result = JobResult()
    if spec.search is None:
        outcome = run_training(
            plan,
            datasets,
            storage=storage,
            run_name="train",
            sink=DatabaseSink(database_url, job_id),
        )
        if outcome.stopped and outcome.last is not None:
            # The stop's final checkpoint replaced `last` in the store; its record follows (the
            # sink records the checkpoints of whole epochs only), or the record would describe
            # the previous epoch's archive and downloads would fail their checksum.
            _record_checkpoint(database_url, job_id, outcome.last)
        if outcome.stopped or control.cancel.is_set():
            result.cancelled = True
            return result
    else:
        from workers.tune import run_search

        search = run_search(
            plan,
            datasets,
            storage=storage,
            run_name="search",
            trial_base=join_key(base, "trials"),
            make_sink=lambda index: DatabaseSink(database_url, job_id, trial=index),
        )
        _record_trials(database_url, job_id, search)
        if control.cancel.is_set():
            result.cancelled = True
            return result
        if search.best is None:
            raise RuntimeError("no trial of the search produced a result")
        with tempfile.TemporaryDirectory(prefix="bird-best-") as directory:
            local = download_checkpoint(store, search.best.checkpoint_base, "best", directory)
            published = publish_checkpoint(store, local, join_key(base, "checkpoints"), "best")
            _record_checkpoint(database_url, job_id, published.as_dict())

    control.enter(JobStage.EVALUATING, 0.92)
    with tempfile.TemporaryDirectory(prefix="bird-eval-") as directory:
        local = download_checkpoint(store, join_key(base, "checkpoints"), "best", directory)
        student = load_student(local)
        test = evaluate(student.model, student.preprocess, splits.test, splits.task)
    result.test = test
    result.best_epoch = student.meta.get("epoch")
    _record_test_metrics(database_url, job_id, test, result.best_epoch)

    control.enter(JobStage.UPLOADING, 0.97)
    result.checkpoints = _checkpoint_records(database_url, job_id)
    summary = {
        "job_id": job_id,
        "test": test,
        "best_epoch": result.best_epoch,
        "checkpoints": result.checkpoints,
        "spec": spec.model_dump(mode="json"),
    }
    # Written last: the job's result exists once this object does.
    store.put_bytes(
        join_key(base, RESULT_NAME), json.dumps(summary, default=_json_default).encode()
    )
    control.progress = 1.0
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _session(database_url: str) -> Any:
    from service.db import make_engine, session_factory

    engine = make_engine(database_url)
    return engine, session_factory(engine)()


def _record_test_metrics(
    database_url: str, job_id: int, test: dict[str, Any], epoch: int | None
) -> None:
    from service import queue

    engine, session = _session(database_url)
    try:
        with session:
            queue.record_metrics(
                session, job_id, report_rows(test, "test", epoch=epoch, trial=None)
            )
    finally:
        engine.dispose()


def _record_checkpoint(database_url: str, job_id: int, info: dict[str, Any]) -> None:
    from service import queue

    engine, session = _session(database_url)
    try:
        with session:
            queue.add_checkpoint(
                session, job_id, info["name"], info["uri"], size=info["size"], sha256=info["sha256"]
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


def _record_trials(database_url: str, job_id: int, search: Any) -> None:
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
                )
    finally:
        engine.dispose()


def load_result(store: ObjectStore, job_id: int) -> dict[str, Any] | None:
    """The job's ``result.json`` (None while it does not exist)."""
    try:
        return json.loads(store.get_bytes(join_key(job_prefix(job_id), RESULT_NAME)))
    except ObjectNotFoundError:
        return None
