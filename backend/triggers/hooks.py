"""What happens when a run ends: event triggers and workflow notifications.

`execution_finished` is called inside the transaction that moves an execution to a
terminal status (the runner's close, a cancel of a pending run, the delivery cap), so
anything it inserts commits, or rolls back, with that status change.
"""

from __future__ import annotations

from backend.kit.db import UnitOfWork
from backend.models import WorkflowExecution


async def execution_finished(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    """Start the workflows whose event triggers listen for this outcome and queue the
    workflow's notifications. (Filled in by the triggers issue.)"""
    return None
