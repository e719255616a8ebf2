"""People in the loop: tasks, one-time action links, a person's notifications,
preferences, watches and push subscriptions; node status `waiting`.

Revision ID: dd362d70efb0
Revises: c5e2f8a1d3b7
Create Date: 2026-12-02 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "dd362d70efb0"
down_revision: str | None = "c5e2f8a1d3b7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NODE_OLD = (
    "status IN ('pending', 'running', 'retrying', 'completed', 'failed', 'skipped', 'cancelled')"
)
NODE_NEW = (
    "status IN ('pending', 'running', 'retrying', 'waiting', 'completed', 'failed', "
    "'skipped', 'cancelled')"
)


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]  # fmt: skip


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        [f"{target}.id"],
        name=op.f(f"fk_{table}_{column}_{target}"),
        ondelete=ondelete,
    )


def _set_node_check(check: str) -> None:
    op.drop_constraint(op.f("ck_node_executions_status"), "node_executions", type_="check")
    # NOT VALID, then VALIDATE: writes go on while the table is checked.
    op.execute(
        f"ALTER TABLE node_executions ADD CONSTRAINT ck_node_executions_status CHECK ({check}) "
        "NOT VALID"
    )
    op.execute("ALTER TABLE node_executions VALIDATE CONSTRAINT ck_node_executions_status")


def upgrade() -> None:
    _set_node_check(NODE_NEW)
    op.create_table(
        "tasks",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), server_default=sa.text("'open'"), nullable=False),
        sa.Column("title", sa.String(length=500), nullable=False),
        sa.Column("message", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("form", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("assignee_ids", postgresql.ARRAY(sa.Uuid()), server_default=sa.text("'{}'::uuid[]"), nullable=False),
        sa.Column("min_role", sa.String(length=20), nullable=True),
        sa.Column("claimed_by", sa.Uuid(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("execution_id", sa.Uuid(), nullable=True),
        sa.Column("workflow_id", sa.Uuid(), nullable=True),
        sa.Column("node_id", sa.String(length=200), nullable=True),
        sa.Column("iteration", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("on_timeout", sa.String(length=10), server_default=sa.text("'reject'"), nullable=False),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        *_stamps(),
        _fk("tasks", "workspace_id", "workspaces", "CASCADE"),
        _fk("tasks", "claimed_by", "users", "SET NULL"),
        _fk("tasks", "execution_id", "workflow_executions", "CASCADE"),
        _fk("tasks", "workflow_id", "workflows", "CASCADE"),
        _fk("tasks", "decided_by", "users", "SET NULL"),
        _fk("tasks", "created_by", "users", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("execution_id", "node_id", "iteration", name=op.f("uq_tasks_execution_id_node_id_iteration")),
        sa.CheckConstraint("status IN ('open', 'approved', 'rejected', 'expired', 'cancelled')", name=op.f("ck_tasks_status")),
    )  # fmt: skip
    op.create_index(
        "ix_tasks_workspace_id_status_created_at", "tasks", ["workspace_id", "status", "created_at"]
    )
    op.create_index(
        "ix_tasks_open_expiry", "tasks", ["expires_at"], postgresql_where=sa.text("status = 'open'")
    )
    op.create_index(op.f("ix_tasks_workflow_id"), "tasks", ["workflow_id"])

    op.create_table(
        "action_links",
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=True),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("execution_id", sa.Uuid(), nullable=True),
        sa.Column("node_id", sa.String(length=200), nullable=True),
        sa.Column("iteration", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("body", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        *_stamps(),
        _fk("action_links", "task_id", "tasks", "CASCADE"),
        _fk("action_links", "user_id", "users", "CASCADE"),
        _fk("action_links", "execution_id", "workflow_executions", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_action_links")),
        sa.UniqueConstraint("execution_id", "node_id", "iteration", "purpose", name=op.f("uq_action_links_execution_id_node_id_iteration_purpose")),
    )  # fmt: skip
    op.create_index(op.f("ix_action_links_task_id"), "action_links", ["task_id"])

    op.create_table(
        "user_notifications",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("title", sa.String(length=500), nullable=False),
        sa.Column("body", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
        _fk("user_notifications", "user_id", "users", "CASCADE"),
        _fk("user_notifications", "workspace_id", "workspaces", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_notifications")),
    )  # fmt: skip
    op.create_index(
        "ix_user_notifications_user_id_created_at",
        "user_notifications",
        ["user_id", "created_at"],
    )

    op.create_table(
        "notification_preferences",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("preferences", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
        *_stamps(),
        _fk("notification_preferences", "user_id", "users", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_preferences")),
        sa.UniqueConstraint("user_id", name=op.f("uq_notification_preferences_user_id")),
    )  # fmt: skip

    op.create_table(
        "workflow_watches",
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        *_stamps(),
        _fk("workflow_watches", "workflow_id", "workflows", "CASCADE"),
        _fk("workflow_watches", "user_id", "users", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_watches")),
        sa.UniqueConstraint("workflow_id", "user_id", name=op.f("uq_workflow_watches_workflow_id_user_id")),
    )  # fmt: skip
    op.create_index(op.f("ix_workflow_watches_user_id"), "workflow_watches", ["user_id"])

    op.create_table(
        "push_subscriptions",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("address_hash", sa.String(length=64), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("origin", sa.String(length=300), nullable=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
        _fk("push_subscriptions", "user_id", "users", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_push_subscriptions")),
        sa.UniqueConstraint("user_id", "address_hash", name=op.f("uq_push_subscriptions_user_id_address_hash")),
    )  # fmt: skip
    op.create_index(op.f("ix_push_subscriptions_user_id"), "push_subscriptions", ["user_id"])


def downgrade() -> None:
    op.drop_table("push_subscriptions")
    op.drop_table("workflow_watches")
    op.drop_table("notification_preferences")
    op.drop_table("user_notifications")
    op.drop_table("action_links")
    op.drop_table("tasks")
    # Nodes left waiting cannot be kept under the old check: they end as cancelled.
    op.execute("UPDATE node_executions SET status = 'cancelled' WHERE status = 'waiting'")
    _set_node_check(NODE_OLD)
