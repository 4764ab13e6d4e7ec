"""Webhook endpoints and the webhook outbox (PostgreSQL).

A terminal transition inserts one `webhook_deliveries` row per subscribed endpoint in
its own transaction (the outbox), so no terminal response is ever without its webhook;
a sender delivers the rows, at least once (docs/webhooks.md).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False, index=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("events", sa.Text, nullable=False),  # a JSON array of event types
        sa.Column("secret", sa.Text, nullable=False),  # whsec_...: needed to sign
        # A rotated-out secret still signing (next to the new one) until `old_secret_until`.
        sa.Column("old_secret", sa.Text),
        sa.Column("old_secret_until", sa.Double),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Text, primary_key=True),  # the event id: webhook-id
        sa.Column("endpoint_id", sa.Text, nullable=False, index=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("response_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_at", sa.Double, nullable=False),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_until", sa.Double, nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("gave_up", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    # What the sender scans: only the rows still to deliver.
    op.create_index(
        "webhook_deliveries_due",
        "webhook_deliveries",
        ["next_at"],
        postgresql_where=sa.text("delivered_at IS NULL AND NOT gave_up"),
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
