"""Where per-epoch training reports go: the jobs database, or memory (tests, notebooks).

Training workers call ``ray.train.report`` once per epoch; :class:`SinkCallback` (a Ray Train
``UserCallback``, run by the Train controller) turns rank 0's report into an
:class:`EpochRecord` and hands it to a :class:`MetricsSink`.

Sinks are idempotent per ``(trial, epoch)``: a run restored from a checkpoint after a worker
died, or a job resumed by its next attempt, re-reports nothing the sink already has, so the
metrics history never holds an epoch twice.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ray.train import Checkpoint, UserCallback

__all__ = [
    "ActorSink",
    "DatabaseSink",
    "EpochRecord",
    "MemorySink",
    "MetricsSink",
    "SinkCallback",
    "metric_rows",
]

# Scalars of a fairness report written as metrics (the per-group table goes as group/<g>/...).
REPORT_SCALARS = (
    "auroc",
    "f1",
    "accuracy",
    "delta_mean_deo",
    "delta_max_deo",
    "equalized_odds_difference",
    "demographic_parity_difference",
    "predicted_classes",
)
GROUP_FIELDS = ("count", "accuracy", "tpr", "fpr")


@dataclass
class EpochRecord:
    """One epoch of one run: loss parts, validation report, objective, published checkpoints."""

    epoch: int  # 1-based: epochs completed when the record was made
    step: int
    train: dict[str, float]
    val: dict[str, Any]
    objective: float
    seconds: float
    trial: int | None = None
    # The trial's sampled options: its row shows them from its first epoch, not only once the
    # search has ended.
    trial_params: dict[str, Any] | None = None
    stopped: bool = False
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_param_max_diff: float = 0.0
    # Set on the first epoch a run reports after restoring a checkpoint: the epochs it had.
    resumed_from_epoch: int | None = None

    def to_json(self) -> str:
        """Serialised form carried inside ``ray.train.report`` metrics."""
        return json.dumps(asdict(self), default=float)

    @classmethod
    def from_json(cls, text: str) -> EpochRecord:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def report_rows(
    report: dict[str, Any], split: str, *, epoch: int | None, trial: int | None
) -> list[dict[str, Any]]:
    """Metric rows of one fairness report (``bird_core.metrics.fairness_report``)."""
    rows: list[dict[str, Any]] = []
    base = {"split": split, "epoch": epoch, "trial": trial}
    for name in REPORT_SCALARS:
        value = _number(report.get(name))
        rows.append({**base, "name": name, "value": math.nan if value is None else value})
    for group in report.get("groups", []):
        for name in GROUP_FIELDS:
            value = _number(group.get(name))
            rows.append(
                {
                    **base,
                    "name": f"group/{group['group']}/{name}",
                    "value": math.nan if value is None else value,
                }
            )
    return rows


def metric_rows(record: EpochRecord) -> list[dict[str, Any]]:
    """The jobs-database rows of one epoch: ``train`` loss parts, ``val`` report, objective."""
    rows = [
        {"split": "train", "name": name, "value": value, "epoch": record.epoch}
        for name, value in sorted(record.train.items())
    ]
    rows.append({"split": "train", "name": "seconds", "value": record.seconds})
    rows += report_rows(record.val, "val", epoch=record.epoch, trial=record.trial)
    rows.append({"split": "val", "name": "objective", "value": record.objective})
    for row in rows:
        row.setdefault("epoch", record.epoch)
        row["trial"] = record.trial
        row["step"] = record.step
    return rows


class MetricsSink(Protocol):
    """Receives each epoch's record once."""

    def write(self, record: EpochRecord) -> bool:
        """Store ``record``; return False when that (trial, epoch) was already stored."""
        ...


class MemorySink:
    """Keeps records in a list (tests, notebooks). Thread-safe."""

    def __init__(self) -> None:
        self.records: list[EpochRecord] = []
        self._lock = threading.Lock()

    def write(self, record: EpochRecord) -> bool:
        """Append ``record`` unless its (trial, epoch) is already there."""
        with self._lock:
            if any(r.trial == record.trial and r.epoch == record.epoch for r in self.records):
                return False
            self.records.append(record)
            return True

    def get(self) -> list[EpochRecord]:
        """Every record so far, in arrival order."""
        with self._lock:
            return list(self.records)


class ActorSink:
    """A sink living in a Ray actor, so a controller in another process can write to it."""

    def __init__(self) -> None:
        import ray

        self.actor = ray.remote(num_cpus=0)(MemorySink).remote()

    def write(self, record: EpochRecord) -> bool:
        """Forward to the actor."""
        import ray

        return bool(ray.get(self.actor.write.remote(record)))

    def records(self) -> list[EpochRecord]:
        """Every record the actor holds."""
        import ray

        return list(ray.get(self.actor.get.remote()))


class DatabaseSink:
    """Writes records to the jobs database: metric rows, checkpoint records, the trial row.

    Picklable: only the URL and ids travel; the engine is created on first use in whichever
    process the sink ends up (the Ray Train controller). With ``attempt`` every write is fenced
    (``service.queue``): once another attempt owns the job, a write raises
    :class:`~service.queue.StaleAttempt`, which ends the stale run.
    """

    def __init__(
        self,
        database_url: str,
        job_id: int,
        trial: int | None = None,
        attempt: int | None = None,
    ) -> None:
        self.database_url = database_url
        self.job_id = job_id
        self.trial = trial
        self.attempt = attempt
        self._engine: Any = None
        self._written: set[tuple[int | None, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "database_url": self.database_url,
            "job_id": self.job_id,
            "trial": self.trial,
            "attempt": self.attempt,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _session(self) -> Any:
        from service.db import make_engine, session_factory

        if self._engine is None:
            from sqlalchemy.pool import NullPool

            # No pooled connection left idle in the Train controller between epochs (it would
            # also hold the database up when the job's schema or database is dropped).
            self._engine = make_engine(self.database_url, poolclass=NullPool)
        return session_factory(self._engine)()

    def _existing_epochs(self, session: Any) -> set[tuple[int | None, int]]:
        from sqlalchemy import select

        from service.models import Metric

        rows = session.execute(
            select(Metric.trial, Metric.epoch)
            .where(Metric.job_id == self.job_id, Metric.split == "val", Metric.name == "objective")
            .distinct()
        ).all()
        return {(trial, epoch) for trial, epoch in rows if epoch is not None}

    def write(self, record: EpochRecord) -> bool:
        """Record the epoch's metrics and checkpoints unless that epoch is already stored."""
        from service import queue

        with self._session() as session:
            if self._written is None:
                self._written = self._existing_epochs(session)
            key = (record.trial, record.epoch)
            if key in self._written:
                return False
            if record.trial is None:
                for info in record.checkpoints.values():
                    queue.add_checkpoint(
                        session,
                        self.job_id,
                        info["name"],
                        info["uri"],
                        size=info["size"],
                        sha256=info["sha256"],
                        attempt=self.attempt,
                    )
            else:
                best = record.checkpoints.get("best")
                queue.upsert_trial(
                    session,
                    self.job_id,
                    record.trial,
                    state="running",
                    params=record.trial_params,
                    metrics={
                        "epoch": record.epoch,
                        "objective": record.objective,
                        **{k: record.val.get(k) for k in REPORT_SCALARS},
                    },
                    checkpoint_uri=best["uri"] if best else None,
                    attempt=self.attempt,
                )
            if record.resumed_from_epoch is not None:
                where = "" if record.trial is None else f" (trial {record.trial})"
                queue.append_log(
                    session,
                    self.job_id,
                    "info",
                    f"resumed from the checkpoint after epoch {record.resumed_from_epoch}{where}",
                    attempt=self.attempt,
                )
            # Metric rows last: the objective row is what marks the epoch as stored.
            queue.record_metrics(session, self.job_id, metric_rows(record), attempt=self.attempt)
            self._written.add(key)
            return True


class SinkCallback(UserCallback):
    """Ray Train callback (runs in the Train controller): rank 0's report → ``sink``."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> None:
        """Forward the epoch record that rank 0 attached to its metrics (after the restored
        epoch's record, when a restored run sends it again)."""
        if not metrics:
            return
        if "restored_record" in metrics[0]:
            self.sink.write(EpochRecord.from_json(metrics[0]["restored_record"]))
        if "record" in metrics[0]:
            self.sink.write(EpochRecord.from_json(metrics[0]["record"]))
