"""Suggestions to improve a workflow: from its run history (rules.py, beat) and from the model."""
