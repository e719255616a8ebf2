"""Shared building blocks every domain uses: database, errors, logging, Celery client."""
