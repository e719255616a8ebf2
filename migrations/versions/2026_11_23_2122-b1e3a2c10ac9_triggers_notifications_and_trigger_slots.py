"""Trigger records (schedules, webhooks, events), notification deliveries and secrets,
and the trigger slot of an execution: UNIQUE (trigger_id, scheduled_for) is what makes
a schedule slot fire once even with two dispatchers.

Revision ID: b1e3a2c10ac9
Revises: d11d580ca8a0
Create Date: 2026-11-23 21:22:40.184395+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "b1e3a2c10ac9"
down_revision: str | None = "d11d580ca8a0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_secrets",
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_notification_secrets_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_secrets")),
        sa.UniqueConstraint("workflow_id", name=op.f("uq_notification_secrets_workflow_id")),
    )
    op.create_table(
        "triggers",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("config", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("token", sa.String(length=100), nullable=True),
        sa.Column("secret_encrypted", sa.Text(), nullable=True),
        sa.Column("source_workflow_id", sa.Uuid(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["source_workflow_id"],
            ["workflows.id"],
            name=op.f("fk_triggers_source_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_triggers_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_triggers_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triggers")),
        sa.UniqueConstraint("token", name=op.f("uq_triggers_token")),
        sa.UniqueConstraint("workflow_id", "node_id", name=op.f("uq_triggers_workflow_id_node_id")),
    )
    op.create_index(
        "ix_triggers_due",
        "triggers",
        ["next_run_at"],
        unique=False,
        postgresql_where=sa.text("kind = 'schedule' AND enabled AND active"),
    )
    op.create_index(
        "ix_triggers_listeners",
        "triggers",
        ["source_workflow_id"],
        unique=False,
        postgresql_where=sa.text("kind = 'event' AND enabled AND active"),
    )
    op.create_table(
        "notifications",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("event", sa.String(length=20), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=False),
        sa.Column("target", sa.String(length=2000), nullable=False),
        sa.Column(
            "status", sa.String(length=20), server_default=sa.text("'pending'"), nullable=False
        ),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["workflow_executions.id"],
            name=op.f("fk_notifications_execution_id_workflow_executions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_notifications_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_notifications_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint(
            "execution_id",
            "channel",
            "target",
            name=op.f("uq_notifications_execution_id_channel_target"),
        ),
    )
    op.create_index(
        "ix_notifications_workflow_id_created_at",
        "notifications",
        ["workflow_id", "created_at"],
        unique=False,
    )
    op.add_column("workflow_executions", sa.Column("trigger_id", sa.Uuid(), nullable=True))
    op.add_column(
        "workflow_executions", sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_unique_constraint(
        op.f("uq_workflow_executions_trigger_id_scheduled_for"),
        "workflow_executions",
        ["trigger_id", "scheduled_for"],
    )
    op.create_foreign_key(
        op.f("fk_workflow_executions_trigger_id_triggers"),
        "workflow_executions",
        "triggers",
        ["trigger_id"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_workflow_executions_trigger_id_triggers"),
        "workflow_executions",
        type_="foreignkey",
    )
    op.drop_constraint(
        op.f("uq_workflow_executions_trigger_id_scheduled_for"),
        "workflow_executions",
        type_="unique",
    )
    op.drop_column("workflow_executions", "scheduled_for")
    op.drop_column("workflow_executions", "trigger_id")
    op.drop_index("ix_notifications_workflow_id_created_at", table_name="notifications")
    op.drop_table("notifications")
    op.drop_index(
        "ix_triggers_listeners",
        table_name="triggers",
        postgresql_where=sa.text("kind = 'event' AND enabled AND active"),
    )
    op.drop_index(
        "ix_triggers_due",
        table_name="triggers",
        postgresql_where=sa.text("kind = 'schedule' AND enabled AND active"),
    )
    op.drop_table("triggers")
    op.drop_table("notification_secrets")
