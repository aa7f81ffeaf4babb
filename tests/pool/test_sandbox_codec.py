"""The sandbox's JSON on its per-run path: json's C scanner and encoder, called directly
(a run touches fewer pages than through json.loads and json.dumps), must accept and
produce exactly what json does for a frame and a result."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from pluginpool.pool.sandbox.runtime import channel, messages, run


@pytest.mark.parametrize("value", [
    None, 0, -3, 1.5, 1e-05, True, "é\n\"x\"", [], {}, [1, [2, {"a": None}]],
    {"nested": {"list": [1.0, "two", False]}, "unicode": "日本"}, {1: "int key"}, (1, 2),
])
def test_a_result_is_encoded_as_json_dumps_would(value: Any) -> None:
    assert run._encode_result(value) == json.dumps(value, allow_nan=False)


def test_a_result_json_cannot_hold_fails_as_json_dumps_would() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    for value in (math.nan, {"x": math.inf}, {"x": object()}, cyclic):
        with pytest.raises((TypeError, ValueError)) as ours:
            run._encode_result(value)
        with pytest.raises((TypeError, ValueError)) as theirs:
            json.dumps(value, allow_nan=False)
        assert type(ours.value) is type(theirs.value)
        assert str(ours.value) == str(theirs.value)


def test_a_frame_is_one_json_document_and_nothing_else() -> None:
    assert channel.loads(b'{"op": "log", "stream": "stdout", "text": "\\u00e9"}') == {
        "op": "log", "stream": "stdout", "text": "é"}
    for bad in (b"", b"{", b'{"a": 1} trailing', b'{"a": 1}{"b": 2}', b"\xff", b"nope",
                b"[" * 100_000 + b"]" * 100_000):  # nested too deep: ValueError too
        with pytest.raises(ValueError):
            channel.loads(bad)


def test_a_run_decodes_the_spawn_the_pool_child_encodes() -> None:
    spawn = messages.Spawn(job_id="j", operation="summarize", payload={"deep": [1, {"x": None}]},
                           attempt=2, workspace="/w", cpu_backstop_s=3, max_memory_mb=64,
                           max_storage_kb=8)
    body = json.dumps(messages.encode(spawn), allow_nan=False).encode()
    assert run._spawn_of(body) == spawn
    with pytest.raises((TypeError, ValueError)):
        run._spawn_of(json.dumps(messages.encode(messages.Close(reason="x"))).encode())
