"""Celery's per-task success line without the plugin's value.

Celery logs every success with its whole return value at INFO: megabytes a minute for a
busy plugin, and plugin-supplied data in the worker's log. For plugin tasks this filter
keeps the line (task, job id, run time) and replaces the value with a note. Failure lines
stay: a PluginExecutionError prints as its type, plugin and bounded message, without its
details (traceback, logs). A run's logs come before its line (tasks/runs.py).
"""

from __future__ import annotations

import logging

from celery.app import trace

PLUGIN_TASK_PREFIX = "plugin."
NOT_LOGGED = "(value not logged)"


class ValueNotLogged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (isinstance(args, dict) and str(record.msg).strip() == trace.LOG_SUCCESS.strip()
                and str(args.get("name", "")).startswith(PLUGIN_TASK_PREFIX)):
            context = {**args, "return_value": NOT_LOGGED}
            record.args = context
            record.data = context  # what Celery hands custom handlers (extra={"data": ...})
        return True


def install() -> None:
    logging.getLogger("celery.app.trace").addFilter(ValueNotLogged())
