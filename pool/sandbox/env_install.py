"""Installing one plugin revision's environment: lock, install into scratch, rename.

Runs as a process of its own (`python -I <this file>`, the request as JSON on stdin, the
result as one JSON line on stdout), started by a pool child (environments.py) that waits
for it within the job's setup budget. Being its own process, an install outlives a job
that stops waiting (its deadline, Celery's limits, a killed pool child) and still lands.
Standard library only, run by path: nothing of the worker is imported.

Whatever happens, a half-built environment is never used: the installer writes into a
scratch directory beside the target and the finished directory is renamed into place
(atomic on one filesystem). An exclusive `flock` on `<key>.lock` makes the processes of a
host that want the same environment at once install it once: the others wait for the lock
and find it there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

SITE = "site"
"""The environment's site directory (installed packages) inside `<envs>/<key>/`."""
META = "env.json"
INSTALL_LOG = "install.log"
"""One JSON line per install this host ran, and per process that waited for another's
(`installed` false), in `<envs>/install.log`: for operators and tests."""
MAX_MESSAGE_CHARS = 4_000
"""The installer's output kept in a failure (its tail: where the resolver says why)."""
LOCK_POLL_S = 0.05
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class InstallRequest:
    """What to install where. `index_url`: None for the installer's default index,
    "none" for no index at all."""

    envs_dir: str
    key: str
    requirements: list[str]
    interpreter: str
    timeout_s: float
    index_url: str | None = None
    find_links: list[str] = field(default_factory=list)
    uv: str | None = None
    """The uv binary; None: `interpreter -m pip install --target`."""
    cache_dir: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> InstallRequest:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class InstallResult:
    """`installed`: this process ran the installer (False: the environment was there, or
    another process built it while this one waited). On failure `reason` is one of
    unresolvable (the installer refused: the resolver's `message`), timeout, error."""

    ok: bool
    site: str | None = None
    installed: bool = False
    installer: str = ""
    seconds: float = 0.0
    reason: str = ""
    message: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> InstallResult:
        return cls(**json.loads(data))


def site_of(envs_dir: str, key: str) -> str:
    return os.path.join(envs_dir, key, SITE)


def installer_command(request: InstallRequest, target: str) -> tuple[str, list[str]]:
    """The installer's name and command line. uv resolves and installs from its cache
    (hardlinks), in well under a second for small sets; pip is the fallback."""
    sources: list[str] = []
    if request.index_url == "none":
        sources.append("--no-index")
    elif request.index_url:
        sources += ["--index-url", request.index_url]
    for link in request.find_links:
        sources += ["--find-links", link]
    if request.uv:
        command = [request.uv, "pip", "install", "--no-config", "--no-progress",
                   "--target", target, "--python", request.interpreter, "--compile-bytecode"]
        if request.cache_dir:
            command += ["--cache-dir", os.path.join(request.cache_dir, "uv")]
        return "uv", [*command, *sources, "--", *request.requirements]
    command = [request.interpreter, "-m", "pip", "install", "--no-input",
               "--disable-pip-version-check", "--no-warn-script-location", "--quiet",
               "--target", target]
    if request.cache_dir:
        command += ["--cache-dir", os.path.join(request.cache_dir, "pip")]
    return "pip", [*command, *sources, *request.requirements]


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else "..." + text[-MAX_MESSAGE_CHARS:]


def _run(command: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Exit code (None: timed out, the installer's process group killed) and output."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=KILL_GRACE_S)
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def _locked(path: str, *, timeout_s: float) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most `timeout_s` (TimeoutError)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s") from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _log(request: InstallRequest, result: InstallResult) -> None:
    line = json.dumps({"key": request.key, "ok": result.ok, "installed": result.installed,
                       "installer": result.installer,
                       "seconds": round(result.seconds, 3), "reason": result.reason,
                       "requirements": request.requirements, "pid": os.getpid(),
                       "at": time.time()})
    with open(os.path.join(request.envs_dir, INSTALL_LOG), "a", encoding="utf-8") as log:
        log.write(line + "\n")


def install(request: InstallRequest) -> InstallResult:
    """The environment's site directory, installed here unless it is there already."""
    target = os.path.join(request.envs_dir, request.key)
    site = os.path.join(target, SITE)
    if os.path.isdir(target):
        return InstallResult(ok=True, site=site)
    os.makedirs(request.envs_dir, mode=0o700, exist_ok=True)
    lock = os.path.join(request.envs_dir, f"{request.key}.lock")
    try:
        with _locked(lock, timeout_s=request.timeout_s + KILL_GRACE_S):
            if os.path.isdir(target):  # another process installed it while we waited
                waited = InstallResult(ok=True, site=site)
                _log(request, waited)
                return waited
            return _install_locked(request, target)
    except TimeoutError as exc:
        return InstallResult(ok=False, reason="timeout", message=str(exc))


def _install_locked(request: InstallRequest, target: str) -> InstallResult:
    for stale in os.listdir(request.envs_dir):  # left by an installer killed mid-way
        if stale.startswith(f".{request.key}."):
            shutil.rmtree(os.path.join(request.envs_dir, stale), ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=f".{request.key}.", dir=request.envs_dir)
    name, command = installer_command(request, os.path.join(scratch, SITE))
    started = time.monotonic()
    try:
        code, output = _run(command, request.timeout_s)
        seconds = time.monotonic() - started
        if code is None:
            result = InstallResult(
                ok=False, installer=name, seconds=seconds, reason="timeout",
                message=f"{name} did not finish within {request.timeout_s:.0f} s"
                        f" (PLUGINPOOL_ENV_INSTALL_TIMEOUT_S): {_tail(output)}")
        elif code != 0:
            result = InstallResult(ok=False, installer=name, seconds=seconds,
                                   reason="unresolvable", message=_tail(output))
        else:
            with contextlib.suppress(FileNotFoundError):  # uv's own lock file, mode 0666
                os.unlink(os.path.join(scratch, SITE, ".lock"))
            os.makedirs(os.path.join(scratch, SITE), exist_ok=True)  # nothing to install
            with open(os.path.join(scratch, META), "w", encoding="utf-8") as meta:
                json.dump({"key": request.key, "requirements": request.requirements,
                           "index_url": request.index_url, "find_links": request.find_links,
                           "interpreter": request.interpreter, "installer": name,
                           "seconds": round(seconds, 3), "created": time.time()}, meta)
            os.rename(scratch, target)
            result = InstallResult(ok=True, site=os.path.join(target, SITE), installed=True,
                                   installer=name, seconds=seconds)
    except OSError as exc:
        result = InstallResult(ok=False, installer=name, reason="error",
                               seconds=time.monotonic() - started,
                               message=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _log(request, result)
    return result


def main() -> None:
    """Read one request from stdin, install, write the result to stdout. The pool child
    may have stopped waiting (its pipe closed): the environment lands all the same."""
    result = install(InstallRequest.decode(sys.stdin.buffer.read()))
    with contextlib.suppress(BrokenPipeError, OSError):
        sys.stdout.buffer.write(result.encode())
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
