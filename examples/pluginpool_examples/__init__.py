"""Example plugins for pluginpool: well-behaved and misbehaving ones, used by the demo."""
