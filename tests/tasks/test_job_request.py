"""Messages from any producer are parsed into a job, or refused with the reason."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import InvalidJobError
from pluginpool.pool.job_request import parse_job


def test_keyword_and_positional_forms() -> None:
    assert parse_job((), {"payload": {"a": 1}, "instance_id": "i1"}).instance_id == "i1"
    assert parse_job(({"a": 1},), {}).payload == {"a": 1}
    assert parse_job(({"a": 1}, "i2"), {}).instance_id == "i2"
    assert parse_job((), {}).payload is None


@pytest.mark.parametrize(("args", "kwargs", "reason"), [
    ((1, 2, 3), {}, "at most 2"),
    ((1,), {"payload": 2}, "given twice"),
    ((), {"other": 1}, "unknown arguments"),
    ((), {"instance_id": 5}, "must be a string"),
    ((), {"operation": ""}, "non-empty string"),
    ((), {"operation": 0}, "non-empty string"),
    ((), {"operation": False}, "non-empty string"),
    ((), {"operation": ["run"]}, "non-empty string"),
])
def test_bad_shapes_are_refused(args: tuple[object, ...], kwargs: dict[str, object],
                                reason: str) -> None:
    with pytest.raises(InvalidJobError, match=reason):
        parse_job(args, kwargs)


def test_an_operation_left_out_or_null_is_run() -> None:
    """Before, "", 0 and False ran `run` too (`or "run"`), hiding a producer's bug."""
    assert parse_job((), {}).operation == "run"
    assert parse_job((), {"operation": None}).operation == "run"
    assert parse_job((), {"operation": "summarize"}).operation == "summarize"
