"""The depth check at the delivery boundary (tasks/delivery.py): exact at its limit, and
the bracket-count shortcut never lets a deeper text through."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import MalformedMessageError
from pluginpool.tasks.delivery import DeliveryLimits, _decode_json

LIMITS = DeliveryLimits(max_depth=8)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_text_at_the_limit_decodes_and_one_level_more_is_refused() -> None:
    assert _decode_json(nested(8), "body", LIMITS) is not None
    with pytest.raises(MalformedMessageError, match="nested 9 deep"):
        _decode_json(nested(9), "body", LIMITS)


def test_brackets_inside_strings_do_not_count_even_past_the_shortcut_bound() -> None:
    text = '{"a": "' + "[{" * 50 + '", "b": [[1]]}'
    assert _decode_json(text, "body", LIMITS) == {"a": "[{" * 50, "b": [[1]]}


def test_many_shallow_brackets_pass_and_a_deep_one_among_them_does_not() -> None:
    shallow = "[" + ", ".join(["[1]"] * 40) + "]"
    assert len(_decode_json(shallow, "body", LIMITS)) == 40
    with pytest.raises(MalformedMessageError):
        _decode_json("[" + ", ".join(["[1]"] * 40 + [nested(9)]) + "]", "body", LIMITS)
