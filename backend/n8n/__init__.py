"""n8n fleets: connected n8n instances, their synced workflows and executions, and the
failures their error workflows report."""
