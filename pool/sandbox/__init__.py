"""Sandboxed runs: a single-use process per run, limits applied before plugin code runs,
supervised by the pool child. See runner.py for the path of one run."""
