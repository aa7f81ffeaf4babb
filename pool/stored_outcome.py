"""Whether a job's outcome is stored already: then no delivery of it needs to run again.

Used where a worker would otherwise run a job a second time: the poison rule's quarantine
(`quarantine.py`) and the reserved messages a warm shutdown hands back
(`claim_qos.OUTCOME_STORED_OPTION`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, states

logger = logging.getLogger("pluginpool.worker")


def has_outcome(app: Celery, job_id: str) -> bool:
    """True when the result backend holds a final state (success or failure) for the job."""
    return app.backend.get_task_meta(job_id).get("status") in states.READY_STATES


def reserved_message_done(app: Celery) -> Callable[[Any], bool]:
    """The warm-shutdown check for one reserved kombu message (a Celery task message: its
    job id is the `id` header). When unsure (no id, Redis failing) it says False: the
    message is handed back, at least once as before."""

    def done(message: Any) -> bool:
        headers = getattr(message, "headers", None)
        job_id = headers.get("id") if isinstance(headers, dict) else None
        if not isinstance(job_id, str):
            return False
        try:
            return has_outcome(app, job_id)
        except Exception as exc:  # a failing check must not stop the hand-back
            logger.warning("could not read the outcome of job %s at shutdown (handed back): "
                           "%r", job_id, exc)
            return False

    return done
