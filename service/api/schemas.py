"""What the REST API reads and answers: request bodies and response models.

These are deliberately separate from the SQL models (``service.models``): the tables hold what
the queue and the workers need (leases, idempotency keys, tenant ids), the API shows what a user
needs and nothing more.

Metric naming convention (what the worker records with ``service.queue.record_metrics`` and what
``GET /jobs/{id}/metrics`` summarises):

* split ``train``: the loss and its parts per epoch — ``loss``, ``kd``, ``ce``, ... (the parts
  depend on the method);
* splits ``val`` and ``test``: ``auroc``, ``f1``, ``accuracy``, ``delta_mean_deo``,
  ``delta_max_deo``, ``equalized_odds_difference``, ``demographic_parity_difference``, and per
  sensitive group ``group/<g>/count``, ``group/<g>/accuracy``, ``group/<g>/tpr`` and
  ``group/<g>/fpr`` (``<g>`` the integer group index);
* ``trial`` is null outside a hyper-parameter search; the final test metrics have split ``test``.

Numbers that JSON cannot carry (NaN, ±Infinity: a diverging loss) are answered as ``null``.

Checkpoints: a checkpoint record (``service.queue.add_checkpoint``) describes ONE downloadable
file, the archive ``jobs/<job id>/checkpoints/<name>.tar`` that the worker publishes next to the
checkpoint directory ``jobs/<job id>/checkpoints/<name>/``. Its ``uri`` is the archive's full
store URI (``s3://bucket/prefix/jobs/7/checkpoints/best.tar``, ``file:///.../best.tar``) or its
store-relative key; ``size`` and ``sha256`` are those of the archive. The archive holds the
checkpoint directory's files (``manifest.json``, ``student.safetensors``, ``meta.json``, ...) at
its top level, so extracting it into ``<out>/<name>/`` gives a directory that
``bird_core.checkpoint.load_student`` loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.api.edges import EXCERPT_CHARS, MAX_ERRORS, valid_text
from service.models import Checkpoint, Job, JobEvent, JobLog, JobStage, JobState, Metric, Trial
from service.spec import JobSpec

__all__ = [
    "CheckpointPublic",
    "DatasetCreate",
    "DatasetDescription",
    "DatasetFile",
    "DatasetList",
    "DatasetPublic",
    "DatasetUpload",
    "ErrorPublic",
    "EventPublic",
    "GroupRow",
    "Health",
    "JobCreate",
    "JobList",
    "JobPublic",
    "LogList",
    "LogPublic",
    "MetricPoint",
    "MetricsPublic",
    "TrialPublic",
    "UploadURL",
    "ValidationErrorPublic",
    "ValidationIssue",
    "error_responses",
    "finite",
]

# The request body of ``POST /jobs`` is the job spec itself: one schema, validated at the API,
# stored as JSON, parsed again by the worker.
JobCreate = JobSpec


def finite(value: float | None) -> float | None:
    """``value``, or None where JSON has no number for it (NaN, ±Infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return value


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_Out):
    """A job as its tenant sees it."""

    id: int
    state: JobState = Field(description="queued, running, cancelling, succeeded, failed, cancelled")
    stage: JobStage | None = Field(
        description="What a running job is doing: precomputing, waiting_for_resources, "
        "training, tuning, evaluating, uploading (null when not running)."
    )
    progress: float = Field(description="0..1, reported by the worker.")
    priority: int
    attempts: int
    max_attempts: int
    error: str | None = Field(description="Why the job failed, in words.")
    cancel_requested: bool
    method: str = Field(description="spec.method.name")
    dataset: str = Field(description="spec.dataset.uri")
    spec: dict[str, Any] = Field(description="The resolved job spec (defaults filled in).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        """The public view of a ``jobs`` row.

        The API refuses specs with text that UTF-8 cannot carry; a row stored before it did is
        shown with U+FFFD in place of such characters rather than failing to render.
        """
        spec = valid_text(job.spec or {})
        method = spec.get("method") or {}
        dataset = spec.get("dataset") or {}
        return cls(
            id=job.id,
            state=job.state,
            stage=job.stage,
            progress=job.progress,
            priority=job.priority,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            error=job.error,
            cancel_requested=job.cancel_requested,
            method=str(method.get("name", "")) if isinstance(method, dict) else "",
            dataset=str(dataset.get("uri", "")) if isinstance(dataset, dict) else "",
            spec=spec,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
        )


class JobList(BaseModel):
    """One page of a tenant's jobs, newest first."""

    items: list[JobPublic]
    total: int = Field(description="How many jobs match the filter in all.")
    limit: int
    offset: int


class MetricPoint(BaseModel):
    """One point of a job's metric series (see the module docstring for the names)."""

    id: int = Field(description="Increasing; pass the largest seen as ?since= to poll.")
    trial: int | None
    epoch: int | None
    step: int | None
    split: str
    name: str
    value: float | None = Field(description="null for NaN or an infinity.")
    at: datetime

    @classmethod
    def from_row(cls, row: Metric | Any) -> MetricPoint:
        """A point from a ``metrics`` row (an entity or a row with the same columns)."""
        return cls(
            id=row.id,
            trial=row.trial,
            epoch=row.epoch,
            step=row.step,
            split=row.split,
            name=row.name,
            value=finite(row.value),
            at=row.at,
        )


class GroupRow(BaseModel):
    """Per-group figures of one split at its latest epoch (from ``group/<g>/<field>``)."""

    group: int
    count: float | None = None
    accuracy: float | None = None
    tpr: float | None = None
    fpr: float | None = None


class MetricsPublic(BaseModel):
    """A job's metrics: the series since a point, the latest summary and the per-group table.

    ``latest`` maps each split to its metrics at that split's highest epoch (per-group metrics
    excluded; rows outside a search preferred over trial rows, then a finished search's best trial
    at its highest epoch, then the trial that reported last). ``groups`` maps each split to the
    per-group rows built from ``group/<g>/count|accuracy|tpr|fpr`` at the same epoch.
    ``series`` holds at most 10,000 points; poll again with ``since=next_since`` for more.
    """

    job_id: int
    series: list[MetricPoint]
    latest: dict[str, dict[str, float | None]]
    groups: dict[str, list[GroupRow]]
    next_since: int = Field(description="The largest id returned, or the given since if none.")


class TrialPublic(_Out):
    """One trial of a job's hyper-parameter search."""

    trial_index: int
    params: dict[str, Any]
    metrics: dict[str, Any]
    state: str
    checkpoint_uri: str | None

    @classmethod
    def from_row(cls, row: Trial, checkpoint_name: str | None) -> TrialPublic:
        """A trial from a ``trials`` row (its JSON columns made valid UTF-8, as for a job), with
        its best checkpoint named as the tenant reads it (``AppState.object_name``)."""
        trial = cls.model_validate(row)
        return trial.model_copy(
            update={
                "params": valid_text(trial.params),
                "metrics": valid_text(trial.metrics),
                "checkpoint_uri": checkpoint_name,
            }
        )


class EventPublic(_Out):
    """One change of a job (state transition, stage change)."""

    id: int
    at: datetime
    from_state: JobState | None
    to_state: JobState
    transition: str
    message: str
    worker: str | None

    @classmethod
    def from_row(cls, row: JobEvent) -> EventPublic:
        """An event from a ``job_events`` row."""
        return cls.model_validate(row)


class LogPublic(_Out):
    """One log line of a job."""

    id: int
    at: datetime
    level: str
    message: str

    @classmethod
    def from_row(cls, row: JobLog) -> LogPublic:
        """A log line from a ``job_logs`` row."""
        return cls.model_validate(row)


class LogList(BaseModel):
    """Log lines after ``since`` (at most 1,000 per response), oldest first."""

    items: list[LogPublic]
    next_since: int = Field(description="The largest id returned, or the given since if none.")


class CheckpointPublic(BaseModel):
    """A downloadable checkpoint archive (``<name>.tar``; see the module docstring)."""

    name: str
    uri: str = Field(
        description="The archive's key in the deployment's store "
        "(jobs/<id>/checkpoints/<name>.tar); download it from url."
    )
    size: int = Field(description="Bytes of the archive.")
    sha256: str = Field(description="sha256 of the archive; verify it after downloading.")
    created_at: datetime
    url: str = Field(
        description="Where to GET the archive: a presigned S3 URL, or this API's /files/... "
        "path (send the bearer key) for a local store."
    )

    @classmethod
    def from_row(cls, row: Checkpoint, url: str, name_in_store: str) -> CheckpointPublic:
        """A checkpoint from a ``checkpoints`` row, its download URL and its key as the tenant
        reads it (``AppState.object_name``)."""
        return cls(
            name=row.name,
            uri=name_in_store,
            size=row.size,
            sha256=row.sha256,
            created_at=row.created_at,
            url=url,
        )


class DatasetFile(BaseModel):
    """One file of a dataset upload, relative to the dataset (``part-00000.parquet``)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=255,
        # One or more plain segments: no '..', no leading '/', no empty segment.
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$",
    )
    size: int = Field(ge=0, description="Bytes of the file (at most BIRD_MAX_UPLOAD_BYTES).")


class DatasetCreate(BaseModel):
    """``POST /datasets``: a dataset to upload, by name, and the files it consists of."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Jobs name it datasets/<name>; lower-case letters, digits, '.', '_', '-'.",
    )
    files: list[DatasetFile] = Field(
        min_length=1,
        max_length=10_000,
        description="Every file of the dataset directory, manifest.json included.",
    )


class UploadURL(BaseModel):
    """Where to send one file of an upload."""

    path: str
    method: str = "PUT"
    url: str = Field(
        description="A presigned S3 URL (send no Authorization header), or this API's "
        "/datasets/<name>/files/<path> for a local store (send the bearer key)."
    )


class DatasetUpload(BaseModel):
    """The answer to ``POST /datasets``: an upload URL per file; send manifest.json last."""

    name: str
    uri: str = Field(description="What a job's dataset.uri names it: datasets/<name>.")
    expires_in_s: int
    uploads: list[UploadURL]


class DatasetPublic(BaseModel):
    """One dataset of a listing."""

    name: str
    uri: str = Field(description="What a job's dataset.uri names it.")
    shared: bool = Field(description="Published by the operator for every tenant (read-only).")
    files: int
    size: int = Field(description="Bytes of its files, manifest excluded.")
    created_at: datetime
    description: dict[str, Any] = Field(
        description="From its metadata: name, task, num_classes, num_groups."
    )


class DatasetList(BaseModel):
    """``GET /datasets``: the tenant's datasets, then the shared ones."""

    items: list[DatasetPublic]


class DatasetDescription(BaseModel):
    """``GET /datasets/{name}``: counts per split × class × group, and the same as a table."""

    model_config = ConfigDict(extra="allow")

    uri: str
    name: str
    task: str
    num_classes: int
    num_groups: int
    class_names: list[str]
    group_names: list[str]
    rows: int
    splits: dict[str, Any]
    table: str = Field(description="The table `bird datasets describe` prints.")


class Health(BaseModel):
    """Answer of the health and readiness probes."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class ErrorPublic(BaseModel):
    """An error, in words (every status except 422)."""

    detail: str = Field(description="What went wrong and, where it helps, what to do.")


class ValidationIssue(BaseModel):
    """One problem of a 422: where it is and what is wrong."""

    loc: list[str | int] = Field(description='Where, e.g. ["body", "training", "epochs"].')
    msg: str
    type: str
    input: Any = Field(
        default=None,
        description=f"The value refused, or an excerpt of at most {EXCERPT_CHARS} characters "
        "of it.",
    )
    ctx: dict[str, Any] | None = Field(default=None, description="Details, e.g. a bound.")


class ValidationErrorPublic(BaseModel):
    """A 422: every problem found (at most MAX_ERRORS, then a ``too_many_errors`` entry)."""

    detail: list[ValidationIssue] = Field(max_length=MAX_ERRORS + 1)


def _header(description: str, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["example"] = example
    return {"description": description, "required": True, "schema": schema}


_RETRY_AFTER = _header("Seconds to wait before trying again.", "60")
# The statuses the API answers besides success, with the body and headers each one carries.
_ERROR_RESPONSES: Mapping[int, dict[str, Any]] = {
    400: {"description": "The body could not be read as JSON text (e.g. it is not UTF-8)."},
    401: {
        "description": "No valid API key: the Authorization header is missing or malformed, the "
        "key is unknown or revoked, or a key was sent in the query string.",
        "headers": {"WWW-Authenticate": _header("The scheme to use.", "Bearer")},
    },
    404: {"description": "No such job (or it belongs to another tenant)."},
    409: {"description": "The request conflicts with the resource's state."},
    413: {"description": "The request body is over the deployment's limit (BIRD_MAX_BODY_BYTES)."},
    422: {
        "model": ValidationErrorPublic,
        "description": "Invalid parameters or body, field by field (values echoed only as "
        "bounded excerpts).",
    },
    429: {
        "description": "The tenant has as many queued jobs as it may (BIRD_MAX_QUEUED_PER_TENANT).",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
    503: {
        "description": "The database or the object store cannot be reached.",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
}


def error_responses(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses ``codes``, with their models and headers.

    A keyword ``_404="..."`` replaces the standard description of that status.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        response = {"model": ErrorPublic, **_ERROR_RESPONSES[code]}
        description = descriptions.get(f"_{code}")
        if description is not None:
            response["description"] = description
        responses[code] = response
    return responses
