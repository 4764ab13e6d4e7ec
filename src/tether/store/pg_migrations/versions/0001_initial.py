"""Responses, their event logs, and idempotency keys (PostgreSQL).

The same tables and meaning as the SQLite schema, plus `output_tokens` on the response
row (kept by the append statement, so usage is one row read, and a token-only append with
no event still counts).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

LIVE = sa.text("status IN ('queued', 'in_progress')")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("run_token", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Double, nullable=False, server_default="0"),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stored", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        # Every append rewrites this row (last_seq, output_tokens: unindexed columns): free
        # space in each page lets Postgres do those as heap-only updates.
        postgresql_with={"fillfactor": 70},
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
    op.create_index("responses_live_lease", "responses", ["lease_until"], postgresql_where=LIVE)
    op.create_index("responses_live_owner", "responses", ["owner"], postgresql_where=LIVE)
    op.create_index("responses_finished", "responses", ["finished_at"])
    # One row per appended batch (events first_seq..last_seq).
    op.create_table(
        "events",
        sa.Column("response_id", sa.Text, primary_key=True),
        sa.Column("first_seq", sa.Integer, primary_key=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("types", sa.Text, nullable=False),  # event types, "\n"-separated
        sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("data", sa.LargeBinary, nullable=False),  # event JSONs, "\n"-separated
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("body_hash", sa.Text, nullable=False),
        sa.Column("response_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("idempotency_keys_response", "idempotency_keys", ["response_id"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("events")
    op.drop_table("response_bodies")
    op.drop_table("responses")
