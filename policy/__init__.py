"""Decisions and shared state, no Celery: limits, isolation, errors, keys, restart policy."""
