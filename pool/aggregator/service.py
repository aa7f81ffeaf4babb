"""`pluginpool aggregator`: the event monitor plus the HTTP API and dashboard.

GET /health (every plugin), /health/<id>, /metrics (Prometheus text), / (the dashboard),
/livez. The health figures are read from Redis on each request (they are written there
by the workers), so every aggregator replica answers the same. A connection idle for
`http_idle_timeout_s` is closed.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from pluginpool.policy.errors import UnknownPluginError
from pluginpool.policy.health import PluginHealth
from pluginpool.pool.aggregator.metrics import DeliveryCollector, PluginCollector
from pluginpool.pool.aggregator.monitor import EventMonitor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.deadletter import delivery_stats
from pluginpool.tasks.settings import Settings

logger = logging.getLogger("pluginpool.aggregator")
DASHBOARD = resources.files("pluginpool.pool.aggregator").joinpath("dashboard.html")


class Aggregator:
    def __init__(self, settings: Settings) -> None:
        self.client = PluginClient(settings)
        self.monitor = EventMonitor(self.client.app, self.client.redis, settings.keys)
        self.started_at = time.time()
        self.registry = CollectorRegistry()
        self.registry.register(PluginCollector(self.all_health))
        self.registry.register(DeliveryCollector(
            lambda: delivery_stats(self.client.redis, settings.keys)))

    def all_health(self) -> list[PluginHealth]:
        items = self.client.health()
        assert isinstance(items, list)
        return [self._live(item) for item in items]

    def one_health(self, plugin_id: str) -> PluginHealth:
        item = self.client.health(plugin_id)
        assert isinstance(item, PluginHealth)
        return self._live(item)

    def _live(self, item: PluginHealth) -> PluginHealth:
        running = self.monitor.running_by_plugin()
        return item.model_copy(update={"running": running.get(item.plugin_id, 0)})

    def info(self) -> dict[str, Any]:
        return {"events_seen": self.monitor.events_seen,
                "events_connected": self.monitor.connected.is_set(),
                "uptime_s": round(time.time() - self.started_at, 1)}


def make_handler(aggregator: Aggregator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # A socket timeout on every connection: an idle client (or one that stops reading)
        # is dropped after http_idle_timeout_s instead of holding its thread for good.
        timeout = aggregator.client.settings.http_idle_timeout_s

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path == "/":
                    self._send(200, DASHBOARD.read_bytes(), "text/html; charset=utf-8")
                elif path == "/livez":
                    self._json(200, {"ok": True, **aggregator.info()})
                elif path == "/health":
                    items = aggregator.all_health()
                    self._json(200, {"plugins": [i.model_dump(mode="json") for i in items],
                                     "aggregator": aggregator.info()})
                elif path.startswith("/health/"):
                    item = aggregator.one_health(path.removeprefix("/health/"))
                    self._json(200, item.model_dump(mode="json"))
                elif path == "/metrics":
                    self._send(200, generate_latest(aggregator.registry), CONTENT_TYPE_LATEST)
                else:
                    self._json(404, {"error": "not found", "path": path})
            except UnknownPluginError as exc:
                self._json(404, {"error": "unknown plugin", "message": str(exc)})
            except Exception as exc:  # one bad request must not stop the server
                logger.exception("error serving %s", path)
                self._json(503, {"error": type(exc).__name__, "message": str(exc)})

    return Handler


def serve(settings: Settings, *, host: str, port: int) -> None:
    aggregator = Aggregator(settings)
    aggregator.monitor.start()
    server = ThreadingHTTPServer((host, port), make_handler(aggregator))
    server.daemon_threads = True

    def _stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logger.info("pluginpool aggregator on http://%s:%d", host, port)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        aggregator.monitor.stop()
        server.server_close()
        aggregator.client.close()


def cmd_aggregator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(Settings.from_env(), host=args.host, port=args.port)
    return 0
