"""The worker side of pluginpool: worker launcher, process management, demo, CLI."""
