"""`pluginpool aggregator`: the event monitor plus the HTTP API and dashboard.

GET /health (every plugin), /health/<id>, /metrics (Prometheus text), / (the dashboard),
/livez, and the JSON API of pool/aggregator/api.py (a plugin's page, workers, audit, dead
letters; operator actions as POSTs), behind the tokens and roles of auth.py (only /livez,
/metrics and the page itself, which holds no data, are open). The health figures are read from
Redis on each request (they are written there by the workers), so every aggregator
replica answers the same. A connection idle for
`http_idle_timeout_s` is closed.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from pluginpool.policy.errors import (
    ActionRefusedError,
    AuthError,
    DeadLetterNotFoundError,
    DeadLetterNotRequeueableError,
    UnknownPluginError,
)
from pluginpool.policy.health import PluginHealth
from pluginpool.pool.aggregator.api import MAX_OFFSET, Api, NotFound, query_int
from pluginpool.pool.aggregator.auth import Authenticator, Identity
from pluginpool.pool.aggregator.metrics import DeliveryCollector, PluginCollector
from pluginpool.pool.aggregator.monitor import EventMonitor
from pluginpool.tasks.audit import Actor
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.deadletter import delivery_stats
from pluginpool.tasks.settings import Settings

logger = logging.getLogger("pluginpool.aggregator")
DASHBOARD = resources.files("pluginpool.pool.aggregator").joinpath("dashboard.html")
PUBLIC = ("/livez", "/metrics")
"""Open to anyone who reaches the port: liveness, and the aggregate counters Prometheus
scrapes (scrape annotations cannot carry a token). The page itself holds no data."""
MAX_BODY_BYTES = 65_536
DRAINED_BODY_BYTES = 1 << 20
"""Of a body refused unread, read and dropped before answering: a socket closed with
unread data resets, and the client would see that rather than the answer."""
UNAVAILABLE_REPLIES = ("OOM", "MASTERDOWN", "LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN")
"""Redis error replies that mean "not now" (a 503), not a fault of the request."""


class BadRequest(ValueError):
    """A request the API cannot read (a 400)."""


class BodyTooLarge(Exception):
    """A request body over MAX_BODY_BYTES (a 413)."""


class Aggregator:
    def __init__(self, settings: Settings) -> None:
        self.client = PluginClient(settings)
        self.monitor = EventMonitor(self.client.app, self.client.redis, settings.keys)
        self.started_at = time.time()
        self.registry = CollectorRegistry()
        self.registry.register(PluginCollector(self.all_health))
        self.registry.register(DeliveryCollector(
            lambda: delivery_stats(self.client.redis, settings.keys)))
        self.auth = Authenticator(settings.api_tokens)
        self.api = Api(self.client, running=self.monitor.running_by_plugin,
                       worker_load=lambda: dict(self.monitor.worker_load))

    def all_health(self) -> list[PluginHealth]:
        items = self.client.health()
        assert isinstance(items, list)
        return [self._live(item) for item in items]

    def health_page(self, query: str) -> dict[str, Any]:
        """`/health?offset=M&limit=N`: a page of plugins (by id) and the total, so a person's
        view of 10,000 plugins reads what it shows; without `limit`, every plugin."""
        params = urllib.parse.parse_qs(query)
        offset = query_int(params, "offset", 0, low=0, high=MAX_OFFSET)
        limit = query_int(params, "limit", -1, low=0, high=MAX_OFFSET)
        page, total = self.client.registry.page(offset=offset,
                                                limit=limit if limit >= 0 else None)
        items = self.client.health_reader.read_all(page)
        return {"plugins": [self._live(item).model_dump(mode="json") for item in items],
                "total": total, "offset": offset, "aggregator": self.info()}

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

        def _send(self, status: int, body: bytes, content_type: str, *,
                  headers: dict[str, str] | None = None) -> None:
            """One answer; its body left out where HTTP has none (HEAD, 1xx, 204, 304)."""
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD" and status >= 200 and status not in (204, 304):
                self.wfile.write(body)

        def _json(self, status: int, payload: Any, *,
                  headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json",
                       headers=headers)

        def _page(self) -> None:
            """The dashboard, with a nonce: only its own script runs (an injected
            `<img onerror>` would not, even if some text were ever rendered as HTML)."""
            nonce = secrets.token_urlsafe(16)
            body = DASHBOARD.read_bytes().replace(b"<script>", f'<script nonce="{nonce}">'
                                                  .encode())
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Security-Policy",
                             f"default-src 'self'; script-src 'nonce-{nonce}'; "
                             "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                             "frame-ancestors 'none'")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _identify(self) -> Identity:
            if len(self.headers.get_all("Authorization") or []) > 1:  # which one would count?
                raise AuthError("one Authorization header, not several", status=400)
            return aggregator.auth.identify(self._headers(), peer=self.client_address[0])

        def _headers(self) -> dict[str, str]:
            return {name.lower(): value for name, value in self.headers.items()}

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")  # segments decoded by the API
            actor: Actor | None = None
            try:
                identity = self._identify()
                actor = Actor(who=identity.who, role=identity.role,
                              origin=f"http {self.client_address[0]}")
                try:
                    aggregator.auth.check_action(identity, self._headers())
                except AuthError as exc:
                    aggregator.client.record_refusal(actor, "POST " + path[:200], path[:200],
                                                     str(exc))
                    raise
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise BadRequest("Content-Length must not be negative")
                if length > MAX_BODY_BYTES:
                    self.rfile.read(min(length, DRAINED_BODY_BYTES))
                    raise BodyTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw or b"{}")
                except (ValueError, RecursionError) as exc:
                    raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None
                if not isinstance(body, dict):
                    raise ActionRefusedError("the body must be a JSON object")
                self._json(200, aggregator.api.post(path, body, actor))
            except Exception as exc:
                self._error(path, exc)

        def _error(self, path: str, exc: Exception) -> None:
            if isinstance(exc, AuthError):
                self._json(exc.status, {"error": type(exc).__name__, "message": str(exc)})
            elif isinstance(exc, UnknownPluginError | DeadLetterNotFoundError | NotFound):
                self._json(404, {"error": "not found", "message": str(exc)})
            elif isinstance(exc, BodyTooLarge):
                self._json(413, {"error": type(exc).__name__, "message": str(exc)})
            elif isinstance(exc, ActionRefusedError | DeadLetterNotRequeueableError):
                self._json(409, {"error": type(exc).__name__, "message": str(exc)})
            elif isinstance(exc, ValueError):  # a malformed query (?limit=abc), body or value
                self._json(400, {"error": type(exc).__name__, "message": str(exc)})
            elif isinstance(exc, redis.ConnectionError | redis.TimeoutError | ConnectionError
                            | redis.ReadOnlyError) or (
                    isinstance(exc, redis.ResponseError)
                    and str(exc).startswith(UNAVAILABLE_REPLIES)):
                logger.warning("Redis unavailable serving %r: %r", path[:200], exc)
                self._json(503, {"error": "unavailable", "message": "Redis is unavailable"})
            else:  # one bad request must not stop the server
                logger.exception("error serving %r", path[:200])
                self._json(500, {"error": "internal", "message": type(exc).__name__})

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """http.server's own refusals (a request line, URI or headers it cannot read) as
            JSON like every other answer, not its HTML page."""
            try:
                phrase = HTTPStatus(code).phrase
            except ValueError:
                phrase = "error"
            self._json(code, {"error": phrase, "message": message or ""},
                       headers={"Connection": "close"})

        def _not_allowed(self) -> None:
            self._json(405, {"error": "method not allowed",
                             "message": f"{self.command} is not served: GET or POST"},
                       headers={"Allow": "GET, POST"})

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            path = path.rstrip("/") or "/"  # segments decoded where they are ids
            try:
                if path not in PUBLIC and (path != "/" or not aggregator.auth.enabled):
                    identity = self._identify()
                if path == "/":
                    self._page()
                elif path.startswith("/api/"):
                    self._json(200, aggregator.api.get(path, query, identity))
                elif path == "/livez":
                    self._json(200, {"ok": True, **aggregator.info()})
                elif path == "/health":
                    self._json(200, aggregator.health_page(query))
                elif path.startswith("/health/"):
                    item = aggregator.one_health(
                        urllib.parse.unquote(path.removeprefix("/health/")))
                    self._json(200, item.model_dump(mode="json"))
                elif path == "/metrics":
                    self._send(200, generate_latest(aggregator.registry), CONTENT_TYPE_LATEST)
                else:
                    self._json(404, {"error": "not found", "path": path})
            except Exception as exc:
                self._error(path, exc)

    return Handler


def serve(settings: Settings, *, host: str, port: int) -> None:
    aggregator = Aggregator(settings)
    if not aggregator.auth.enabled:
        logger.warning("PLUGINPOOL_API_TOKENS is not set: the HTTP API is read-only and "
                       "answers loopback clients only")
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
