"""The job stage ``waiting_for_resources``: a job waiting for room on the Ray cluster.

Revision ID: 0002_stage_waiting_for_resources
Revises: 0001_initial
Create Date: 2026-12-01

The stage column is a VARCHAR sized to the longest stage with a CHECK constraint listing the
stages; both grow. SQLite cannot alter either in place, so the table is rebuilt (batch mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_stage_waiting_for_resources"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STAGES = ("precomputing", "training", "tuning", "evaluating", "uploading")
NEW_STAGES = (
    "precomputing",
    "waiting_for_resources",
    "training",
    "tuning",
    "evaluating",
    "uploading",
)


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _set_stages(stages: Sequence[str]) -> None:
    length = max(len(stage) for stage in stages)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_job_stage"), type_="check")
        batch.alter_column("stage", type_=sa.String(length=length), existing_nullable=True)
        batch.create_check_constraint(op.f("ck_jobs_job_stage"), _in("stage", stages))


def upgrade() -> None:
    """Allow the new stage."""
    _set_stages(NEW_STAGES)


def downgrade() -> None:
    """Back to the initial stages (jobs waiting for resources lose their stage)."""
    op.execute(sa.text("UPDATE jobs SET stage = NULL WHERE stage = 'waiting_for_resources'"))
    _set_stages(OLD_STAGES)
