"""Node handlers, one module per node type (trigger, agent, action, logic, integration)."""

from workers.nodes import action, agent, integration, logic, trigger
from workers.nodes.base import Handler

HANDLERS: dict[str, Handler] = {
    "trigger": trigger.run,
    "agent": agent.run,
    "action": action.run,
    "logic": logic.run,
    "integration": integration.run,
}

__all__ = ["HANDLERS"]
