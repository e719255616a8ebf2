"""Node handlers, one module per node type (trigger, agent, action, logic, integration)."""

from backend.config import get_settings
from backend.observability import tracing
from workers.nodes import action, agent, integration, logic, trigger
from workers.nodes.base import Handler

HANDLERS: dict[str, Handler] = {
    "trigger": trigger.run,
    "agent": agent.run,
    "action": action.run,
    "logic": logic.run,
    "integration": integration.run,
}

# With OTEL_EXPORTER_OTLP_ENDPOINT set, each handler runs in a span per node attempt;
# with tracing off the table stays as it is (nothing on the engine's hot path).
if tracing.setup(get_settings(), "worker"):
    tracing.traced_handlers(HANDLERS)

__all__ = ["HANDLERS"]
