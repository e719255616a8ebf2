"""Reusable agent definitions and the agent runtime (Anthropic Messages API)."""
