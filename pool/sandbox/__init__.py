"""Sandboxed runs: each a fresh fork of a warm sandbox (a locked-down zygote that set the
plugin up once), narrowed further and supervised by the pool child. See runner.py for the
path of one run, runtime/ for what runs inside the sandbox."""
