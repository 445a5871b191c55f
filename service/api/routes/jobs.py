"""``/jobs``: submit, list, show and cancel jobs; their metrics, trials, events and logs.

Every route here needs a bearer key, and a job is visible only to its tenant: another tenant's
job id answers 404, exactly like an id that does not exist.

The endpoints are ``async``: each hands its blocking part (queries, the dataset check) to one
worker thread as a ``work(connection_or_session, caller)`` function through
:class:`~service.api.deps.Db`: reads as Core queries on an autocommit connection, writes
through ``service.queue`` on a transactional session (see ``service.api.deps``). The read
queries are built once, at import, with bound parameters: building a statement and its cache key
costs more CPU than running it on a small table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Connection, and_, bindparam, func, select, true
from sqlalchemy.orm import Session

from bird_datasets.format import DatasetMeta, parse_metadata
from bird_datasets.location import (
    DatasetURIError,
    external_refused,
    is_external_uri,
    resolve_tenant_key,
    tenant_prefix,
)
from service import queue
from service.api.deps import AppState, Caller, DbDep, StateDep
from service.api.edges import invalid_text_at
from service.api.schemas import (
    EventPublic,
    GroupRow,
    JobCreate,
    JobList,
    JobPublic,
    LogList,
    LogPublic,
    MetricPoint,
    MetricsPublic,
    TrialPublic,
    error_responses,
    finite,
)
from service.compat import check_spec_against
from service.models import Job, JobEvent, JobLog, JobState, Metric, Trial
from service.spec import JobSpec
from service.storage import (
    MANIFEST_NAME,
    BucketNotFoundError,
    InvalidKeyError,
    LocalStore,
    Manifest,
    ObjectNotFoundError,
    StorageAuthError,
    StorageError,
    join_key,
)
from service.teachers import TeacherFacts, TeacherRecordError, read_teacher_facts

__all__ = ["JOB_ID_MAX", "JobId", "check_dataset", "check_submission", "owned_job_id", "router"]

# Every route: a key to check (401), parameters or a body to validate (422), a database to ask
# (503).
router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401, 422, 503))

# Job ids are drawn from 1 ... 2**31 - 1 (the id column is 32-bit); bounding the path parameter
# turns an absurd id into a 422 instead of a database overflow error.
JOB_ID_MAX = queue.JOB_ID_MAX
# Row ids of metrics and logs are 64-bit.
ROW_ID_MAX = 2**63 - 1
# One metrics response carries at most this many points; clients page with ?since=.
SERIES_CAP = 10_000
LOGS_CAP = 1_000
GROUP_FIELDS = ("count", "accuracy", "tpr", "fpr")
# A point without an epoch sorts below every real epoch when finding a split's latest epoch.
_NO_EPOCH = -1

JobId = Annotated[int, Path(ge=1, le=JOB_ID_MAX, description="The job's id.")]
Since = Annotated[
    int,
    Query(ge=0, le=ROW_ID_MAX, description="Only rows with an id above this (incremental polls)."),
]

_NOT_FOUND = error_responses(404)


_JOB_ID = bindparam("job_id")
_TENANT_ID = bindparam("tenant_id")
_SINCE = bindparam("since")
_OWNED_JOB = select(Job.id).where(Job.id == _JOB_ID, Job.tenant_id == _TENANT_ID)
_TENANT_JOB = select(Job.__table__).where(Job.id == _JOB_ID, Job.tenant_id == _TENANT_ID)


def owned_job_id(connection: Connection | Session, caller: Caller, job_id: int) -> int:
    """``job_id`` if the caller's tenant owns that job; raise JobNotFound (404) otherwise."""
    found = connection.scalar(_OWNED_JOB, {"job_id": job_id, "tenant_id": caller.tenant_id})
    if found is None:
        raise queue.JobNotFound(job_id)
    return found


# --- submit -----------------------------------------------------------------------------------


def _invalid(loc: Sequence[str], message: str, value: Any) -> RequestValidationError:
    """A 422 in FastAPI's standard shape, for checks that go beyond the schema."""
    return RequestValidationError(
        [{"type": "value_error", "loc": tuple(loc), "msg": message, "input": value}]
    )


def _non_finite(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in ``value`` a NaN or an infinity sits (JSON has neither), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _non_finite(item, (*loc, str(key)))
            if found is not None:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _non_finite(item, (*loc, index))
            if found is not None:
                return found
    return None


def check_dataset(state: AppState, uri: str, tenant_id: int | None = None) -> DatasetMeta:
    """The metadata of the published bird dataset ``uri`` names in the space of tenant
    ``tenant_id`` (or a shared one); 422 (or 503 for an outage) if there is none.

    The dataset exists once its ``manifest.json`` does (``service.storage.publish`` writes it
    last); its metadata must describe a bird dataset. The messages name the dataset as the
    caller wrote it and never where it is stored, and a name outside the caller's space is
    refused by its form before anything is read, so no answer tells whether something exists
    where the caller may not look.
    """
    loc = ("body", "dataset", "uri")
    try:
        store, prefix = state.resolve_dataset(uri, tenant_id)
    except DatasetURIError as exc:
        raise _invalid(loc, str(exc), uri) from None
    manifest_key = join_key(prefix, MANIFEST_NAME)
    try:
        raw = store.get_bytes(manifest_key)
    except (ObjectNotFoundError, BucketNotFoundError, InvalidKeyError):
        raise _invalid(loc, dataset_missing(uri), uri) from None
    except StorageError as exc:
        # An outage is a 503: S3 not answering, or our own store refusing us. Anything about a
        # location the user named (a local path that is a file, a bucket we may not read:
        # only with allow_external_uris) is a problem with the request.
        if isinstance(store, LocalStore):
            outage = store is state.store and isinstance(exc, StorageAuthError)
        else:
            outage = store is state.store or not isinstance(exc, StorageAuthError)
        if outage:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"object store unavailable while checking dataset {uri!r}: {exc}",
                headers={"Retry-After": "5"},
            ) from None
        raise _invalid(loc, f"cannot read dataset {uri!r}", uri) from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except (ValidationError, ValueError):
        # The parser's message would quote the file; say what is wrong without echoing it.
        raise _invalid(loc, f"dataset {uri!r} has no valid manifest", uri) from None
    meta, problems = parse_metadata(manifest.metadata)
    if problems or meta is None:
        details = "; ".join(message for _, message in problems[:3])
        raise _invalid(loc, f"dataset {uri!r} is not a bird dataset: {details}", uri)
    return meta


def dataset_missing(uri: str) -> str:
    """The one answer for a dataset name that names nothing the caller may read."""
    return (
        f"dataset {uri!r} does not exist (upload one with 'bird datasets push' or "
        "POST /datasets; shared ones are named shared/datasets/<name>)"
    )


def check_teacher_uri(state: AppState, uri: str | None) -> None:
    """Refuse a ``teacher.weights_uri`` outside the tenant's space by its form (422)."""
    if uri is None or state.settings.allow_external_uris or not is_external_uri(uri):
        return
    raise _invalid(
        ("body", "teacher", "weights_uri"),
        external_refused("teacher weights URI", uri, "teachers/<name>/model.safetensors"),
        uri,
    )


def _tenant_names(state: AppState, tenant_id: int | None, text: str) -> str:
    """``text`` with the deployment store's URIs written as the tenant names them: its own
    resources relative to its space, shared ones as ``shared/...`` (never where they are
    stored)."""
    root = state.store.uri("").rstrip("/") + "/"
    if tenant_id is not None:
        text = text.replace(state.store.uri(tenant_prefix(tenant_id)).rstrip("/") + "/", "")
    return text.replace(root, "")


def _teacher_facts(state: AppState, spec: JobSpec, tenant_id: int | None) -> TeacherFacts:
    """What the spec's teacher says about itself (a published record is read from the store,
    in the space of tenant ``tenant_id``); 422 naming ``teacher.weights_uri`` when the weights
    cannot be found, 503 for an outage."""
    teacher = spec.teacher
    uri = teacher.weights_uri
    loc = ("body", "teacher", "weights_uri")
    key = uri
    if uri is not None and not is_external_uri(uri):
        try:
            key = resolve_tenant_key(uri, tenant_id)
        except InvalidKeyError as exc:
            raise _invalid(loc, f"invalid teacher weights URI {uri!r}: {exc}", uri) from None
    try:
        facts = read_teacher_facts(state.store, teacher.kind, teacher.arch, key)
    except (TeacherRecordError, ObjectNotFoundError, BucketNotFoundError, InvalidKeyError) as exc:
        raise _invalid(loc, _tenant_names(state, tenant_id, str(exc)), uri) from None
    except StorageError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"object store unavailable while reading teacher {uri!r}: {exc}",
            headers={"Retry-After": "5"},
        ) from None
    if facts.uri is not None:
        facts = replace(facts, uri=_tenant_names(state, tenant_id, facts.uri))
    return facts


def check_submission(state: AppState, spec: JobSpec, tenant_id: int | None = None) -> JobSpec:
    """The spec resolved for its dataset and teacher (names in the space of tenant
    ``tenant_id``), or a 422 listing every problem.

    Reads the dataset's manifest and the teacher's published record, then
    :func:`service.compat.check_spec_against` fills in the defaults that depend on them and
    checks teacher, student and method against the data: nothing that can be known here
    reaches a worker. The stored spec keeps the names as the tenant wrote them.
    """
    check_teacher_uri(state, spec.teacher.weights_uri)
    meta = check_dataset(state, spec.dataset.uri, tenant_id)
    teacher = _teacher_facts(state, spec, tenant_id)
    checked = check_spec_against(
        spec, meta, teacher, max_student_params=state.settings.max_student_params
    )
    if checked.problems:
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("body", *p.loc), "msg": p.message, "input": None}
                for p in checked.problems
            ]
        )
    return checked.spec


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    summary="Submit a job",
    responses={
        200: {
            "model": JobPublic,
            "description": "Idempotent replay: this Idempotency-Key already made this job.",
        },
        **error_responses(
            400,
            409,
            429,
            _409="The Idempotency-Key was used before with a different spec.",
        ),
    },
)
async def submit_job(
    spec: JobCreate,
    response: Response,
    db: DbDep,
    state: StateDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            # Printable ASCII: a header's bytes reach the app as Latin-1, and anything else
            # would be stored as something other than what the client meant.
            pattern=r"^[ -~]+$",
            description="Repeat a submit safely: the same key and spec return the same job "
            "(200); the same key with another spec is a 409. 1 … 200 printable ASCII "
            "characters.",
        ),
    ] = None,
) -> JobPublic:
    """Validate the spec, check that its dataset exists, and queue the job (201).

    A repeat with the same ``Idempotency-Key`` and the same spec answers 200 with the job the
    first request made (header ``Idempotent-Replayed: true``); a concurrent duplicate may see
    201 with that same job.
    """
    spec_python = spec.model_dump()
    bad = _non_finite(spec_python)
    if bad is not None:
        raise _invalid(("body", *bad), "NaN and infinities are not allowed", None)
    bad = invalid_text_at(spec_python)
    if bad is not None:
        raise _invalid(
            ("body", *bad),
            "text must be valid Unicode: a lone UTF-16 surrogate (such as \\ud800) has no "
            "UTF-8 encoding",
            None,
        )
    # Refused by its form before anything is read or the database is asked.
    check_teacher_uri(state, spec.teacher.weights_uri)
    max_queued = state.settings.max_queued_per_tenant

    def work(session: Session, caller: Caller) -> JobPublic:
        existing = None
        if idempotency_key is not None:
            existing = session.scalars(
                select(Job).where(
                    Job.tenant_id == caller.tenant_id, Job.idempotency_key == idempotency_key
                )
            ).one_or_none()
        if existing is None:
            # A full queue is refused before the checks cost round trips to the store (submit()
            # enforces the limit again, atomically). This also ends the read transaction,
            # handing the connection back while the dataset and teacher are checked.
            queue.check_queue_room(session, caller.tenant_id, max_queued)
        else:
            # A replay is answered even when the queue is full; end the read transaction.
            session.rollback()
        # The stored spec is the resolved one: what the dataset and teacher fill in included.
        spec_json = check_submission(state, spec, caller.tenant_id).model_dump(mode="json")
        if existing is not None:
            if existing.spec != spec_json:
                raise queue.IdempotencyConflict(
                    f"Idempotency-Key {idempotency_key!r} was already used for job "
                    f"{existing.id} with a different spec"
                )
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
            return JobPublic.from_job(existing)
        job = queue.submit(
            session,
            caller.tenant_id,
            spec_json,
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            idempotency_key=idempotency_key,
            max_queued=max_queued,
        )
        return JobPublic.from_job(job)

    return await db.write(work)


# --- list, show, cancel -----------------------------------------------------------------------


@router.get("", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(
    db: DbDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobList:
    """The caller's jobs, newest first, ``limit`` per page from ``offset``."""

    def work(connection: Connection, caller: Caller) -> JobList:
        where = [Job.tenant_id == caller.tenant_id]
        if state is not None:
            where.append(Job.state == state)
        total = connection.scalar(select(func.count()).select_from(Job).where(*where)) or 0
        rows = connection.execute(
            select(Job.__table__)
            .where(*where)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        items = [JobPublic.from_job(row) for row in rows]
        return JobList(items=items, total=total, limit=limit, offset=offset)

    return await db.read(work)


@router.get("/{job_id}", response_model=JobPublic, summary="Show a job", responses=_NOT_FOUND)
async def get_job(job_id: JobId, db: DbDep) -> JobPublic:
    """One job of the caller's tenant."""

    def work(connection: Connection, caller: Caller) -> JobPublic:
        params = {"job_id": job_id, "tenant_id": caller.tenant_id}
        row = connection.execute(_TENANT_JOB, params).first()
        if row is None:
            raise queue.JobNotFound(job_id)
        return JobPublic.from_job(row)  # the row has the columns the ORM object would

    return await db.read(work)


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        202: {
            "model": JobPublic,
            "description": "The job is running: now cancelling, its worker will stop it.",
        },
        **error_responses(404, 409, _409="The job already finished."),
    },
)
async def cancel_job(job_id: JobId, response: Response, db: DbDep) -> JobPublic:
    """Cancel a job: a queued one at once (200, ``cancelled``); a running one is asked to
    stop (202, ``cancelling``, its worker finishes it); a finished one is a 409."""

    def work(session: Session, caller: Caller) -> JobPublic:
        try:
            job = queue.cancel(session, job_id, caller.tenant_id)
        except queue.IllegalTransition as exc:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"job {job_id} is already {exc.state}: only queued or running jobs can be "
                "cancelled",
            ) from None
        if job.state == JobState.CANCELLING:
            response.status_code = status.HTTP_202_ACCEPTED
        return JobPublic.from_job(job)

    return await db.write(work)


# --- metrics ----------------------------------------------------------------------------------

_POINT_COLUMNS = (
    Metric.id,
    Metric.trial,
    Metric.epoch,
    Metric.step,
    Metric.split,
    Metric.name,
    Metric.value,
    Metric.at,
)
# Plain rows, not ORM entities: a poll can carry thousands of points, and building an
# identity-mapped object per point would cost more than the query.
_SERIES = (
    select(*_POINT_COLUMNS)
    .where(Metric.job_id == _JOB_ID, Metric.id > _SINCE)
    .order_by(Metric.id)
    .limit(SERIES_CAP)
)


def _latest_statement() -> Any:
    """The rows of each split's latest epoch, and whether the caller owns the job: one query.

    Per split, the run to show is the main run (``trial`` null) if there is one, else the trial
    the finished search picked as best (its ``trials`` row says ``"best": true``), else the trial
    that reported last; its rows at its highest epoch are the split's latest values (the best
    trial's checkpoint is of its best epoch, whose metrics its ``trials`` row holds). The
    ``jobs`` row of the caller's tenant is joined (outer) to them, so no row at all means no
    such job (404) and a single row without a split means a job without metrics yet.
    """
    epoch = func.coalesce(Metric.epoch, _NO_EPOCH)
    runs = (
        select(
            Metric.split,
            Metric.trial,
            func.max(epoch).label("epoch"),
            func.max(Metric.id).label("last_id"),
        )
        .where(Metric.job_id == _JOB_ID)
        .group_by(Metric.split, Metric.trial)
        .subquery("runs")
    )
    # Without it, a finished search's latest val would be whichever trial happened to report
    # last (often an early-stopped loser), not the one whose checkpoint the job keeps.
    best_trial = (
        select(Trial.trial_index)
        .where(Trial.job_id == _JOB_ID, Trial.metrics["best"].as_boolean().is_(True))
        .order_by(Trial.trial_index.desc())  # one at most; never an arbitrary pick
        .limit(1)
        .scalar_subquery()
    )
    rank = func.row_number().over(
        partition_by=runs.c.split,
        order_by=(
            runs.c.trial.is_(None).desc(),
            func.coalesce(runs.c.trial == best_trial, False).desc(),
            runs.c.last_id.desc(),
        ),
    )
    ranked = select(runs.c.split, runs.c.trial, runs.c.epoch, rank.label("rank")).subquery("ranked")
    rows = (
        select(Metric.id, Metric.split, Metric.name, Metric.value)
        .join(
            ranked,
            and_(
                ranked.c.rank == 1,
                Metric.split == ranked.c.split,
                Metric.trial.is_not_distinct_from(ranked.c.trial),
                epoch == ranked.c.epoch,
            ),
        )
        .where(Metric.job_id == _JOB_ID)
        .subquery("latest")
    )
    return (
        select(rows.c.split, rows.c.name, rows.c.value)
        .select_from(Job)
        .outerjoin(rows, true())
        .where(Job.id == _JOB_ID, Job.tenant_id == _TENANT_ID)
        .order_by(rows.c.id)
    )


_LATEST = _latest_statement()


def _latest(
    connection: Connection, caller: Caller, job_id: int
) -> tuple[dict[str, dict[str, float | None]], dict[str, list[GroupRow]]]:
    """Each split's values at its latest epoch, and its per-group table at that epoch.

    Raises JobNotFound unless the caller's tenant owns the job (the same query checks it).
    """
    rows = connection.execute(_LATEST, {"job_id": job_id, "tenant_id": caller.tenant_id}).all()
    if not rows:
        raise queue.JobNotFound(job_id)
    latest: dict[str, dict[str, float | None]] = {}
    groups: dict[str, dict[int, dict[str, float | None]]] = {}
    for split, name, value in rows:  # in id order: a re-reported value replaces the older one
        if split is None:  # the job has no metrics yet
            continue
        values = latest.setdefault(split, {})
        if name.startswith("group/"):
            parts = name.split("/")
            if len(parts) == 3 and parts[1].isdigit() and parts[2] in GROUP_FIELDS:
                groups.setdefault(split, {}).setdefault(int(parts[1]), {})[parts[2]] = finite(value)
            continue
        values[name] = finite(value)
    tables = {
        split: [GroupRow(group=g, **fields) for g, fields in sorted(by_group.items())]
        for split, by_group in sorted(groups.items())
    }
    return {split: latest[split] for split in sorted(latest)}, tables


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    summary="Metric series, latest summary and per-group table",
    responses=_NOT_FOUND,
)
async def get_metrics(job_id: JobId, db: DbDep, since: Since = 0) -> MetricsPublic:
    """The series after ``since`` (by id, at most 10,000 points), plus each split's latest
    values and per-group table (see :class:`~service.api.schemas.MetricsPublic`)."""

    def work(connection: Connection, caller: Caller) -> MetricsPublic:
        latest, groups = _latest(connection, caller, job_id)  # 404 first
        points = connection.execute(_SERIES, {"job_id": job_id, "since": since}).all()
        series = [MetricPoint.from_row(point) for point in points]
        return MetricsPublic(
            job_id=job_id,
            series=series,
            latest=latest,
            groups=groups,
            next_since=series[-1].id if series else since,
        )

    return await db.read(work)


# --- trials, events, logs ---------------------------------------------------------------------


@router.get(
    "/{job_id}/trials",
    response_model=list[TrialPublic],
    summary="Trials of the job's search",
    responses=_NOT_FOUND,
)
async def get_trials(job_id: JobId, db: DbDep, state: StateDep) -> list[TrialPublic]:
    """The trials of the job's hyper-parameter search, by index (empty without a search)."""

    def work(connection: Connection, caller: Caller) -> list[TrialPublic]:
        owned_job_id(connection, caller, job_id)
        trials = connection.execute(
            select(Trial.__table__).where(Trial.job_id == job_id).order_by(Trial.trial_index)
        ).all()
        return [TrialPublic.from_row(t, state.object_name(t.checkpoint_uri)) for t in trials]

    return await db.read(work)


@router.get(
    "/{job_id}/events",
    response_model=list[EventPublic],
    summary="The job's state changes",
    responses=_NOT_FOUND,
)
async def get_events(job_id: JobId, db: DbDep) -> list[EventPublic]:
    """Every change of the job (submit, claim, stage changes, cancel, finish...), oldest first."""

    def work(connection: Connection, caller: Caller) -> list[EventPublic]:
        owned_job_id(connection, caller, job_id)
        events = connection.execute(
            select(JobEvent.__table__).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        return [EventPublic.from_row(event) for event in events]

    return await db.read(work)


@router.get("/{job_id}/logs", response_model=LogList, summary="The job's log", responses=_NOT_FOUND)
async def get_logs(job_id: JobId, db: DbDep, since: Since = 0) -> LogList:
    """Log lines after ``since``, oldest first, at most 1,000 per response."""

    def work(connection: Connection, caller: Caller) -> LogList:
        owned_job_id(connection, caller, job_id)
        lines = connection.execute(
            select(JobLog.__table__)
            .where(JobLog.job_id == job_id, JobLog.id > since)
            .order_by(JobLog.id)
            .limit(LOGS_CAP)
        ).all()
        items = [LogPublic.from_row(line) for line in lines]
        return LogList(items=items, next_since=items[-1].id if items else since)

    return await db.read(work)
