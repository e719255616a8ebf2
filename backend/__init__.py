"""Orchestration Studio backend: HTTP API, models and the workflow domain."""
