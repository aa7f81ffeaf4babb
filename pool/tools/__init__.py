"""Operator tooling: the CLI, the demo, Flower, Redis bootstrap and process management.

None of it runs inside a worker's job path."""
