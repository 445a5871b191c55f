"""The job queue: the ``jobs`` table, changed only through named transitions.

Like procrastinate, the queue is the database: there is no broker. Each public function is one
transaction on the given session: it applies one named transition (or records worker output),
appends a ``job_events`` row for every state change, and commits; on any error it rolls back and
raises. Committing inside matters for the queue: a claim holds row locks until it commits, and a
transition must never be half-applied. Pending changes the caller left in the session are
committed (or rolled back) with it, so pass a session without unrelated work in flight.

Transitions are a closed table (:data:`TRANSITIONS`): ``(transition, state) -> new state``.
Anything not in it raises :class:`IllegalTransition`. Worker operations also check the lease: a
worker that does not hold a job's lease (because the reaper gave the job to someone else, say)
gets :class:`LeaseLost` and must stop working on the job.

Every state change is a compare-and-set (``UPDATE ... WHERE id = ? AND state = <state read>
[AND lease_owner = <worker>]``), so concurrent callers (API cancelling, worker finishing, reaper
expiring) can never apply two transitions from the same state; the loser re-reads and either
applies its transition to the new state or raises.

Fencing: a claim increments ``attempts``, and the worker passes that number (``attempt``) with
everything it writes for the job. The database refuses (:class:`StaleAttempt`, or
:class:`LeaseLost` for a transition) a write whose attempt is no longer the job's current one,
or that arrives after the job finished: a worker that lost its lease, or the orphaned Ray run
of a killed worker, cannot add metrics, checkpoints, trials, log lines or state changes to the
attempt that replaced it. The check is a compare-and-set ``UPDATE`` of the job row at the start
of the writing transaction, so the row stays locked until the write commits: a claim of the next
attempt waits for it, and a write never lands after the claim that made it stale.

Clocks: on PostgreSQL every timestamp the queue writes, and every lease comparison, uses the
database's clock (``statement_timestamp()``), so workers on different machines agree on when a
lease expires. SQLite is a single-machine database, where the local clock is the same clock.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Interval,
    Update,
    any_,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import (
    ACTIVE_STATES,
    Checkpoint,
    Job,
    JobEvent,
    JobLog,
    JobStage,
    JobState,
    Metric,
    Tenant,
    Trial,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "JOB_ID_MAX",
    "LOG_LEVELS",
    "TRANSITIONS",
    "IdempotencyConflict",
    "IllegalTransition",
    "JobNotFound",
    "LeaseLost",
    "QueueFull",
    "StaleAttempt",
    "add_checkpoint",
    "append_log",
    "cancel",
    "check_queue_room",
    "claim",
    "fail",
    "finish",
    "finish_cancelled",
    "get_job",
    "heartbeat",
    "reap",
    "record_metrics",
    "retry",
    "submit",
    "target_state",
    "upsert_trial",
]

Q, R, CG = JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED

# The closed transition table: transition name -> {state it may start from: state it ends in}.
# ``submit`` creates a job in ``queued`` and is the only transition without a "from" state.
TRANSITIONS: Mapping[str, Mapping[JobState, JobState]] = {
    "claim": {Q: R},
    # A worker renews its lease; the state does not change (an event is written only when the
    # reported stage changes, not for every renewal).
    "heartbeat": {R: R, CG: CG},
    # A job whose cancellation was requested but which completed anyway is still cancelled: the
    # user asked for it not to run to completion, and must not be surprised by a result.
    "finish": {R: S, CG: C},
    "finish_cancelled": {CG: C},
    "fail": {R: F, CG: F},
    # The worker gives the job back (shutting down, say): queued again unless cancelling.
    "retry": {R: Q, CG: C},
    # Cancelling twice is not an error (users double-click); it changes nothing the second time.
    "cancel": {Q: C, R: CG, CG: CG},
    # The reaper, for jobs whose lease expired: requeue while attempts remain, else fail.
    "reap_requeue": {R: Q},
    "reap_fail": {R: F},
    "reap_cancel": {CG: C},
}

LOG_LEVELS = ("debug", "info", "warning", "error")

# Job ids are drawn at random from 1 ... JOB_ID_MAX (the 32-bit id column's range), so an id
# says nothing about how many jobs other tenants submitted. A draw that hits an existing id
# (at a million stored jobs, one draw in 2,000) is drawn again.
JOB_ID_MAX = 2**31 - 1
_ID_DRAWS = 8
# How many of each tenant's queued jobs a claim on PostgreSQL ranks (see _fair_queue): enough
# for that many claimers at once to pass over each other's locked rows. More claimers than
# that racing for one tenant's jobs may find nothing and poll again.
_CLAIM_DEPTH = 32

# Optimistic compare-and-set retries: each retry means another transition won a race for the
# same job, and a job has only a handful of states, so a few rounds always settle it.
_RACE_ROUNDS = 8
_METRIC_KEYS = frozenset({"split", "name", "value", "trial", "epoch", "step"})


class JobNotFound(LookupError):
    """The job does not exist (or belongs to another tenant, which callers cannot tell apart)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class IllegalTransition(ValueError):
    """A transition that the table does not allow from the job's current state."""

    def __init__(
        self, job_id: int | None, state: JobState | None, transition: str, detail: str = ""
    ) -> None:
        where = f"job {job_id} is {state}" if job_id is not None else f"state {state}"
        message = f"{where}: cannot {transition}"
        super().__init__(f"{message} ({detail})" if detail else message)
        self.job_id = job_id
        self.state = state
        self.transition = transition


class LeaseLost(IllegalTransition):
    """The worker does not hold the job's lease (it expired and was reaped, or never was its)."""

    def __init__(
        self, job_id: int, state: JobState, transition: str, worker: str, owner: str | None
    ) -> None:
        holder = f"held by {owner!r}" if owner is not None else "no worker holds it"
        super().__init__(
            job_id, state, transition, f"worker {worker!r} does not hold its lease; {holder}"
        )
        self.worker = worker
        self.owner = owner


class StaleAttempt(RuntimeError):
    """A write from an attempt that is no longer the job's current, active attempt (fenced)."""

    def __init__(self, job_id: int, attempt: int) -> None:
        super().__init__(
            f"job {job_id}: attempt {attempt} is no longer the job's current attempt; "
            "its write was refused"
        )
        self.job_id = job_id
        self.attempt = attempt


class IdempotencyConflict(ValueError):
    """An idempotency key was reused for a different job spec."""


class QueueFull(RuntimeError):
    """The tenant already has as many queued jobs as it may have."""

    def __init__(self, tenant_id: int, limit: int) -> None:
        super().__init__(
            f"too many queued jobs: this tenant already has {limit} queued (the limit); "
            "submit again when some have started or been cancelled"
        )
        self.tenant_id = tenant_id
        self.limit = limit


def target_state(transition: str, state: JobState, job_id: int | None = None) -> JobState:
    """The state ``transition`` leads to from ``state``; raise :class:`IllegalTransition`."""
    try:
        table = TRANSITIONS[transition]
    except KeyError:
        raise ValueError(f"unknown transition {transition!r}") from None
    try:
        return table[JobState(state)]
    except KeyError:
        raise IllegalTransition(job_id, JobState(state), transition) from None


# --- plumbing ---------------------------------------------------------------------------------


@contextmanager
def _transaction(session: Session) -> Iterator[None]:
    """Commit on success; roll back on any error so no half-applied transition remains."""
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _now(session: Session) -> ColumnElement[datetime]:
    """Now, from the database's clock on PostgreSQL and the local clock on SQLite."""
    if _dialect(session) == "postgresql":
        # statement_timestamp(), not now(): now() is frozen at the start of the transaction,
        # which a caller may have opened long before.
        return func.statement_timestamp(type_=UTCDateTime())
    return literal(utcnow(), UTCDateTime())


def _lease_until(session: Session, lease_s: float) -> ColumnElement[datetime]:
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    lease = timedelta(seconds=lease_s)
    if _dialect(session) == "postgresql":
        return func.statement_timestamp() + literal(lease, Interval())
    return literal(utcnow() + lease, UTCDateTime())


def _released() -> dict[str, Any]:
    """Column values that clear a lease; a job holds one exactly while running or cancelling."""
    return {"lease_owner": None, "lease_expires_at": None}


def _returning_jobs(session: Session, stmt: Update) -> Job | None:
    # populate_existing: a Job already in the session's identity map is refreshed from the
    # returned row instead of keeping its stale attribute values.
    return session.scalars(
        stmt.returning(Job),
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).one_or_none()


_ANY = object()


def _set_if(
    session: Session,
    job_id: int,
    *,
    state: JobState,
    owner: str | object | None = _ANY,
    where: Iterable[ColumnElement[bool]] = (),
    attempt: int | None = None,
    values: Mapping[str, Any],
) -> Job | None:
    """Compare-and-set: update the job only if it is still in ``state`` (held by ``owner``, in
    ``attempt``)."""
    stmt = update(Job).where(Job.id == job_id, Job.state == state, *where)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    if owner is not _ANY:
        stmt = stmt.where(Job.lease_owner.is_(None) if owner is None else Job.lease_owner == owner)
    stmt = stmt.values(updated_at=_now(session), **values)
    return _returning_jobs(session, stmt)


def _event(
    session: Session,
    job_id: int,
    transition: str,
    from_state: JobState | None,
    to_state: JobState,
    *,
    worker: str | None = None,
    message: str = "",
) -> None:
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            at=_now(session),
            from_state=from_state,
            to_state=to_state,
            transition=transition,
            worker=worker,
            message=message,
        )
    )


def _read(session: Session, job_id: int, tenant_id: int | None = None) -> Any:
    stmt = select(Job.state, Job.lease_owner, Job.stage, Job.attempts, Job.max_attempts).where(
        Job.id == job_id
    )
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    row = session.execute(stmt).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return row


def _fence(session: Session, job_id: int, attempt: int | None) -> None:
    """Refuse the rest of the transaction unless ``attempt`` is the job's current, active
    attempt; the job row stays locked until the transaction ends (None: no fence)."""
    if attempt is None:
        return
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.state.in_(ACTIVE_STATES))
        .values(attempts=Job.attempts, updated_at=_now(session)),
        execution_options={"synchronize_session": False},
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleAttempt(job_id, attempt)


def _check_holder(
    row: Any, job_id: int, worker_id: str, transition: str, attempt: int | None
) -> JobState:
    """The job's state, if ``worker_id`` holds its lease (in ``attempt``); else LeaseLost."""
    state = JobState(row.state)
    if row.lease_owner != worker_id or (attempt is not None and row.attempts != attempt):
        raise LeaseLost(job_id, state, transition, worker_id, row.lease_owner)
    return state


def _worker_transition(
    session: Session,
    job_id: int,
    worker_id: str,
    transition: str,
    values_for: Callable[[JobState], dict[str, Any]],
    message_for: Callable[[JobState], str],
    attempt: int | None = None,
) -> Job:
    """Apply a transition that only the worker holding the job's lease (in ``attempt``, when
    given) may apply."""
    with _transaction(session):
        for _ in range(_RACE_ROUNDS):
            row = _read(session, job_id)
            state = _check_holder(row, job_id, worker_id, transition, attempt)
            target = target_state(transition, state, job_id)
            job = _set_if(
                session,
                job_id,
                state=state,
                owner=worker_id,
                attempt=attempt,
                values={"state": target, **values_for(target)},
            )
            if job is not None:
                _event(
                    session,
                    job_id,
                    transition,
                    state,
                    target,
                    worker=worker_id,
                    message=message_for(target),
                )
                return job
        raise RuntimeError(f"job {job_id}: {transition} lost {_RACE_ROUNDS} races in a row")


def _spec_json(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the JSON column will give it back (tuples become lists, keys strings)."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"job spec must be a mapping, got {type(spec).__name__}")
    # allow_nan=False: NaN/Infinity are not JSON, and PostgreSQL's json type rejects them.
    return json.loads(json.dumps(dict(spec), allow_nan=False))


def _finite_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (trial metrics may well be NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


# --- the API side -----------------------------------------------------------------------------


def get_job(session: Session, job_id: int, *, tenant_id: int | None = None) -> Job:
    """The job ``job_id`` (of ``tenant_id`` when given); raise :class:`JobNotFound`."""
    stmt = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    job = session.scalars(stmt, execution_options={"populate_existing": True}).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def _idempotent_match(
    session: Session, tenant_id: int, key: str, spec: dict[str, Any]
) -> Job | None:
    job = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key),
        execution_options={"populate_existing": True},
    ).one_or_none()
    if job is not None and job.spec != spec:
        # Returning the old job for a different spec would silently drop the new request.
        raise IdempotencyConflict(
            f"idempotency key {key!r} was already used for job {job.id} with a different spec"
        )
    return job


def _queued_jobs(session: Session, tenant_id: int) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.state == JobState.QUEUED)
    )


def check_queue_room(session: Session, tenant_id: int, max_queued: int) -> None:
    """Raise :class:`QueueFull` if the tenant already has ``max_queued`` queued jobs.

    A cheap early answer for the API, before it spends time checking the spec's dataset;
    :func:`submit` enforces the limit again, atomically.
    """
    with _transaction(session):
        if _queued_jobs(session, tenant_id) >= max_queued:
            raise QueueFull(tenant_id, max_queued)


def _id_taken(session: Session, job_id: int) -> bool:
    with _transaction(session):
        return session.scalar(select(Job.id).where(Job.id == job_id)) is not None


def submit(
    session: Session,
    tenant_id: int,
    spec: Mapping[str, Any],
    *,
    priority: int = 0,
    max_attempts: int = 3,
    idempotency_key: str | None = None,
    max_queued: int | None = None,
) -> Job:
    """Queue a new job for ``tenant_id``; return it.

    The job's id is drawn at random (see :data:`JOB_ID_MAX`). With ``max_queued``, a tenant that
    already has that many queued jobs gets :class:`QueueFull` and nothing is stored; concurrent
    submits of one tenant cannot both take the last place. With an ``idempotency_key``, a second
    submit by the same tenant returns the job created by the first (also when both race, and
    also when the queue is full meanwhile); reusing the key for a different spec raises
    :class:`IdempotencyConflict`.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if max_queued is not None and max_queued < 1:
        raise ValueError(f"max_queued must be at least 1, got {max_queued}")
    spec_json = _spec_json(spec)
    if idempotency_key is not None:
        with _transaction(session):
            existing = _idempotent_match(session, tenant_id, idempotency_key, spec_json)
        if existing is not None:
            return existing
    for _ in range(_ID_DRAWS):
        job_id = secrets.randbelow(JOB_ID_MAX) + 1
        try:
            with _transaction(session):
                if max_queued is not None and _dialect(session) == "postgresql":
                    # Submits of one tenant take turns from here to their commit: each counts
                    # the queued jobs the others committed. (FOR NO KEY UPDATE does not block
                    # the foreign-key checks that other inserts make on the tenant's row.)
                    session.execute(
                        select(Tenant.id)
                        .where(Tenant.id == tenant_id)
                        .with_for_update(key_share=True)
                    )
                now = _now(session)
                job = session.scalars(
                    insert(Job)
                    .values(
                        id=job_id,
                        tenant_id=tenant_id,
                        spec=spec_json,
                        state=JobState.QUEUED,
                        priority=priority,
                        max_attempts=max_attempts,
                        attempts=0,
                        progress=0.0,
                        cancel_requested=False,
                        idempotency_key=idempotency_key,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(Job)
                ).one()
                # Counted after the insert, which on SQLite holds the database's write lock
                # until the commit: no other submit can slip in between.
                if max_queued is not None and _queued_jobs(session, tenant_id) > max_queued:
                    raise QueueFull(tenant_id, max_queued)
                _event(session, job.id, "submit", None, JobState.QUEUED, message="submitted")
                return job
        except IntegrityError:
            # Another submit with the same key committed first: return its job. An id that
            # another job drew first: draw again. Any other integrity error (an unknown
            # tenant) is raised as it was.
            if idempotency_key is not None:
                with _transaction(session):
                    existing = _idempotent_match(session, tenant_id, idempotency_key, spec_json)
                if existing is not None:
                    return existing
            if not _id_taken(session, job_id):
                raise
    raise RuntimeError(f"no free job id in {_ID_DRAWS} random draws")


def cancel(session: Session, job_id: int, tenant_id: int) -> Job:
    """Cancel a job of ``tenant_id``.

    A queued job is cancelled at once. A running job moves to ``cancelling`` with
    ``cancel_requested`` set; its worker sees that in its next heartbeat, stops, and calls
    :func:`finish_cancelled`. Cancelling a cancelling job changes nothing; cancelling a finished
    job raises :class:`IllegalTransition`. Another tenant's job is :class:`JobNotFound`.
    """
    with _transaction(session):
        for _ in range(_RACE_ROUNDS):
            state = JobState(_read(session, job_id, tenant_id).state)
            target = target_state("cancel", state, job_id)
            if state == target:
                return get_job(session, job_id)
            values: dict[str, Any] = {"state": target, "cancel_requested": True}
            if target == JobState.CANCELLED:
                values.update(finished_at=_now(session), **_released())
            job = _set_if(session, job_id, state=state, values=values)
            if job is not None:
                message = (
                    "cancelled while queued"
                    if target == JobState.CANCELLED
                    else "cancellation requested; waiting for the worker to stop"
                )
                _event(session, job_id, "cancel", state, target, message=message)
                return job
        raise RuntimeError(f"job {job_id}: cancel lost {_RACE_ROUNDS} races in a row")


# --- the worker side --------------------------------------------------------------------------


def _fair_queue(dialect: str) -> Any:
    """The queued jobs in the order a fair claim takes them, as a subquery (id, turn, created_at).

    A tenant's queued jobs are ranked by their ``priority`` (highest first), then age: priority
    orders a tenant's own jobs, never one tenant's against another's. A job's ``turn`` is its
    tenant's active jobs (running or cancelling: they hold a worker) plus its rank, that is how
    many jobs its tenant would hold once it runs. The claim takes the lowest turn, then the
    oldest job: the tenant with the fewest running jobs goes first, and tenants with equal
    shares take turns in the order their jobs were submitted. A claimer that skips a job being
    claimed by another finds the next one in the same order. (A per-tenant limit on running
    jobs is a bound on the turn: see :func:`claim`.)

    The lowest turn is always some tenant's first job, so on PostgreSQL, where claims run
    concurrently, only each tenant's first :data:`_CLAIM_DEPTH` queued jobs are ranked (one
    index probe per tenant, ``LATERAL``) rather than the whole queue; the jobs after them would
    only matter to a claimer that found that many of one tenant's jobs locked by others. SQLite
    (one writer, the embedded default) ranks every queued job.
    """
    active = (
        select(Job.tenant_id, func.count().label("jobs"))
        .where(Job.state.in_(ACTIVE_STATES))
        .group_by(Job.tenant_id)
        .subquery("active")
    )
    if dialect == "postgresql":
        first = (
            select(Job.id, Job.priority, Job.created_at)
            .where(Job.tenant_id == Tenant.id, Job.state == JobState.QUEUED)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(_CLAIM_DEPTH)
            .lateral("first")
        )
        rank = func.row_number().over(
            partition_by=Tenant.id,
            order_by=(first.c.priority.desc(), first.c.created_at, first.c.id),
        )
        return (
            select(
                first.c.id,
                first.c.created_at,
                (func.coalesce(active.c.jobs, 0) + rank).label("turn"),
            )
            .select_from(Tenant)
            .join(first, true())
            .outerjoin(active, active.c.tenant_id == Tenant.id)
            .subquery("ranked")
        )
    rank = func.row_number().over(
        partition_by=Job.tenant_id, order_by=(Job.priority.desc(), Job.created_at, Job.id)
    )
    return (
        select(
            Job.id,
            Job.created_at,
            (func.coalesce(active.c.jobs, 0) + rank).label("turn"),
        )
        .outerjoin(active, active.c.tenant_id == Job.tenant_id)
        .where(Job.state == JobState.QUEUED)
        .subquery("ranked")
    )


def _claim_statement(
    session: Session, worker_id: str, lease_s: float, max_running: int | None
) -> Update:
    now = _now(session)
    values = {
        "state": JobState.RUNNING,
        "lease_owner": worker_id,
        "lease_expires_at": _lease_until(session, lease_s),
        "attempts": Job.attempts + 1,
        "started_at": func.coalesce(Job.started_at, now),
        "updated_at": now,
        "stage": None,
    }
    fair = _fair_queue(_dialect(session))
    order = (fair.c.turn, fair.c.created_at, fair.c.id)
    allowed = [fair.c.turn <= max_running] if max_running is not None else []
    if _dialect(session) == "postgresql":
        # The candidates, best first, as one array computed once. The locking query then reads
        # the jobs table alone, by primary key: PostgreSQL locks no rows of a query with window
        # functions, and a claimer that meets a row another claimer changed re-checks it
        # against that query only. SKIP LOCKED passes over a row another claimer is taking
        # instead of queueing behind its lock; the CTE with FOR UPDATE runs exactly once.
        ranked = (
            select(
                func.array_agg(aggregate_order_by(fair.c.id, *order)).label("ids"),
            )
            .where(*allowed)
            .cte("ranked")
        )
        # An array value, not a subquery's rows: ``id = ANY (array)`` probes the primary key.
        candidates = cast(select(ranked.c.ids).scalar_subquery(), postgresql.ARRAY(Integer))
        next_job = (
            select(Job.id)
            .where(Job.id == any_(candidates), Job.state == JobState.QUEUED)
            .order_by(func.array_position(candidates, Job.id))
            .limit(1)
            .with_for_update(skip_locked=True)
            .cte("next")
        )
        return (
            update(Job)
            .where(Job.id == next_job.c.id, Job.state == JobState.QUEUED)
            .values(**values)
        )
    # SQLite has one writer at a time: the UPDATE takes the write lock before it evaluates the
    # subquery, so two claimers can never pick the same row; the state check is belt and braces.
    next_id = select(fair.c.id).where(*allowed).order_by(*order).limit(1).scalar_subquery()
    return update(Job).where(Job.id == next_id, Job.state == JobState.QUEUED).values(**values)


def claim(
    session_or_engine: Session | Engine,
    worker_id: str,
    lease_s: float,
    *,
    max_running_per_tenant: int | None = None,
) -> Job | None:
    """Claim the next queued job for ``worker_id``, fairly across tenants.

    The tenant with the fewest running jobs goes first, then the oldest job; a tenant's own
    jobs go by ``priority``, then age (see :func:`_fair_queue`). With
    ``max_running_per_tenant``, a tenant that already runs that many jobs gets none until one
    ends. One UPDATE statement picks and takes the job, so a job is claimed exactly once however
    many workers claim concurrently. The job becomes ``running`` with a lease of ``lease_s``
    seconds and ``attempts`` + 1. Returns None when nothing can be claimed. Given an engine, a
    short-lived session is used and the returned job is detached (all its attributes loaded).
    """
    if max_running_per_tenant is not None and max_running_per_tenant < 1:
        raise ValueError(f"max_running_per_tenant must be at least 1, got {max_running_per_tenant}")
    if isinstance(session_or_engine, Engine):
        with Session(session_or_engine, expire_on_commit=False) as session:
            return claim(session, worker_id, lease_s, max_running_per_tenant=max_running_per_tenant)
    session = session_or_engine
    statement = _claim_statement(session, worker_id, lease_s, max_running_per_tenant)
    with _transaction(session):
        job = _returning_jobs(session, statement)
        if job is not None:
            _event(
                session,
                job.id,
                "claim",
                JobState.QUEUED,
                JobState.RUNNING,
                worker=worker_id,
                message=f"attempt {job.attempts} of {job.max_attempts}",
            )
        return job


def heartbeat(
    session: Session,
    job_id: int,
    worker_id: str,
    lease_s: float,
    *,
    progress: float | None = None,
    stage: JobStage | str | None = None,
    attempt: int | None = None,
) -> bool:
    """Renew ``worker_id``'s lease on the job, optionally reporting progress (0..1) and stage.

    Returns whether cancellation was requested, in which case the worker should stop and call
    :func:`finish_cancelled`. Raises :class:`LeaseLost` if the worker no longer holds the lease
    (the reaper gave the job away), or ``attempt`` is not the job's current one, in which case
    it must stop without reporting anything.
    """
    if progress is not None and not (0.0 <= progress <= 1.0):
        raise ValueError(f"progress must be within [0, 1], got {progress}")
    new_stage = JobStage(stage) if stage is not None else None
    with _transaction(session):
        for _ in range(_RACE_ROUNDS):
            row = _read(session, job_id)
            state = _check_holder(row, job_id, worker_id, "heartbeat", attempt)
            target_state("heartbeat", state, job_id)
            values: dict[str, Any] = {"lease_expires_at": _lease_until(session, lease_s)}
            if progress is not None:
                values["progress"] = progress
            if new_stage is not None:
                values["stage"] = new_stage
            job = _set_if(
                session, job_id, state=state, owner=worker_id, attempt=attempt, values=values
            )
            if job is None:
                continue  # cancelled (running -> cancelling) meanwhile: renew from that state
            old_stage = JobStage(row.stage) if row.stage is not None else None
            if new_stage is not None and new_stage != old_stage:
                _event(
                    session,
                    job_id,
                    "heartbeat",
                    state,
                    state,
                    worker=worker_id,
                    message=f"stage {old_stage or '-'} -> {new_stage}",
                )
            return job.cancel_requested
        raise RuntimeError(f"job {job_id}: heartbeat lost {_RACE_ROUNDS} races in a row")


def finish(session: Session, job_id: int, worker_id: str, *, attempt: int | None = None) -> Job:
    """The worker completed the job: ``succeeded`` (or ``cancelled`` if cancellation was
    requested while it ran). Raises :class:`LeaseLost` if the worker does not hold the lease."""

    def values(target: JobState) -> dict[str, Any]:
        done: dict[str, Any] = {"finished_at": _now(session), **_released()}
        if target == JobState.SUCCEEDED:
            done["progress"] = 1.0
        return done

    def message(target: JobState) -> str:
        if target == JobState.CANCELLED:
            return "completed after cancellation was requested; result discarded"
        return "succeeded"

    return _worker_transition(session, job_id, worker_id, "finish", values, message, attempt)


def finish_cancelled(
    session: Session, job_id: int, worker_id: str, *, attempt: int | None = None
) -> Job:
    """The worker stopped a ``cancelling`` job at the user's request: ``cancelled``."""
    return _worker_transition(
        session,
        job_id,
        worker_id,
        "finish_cancelled",
        lambda _target: {"finished_at": _now(session), **_released()},
        lambda _target: "stopped at the user's request",
        attempt,
    )


def fail(
    session: Session, job_id: int, worker_id: str, error: str, *, attempt: int | None = None
) -> Job:
    """The job failed on ``worker_id`` for ``error`` (a human-readable reason); no retry."""
    return _worker_transition(
        session,
        job_id,
        worker_id,
        "fail",
        lambda _target: {"finished_at": _now(session), "error": error, **_released()},
        lambda _target: error,
        attempt,
    )


def retry(
    session: Session,
    job_id: int,
    worker_id: str,
    reason: str = "",
    *,
    attempt: int | None = None,
) -> Job:
    """The worker gives the job back: ``queued`` again (``attempts`` kept: the next claim counts
    the next attempt), or ``cancelled`` if cancellation was requested meanwhile."""

    def values(target: JobState) -> dict[str, Any]:
        if target == JobState.CANCELLED:
            return {"finished_at": _now(session), **_released()}
        return {"stage": None, **_released()}

    return _worker_transition(
        session,
        job_id,
        worker_id,
        "retry",
        values,
        lambda _target: reason or "given back",
        attempt,
    )


def reap(session: Session, now: datetime | None = None) -> list[int]:
    """Expire the leases that ran out before ``now`` (default: the database's clock).

    A running job goes back to ``queued`` (lease cleared; its next claim counts the next attempt)
    while ``attempts < max_attempts``, else to ``failed`` with the reason in ``error``. A
    cancelling job becomes ``cancelled``. Returns the ids of the jobs changed. Safe to run from
    several processes at once: on PostgreSQL each reaper skips rows another is handling.
    """
    deadline = literal(now, UTCDateTime()) if now is not None else _now(session)
    expired = Job.lease_expires_at < deadline
    reaped: list[int] = []
    with _transaction(session):
        query = (
            select(Job.id, Job.state, Job.lease_owner, Job.attempts, Job.max_attempts)
            .where(Job.state.in_(ACTIVE_STATES), expired)
            .order_by(Job.id)
        )
        if _dialect(session) == "postgresql":
            query = query.with_for_update(skip_locked=True)
        for row in session.execute(query).all():
            state = JobState(row.state)
            worker = row.lease_owner
            values: dict[str, Any] = dict(_released())
            if state == JobState.CANCELLING:
                transition, message = "reap_cancel", f"lease of worker {worker} expired"
                values["finished_at"] = _now(session)
            elif row.attempts >= row.max_attempts:
                transition = "reap_fail"
                message = f"lease expired after {row.attempts} attempts (last worker {worker})"
                values.update(finished_at=_now(session), error=message)
            else:
                transition = "reap_requeue"
                message = (
                    f"lease of worker {worker} expired; requeued after attempt "
                    f"{row.attempts} of {row.max_attempts}"
                )
                values["stage"] = None
            target = target_state(transition, state, row.id)
            # Re-check the expiry in the UPDATE: a heartbeat may have renewed it since the read.
            job = _set_if(
                session,
                row.id,
                state=state,
                owner=worker,
                where=[expired],
                values={"state": target, **values},
            )
            if job is not None:
                _event(session, row.id, transition, state, target, worker=worker, message=message)
                reaped.append(row.id)
    return reaped


# --- what workers record ----------------------------------------------------------------------


def record_metrics(
    session: Session,
    job_id: int,
    rows: Iterable[Mapping[str, Any]],
    *,
    attempt: int | None = None,
    replace_split: str | None = None,
) -> int:
    """Append metric points to the job's time series; return how many.

    Each row has ``split``, ``name`` and ``value`` and optionally ``trial``, ``epoch``, ``step``.
    NaN values are kept as NULL (a diverging loss is worth seeing); infinities are kept as such.
    With ``attempt``, the write is fenced (:class:`StaleAttempt`; see the module docstring).
    With ``replace_split``, the job's earlier points of that split go in the same transaction:
    for a result measured once per job (the test split), which an attempt that follows one
    killed after recording it measures again.
    """
    points: list[dict[str, Any]] = []
    for row in rows:
        unknown = set(row) - _METRIC_KEYS
        missing = {"split", "name", "value"} - set(row)
        if unknown or missing:
            raise ValueError(
                f"metric row {dict(row)!r}: missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        value = row["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {row['name']!r}: value must be a number, got {value!r}")
        points.append(
            {
                "job_id": job_id,
                "split": str(row["split"]),
                "name": str(row["name"]),
                # NULL stands for NaN: SQLite cannot store NaN, and JSON has no NaN either.
                "value": None if math.isnan(value) else float(value),
                "trial": row.get("trial"),
                "epoch": row.get("epoch"),
                "step": row.get("step"),
            }
        )
    if not points:
        return 0
    with _transaction(session):
        _fence(session, job_id, attempt)
        if replace_split is not None:
            session.execute(
                delete(Metric).where(Metric.job_id == job_id, Metric.split == replace_split)
            )
        # Core insert: one executemany, with the timestamp taken from the database clock.
        session.execute(insert(Metric.__table__).values(at=_now(session)), points)
    return len(points)


def append_log(
    session: Session, job_id: int, level: str, message: str, *, attempt: int | None = None
) -> JobLog:
    """Append a log line (level: debug, info, warning or error) to the job's log (fenced with
    ``attempt``)."""
    level = level.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    with _transaction(session):
        _fence(session, job_id, attempt)
        return session.scalars(
            insert(JobLog)
            .values(job_id=job_id, at=_now(session), level=level, message=message)
            .returning(JobLog)
        ).one()


def _upsert(session: Session) -> Callable[..., Any]:
    """The dialect's INSERT with ON CONFLICT (both PostgreSQL and SQLite have one)."""
    return postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert


def add_checkpoint(
    session: Session,
    job_id: int,
    name: str,
    uri: str,
    *,
    size: int,
    sha256: str,
    attempt: int | None = None,
) -> Checkpoint:
    """Record the job's checkpoint ``name`` (``best``, ``last``, ...) at ``uri``.

    A checkpoint of the same name replaces the previous record: ``best`` and ``last`` move as
    training goes on. Fenced with ``attempt``.
    """
    if size < 0:
        raise ValueError(f"checkpoint size must be non-negative, got {size}")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    with _transaction(session):
        _fence(session, job_id, attempt)
        now = _now(session)
        stmt = _upsert(session)(Checkpoint).values(
            job_id=job_id, name=name, uri=uri, size=size, sha256=sha256, created_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Checkpoint.job_id, Checkpoint.name],
            set_={
                "uri": stmt.excluded.uri,
                "size": stmt.excluded.size,
                "sha256": stmt.excluded.sha256,
                "created_at": now,
            },
        )
        return session.scalars(
            stmt.returning(Checkpoint), execution_options={"populate_existing": True}
        ).one()


def upsert_trial(
    session: Session,
    job_id: int,
    trial_index: int,
    *,
    state: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    attempt: int | None = None,
) -> Trial:
    """Create or update trial ``trial_index`` of the job's search.

    On update, ``params`` and ``metrics`` replace the stored ones when given, and a None
    ``checkpoint_uri`` keeps the one already recorded. Fenced with ``attempt``.
    """
    if not state:
        raise ValueError("trial state must be a non-empty string")
    params_json = _spec_json(params or {})
    metrics_json = _spec_json(_finite_json(metrics or {}))
    with _transaction(session):
        _fence(session, job_id, attempt)
        stmt = _upsert(session)(Trial).values(
            job_id=job_id,
            trial_index=trial_index,
            params=params_json,
            metrics=metrics_json,
            state=state,
            checkpoint_uri=checkpoint_uri,
        )
        changes: dict[str, Any] = {
            "state": stmt.excluded.state,
            "checkpoint_uri": func.coalesce(stmt.excluded.checkpoint_uri, Trial.checkpoint_uri),
        }
        if params is not None:
            changes["params"] = stmt.excluded.params
        if metrics is not None:
            changes["metrics"] = stmt.excluded.metrics
        stmt = stmt.on_conflict_do_update(
            index_elements=[Trial.job_id, Trial.trial_index], set_=changes
        )
        return session.scalars(
            stmt.returning(Trial), execution_options={"populate_existing": True}
        ).one()
