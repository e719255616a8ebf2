"""What a run's followers see: the runner's events, queued without waiting and sent in
order after the state they describe was committed (backend/realtime/events.Emitter)."""

from __future__ import annotations

import json
from typing import Any

from backend.executions.lifecycle import Claim
from backend.executions.state import NodeStatus
from backend.realtime.events import EXECUTION_STATUS, NODE_STATUS, Emitter, event

# Node outputs up to this size ride along in their node.status event.
EVENT_OUTPUT_MAX = 16_384


class Progress:
    def __init__(self) -> None:
        self.emitter = Emitter()

    def emit(
        self,
        claim: Claim,
        type_: str,
        *,
        node_id: str | None = None,
        status: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        if claim.stop == "lost":
            return  # someone else runs it now: they tell the story
        self.emitter.emit(
            claim.id,
            claim.workspace_id,
            event(type_, claim.id, node_id=node_id, status=status, data=data),
        )

    def run_started(self, claim: Claim) -> None:
        self.emit(
            claim,
            EXECUTION_STATUS,
            status="running",
            data={"workflow_id": str(claim.workflow_id), "workspace_id": str(claim.workspace_id)},
        )

    def node_started(self, claim: Claim, node_id: str, attempt: int) -> None:
        self.emit(claim, NODE_STATUS, node_id=node_id, status="running", data={"attempt": attempt})

    def node_line(self, claim: Claim, node_id: str, type_: str, data: dict[str, Any]) -> None:
        """A handler's own event (node.log, agent.delta)."""
        self.emit(claim, type_, node_id=node_id, data=data)

    def checkpointed(
        self,
        claim: Claim,
        node_id: str,
        status: NodeStatus,
        values: dict[str, Any],
        iteration: int = 0,
        size: int | None = None,
    ) -> None:
        """A checkpoint, as followers see it (big outputs stay in the node's row);
        `size`: the output's JSON size when the caller already measured it."""
        data = {
            k: values[k]
            for k in ("attempt", "duration_ms", "error", "branch", "next_attempt_at")
            if values.get(k) is not None
        }
        if iteration:
            data["iteration"] = iteration
        if values.get("input_tokens") or values.get("output_tokens"):
            data.update(
                input_tokens=values["input_tokens"],
                output_tokens=values["output_tokens"],
                cost_usd=values["cost_usd"],
            )
        if "output" in values and status == NodeStatus.COMPLETED:
            if size is None:
                size = len(json.dumps(values["output"], default=str))
            if size <= EVENT_OUTPUT_MAX:
                data["output"] = values["output"]
            else:
                data["output_bytes"] = size
        self.emit(claim, NODE_STATUS, node_id=node_id, status=status.value, data=data)

    async def drain(self, claim: Claim) -> None:
        """Every event queued for the run is out (before its status changes)."""
        await self.emitter.drain(claim.id)
