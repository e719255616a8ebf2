"""Executions: runs of a pinned workflow version, and their state machine."""
