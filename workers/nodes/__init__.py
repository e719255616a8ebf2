"""Node handlers, one module per node type (trigger, agent, action, logic, integration)."""
