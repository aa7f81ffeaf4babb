"""Celery's per-task strategies, each built when its task's first message arrives.

Celery's consumer builds every task's strategy (a Request class each) and the main
process's tracer when it starts, and again for every task whenever one is added: about
0.5 ms a task, so with 10,000 plugins seconds of each worker start went to plugins it may
never run, with no event loop meanwhile. Here a strategy is built at its task's first
message (and dropped, to be built again, when Celery would rebuild them all). A message
naming a task the worker does not know still goes to Celery's unknown-task handling.
"""

from __future__ import annotations

from typing import Any

from celery.app.trace import build_tracer
from celery.worker.consumer import Consumer


class LazyStrategies(dict[str, Any]):
    """The consumer's strategy table, filled on first use."""

    def __init__(self, consumer: Any) -> None:
        super().__init__()
        self._consumer = consumer

    def __missing__(self, name: str) -> Any:
        consumer = self._consumer
        app = consumer.app
        tasks = app.tasks
        # Only tasks the worker registered: the plugin task registry would build one for
        # any `plugin.<id>` name (`plugin_tasks.py`), which is for the pool processes.
        if not dict.__contains__(tasks, name):
            raise KeyError(name)
        task = tasks[name]
        strategy = task.start_strategy(app, consumer)
        task.__trace__ = build_tracer(name, task, app.loader, consumer.hostname, app=app)
        self[name] = strategy
        return strategy


class LazyStrategyConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with `LazyStrategies`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strategies = LazyStrategies(self)

    def update_strategies(self) -> None:
        """Celery rebuilds every strategy here (at start, after a task is added): drop
        them instead; each is built again at its task's next message. In place: the task
        handler holds this table."""
        self.strategies.clear()
