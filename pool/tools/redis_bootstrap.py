"""Making sure a Redis is reachable: the configured one, the local default, or one we start.

Used by `make demo`, `make test` and `pluginpool demo`, so a fresh machine needs no
manual step. A Redis we start is daemonised with a pidfile, and stopped by that PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class ReachableRedis:
    url: str
    how: str
    pid: int | None = None


def ping(url: str, *, timeout_s: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _install_redis_server() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("redis-server is not installed and we are not root: install it")
    print("installing Debian's redis-server package", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=True,
                   stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def start_local_redis(run_dir: Path) -> ReachableRedis:
    """Start a throw-away redis-server on a free loopback port."""
    if shutil.which("redis-server") is None:
        _install_redis_server()
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pidfile = run_dir / f"redis-{port}.pid"
    subprocess.run([
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(pidfile),
        "--dir", str(run_dir), "--logfile", str(run_dir / f"redis-{port}.log"),
    ], check=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ping(url):
            pid = int(pidfile.read_text().strip()) if pidfile.exists() else None
            return ReachableRedis(url=url, how=f"started redis-server on port {port}", pid=pid)
        time.sleep(0.1)
    raise RuntimeError(f"started redis-server on port {port} but it does not answer")


def ensure_redis(configured_url: str | None, *, run_dir: Path) -> ReachableRedis:
    """The configured URL if it answers, else the local default, else a Redis we start."""
    if configured_url and ping(configured_url):
        return ReachableRedis(url=configured_url, how="configured PLUGINPOOL_REDIS_URL")
    if configured_url:
        print(f"configured Redis {urlparse(configured_url).netloc} does not answer",
              file=sys.stderr)
    if ping(DEFAULT_URL):
        return ReachableRedis(url=DEFAULT_URL, how="local Redis on 127.0.0.1:6379")
    return start_local_redis(run_dir)


def with_db(url: str, db: int) -> str:
    """The same server with another database number."""
    parsed = urlparse(url)
    return parsed._replace(path=f"/{db}").geturl()
