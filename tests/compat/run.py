"""`make compat`: kombu's own Redis integration tests against pluginpool's transport.

Fetches the source distribution of the installed kombu from the package index (cached in
`.compat/`, git-ignored), extracts only the Redis integration tests and the helpers they
import, starts a private redis-server on a free loopback port, and runs those tests
unchanged with `kombu_transport_alias` (next to this file) loaded as a pytest plugin.
The redis-server is stopped by its PID whatever happens. Extra arguments go to pytest.

    .venv/bin/python tests/compat/run.py [-k half_open] [-x] ...
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".compat"
TEST_FILES = ("t/__init__.py", "t/integration/__init__.py", "t/integration/common.py",
              "t/integration/test_redis.py", "t/integration/test_redis_brpop_qos.py")
PIP_TIMEOUT_S = 20


class CompatError(RuntimeError):
    """A step before the tests could not be done; the message says which and why."""


def fetch_sdist(version: str) -> Path:
    """The kombu sdist of exactly `version`, downloaded once with pip."""
    CACHE.mkdir(exist_ok=True)
    found = sorted(CACHE.glob(f"kombu-{version}.tar.gz"))
    if found:
        return found[0]
    print(f"compat: downloading the kombu {version} source distribution with pip",
          file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         "--timeout", str(PIP_TIMEOUT_S), "--retries", "1",
         "--dest", str(CACHE), f"kombu=={version}"],
        capture_output=True, text=True, check=False)
    found = sorted(CACHE.glob(f"kombu-{version}.tar.gz"))
    if result.returncode != 0 or not found:
        raise CompatError(
            f"could not fetch the kombu {version} sdist with pip (is the package index "
            f"reachable? pip's configured index is used):\n{result.stderr[-2000:]}")
    return found[0]


def extract_tests(sdist: Path, version: str) -> Path:
    """Only kombu's Redis tests and their helpers: never kombu's package itself, which
    would shadow the installed one."""
    dest = CACHE / f"kombu-{version}-tests"
    shutil.rmtree(dest, ignore_errors=True)
    prefix = f"kombu-{version}/"
    with tarfile.open(sdist) as archive:
        for name in TEST_FILES:
            member = archive.getmember(prefix + name)
            source = archive.extractfile(member)
            if source is None:
                raise CompatError(f"{name} is not a file in {sdist.name}")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    # kombu's setup.cfg names its test classes test_*; the rest of its config is not needed.
    (dest / "pytest.ini").write_text("[pytest]\npython_classes = test_*\n")
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(run_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A throw-away redis-server in the foreground, so its PID is ours to stop."""
    if shutil.which("redis-server") is None:
        raise CompatError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    log = (run_dir / "redis.log").open("wb")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if client.ping():
                client.close()
                return proc, port
        except redis.ConnectionError:
            time.sleep(0.1)
    stop(proc)
    raise CompatError(f"redis-server on port {port} did not answer; see {run_dir}/redis.log")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    version = metadata.version("kombu")
    try:
        tests = extract_tests(fetch_sdist(version), version)
    except CompatError as exc:
        print(f"compat: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pluginpool-compat-") as run_dir:
        try:
            proc, port = start_redis(Path(run_dir))
        except CompatError as exc:
            print(f"compat: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"compat: kombu {version}'s Redis integration tests on redis-server "
                  f"127.0.0.1:{port} (pid {proc.pid}), transport = pluginpool's",
                  file=sys.stderr)
            env = {**os.environ, "REDIS_HOST": "127.0.0.1", "REDIS_6379_TCP": str(port),
                   "PYTHONPATH": os.pathsep.join(
                       filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
            command = [sys.executable, "-m", "pytest", "-p", "kombu_transport_alias",
                       "-p", "no:cacheprovider", "-c", str(tests / "pytest.ini"),
                       "--rootdir", str(tests), "--timeout", "120", "-ra",
                       "t/integration/test_redis.py", "t/integration/test_redis_brpop_qos.py",
                       *argv]
            return subprocess.run(command, cwd=tests, env=env, check=False).returncode
        finally:
            stop(proc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
