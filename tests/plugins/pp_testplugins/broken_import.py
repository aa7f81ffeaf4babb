"""A plugin module that fails while being imported."""

raise RuntimeError("this module is broken at import time")


def run(ctx: object, payload: object) -> None:
    return None
