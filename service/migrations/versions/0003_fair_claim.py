"""Indexes for the fair claim and for listing a tenant's jobs newest first.

Revision ID: 0003_fair_claim
Revises: 0002_stage_waiting_for_resources
Create Date: 2026-01-12

The claim ranks each tenant's queued jobs by priority, then age, and counts each tenant's
active jobs: both read the index on (state, tenant_id, priority DESC, created_at, id), which
replaces the one on (state, priority DESC, created_at, id) that ranked all queued jobs as one.
Job ids are drawn at random, so a tenant's jobs are listed by creation time:
(tenant_id, created_at, id).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_fair_claim"
down_revision: str | Sequence[str] | None = "0002_stage_waiting_for_resources"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Replace the global claim index by a per-tenant one; index jobs by tenant and age."""
    op.drop_index(op.f("ix_jobs_claim"), table_name="jobs")
    op.create_index(
        op.f("ix_jobs_fair_claim"),
        "jobs",
        ["state", "tenant_id", sa.text("priority DESC"), "created_at", "id"],
    )
    op.create_index(op.f("ix_jobs_tenant_id_created_at"), "jobs", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    """Back to the indexes of the initial schema."""
    op.drop_index(op.f("ix_jobs_tenant_id_created_at"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_fair_claim"), table_name="jobs")
    op.create_index(
        op.f("ix_jobs_claim"), "jobs", ["state", sa.text("priority DESC"), "created_at", "id"]
    )
