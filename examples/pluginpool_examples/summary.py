"""A class plugin: its setup builds a table once per warm sandbox, then every run of either
operation forks from it. The README's class-plugin example is this file."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

STOP_WORDS = "a an and are as at be by for from in is it of on or that the this to was with"


class Summarizer:
    def __init__(self, ctx: Any) -> None:           # setup: once per warm sandbox
        self.stop_words = frozenset(ctx.initial_data.get("stop_words", STOP_WORDS).split())
        self.sentences = int(ctx.initial_data.get("sentences", 1))

    def run(self, ctx: Any, payload: dict[str, Any]) -> str:        # operation "run"
        sentences = re.split(r"(?<=[.!?])\s+", payload["text"].strip())
        return " ".join(sentences[: self.sentences])

    def keywords(self, ctx: Any, payload: dict[str, Any]) -> list[str]:  # "keywords"
        words = re.findall(r"[a-z']+", payload["text"].lower())
        counts = Counter(word for word in words if word not in self.stop_words)
        return [word for word, _ in counts.most_common(3)]

    def close(self) -> None:                        # teardown
        self.stop_words = frozenset()
