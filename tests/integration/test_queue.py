"""service.queue on real PostgreSQL and SQLite: every named transition, its events row, the
illegal ones, leases and the reaper, and exactly-once claims under concurrency."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import URL, Engine, func, insert, select
from sqlalchemy.orm import Session

from service import queue
from service.db import make_engine, session_factory
from service.models import (
    Checkpoint,
    Job,
    JobEvent,
    JobLog,
    JobStage,
    JobState,
    Metric,
    Tenant,
    Trial,
)
from service.queue import (
    IdempotencyConflict,
    IllegalTransition,
    JobNotFound,
    LeaseLost,
    StaleAttempt,
)

LEASE_S = 60
SPEC = {"method": "bird", "epochs": 3}


def events(session: Session, job_id: int) -> list[tuple[str, str | None, str, str | None]]:
    """(transition, from, to, worker) of the job's events, oldest first."""
    rows = session.execute(
        select(JobEvent.transition, JobEvent.from_state, JobEvent.to_state, JobEvent.worker)
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.id)
    )
    return [(t, f and str(f), str(to), w) for t, f, to, w in rows]


def fresh(session: Session, job_id: int) -> Job:
    """The job as the database has it now."""
    return queue.get_job(session, job_id)


def later(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


@pytest.fixture
def running(db_session: Session, db_tenant_id: int) -> Job:
    """A job claimed by worker ``w1``."""
    job = queue.submit(db_session, db_tenant_id, SPEC)
    claimed = queue.claim(db_session, "w1", LEASE_S)
    assert claimed is not None and claimed.id == job.id
    return claimed


# --- submit ----------------------------------------------------------------------------------


def test_submit_queues_the_job_and_records_it(db_session: Session, db_tenant_id: int) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC, priority=3, max_attempts=5)
    job = fresh(db_session, job.id)
    assert (job.state, job.priority, job.max_attempts, job.attempts) == (JobState.QUEUED, 3, 5, 0)
    assert job.spec == SPEC and job.progress == 0.0 and not job.cancel_requested
    assert job.lease_owner is None and job.started_at is None and job.finished_at is None
    assert events(db_session, job.id) == [("submit", None, "queued", None)]


def test_submit_is_idempotent_per_tenant_and_key(db_session: Session, db_tenant_id: int) -> None:
    first = queue.submit(db_session, db_tenant_id, SPEC, idempotency_key="abc")
    again = queue.submit(db_session, db_tenant_id, dict(SPEC), idempotency_key="abc")
    assert again.id == first.id
    assert events(db_session, first.id) == [("submit", None, "queued", None)]
    # Another tenant's key space is its own.
    other = Tenant(name="other")
    db_session.add(other)
    db_session.commit()
    assert queue.submit(db_session, other.id, SPEC, idempotency_key="abc").id != first.id
    # Without a key every submit is a new job.
    assert queue.submit(db_session, db_tenant_id, SPEC).id != first.id
    assert db_session.scalar(select(func.count()).select_from(Job)) == 3


def test_reusing_an_idempotency_key_for_another_spec_is_refused(
    db_session: Session, db_tenant_id: int
) -> None:
    queue.submit(db_session, db_tenant_id, SPEC, idempotency_key="abc")
    with pytest.raises(IdempotencyConflict, match="abc"):
        queue.submit(db_session, db_tenant_id, {"method": "mfd"}, idempotency_key="abc")


def test_racing_idempotent_submits_create_one_job(db_engine: Engine, db_tenant_id: int) -> None:
    factory = session_factory(db_engine)
    barrier = threading.Barrier(4)
    ids: list[int] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            with factory() as session:
                barrier.wait()
                ids.append(queue.submit(session, db_tenant_id, SPEC, idempotency_key="k").id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(ids) == 4 and len(set(ids)) == 1
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_submit_validates_its_arguments(db_session: Session, db_tenant_id: int) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        queue.submit(db_session, db_tenant_id, SPEC, max_attempts=0)
    with pytest.raises(TypeError, match="mapping"):
        queue.submit(db_session, db_tenant_id, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        queue.submit(db_session, db_tenant_id, {"lr": float("nan")})
    assert db_session.scalar(select(func.count()).select_from(Job)) == 0


# --- claim -----------------------------------------------------------------------------------


def test_claim_takes_the_highest_priority_then_the_oldest(
    db_session: Session, db_tenant_id: int
) -> None:
    low_old = queue.submit(db_session, db_tenant_id, {"n": 1}, priority=0).id
    high_old = queue.submit(db_session, db_tenant_id, {"n": 2}, priority=5).id
    low_new = queue.submit(db_session, db_tenant_id, {"n": 3}, priority=0).id
    high_new = queue.submit(db_session, db_tenant_id, {"n": 4}, priority=5).id
    negative = queue.submit(db_session, db_tenant_id, {"n": 5}, priority=-1).id
    order = [queue.claim(db_session, "w", LEASE_S).id for _ in range(5)]
    assert order == [high_old, high_new, low_old, low_new, negative]
    assert queue.claim(db_session, "w", LEASE_S) is None


def test_claim_breaks_equal_timestamps_by_id(db_session: Session, db_tenant_id: int) -> None:
    at = datetime(2024, 1, 1, tzinfo=timezone.utc)
    ids = [
        db_session.scalar(
            insert(Job)
            .values(tenant_id=db_tenant_id, spec={}, created_at=at, updated_at=at)
            .returning(Job.id)
        )
        for _ in range(3)
    ]
    db_session.commit()
    assert [queue.claim(db_session, "w", LEASE_S).id for _ in range(3)] == ids


def test_claim_leases_the_job_and_counts_the_attempt(
    db_session: Session, db_tenant_id: int
) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC)
    before = datetime.now(timezone.utc)
    claimed = queue.claim(db_session, "worker-a", LEASE_S)
    assert claimed.id == job.id
    job = fresh(db_session, job.id)
    assert job.state == JobState.RUNNING and job.attempts == 1
    assert job.lease_owner == "worker-a"
    assert before - timedelta(seconds=2) <= job.started_at <= later(2)
    expected = job.started_at + timedelta(seconds=LEASE_S)
    assert abs(job.lease_expires_at - expected) < timedelta(seconds=1)
    assert events(db_session, job.id)[-1] == ("claim", "queued", "running", "worker-a")


def test_claim_accepts_an_engine(db_engine: Engine, db_tenant_id: int) -> None:
    with session_factory(db_engine)() as session:
        job_id = queue.submit(session, db_tenant_id, SPEC).id
    claimed = queue.claim(db_engine, "w", LEASE_S)
    assert claimed.id == job_id and claimed.state == JobState.RUNNING  # detached, loaded
    assert queue.claim(db_engine, "w", LEASE_S) is None


def test_claim_skips_jobs_that_are_not_queued(db_session: Session, db_tenant_id: int) -> None:
    cancelled = queue.submit(db_session, db_tenant_id, SPEC)
    queue.cancel(db_session, cancelled.id, db_tenant_id)
    assert queue.claim(db_session, "w", LEASE_S) is None


# --- heartbeat -------------------------------------------------------------------------------


def test_heartbeat_renews_the_lease_and_reports_progress(db_session: Session, running: Job) -> None:
    first_expiry = fresh(db_session, running.id).lease_expires_at
    time.sleep(0.01)
    assert queue.heartbeat(db_session, running.id, "w1", LEASE_S, progress=0.25) is False
    job = fresh(db_session, running.id)
    assert job.lease_expires_at > first_expiry and job.progress == 0.25
    assert queue.heartbeat(db_session, running.id, "w1", 600, stage="training") is False
    job = fresh(db_session, running.id)
    assert job.stage == JobStage.TRAINING
    assert job.lease_expires_at > later(500)
    # A repeated stage is not a change: one event for the stage, none for plain renewals.
    queue.heartbeat(db_session, running.id, "w1", LEASE_S, stage=JobStage.TRAINING)
    queue.heartbeat(db_session, running.id, "w1", LEASE_S, stage="evaluating")
    assert events(db_session, running.id)[2:] == [
        ("heartbeat", "running", "running", "w1"),
        ("heartbeat", "running", "running", "w1"),
    ]
    messages = db_session.scalars(
        select(JobEvent.message)
        .where(JobEvent.job_id == running.id, JobEvent.transition == "heartbeat")
        .order_by(JobEvent.id)
    ).all()
    assert messages == ["stage - -> training", "stage training -> evaluating"]


def test_heartbeat_validates_progress_and_stage(db_session: Session, running: Job) -> None:
    with pytest.raises(ValueError, match="progress"):
        queue.heartbeat(db_session, running.id, "w1", LEASE_S, progress=1.5)
    with pytest.raises(ValueError):
        queue.heartbeat(db_session, running.id, "w1", LEASE_S, stage="sleeping")
    with pytest.raises(ValueError, match="lease_s"):
        queue.heartbeat(db_session, running.id, "w1", 0)
    assert fresh(db_session, running.id).progress == 0.0


def test_heartbeat_from_a_worker_without_the_lease_raises(
    db_session: Session, running: Job
) -> None:
    with pytest.raises(LeaseLost, match=r"job \d+ is running: cannot heartbeat") as raised:
        queue.heartbeat(db_session, running.id, "intruder", LEASE_S)
    assert (raised.value.worker, raised.value.owner) == ("intruder", "w1")
    assert isinstance(raised.value, IllegalTransition)
    assert fresh(db_session, running.id).lease_owner == "w1"


def test_heartbeat_of_an_unknown_job_raises(db_session: Session) -> None:
    with pytest.raises(JobNotFound):
        queue.heartbeat(db_session, 12345, "w1", LEASE_S)


# --- finish, fail, retry ----------------------------------------------------------------------


def test_finish_succeeds_the_job(db_session: Session, running: Job) -> None:
    job = queue.finish(db_session, running.id, "w1")
    assert job.state == JobState.SUCCEEDED and job.progress == 1.0
    job = fresh(db_session, running.id)
    assert job.state == JobState.SUCCEEDED and job.finished_at is not None
    assert job.lease_owner is None and job.lease_expires_at is None
    assert events(db_session, job.id)[-1] == ("finish", "running", "succeeded", "w1")


def test_fail_records_the_reason(db_session: Session, running: Job) -> None:
    queue.fail(db_session, running.id, "w1", "dataset shard 3 is corrupt")
    job = fresh(db_session, running.id)
    assert job.state == JobState.FAILED and job.error == "dataset shard 3 is corrupt"
    assert job.finished_at is not None and job.lease_owner is None
    assert events(db_session, job.id)[-1] == ("fail", "running", "failed", "w1")
    message = db_session.scalars(
        select(JobEvent.message).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())
    ).first()
    assert message == "dataset shard 3 is corrupt"


def test_retry_requeues_and_keeps_the_attempt_count(db_session: Session, running: Job) -> None:
    queue.heartbeat(db_session, running.id, "w1", LEASE_S, stage="training")
    queue.retry(db_session, running.id, "w1", "worker shutting down")
    job = fresh(db_session, running.id)
    assert (job.state, job.attempts, job.lease_owner, job.stage) == (JobState.QUEUED, 1, None, None)
    assert events(db_session, job.id)[-1] == ("retry", "running", "queued", "w1")
    again = queue.claim(db_session, "w2", LEASE_S)
    assert again.id == job.id and again.attempts == 2 and again.lease_owner == "w2"
    assert again.started_at == job.started_at  # the first start is kept


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_a_queued_job_cancels_it_at_once(db_session: Session, db_tenant_id: int) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC)
    cancelled = queue.cancel(db_session, job.id, db_tenant_id)
    assert cancelled.state == JobState.CANCELLED and cancelled.cancel_requested
    assert fresh(db_session, job.id).finished_at is not None
    assert events(db_session, job.id)[-1] == ("cancel", "queued", "cancelled", None)


def test_cancel_a_running_job_asks_its_worker_to_stop(
    db_session: Session, running: Job, db_tenant_id: int
) -> None:
    job = queue.cancel(db_session, running.id, db_tenant_id)
    assert job.state == JobState.CANCELLING and job.cancel_requested
    assert events(db_session, job.id)[-1] == ("cancel", "running", "cancelling", None)
    # Cancelling again changes nothing and records nothing.
    assert queue.cancel(db_session, running.id, db_tenant_id).state == JobState.CANCELLING
    assert len(events(db_session, job.id)) == 3
    # The worker hears it in its next heartbeat (which still renews the lease) and stops.
    assert queue.heartbeat(db_session, running.id, "w1", LEASE_S, progress=0.5) is True
    done = queue.finish_cancelled(db_session, running.id, "w1")
    assert done.state == JobState.CANCELLED and done.lease_owner is None
    assert done.finished_at is not None
    assert events(db_session, job.id)[-1] == ("finish_cancelled", "cancelling", "cancelled", "w1")


def test_a_cancelling_job_that_finishes_anyway_is_cancelled(
    db_session: Session, running: Job, db_tenant_id: int
) -> None:
    queue.cancel(db_session, running.id, db_tenant_id)
    job = queue.finish(db_session, running.id, "w1")
    assert job.state == JobState.CANCELLED
    assert events(db_session, job.id)[-1] == ("finish", "cancelling", "cancelled", "w1")


def test_a_cancelling_job_given_back_is_cancelled_not_requeued(
    db_session: Session, running: Job, db_tenant_id: int
) -> None:
    queue.cancel(db_session, running.id, db_tenant_id)
    assert queue.retry(db_session, running.id, "w1").state == JobState.CANCELLED
    assert queue.claim(db_session, "w2", LEASE_S) is None


def test_cancel_is_scoped_to_the_tenant(db_session: Session, db_tenant_id: int) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC)
    other = Tenant(name="other")
    db_session.add(other)
    db_session.commit()
    with pytest.raises(JobNotFound):
        queue.cancel(db_session, job.id, other.id)
    assert fresh(db_session, job.id).state == JobState.QUEUED


# --- illegal transitions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "attempt", "error", "pattern"),
    [
        ("queued", "finish", LeaseLost, "is queued: cannot finish"),
        ("queued", "fail", LeaseLost, "is queued: cannot fail"),
        ("queued", "finish_cancelled", LeaseLost, "is queued: cannot finish_cancelled"),
        ("running", "finish_cancelled", IllegalTransition, "is running: cannot finish_cancelled"),
        ("running", "finish_other", LeaseLost, "is running: cannot finish"),
        ("running", "retry_other", LeaseLost, "is running: cannot retry"),
        ("succeeded", "cancel", IllegalTransition, "is succeeded: cannot cancel"),
        ("succeeded", "finish", LeaseLost, "is succeeded: cannot finish"),
        ("failed", "cancel", IllegalTransition, "is failed: cannot cancel"),
        ("cancelled", "cancel", IllegalTransition, "is cancelled: cannot cancel"),
        ("cancelled", "heartbeat", LeaseLost, "is cancelled: cannot heartbeat"),
    ],
)
def test_illegal_transitions_raise_and_change_nothing(
    db_session: Session,
    db_tenant_id: int,
    setup: str,
    attempt: str,
    error: type[Exception],
    pattern: str,
) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC)
    if setup != "queued":
        queue.claim(db_session, "w1", LEASE_S)
    if setup == "succeeded":
        queue.finish(db_session, job.id, "w1")
    elif setup == "failed":
        queue.fail(db_session, job.id, "w1", "boom")
    elif setup == "cancelled":
        queue.cancel(db_session, job.id, db_tenant_id)
        queue.finish_cancelled(db_session, job.id, "w1")
    before = (fresh(db_session, job.id).state, len(events(db_session, job.id)))

    actions = {
        "finish": lambda: queue.finish(db_session, job.id, "w1"),
        "fail": lambda: queue.fail(db_session, job.id, "w1", "x"),
        "finish_cancelled": lambda: queue.finish_cancelled(db_session, job.id, "w1"),
        "finish_other": lambda: queue.finish(db_session, job.id, "w2"),
        "retry_other": lambda: queue.retry(db_session, job.id, "w2"),
        "cancel": lambda: queue.cancel(db_session, job.id, db_tenant_id),
        "heartbeat": lambda: queue.heartbeat(db_session, job.id, "w1", LEASE_S),
    }
    with pytest.raises(error, match=rf"job {job.id} {pattern}") as raised:
        actions[attempt]()
    assert isinstance(raised.value, IllegalTransition) and isinstance(raised.value, ValueError)
    assert raised.value.job_id == job.id and str(raised.value.state) == setup
    assert (fresh(db_session, job.id).state, len(events(db_session, job.id))) == before


def test_the_transition_table_is_closed() -> None:
    legal = {(name, state) for name, table in queue.TRANSITIONS.items() for state in table}
    for name, state in itertools.product(queue.TRANSITIONS, JobState):
        if (name, state) in legal:
            assert queue.target_state(name, state) == queue.TRANSITIONS[name][state]
        else:
            with pytest.raises(IllegalTransition):
                queue.target_state(name, state)
    # Terminal states have no way out.
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        assert not any(state in table for table in queue.TRANSITIONS.values())
    with pytest.raises(ValueError, match="unknown transition"):
        queue.target_state("resurrect", JobState.FAILED)


# --- the reaper -------------------------------------------------------------------------------


def test_reap_requeues_expired_jobs_then_fails_them_after_max_attempts(
    db_session: Session, db_tenant_id: int
) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC, max_attempts=2)
    assert queue.claim(db_session, "w1", LEASE_S).attempts == 1
    assert queue.reap(db_session) == []  # the lease is live
    assert queue.reap(db_session, now=later(LEASE_S + 1)) == [job.id]
    requeued = fresh(db_session, job.id)
    assert (requeued.state, requeued.attempts, requeued.lease_owner) == (JobState.QUEUED, 1, None)
    assert requeued.lease_expires_at is None and requeued.error is None

    # The old worker lost the job: it must stop, whatever it tries.
    with pytest.raises(LeaseLost):
        queue.heartbeat(db_session, job.id, "w1", LEASE_S)
    again = queue.claim(db_session, "w2", LEASE_S)
    assert again.id == job.id and again.attempts == 2
    with pytest.raises(LeaseLost, match="held by 'w2'"):
        queue.finish(db_session, job.id, "w1")

    assert queue.reap(db_session, now=later(LEASE_S + 1)) == [job.id]
    failed = fresh(db_session, job.id)
    assert failed.state == JobState.FAILED
    assert failed.error == "lease expired after 2 attempts (last worker w2)"
    assert failed.finished_at is not None and failed.lease_owner is None
    assert queue.claim(db_session, "w3", LEASE_S) is None
    assert [e[0] for e in events(db_session, job.id)] == [
        "submit",
        "claim",
        "reap_requeue",
        "claim",
        "reap_fail",
    ]
    assert events(db_session, job.id)[-1] == ("reap_fail", "running", "failed", "w2")


def test_reap_uses_the_database_clock_by_default(db_session: Session, db_tenant_id: int) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC)
    queue.claim(db_session, "w1", 0.05)
    time.sleep(0.2)
    assert queue.reap(db_session) == [job.id]
    assert fresh(db_session, job.id).state == JobState.QUEUED


def test_a_heartbeat_keeps_the_reaper_away(db_session: Session, running: Job) -> None:
    queue.heartbeat(db_session, running.id, "w1", 3600)
    assert queue.reap(db_session, now=later(LEASE_S + 1)) == []
    assert fresh(db_session, running.id).state == JobState.RUNNING


def test_reap_cancels_an_expired_cancelling_job(
    db_session: Session, running: Job, db_tenant_id: int
) -> None:
    queue.cancel(db_session, running.id, db_tenant_id)
    assert queue.reap(db_session, now=later(LEASE_S + 1)) == [running.id]
    job = fresh(db_session, running.id)
    assert job.state == JobState.CANCELLED and job.lease_owner is None
    assert events(db_session, job.id)[-1] == ("reap_cancel", "cancelling", "cancelled", "w1")


def test_reap_touches_only_expired_active_jobs(db_session: Session, db_tenant_id: int) -> None:
    queued = queue.submit(db_session, db_tenant_id, {"n": 0}).id
    short = queue.submit(db_session, db_tenant_id, {"n": 1}, priority=2).id
    long = queue.submit(db_session, db_tenant_id, {"n": 2}, priority=1).id
    queue.claim(db_session, "w-short", 10)
    queue.claim(db_session, "w-long", 1000)
    assert queue.reap(db_session, now=later(100)) == [short]
    assert fresh(db_session, long).state == JobState.RUNNING
    assert fresh(db_session, queued).state == JobState.QUEUED


# --- what workers record ----------------------------------------------------------------------


def test_record_metrics(db_session: Session, running: Job) -> None:
    rows = [
        {"split": "train", "name": "loss", "value": 0.7, "epoch": 0, "step": 10},
        {"split": "val", "name": "auroc", "value": 91.5, "epoch": 0, "trial": 2},
        {"split": "train", "name": "loss", "value": float("nan"), "epoch": 1, "step": 20},
    ]
    assert queue.record_metrics(db_session, running.id, rows) == 3
    assert queue.record_metrics(db_session, running.id, []) == 0
    stored = db_session.execute(
        select(Metric.split, Metric.name, Metric.value, Metric.epoch, Metric.step, Metric.trial)
        .where(Metric.job_id == running.id)
        .order_by(Metric.id)
    ).all()
    assert stored == [
        ("train", "loss", 0.7, 0, 10, None),
        ("val", "auroc", 91.5, 0, None, 2),
        ("train", "loss", None, 1, 20, None),  # NaN is stored as NULL
    ]
    with pytest.raises(ValueError, match="missing"):
        queue.record_metrics(db_session, running.id, [{"name": "loss", "value": 1.0}])
    with pytest.raises(ValueError, match="number"):
        queue.record_metrics(db_session, running.id, [{"split": "a", "name": "b", "value": "x"}])


def test_record_metrics_replacing_a_split_keeps_one_set(db_session: Session, running: Job) -> None:
    """The test split measured again by a later attempt replaces the first measurement."""
    queue.record_metrics(db_session, running.id, [{"split": "val", "name": "auroc", "value": 1.0}])
    for value in (80.0, 81.0):
        queue.record_metrics(
            db_session,
            running.id,
            [{"split": "test", "name": "auroc", "value": value}],
            replace_split="test",
        )
    stored = db_session.execute(
        select(Metric.split, Metric.value).where(Metric.job_id == running.id).order_by(Metric.id)
    ).all()
    assert stored == [("val", 1.0), ("test", 81.0)]


def test_append_log(db_session: Session, running: Job) -> None:
    queue.append_log(db_session, running.id, "INFO", "precomputing teacher features")
    line = queue.append_log(db_session, running.id, "warning", "shard 2 retried")
    assert line.at.tzinfo is not None
    lines = db_session.execute(
        select(JobLog.level, JobLog.message).where(JobLog.job_id == running.id).order_by(JobLog.id)
    ).all()
    assert lines == [("info", "precomputing teacher features"), ("warning", "shard 2 retried")]
    with pytest.raises(ValueError, match="log level"):
        queue.append_log(db_session, running.id, "loud", "x")


def test_add_checkpoint_replaces_a_checkpoint_of_the_same_name(
    db_session: Session, running: Job
) -> None:
    first = queue.add_checkpoint(
        db_session, running.id, "best", "s3://b/jobs/1/best-0", size=10, sha256="a" * 64
    )
    queue.add_checkpoint(db_session, running.id, "last", "s3://b/last", size=5, sha256="c" * 64)
    second = queue.add_checkpoint(
        db_session, running.id, "best", "s3://b/jobs/1/best-1", size=12, sha256="b" * 64
    )
    assert second.id == first.id and second.uri.endswith("best-1") and second.size == 12
    names = db_session.execute(
        select(Checkpoint.name, Checkpoint.sha256)
        .where(Checkpoint.job_id == running.id)
        .order_by(Checkpoint.name)
    ).all()
    assert names == [("best", "b" * 64), ("last", "c" * 64)]
    with pytest.raises(ValueError, match="sha256"):
        queue.add_checkpoint(db_session, running.id, "x", "u", size=1, sha256="XYZ")


def test_upsert_trial(db_session: Session, running: Job) -> None:
    created = queue.upsert_trial(
        db_session, running.id, 0, state="running", params={"phi_lr": 10.0, "gamma": 5}
    )
    assert (created.metrics, created.checkpoint_uri) == ({}, None)
    queue.upsert_trial(db_session, running.id, 1, state="running", params={"phi_lr": 100.0})
    updated = queue.upsert_trial(
        db_session,
        running.id,
        0,
        state="terminated",
        metrics={"auroc": 92.0, "mean_deo": float("nan")},
        checkpoint_uri="s3://b/trial-0",
    )
    assert updated.id == created.id
    assert updated.params == {"phi_lr": 10.0, "gamma": 5}  # kept: not given
    assert updated.metrics == {"auroc": 92.0, "mean_deo": None}
    # A later update without a checkpoint keeps the recorded one.
    kept = queue.upsert_trial(db_session, running.id, 0, state="done")
    assert kept.checkpoint_uri == "s3://b/trial-0" and kept.state == "done"


# --- fair sharing between tenants ----------------------------------------------------------


def new_tenant(session: Session, name: str) -> int:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.commit()
    return tenant.id


def claim_all(session: Session, **limits: int) -> list[int]:
    """Claim until nothing is claimable; the ids in claim order."""
    order: list[int] = []
    while (job := queue.claim(session, "w", LEASE_S, **limits)) is not None:
        order.append(job.id)
    return order


def test_priority_orders_a_tenants_own_jobs_only(db_session: Session) -> None:
    a, b = new_tenant(db_session, "a"), new_tenant(db_session, "b")
    a_jobs = [queue.submit(db_session, a, {"n": n}).id for n in range(3)]
    # b comes later and asks for the highest priority: it gets its turns, not the whole queue.
    b_jobs = [queue.submit(db_session, b, {"n": n}, priority=100).id for n in range(3)]
    assert claim_all(db_session) == [
        a_jobs[0], b_jobs[0], a_jobs[1], b_jobs[1], a_jobs[2], b_jobs[2]
    ]  # fmt: skip


def test_the_claim_is_fair_across_three_tenants(db_session: Session) -> None:
    a, b, c = (new_tenant(db_session, name) for name in "abc")
    # a runs two jobs and b one; c runs none.
    running_a = [queue.submit(db_session, a, {"run": n}).id for n in range(2)]
    assert claim_all(db_session) == running_a
    running_b = queue.submit(db_session, b, {"run": 0}).id
    assert claim_all(db_session) == [running_b]

    a1, a2 = (queue.submit(db_session, a, {"n": n}).id for n in range(2))
    b1, b2 = (queue.submit(db_session, b, {"n": n}).id for n in range(2))
    c1, c2 = (queue.submit(db_session, c, {"n": n}).id for n in range(2))
    c3 = queue.submit(db_session, c, {"n": 3}, priority=5).id  # c's own urgent job
    # The tenant with the fewest running jobs first (c, which takes its urgent job first); at
    # equal shares the older job goes first (b1 before c1, a1 before b2 before c2); a's jobs
    # wait until every other tenant runs as many as a does.
    assert claim_all(db_session) == [c3, b1, c1, a1, b2, c2, a2]
    assert [(t, f, to) for t, f, to, _ in events(db_session, c3)] == [
        ("submit", None, "queued"),
        ("claim", "queued", "running"),
    ]


def test_a_long_queue_is_claimed_in_order_and_a_newcomer_gets_its_turn(
    db_session: Session,
) -> None:
    # More queued jobs than a claim ranks per tenant on PostgreSQL (32): later ones move up.
    a, b = new_tenant(db_session, "a"), new_tenant(db_session, "b")
    a_jobs = [queue.submit(db_session, a, {"n": n}, priority=n % 2).id for n in range(45)]
    b_job = queue.submit(db_session, b, {"n": 0}).id
    by_priority = [job for n, job in enumerate(a_jobs) if n % 2] + [
        job for n, job in enumerate(a_jobs) if not n % 2
    ]
    assert claim_all(db_session) == [by_priority[0], b_job, *by_priority[1:]]


def test_a_tenants_running_limit_holds_its_jobs_back(db_session: Session) -> None:
    a, b = new_tenant(db_session, "a"), new_tenant(db_session, "b")
    a_jobs = [queue.submit(db_session, a, {"n": n}).id for n in range(4)]
    b_jobs = [queue.submit(db_session, b, {"n": n}).id for n in range(3)]
    # Two running jobs per tenant at most: a and b take turns until both run two.
    assert claim_all(db_session, max_running_per_tenant=2) == [
        a_jobs[0], b_jobs[0], a_jobs[1], b_jobs[1]
    ]  # fmt: skip
    assert queue.claim(db_session, "w", LEASE_S, max_running_per_tenant=2) is None
    # One of a's jobs ends: a may run another; a cancelling job still holds its place.
    queue.finish(db_session, a_jobs[0], "w")
    queue.cancel(db_session, b_jobs[0], b)
    assert claim_all(db_session, max_running_per_tenant=2) == [a_jobs[2]]
    # Without a limit the rest is claimed.
    assert claim_all(db_session) == [a_jobs[3], b_jobs[2]]
    with pytest.raises(ValueError, match="max_running_per_tenant"):
        queue.claim(db_session, "w", LEASE_S, max_running_per_tenant=0)


def test_the_queued_limit_refuses_and_stores_nothing(
    db_session: Session, db_tenant_id: int
) -> None:
    jobs = [queue.submit(db_session, db_tenant_id, SPEC, max_queued=3).id for _ in range(3)]

    def stored() -> tuple[int, int]:
        return (
            db_session.scalar(select(func.count()).select_from(Job)),
            db_session.scalar(select(func.count()).select_from(JobEvent)),
        )

    before = stored()
    with pytest.raises(queue.QueueFull, match="3 queued"):
        queue.submit(db_session, db_tenant_id, SPEC, max_queued=3)
    with pytest.raises(queue.QueueFull):
        queue.check_queue_room(db_session, db_tenant_id, 3)
    assert stored() == before
    # Only queued jobs count: once one runs, there is room again.
    assert queue.claim(db_session, "w", LEASE_S).id == jobs[0]
    queue.check_queue_room(db_session, db_tenant_id, 3)
    queue.submit(db_session, db_tenant_id, SPEC, max_queued=3, idempotency_key="k")
    # A replayed idempotent submit returns its job even when the queue is full.
    again = queue.submit(db_session, db_tenant_id, SPEC, max_queued=3, idempotency_key="k")
    assert fresh(db_session, again.id).idempotency_key == "k"
    # Another tenant has its own limit.
    other = new_tenant(db_session, "other")
    queue.submit(db_session, other, SPEC, max_queued=3)


def test_concurrent_submits_never_exceed_the_queued_limit(
    db_engine: Engine, db_tenant_id: int
) -> None:
    factory = session_factory(db_engine)
    barrier = threading.Barrier(6)
    accepted: list[int] = []
    refused: list[queue.QueueFull] = []
    errors: list[BaseException] = []

    def submit_many() -> None:
        try:
            with factory() as session:
                barrier.wait()
                for _ in range(8):
                    try:
                        accepted.append(queue.submit(session, db_tenant_id, SPEC, max_queued=20).id)
                    except queue.QueueFull as full:
                        refused.append(full)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=submit_many) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (len(accepted), len(refused)) == (20, 28)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 20
        assert session.scalar(select(func.count()).select_from(JobEvent)) == 20


def test_job_ids_are_random_and_a_taken_id_is_drawn_again(
    db_session: Session, db_tenant_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [queue.submit(db_session, db_tenant_id, {"n": n}).id for n in range(40)]
    assert all(1 <= job_id <= queue.JOB_ID_MAX for job_id in ids)
    # Sequential ids would be sorted and dense; 40 random draws are neither.
    assert ids != sorted(ids) and max(ids) - min(ids) > 10_000
    # Make the next draw hit an id that exists: the submit draws again and succeeds.
    draws = iter([ids[0] - 1, 12345 - 1])
    monkeypatch.setattr(queue.secrets, "randbelow", lambda _bound: next(draws))
    if 12345 not in ids:
        assert queue.submit(db_session, db_tenant_id, {"n": "again"}).id == 12345
    assert fresh(db_session, ids[0]).spec == {"n": 0}


def test_a_trial_row_shows_its_params_from_its_first_epoch(
    db_url: URL, db_session: Session, running: Job
) -> None:
    """The sink of a search trial writes the trial's sampled options with its first epoch (the
    row showed ``{}`` until the search ended); a record from before the field existed (no
    ``trial_params`` in its JSON, as a resumed trial's stored records are) keeps them."""
    from workers.sinks import DatabaseSink, EpochRecord

    sink = DatabaseSink(db_url.render_as_string(hide_password=False), running.id, trial=2)
    first = EpochRecord(
        epoch=1,
        step=10,
        train={"loss": 1.0},
        val={"auroc": 80.0, "delta_mean_deo": 5.0},
        objective=80.0,
        seconds=1.0,
        trial=2,
        trial_params={"phi_lr": 0.5, "gamma": 1.0},
    )
    assert EpochRecord.from_json(first.to_json()) == first
    assert sink.write(EpochRecord.from_json(first.to_json()))
    row = db_session.scalars(select(Trial).where(Trial.job_id == running.id)).one()
    assert (row.trial_index, row.state) == (2, "running")
    assert row.params == {"phi_lr": 0.5, "gamma": 1.0}
    assert row.metrics["epoch"] == 1 and row.metrics["auroc"] == 80.0

    old = json.loads(first.to_json())
    del old["trial_params"]
    old.update(epoch=2, objective=81.0)
    assert sink.write(EpochRecord.from_json(json.dumps(old)))
    db_session.expire_all()
    row = db_session.scalars(select(Trial).where(Trial.job_id == running.id)).one()
    assert row.params == {"phi_lr": 0.5, "gamma": 1.0} and row.metrics["epoch"] == 2


# --- fencing: writes of a stale attempt ------------------------------------------------------


def _writes(session: Session, job_id: int, attempt: int, tag: str) -> dict[str, object]:
    """One of every fenced worker write, for ``attempt``; what each raised (or None)."""
    outcomes: dict[str, object] = {}
    calls = {
        "metrics": lambda: queue.record_metrics(
            session, job_id, [{"split": "val", "name": tag, "value": 1.0}], attempt=attempt
        ),
        "checkpoint": lambda: queue.add_checkpoint(
            session, job_id, tag, f"s3://b/{tag}", size=1, sha256="a" * 64, attempt=attempt
        ),
        "trial": lambda: queue.upsert_trial(session, job_id, attempt, state=tag, attempt=attempt),
        "log": lambda: queue.append_log(session, job_id, "info", tag, attempt=attempt),
    }
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = None
        except StaleAttempt as error:
            outcomes[name] = error
    return outcomes


def _written(session: Session, job_id: int, tag: str) -> dict[str, int]:
    count = {
        "metrics": select(func.count()).select_from(Metric).where(Metric.name == tag),
        "checkpoint": select(func.count()).select_from(Checkpoint).where(Checkpoint.name == tag),
        "log": select(func.count()).select_from(JobLog).where(JobLog.message == tag),
    }
    return {name: int(session.scalar(query)) for name, query in count.items()}


def test_writes_of_a_stale_attempt_are_refused_by_the_database(
    db_session: Session, db_tenant_id: int
) -> None:
    job = queue.submit(db_session, db_tenant_id, SPEC, max_attempts=3)
    first = queue.claim(db_session, "w1", LEASE_S)
    assert first.attempts == 1
    assert _writes(db_session, job.id, 1, "one") == dict.fromkeys(
        ("metrics", "checkpoint", "trial", "log")
    )
    # The lease expires, the reaper requeues the job and another worker claims attempt 2.
    assert queue.reap(db_session, now=later(LEASE_S + 1)) == [job.id]
    assert queue.claim(db_session, "w2", LEASE_S).attempts == 2

    refused = _writes(db_session, job.id, 1, "stale")
    assert all(isinstance(error, StaleAttempt) for error in refused.values()), refused
    assert _written(db_session, job.id, "stale") == {"metrics": 0, "checkpoint": 0, "log": 0}
    assert queue.get_job(db_session, job.id).state == JobState.RUNNING
    # The same worker id cannot act for an attempt that is not the current one either.
    with pytest.raises(LeaseLost):
        queue.heartbeat(db_session, job.id, "w2", LEASE_S, attempt=1)
    with pytest.raises(LeaseLost):
        queue.fail(db_session, job.id, "w2", "stale", attempt=1)

    # The current attempt writes and finishes; after that nothing is accepted, not even from it.
    assert _writes(db_session, job.id, 2, "two") == dict.fromkeys(
        ("metrics", "checkpoint", "trial", "log")
    )
    assert queue.heartbeat(db_session, job.id, "w2", LEASE_S, attempt=2) is False
    queue.finish(db_session, job.id, "w2", attempt=2)
    late = _writes(db_session, job.id, 2, "late")
    assert all(isinstance(error, StaleAttempt) for error in late.values()), late
    assert _written(db_session, job.id, "two") == {"metrics": 1, "checkpoint": 1, "log": 1}
    assert _written(db_session, job.id, "late") == {"metrics": 0, "checkpoint": 0, "log": 0}
    trials = db_session.scalars(select(Trial.state).where(Trial.job_id == job.id)).all()
    assert sorted(trials) == ["one", "two"]


def test_a_fenced_write_holds_the_job_row_until_it_commits(pg_url: object) -> None:
    """On PostgreSQL the fence locks the job row until the write commits: the reaper (which
    would make the attempt stale) passes over the locked row, and takes it once the write
    committed, so a write that passed the fence can never land after its attempt was replaced."""
    engine = make_engine(pg_url)  # type: ignore[arg-type]
    try:
        factory = session_factory(engine)
        with factory() as session:
            tenant = Tenant(name="fence")
            session.add(tenant)
            session.commit()
            job = queue.submit(session, tenant.id, SPEC)
            queue.claim(session, "w1", 0.05)
        with factory() as writer, factory() as reaper:
            # The write's transaction: fence taken, row inserted, not committed yet.
            queue._fence(writer, job.id, 1)
            writer.execute(
                insert(Metric.__table__).values(
                    job_id=job.id, split="val", name="held", value=1.0, at=later(0)
                )
            )
            assert queue.reap(reaper, now=later(10)) == []  # the row is locked: passed over
            writer.commit()
            assert queue.reap(reaper, now=later(10)) == [job.id]
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Metric)) == 1
            with pytest.raises(StaleAttempt):
                queue.record_metrics(
                    session, job.id, [{"split": "val", "name": "x", "value": 1.0}], attempt=1
                )
    finally:
        engine.dispose()


# --- exactly-once claims under concurrency ----------------------------------------------------


def _claim_until_empty(
    engine: Engine, worker: str, barrier: threading.Barrier, claimed: list[int]
) -> None:
    with session_factory(engine)() as session:
        barrier.wait()
        while (job := queue.claim(session, worker, LEASE_S)) is not None:
            claimed.append(job.id)
            queue.finish(session, job.id, worker)


@pytest.mark.parametrize(
    ("backend", "jobs", "workers"), [("postgresql", 1000, 8), ("sqlite", 200, 4)]
)
def test_concurrent_claims_take_every_job_exactly_once(
    backend: str, jobs: int, workers: int, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    engine = make_engine(url, pool_size=workers + 1)
    try:
        factory = session_factory(engine)
        with factory() as session:
            tenant = Tenant(name="load")
            session.add(tenant)
            session.commit()
            # Bulk insert: the test is about claiming; submit() is tested above.
            start = datetime.now(timezone.utc)
            session.execute(
                insert(Job),
                [
                    {
                        "tenant_id": tenant.id,
                        "spec": {"n": n},
                        "priority": n % 3,
                        "created_at": start + timedelta(microseconds=n),
                        "updated_at": start,
                    }
                    for n in range(jobs)
                ],
            )
            session.commit()
            all_ids = set(session.scalars(select(Job.id)))
        assert len(all_ids) == jobs

        barrier = threading.Barrier(workers + 1)
        per_worker: list[list[int]] = [[] for _ in range(workers)]
        errors: list[BaseException] = []

        def work(index: int) -> None:
            try:
                _claim_until_empty(engine, f"w{index}", barrier, per_worker[index])
            except BaseException as error:
                errors.append(error)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for thread in threads:
            thread.start()
        barrier.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join(timeout=120)
        elapsed = time.perf_counter() - began
        assert errors == [], errors
        assert not any(thread.is_alive() for thread in threads)

        claimed = [job_id for ids in per_worker for job_id in ids]
        assert len(claimed) == jobs and set(claimed) == all_ids
        with factory() as session:
            claim_events = Counter(
                session.scalars(select(JobEvent.job_id).where(JobEvent.transition == "claim"))
            )
            assert set(claim_events) == all_ids and set(claim_events.values()) == {1}
            states = Counter(session.scalars(select(Job.state)))
            assert states == {JobState.SUCCEEDED: jobs}
            assert set(session.scalars(select(Job.attempts))) == {1}
        rate = jobs / elapsed
        request.node.user_properties.append(("claim_finish_per_s", rate))
        print(
            f"\n{backend}: {jobs} jobs, {workers} threads, {elapsed:.2f} s, "
            f"{rate:.0f} claim+finish cycles/s, per worker {[len(ids) for ids in per_worker]}"
        )
    finally:
        engine.dispose()
