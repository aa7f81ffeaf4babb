"""Running Flower against pluginpool's app, API enabled on loopback only."""

from __future__ import annotations

import os

from pluginpool.tasks.app import create_app
from pluginpool.tasks.settings import Settings


def run_flower(settings: Settings, *, port: int = 5555, address: str = "127.0.0.1") -> None:
    """Flower shows each plugin as its own task (`plugin.<id>`) and queue (`plugins.<id>`)."""
    # Flower reads this from the environment; its API is only safe unauthenticated on loopback.
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true" if address == "127.0.0.1" else "")
    app = create_app(settings, guarded_transport=False)
    app.start(argv=["flower", f"--port={port}", f"--address={address}"])
