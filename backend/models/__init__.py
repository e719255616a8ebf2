"""Every ORM model, imported here so Alembic and the mappers see them all at once."""

from backend.models.analytics import AnalyticsAggregate, AnalyticsCursor, WorkspaceQuota
from backend.models.base import Base, RecordModel
from backend.models.executions import (
    ExecutionEvent,
    ExecutionTransition,
    NodeExecution,
    WorkflowExecution,
)
from backend.models.identity import (
    ActivityLog,
    ApiKey,
    AuthSession,
    Invitation,
    OtpCode,
    User,
    Workspace,
    WorkspaceMember,
)
from backend.models.inbox import (
    ActionLink,
    NotificationPreference,
    PushSubscription,
    Task,
    UserNotification,
    WorkflowWatch,
)
from backend.models.library import WorkflowSuggestion, WorkflowTemplate
from backend.models.mcp import File, McpServer, McpTool, ToolUsage
from backend.models.n8n import N8nError, N8nExecution, N8nInstance, N8nWatch, N8nWorkflow
from backend.models.n8n_envs import (
    N8nBaseline,
    N8nDriftIncident,
    N8nEnvironment,
    N8nPipeline,
    N8nSnapshot,
)
from backend.models.n8n_promotions import N8nDeployment, N8nLineage, N8nPromotion
from backend.models.triggers import Notification, NotificationSecret, Trigger
from backend.models.workflows import Agent, Credential, Workflow, WorkflowVersion

__all__ = [
    "ActionLink",
    "ActivityLog",
    "Agent",
    "AnalyticsAggregate",
    "AnalyticsCursor",
    "ApiKey",
    "AuthSession",
    "Base",
    "Credential",
    "ExecutionEvent",
    "ExecutionTransition",
    "File",
    "Invitation",
    "McpServer",
    "McpTool",
    "N8nBaseline",
    "N8nDeployment",
    "N8nDriftIncident",
    "N8nEnvironment",
    "N8nError",
    "N8nExecution",
    "N8nInstance",
    "N8nLineage",
    "N8nPipeline",
    "N8nPromotion",
    "N8nSnapshot",
    "N8nWatch",
    "N8nWorkflow",
    "NodeExecution",
    "Notification",
    "NotificationPreference",
    "NotificationSecret",
    "OtpCode",
    "PushSubscription",
    "RecordModel",
    "Task",
    "ToolUsage",
    "Trigger",
    "User",
    "UserNotification",
    "Workflow",
    "WorkflowExecution",
    "WorkflowSuggestion",
    "WorkflowTemplate",
    "WorkflowVersion",
    "WorkflowWatch",
    "Workspace",
    "WorkspaceMember",
    "WorkspaceQuota",
]
