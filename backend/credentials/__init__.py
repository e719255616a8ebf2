"""Workspace credentials: secrets nodes reference by id, encrypted at rest."""
