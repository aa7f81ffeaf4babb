"""A PEP 578 audit hook: counts network requests and checks files, hosts and processes.

Standard library only (it runs in the zygote). It is the only layer that sees host names,
and it reports what a plugin attempted in its own words. It is detection, not enforcement
(ctypes calls into libc bypass it): Landlock and seccomp are the enforcement where the
kernel has them.
"""

from __future__ import annotations

import os
import sys

from .messages import RESOURCE, SECURITY
from .records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROCESS_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
    "os.spawn", "pty.spawn", "os.kill", "os.killpg",
})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """Raised inside the plugin when it attempts something its spec does not allow."""


@record
class AuditPolicy:
    """What the run may touch. Paths are absolute and normalised."""

    workspace: str
    read_paths: tuple[str, ...]
    hosts: dict[str, set[int] | None]
    """Allowed host → allowed ports (None: any port)."""
    max_network_requests: int
    allow_processes: bool
    violations: list[dict[str, Any]] = field(default_factory=list)
    network_requests: int = 0
    resolved_allowed: bool = False

    enforcing: bool = False
    """Off while the sandbox's own code runs (it forks, sets limits); on for plugin code."""

    def violate(self, type_: str, message: str, **details: Any) -> None:
        self.violations.append({"type": type_, "message": message, "details": details})
        raise SandboxViolation(message)

    def narrow(self, *, workspace: str) -> None:
        """A run's own policy, in the run's process: its workspace, fresh counters."""
        self.workspace = workspace
        self.violations = []
        self.network_requests = 0
        self.resolved_allowed = False

    def readable(self, path: str) -> bool:
        return self.writable(path) or any(
            path == root or path.startswith(root.rstrip("/") + "/") for root in self.read_paths)

    def writable(self, path: str) -> bool:
        return path == self.workspace or path.startswith(self.workspace + "/")

    def on_open(self, target: Any, mode: Any, flags: Any) -> None:
        if not isinstance(target, str | bytes) or target in ("", b""):
            return  # an fd, not a path
        path = os.path.abspath(os.fsdecode(target))
        writing = (isinstance(flags, int) and flags & WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing and not self.writable(path):
            self.violate(SECURITY, f"write outside the workspace: {path}",
                         attempted="write", path=path)
        if not writing and not self.readable(path):
            self.violate(SECURITY, f"read of a path not allowed: {path}",
                         attempted="read", path=path)

    def on_getaddrinfo(self, host: Any, port: Any) -> None:
        name = os.fsdecode(host) if isinstance(host, str | bytes) else str(host)
        if name not in self.hosts:
            self.violate(SECURITY, f"host not allowed: {name}", attempted="resolve",
                         host=name)
        self.resolved_allowed = True

    def on_connect(self, sock: Any, address: Any) -> None:
        if isinstance(address, str | bytes):
            path = os.path.abspath(os.fsdecode(address))
            if not self.writable(path):
                self.violate(SECURITY, f"unix socket not allowed: {path}",
                             attempted="connect", path=path)
            return
        if not isinstance(address, tuple) or len(address) < 2:
            return
        host, port = str(address[0]), int(address[1])
        if host in self.hosts:
            ports = self.hosts[host]
        elif self.resolved_allowed:
            ports = set().union(*(p for p in self.hosts.values() if p is not None)) or None
        else:
            self.violate(SECURITY, f"connection to a host not allowed: {host}:{port}",
                         attempted="connect", host=host, port=port)
            return
        if ports is not None and port not in ports:
            self.violate(SECURITY, f"port not allowed: {host}:{port}",
                         attempted="connect", host=host, port=port)
        self.network_requests += 1
        if self.network_requests > self.max_network_requests:
            self.violate(RESOURCE, "too many network requests",
                         limit="max_network_requests", limit_value=self.max_network_requests,
                         observed=self.network_requests)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.enforcing:
            return
        if event == "open":
            self.on_open(*args[:3])
        elif event == "socket.getaddrinfo":
            self.on_getaddrinfo(args[0], args[1])
        elif event == "socket.connect":
            self.on_connect(*args[:2])
        elif event == "socket.__new__" and not self.hosts and args[1] in (2, 10):
            self.violate(SECURITY, "network access not allowed",
                         attempted="socket")
        elif event == "resource.setrlimit":
            self.violate(SECURITY, "changing resource limits is not allowed",
                         attempted=event)
        elif event in PROCESS_EVENTS:
            if event in ("os.kill", "os.killpg") and args and args[0] in (0, os.getpid()):
                return
            if not self.allow_processes or event in ("os.kill", "os.killpg"):
                self.violate(SECURITY, f"process control not allowed: {event}",
                             attempted=event)


def parse_hosts(entries: list[str]) -> dict[str, set[int] | None]:
    """`host` (any port) or `host:port` entries → host → ports."""
    hosts: dict[str, set[int] | None] = {}
    for entry in entries:
        host, sep, port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if sep and port.isdigit():
            current = hosts.get(host, set())
            if current is not None:
                current.add(int(port))
                hosts[host] = current
        else:
            hosts[entry] = None
    return hosts


def install(policy: AuditPolicy) -> None:
    """Hook `policy` into every audit event of this process (and its forks).

    The hook is a plain function that returns at once while the sandbox's own code runs:
    CPython looks up `__cantrace__` on a hook for every event, and on a bound method that
    lookup raises (and formats) an AttributeError each time, which a run's lock-down (its
    ctypes calls and setrlimits are audited) paid in CPU and copied pages."""
    check = policy.hook

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if policy.enforcing:
            check(event, args)

    sys.addaudithook(hook)
