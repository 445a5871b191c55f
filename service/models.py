"""SQL models: tenants, API keys, jobs (which are also the queue) and what jobs produce.

The schema is portable between PostgreSQL (production) and SQLite (the embedded default), so
every choice here is one that behaves the same on both:

* enums are stored as strings with a CHECK constraint (``native_enum=False``), not as PostgreSQL
  ``ENUM`` types, so a value outside the Python enum is rejected by either database;
* JSON columns use the generic :class:`sqlalchemy.JSON` type;
* timestamps go through :class:`UTCDateTime`, which stores UTC and always returns aware
  datetimes, also on SQLite (which has no time-zone-aware type);
* constraints and indexes are named by :data:`NAMING_CONVENTION`, so Alembic migrations can refer
  to them by name on both databases.

The migrations in ``service/migrations/versions/`` create exactly this schema; a test compares
the migrated database with these models.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ACTIVE_STATES",
    "NAMING_CONVENTION",
    "TERMINAL_STATES",
    "ApiKey",
    "Base",
    "Checkpoint",
    "Job",
    "JobEvent",
    "JobLog",
    "JobStage",
    "JobState",
    "Metric",
    "Tenant",
    "Trial",
    "UTCDateTime",
    "utcnow",
]

# Explicit names for every constraint and index: PostgreSQL and SQLite would otherwise invent
# different names (or none), and migrations that alter a constraint need to know its name.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Row ids of the append-only tables (events, metrics, logs) can outgrow 32 bits in a long-lived
# deployment. SQLite only auto-increments a column declared exactly ``INTEGER PRIMARY KEY``, so
# those ids are BIGINT on PostgreSQL and INTEGER on SQLite (which is 64-bit there anyway).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the only kind the schema stores)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back time-zone aware.

    PostgreSQL stores ``timestamptz`` and returns aware values already; SQLite stores naive text,
    so values are converted to UTC and made naive on the way in and tagged UTC on the way out.
    Naive datetimes are refused on the way in: guessing their zone silently corrupts leases.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC (naive UTC on SQLite); refuse naive input."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            # SQLite compares timestamps as text; one fixed format (naive UTC) keeps that correct.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the database handed back."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class JobState(str, enum.Enum):
    """Where a job is in its life; the queue's transition table (``service.queue``) is closed."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class JobStage(str, enum.Enum):
    """What a running job is doing right now (reported by the worker's heartbeats)."""

    PRECOMPUTING = "precomputing"
    # Training or tuning waits for the Ray cluster to have room for it (bounded by the
    # deployment's resource_wait_s).
    WAITING_FOR_RESOURCES = "waiting_for_resources"
    TRAINING = "training"
    TUNING = "tuning"
    EVALUATING = "evaluating"
    UPLOADING = "uploading"

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
)
# States in which a worker holds the job's lease.
ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.RUNNING, JobState.CANCELLING})


def _enum_values(enum_cls: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_cls]


def _string_enum(enum_cls: type[enum.Enum], name: str) -> Enum:
    """A VARCHAR column with a CHECK constraint listing the enum's values, on every database."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        values_callable=_enum_values,
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base of every bird table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Tenant(Base):
    """An organisation; every job and API key belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """A bearer key. Only its sha256 is stored; the prefix identifies it in listings and logs."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_prefix: Mapped[str] = mapped_column(String(8), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Job(Base):
    """A distillation job. The table is also the queue: ``service.queue`` claims rows from it.

    Change ``state`` only through ``service.queue`` (which appends a ``job_events`` row for every
    change); the other columns are written by the queue operations and the worker's heartbeats.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[JobState] = mapped_column(
        _string_enum(JobState, "job_state"), default=JobState.QUEUED
    )
    stage: Mapped[JobStage | None] = mapped_column(
        _string_enum(JobStage, "job_stage"), default=None
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default=text("3"))
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.state!s}, attempts={self.attempts!r})"


# The claim ranks each tenant's queued jobs by priority, then age, and counts each tenant's
# running jobs (``service.queue.claim``): this index hands it the queued jobs already in that
# order, tenant by tenant, and the active ones grouped by tenant.
Index("ix_jobs_fair_claim", Job.state, Job.tenant_id, Job.priority.desc(), Job.created_at, Job.id)
# A tenant's jobs, newest first (ids are random, so creation time gives the order).
Index("ix_jobs_tenant_id_created_at", Job.tenant_id, Job.created_at, Job.id)


class JobEvent(Base):
    """One row per change of a job (the audit trail behind ``GET /jobs/{id}/events``)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[JobState | None] = mapped_column(
        _string_enum(JobState, "from_state"), default=None
    )
    to_state: Mapped[JobState] = mapped_column(_string_enum(JobState, "to_state"))
    transition: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    worker: Mapped[str | None] = mapped_column(String(200), default=None)


class Metric(Base):
    """One point of a job's metric time series (loss, AUROC, Δ-DEO, ... per split)."""

    __tablename__ = "metrics"
    __table_args__ = (
        # ``GET /jobs/{id}/metrics?since=<id>`` reads a job's points in insertion order.
        Index("ix_metrics_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trial: Mapped[int | None] = mapped_column(Integer, default=None)
    epoch: Mapped[int | None] = mapped_column(Integer, default=None)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    split: Mapped[str] = mapped_column(String(50))
    name: Mapped[str] = mapped_column(String(200))
    # NULL means NaN: SQLite cannot store NaN (it turns it into NULL anyway), and neither can
    # the JSON the API answers with.
    value: Mapped[float | None] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Trial(Base):
    """One trial of a job's hyper-parameter search."""

    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "trial_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trial_index: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(50))
    checkpoint_uri: Mapped[str | None] = mapped_column(Text, default=None)


class Checkpoint(Base):
    """A named checkpoint of a job (``best``, ``last``, ...) in the object store."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLog(Base):
    """A log line of a job, for ``GET /jobs/{id}/logs``."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)
