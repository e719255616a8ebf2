"""Workflows: versioned definitions and the graph validator."""
