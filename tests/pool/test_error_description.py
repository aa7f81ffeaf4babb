"""Describing a plugin's exception never runs into the plugin's own traps: a __str__ that
raises or returns a str subclass whose methods raise, a metaclass whose __name__ raises, a
2 MB class name, a __class__ property, an OSError whose errno property raises, a
KeyboardInterrupt from __notes__. Pure logic (both classifiers run in one process: the
sandbox's in the run process, the pool child's in the pool process); the process paths are
tested in test_warm_sandboxes.py."""

from __future__ import annotations

from typing import Any

import pytest

from pluginpool.policy.errors import (
    MAX_ERROR_MESSAGE_CHARS,
    TRUNCATION_MARKER,
    ErrorType,
    PluginExecutionError,
)
from pluginpool.pool.in_process_instances import Loaded, operation_of
from pluginpool.pool.runner import error_from_exception
from pluginpool.pool.sandbox.runtime import classify
from pluginpool.pool.sandbox.runtime.messages import RUNTIME
from pluginpool.pool.shutdown_exit import is_pool_shutdown
from pluginpool.tasks.spec import PluginSpec

SPEC = PluginSpec(id="p", name="p", entrypoint="m:f")


class Boom(str):
    def __len__(self) -> int:
        raise SystemExit(3)

    def __getitem__(self, item: Any) -> Any:
        raise KeyboardInterrupt

    def __format__(self, spec: str) -> str:
        raise RuntimeError("format")


class ReturnsBoom(Exception):
    def __str__(self) -> str:
        return Boom("x" * 10_000)


class NamelessMeta(type):
    @property
    def __name__(cls) -> str:  # type: ignore[override]
        raise RuntimeError("no name")


class Nameless(Exception, metaclass=NamelessMeta):
    pass


class Disguised(Exception):
    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        raise RuntimeError("no class")


class Errnoless(OSError):
    @property
    def errno(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no errno")


class LoudNotes(Exception):
    @property
    def __notes__(self) -> Any:
        raise KeyboardInterrupt


HUGE_NAME = type("A" * 2_000_000, (Exception,), {})

HOSTILE = {"str subclass": ReturnsBoom, "metaclass name": lambda: Nameless("n"),
           "class property": lambda: Disguised("d"), "errno property": lambda: Errnoless(2, "e"),
           "notes": lambda: LoudNotes("l"), "huge name": lambda: HUGE_NAME("h"),
           "huge message": lambda: ValueError("z" * 5_000_000)}


@pytest.mark.parametrize("kind", HOSTILE)
def test_both_classifiers_describe_any_exception_within_the_bounds(kind: str) -> None:
    exc = HOSTILE[kind]()
    sandboxed = classify.error_of(exc, policy=None, max_memory_mb=1, max_storage_kb=1,
                                  timeout_ms=1)
    assert sandboxed.type == RUNTIME
    assert type(sandboxed.message) is str and len(sandboxed.message) <= MAX_ERROR_MESSAGE_CHARS
    in_pool = error_from_exception(SPEC, exc)
    assert in_pool.type is ErrorType.RUNTIME
    assert len(in_pool.message) <= MAX_ERROR_MESSAGE_CHARS
    assert "truncated 68 chars" not in in_pool.message  # not cut twice
    assert len(str(in_pool.details.get("exception_type"))) <= classify.NAME_LIMIT_CHARS


def test_a_long_message_is_cut_once_with_the_count_of_what_was_cut() -> None:
    message = classify.describe(ValueError("z" * 5_000_000))
    assert len(message) == MAX_ERROR_MESSAGE_CHARS
    cut = 5_000_000 - (MAX_ERROR_MESSAGE_CHARS - len("ValueError: ")
                       - len(TRUNCATION_MARKER.format(5_000_000)))
    assert message.endswith(TRUNCATION_MARKER.format(cut))
    assert classify.TRUNCATION_MARKER == TRUNCATION_MARKER
    assert classify.MESSAGE_LIMIT_CHARS == MAX_ERROR_MESSAGE_CHARS


def test_an_in_process_operation_whose_lookup_raises_fails_anew_each_time() -> None:
    """Before, one error object was raised for every call: its traceback grew with each
    job's frames (and their locals), and its details kept the first job's."""

    class Plugin:
        def __init__(self, ctx: Any) -> None:
            pass

        @property
        def boom(self) -> Any:
            raise RuntimeError("property boom")

    spec = PluginSpec.model_validate({"id": "q", "name": "q", "entrypoint": "m:Plugin",
                                      "operations": ["run", "boom"]})
    loaded = Loaded(spec, Plugin, None)
    raised = []
    for _ in range(3):
        with pytest.raises(PluginExecutionError) as info:
            operation_of(loaded, spec, "boom")
        raised.append(info.value)
    assert len({id(error) for error in raised}) == 3
    assert all("property boom" in error.message for error in raised)
    with pytest.raises(PluginExecutionError) as info:
        operation_of(loaded, spec, "run")
    assert info.value.details["operation_missing"] is True


def test_billiards_shutdown_exit_is_told_from_a_plugins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import billiard.common

    sigterm, sigquit = SystemExit(-(256 - 15)), SystemExit(-(256 - 3))  # REMAP_SIGTERM
    monkeypatch.setattr(billiard.common, "terminate_handler_fired", lambda: True,
                        raising=False)
    assert is_pool_shutdown(sigterm) and is_pool_shutdown(sigquit)
    assert not is_pool_shutdown(KeyboardInterrupt())
    monkeypatch.setattr(billiard.common, "terminate_handler_fired", lambda: False,
                        raising=False)
    assert not is_pool_shutdown(sigterm)  # the plugin's own, with billiard's code
    monkeypatch.delattr(billiard.common, "terminate_handler_fired", raising=False)
    assert is_pool_shutdown(sigterm) and is_pool_shutdown(sigquit)  # by its code alone
    assert not is_pool_shutdown(SystemExit(0)) and not is_pool_shutdown(SystemExit("bye"))
