"""Uploaded files: metadata in the `files` table, bytes in the workspace storage."""
