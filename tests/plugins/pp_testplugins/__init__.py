"""Plugins used by the test suite, well-behaved and misbehaving."""
