"""pytest plugin for `make compat`: kombu's own tests, run against pluginpool's transport.

Loaded with `-p kombu_transport_alias` before kombu's test modules are imported, it points
kombu's Redis transport aliases at pluginpool's classes, so every `kombu.Connection`
("redis://", "rediss://", "sentinel://") those tests open is served by reliable fetch.
No pluginpool option is set: the transport runs on its defaults, as it does for a plain
kombu or Celery client (bell prefix `pluginpool:bell:`, idle wait = kombu's
`brpop_timeout`, malformed messages logged and dropped rather than dead-lettered).
"""

from __future__ import annotations

import pytest
from kombu import transport

from pluginpool.tasks.transport import SENTINEL_TRANSPORT_PATH, TRANSPORT_PATH

ALIASES = {"redis": TRANSPORT_PATH, "rediss": TRANSPORT_PATH,
           "sentinel": SENTINEL_TRANSPORT_PATH}

CALL_PATTERN_TESTS = {
    "t/integration/test_redis_brpop_qos.py::test_drain_events_resumes_pending_brpop_without_resending":
        "asserts no second BRPOP is sent after the ack; an idle pluginpool consumer is woken "
        "by a bell token and then claims the message, a second command by design",
    "t/integration/test_redis_brpop_qos.py::test_hub_pauses_pending_brpop_until_ack[message]":
        "the same assertion, with the message expected inside the pending reply",
}
"""Tests that pin kombu's exact BRPOP call pattern rather than behaviour: not run."""


def pytest_configure(config: pytest.Config) -> None:
    transport.TRANSPORT_ALIASES.update(ALIASES)
    # kombu's markers: `env` selects the broker, `flaky` asks pytest-rerunfailures for
    # reruns. Reruns are not installed: every test must pass on its first run here.
    config.addinivalue_line("markers", "env(name): the broker a kombu test needs")
    config.addinivalue_line("markers", "flaky(reruns, reruns_delay): rerun on failure")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept = [item for item in items if item.nodeid not in CALL_PATTERN_TESTS]
    dropped = [item for item in items if item.nodeid in CALL_PATTERN_TESTS]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header() -> str:
    return "kombu transport aliases: " + ", ".join(f"{k} -> {v}" for k, v in ALIASES.items())


@pytest.fixture(autouse=True)
def _pluginpool_transport_in_use() -> None:
    """Fail loudly if a test module re-imported kombu and lost the aliases."""
    for alias, path in ALIASES.items():
        assert transport.TRANSPORT_ALIASES[alias] == path, alias
