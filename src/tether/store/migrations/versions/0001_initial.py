"""Responses, their event logs, and idempotency keys.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("run_token", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Float, nullable=False, server_default="0"),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stored", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    # The large, rarely written parts live apart, so the per-batch update of `last_seq`
    # rewrites a small row.
    op.create_table(
        "response_bodies",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("snapshot", sa.LargeBinary, nullable=False),
        sa.Column("run", sa.LargeBinary, nullable=False),
        sa.Column("input_items", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "responses_live_lease",
        "responses",
        ["lease_until"],
        sqlite_where=sa.text("status IN ('queued', 'in_progress')"),
        postgresql_where=sa.text("status IN ('queued', 'in_progress')"),
    )
    op.create_index("responses_finished", "responses", ["finished_at"])
    # One row per appended batch (events first_seq..last_seq): a row per event would cost
    # more than the rest of the per-token path together.
    op.create_table(
        "events",
        sa.Column("response_id", sa.Text, primary_key=True),
        sa.Column("first_seq", sa.Integer, primary_key=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("types", sa.Text, nullable=False),  # event types, "\n"-separated
        sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("data", sa.LargeBinary, nullable=False),  # event JSONs, "\n"-separated
        sqlite_with_rowid=False,
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("body_hash", sa.Text, nullable=False),
        sa.Column("response_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("events")
    op.drop_table("response_bodies")
    op.drop_table("responses")
