"""Plugin-supplied error text is bounded wherever an ErrorInfo is built, with a marker."""

from __future__ import annotations

from pluginpool.policy.errors import (
    MAX_DETAIL_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    ErrorInfo,
    PluginExecutionError,
    truncate_text,
)


def test_short_text_is_unchanged_and_long_text_is_cut_with_a_marker() -> None:
    assert truncate_text("abc", 10) == "abc"
    cut = truncate_text("x" * 10_000 + "END", 4096)
    assert len(cut) <= 4096 and "[truncated " in cut and cut.startswith("xxx")
    kept_tail = truncate_text("HEAD" + "x" * 10_000 + "END", 4096, keep_tail=True)
    assert kept_tail.startswith("HEAD") and kept_tail.endswith("END")
    assert len(kept_tail) <= 4096


def test_error_info_bounds_message_traceback_and_details() -> None:
    info = ErrorInfo(type="runtime", message="m" * 900_000,  # type: ignore[arg-type]
                     details={"traceback": "Traceback\n" + "t" * 900_000 + "\nKeyError: x",
                              "attempted": "a" * 900_000, "usage": {"wall_ms": 1.0},
                              "blob": list(range(200_000)), "limit_value": 5})
    assert len(info.message) <= MAX_ERROR_MESSAGE_CHARS
    assert len(info.details["traceback"]) <= MAX_TRACEBACK_CHARS
    assert info.details["traceback"].endswith("KeyError: x")
    assert len(info.details["attempted"]) <= MAX_DETAIL_CHARS
    assert info.details["usage"] == {"wall_ms": 1.0} and info.details["limit_value"] == 5
    assert info.details["blob"] == [] and info.details["blob_dropped"].startswith("[dropped:")
    # The bounded form survives the result backend's round trip unchanged.
    rebuilt = PluginExecutionError(info.model_dump(mode="json")).info
    assert rebuilt == info
