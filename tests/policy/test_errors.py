"""Errors carry data and survive Celery's JSON result backend."""

from __future__ import annotations

import json

from celery import Celery

from pluginpool.policy.errors import ErrorType, PluginExecutionError
from pluginpool.tasks.outcome import error_for_failure


def test_execution_error_round_trips_through_the_json_backend() -> None:
    app = Celery("t", backend="cache+memory://", set_as_current=False)
    app.conf.result_serializer = "json"
    original = PluginExecutionError.of(ErrorType.RESOURCE, "too big", plugin_id="p",
                                       limit="max_memory_mb", observed=300)
    stored = json.loads(json.dumps(app.backend.prepare_exception(original)))
    rebuilt = app.backend.exception_to_python(stored)
    assert isinstance(rebuilt, PluginExecutionError)
    assert rebuilt.type is ErrorType.RESOURCE
    assert rebuilt.details == {"limit": "max_memory_mb", "observed": 300}


def test_celery_failures_are_classified() -> None:
    from billiard.exceptions import WorkerLostError
    from celery.exceptions import TimeLimitExceeded

    timeout = error_for_failure(TimeLimitExceeded(5.5), plugin_id="p", job_id="j")
    assert timeout.type is ErrorType.TIMEOUT and timeout.job_id == "j"
    lost = error_for_failure(WorkerLostError("died"), plugin_id="p", job_id="j")
    assert lost.type is ErrorType.RUNTIME and lost.details["restarts_exhausted"]
    other = error_for_failure(ZeroDivisionError("x"), plugin_id="p", job_id="j")
    assert other.type is ErrorType.RUNTIME


def test_the_module_docstring_draws_every_error_class() -> None:
    """errors.py draws the whole tree in its docstring; a new error must be drawn there."""
    import inspect

    import pluginpool.policy.errors as errors_module

    doc = errors_module.__doc__ or ""
    classes = [cls for _, cls in inspect.getmembers(errors_module, inspect.isclass)
               if issubclass(cls, errors_module.PluginPoolError)
               and cls.__module__ == errors_module.__name__]
    missing = [cls.__name__ for cls in classes if f"── {cls.__name__}" not in doc
               and cls is not errors_module.PluginPoolError]
    assert not missing, f"not drawn in policy/errors.py's docstring: {missing}"
