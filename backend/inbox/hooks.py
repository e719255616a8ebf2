"""What a run's end means for people: its open tasks close with it, and a failed run
tells its workflow's owner and watchers. Registered with the lifecycle's finished
listeners (importing `backend.inbox` does it, in the API and in workers), so both
commit, or roll back, with the run's terminal status.

On the engine's hot path every run ends here: a completed run costs nothing (all its
approval steps finished, so none of its tasks is open), others one UPDATE, and a
failed top-level run one query for the people to tell.
"""

from __future__ import annotations

from backend.config import get_settings
from backend.executions import lifecycle
from backend.inbox import service
from backend.kit.db import UnitOfWork
from backend.models import WorkflowExecution
from backend.push import service as people


@lifecycle.on_finished
async def run_finished(uow: UnitOfWork, execution: WorkflowExecution) -> None:
    outcome = str(execution.status)
    if outcome == "completed":
        return
    await service.cancel_open_for_run(uow, execution.id, f"run {outcome}")
    if outcome != "failed" or execution.parent_execution_id is not None:
        return
    who = await people.people_for_failures(uow.session, execution.workflow_id)
    if not who:
        return
    error = execution.error if isinstance(execution.error, dict) else {}
    message = str(error.get("message") or error.get("node_id") or "")[:500]
    await people.notify(
        uow,
        get_settings(),
        who,
        kind="run.failed",
        title="A run failed",
        body=message,
        data={"execution_id": str(execution.id), "workflow_id": str(execution.workflow_id)},
        workspace_id=execution.workspace_id,
    )
