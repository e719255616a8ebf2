"""Triggers: schedules, webhooks and events that start runs, and what happens when a
run ends. Importing the package registers the run-finished listener with the lifecycle
(`backend.executions.lifecycle.on_finished`), in the API and in workers alike."""

from backend.triggers import hooks as hooks
