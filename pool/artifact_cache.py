"""The worker's side of artifacts: fetch, verify, unpack once per host, put on the path.

Layout of the cache directory (`PLUGINPOOL_ARTIFACT_CACHE_DIR`), one entry per content
hash so that any number of revisions, plugins and worker processes share it:

    <cache>/artifacts/<sha256>/   an artifact's wheel, unpacked (a site directory)
    <cache>/envs/<hash>/site/     a plugin revision's environment: its requires.packages
                                  (built and looked up by pool/sandbox/environments.py)
    <cache>/uv/, <cache>/pip/     the installers' download caches

An entry appears by an atomic rename of a fully unpacked scratch directory, so a process
either sees a complete entry or none, and two processes unpacking the same artifact at once
both end up using the one that won. The bytes are verified against the spec's sha256
before anything is unpacked. A pure wheel unpacked into a directory is what pip installs
for it (purelib at the root); data files and scripts of a wheel are not installed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluginpool.policy.errors import ArtifactError, ErrorType, PluginExecutionError
from pluginpool.pool.runner import Runner, RunReport
from pluginpool.tasks.artifacts import ArtifactStore, check_wheel
from pluginpool.tasks.context import PluginContext
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import ArtifactRef, PluginSpec

HOST_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.EIO,
                         errno.ENOMEM, errno.EROFS))
"""Unpacking failures that are the host's, not the artifact's."""


def default_cache_dir(settings: Settings) -> Path:
    return Path(settings.artifact_cache_dir
                or Path(tempfile.gettempdir()) / f"pluginpool-cache-{os.getuid()}")


def owned_directory(path: Path) -> Path:
    """`path` created if needed (mode 0700), refused unless this user owns it and nobody
    else may write to it: code is imported from here, so no one else may plant any."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ArtifactError("cache", f"artifact cache {path} is not this user's alone (owner"
                            f" uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): set"
                            " PLUGINPOOL_ARTIFACT_CACHE_DIR to a private directory")
    return path


class ArtifactCache:
    """Unpacked artifacts on this host, keyed by sha256."""

    def __init__(self, store: ArtifactStore, root: Path) -> None:
        self._store = store
        self.root = root
        self._known: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactCache:
        return cls(ArtifactStore.from_settings(settings), default_cache_dir(settings))

    def path_for(self, ref: ArtifactRef, *, plugin_id: str) -> Path:
        """The unpacked artifact's directory, fetched and verified first if it is new here."""
        if ref.sha256 in self._known:
            return self.root / "artifacts" / ref.sha256
        owned_directory(self.root)
        target = self.root / "artifacts" / ref.sha256
        if target.is_dir():
            self._known.add(ref.sha256)
            return target
        data = self._store.fetch(ref, plugin_id=plugin_id)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{ref.sha256[:16]}-", dir=target.parent))
        try:
            # Checked whole first (registered before the checks grew, or by another
            # producer): what fails here is the artifact's fault, typed `invalid`.
            check_wheel(data, plugin_id=plugin_id, max_bytes=self._store.max_bytes,
                        sha256=ref.sha256)
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                archive.extractall(scratch)
            os.rename(scratch, target)
        except OSError as exc:
            if target.is_dir():  # another process unpacked it first
                pass
            elif exc.errno in HOST_ERRNOS:  # this host's trouble, not the artifact's: the
                raise  # job may run elsewhere (an untyped, restartable error)
            else:  # the artifact's own (a file and a directory of one name, a long name)
                raise ArtifactError(
                    "unpack", f"artifact {ref.sha256} of {plugin_id!r} could not be "
                    f"unpacked: {type(exc).__name__}: {str(exc)[:200]}", plugin_id=plugin_id,
                    sha256=ref.sha256) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._known.add(ref.sha256)
        return target


def artifact_code_paths(spec: PluginSpec, cache: ArtifactCache) -> list[str]:
    """The directories to put first on `sys.path` to import this plugin revision's code
    (empty for a plugin without an artifact). For runtimes that start an interpreter with
    explicit code paths (warm sandboxes); raises ArtifactError (see as_dependency_error)."""
    if spec.artifact is None:
        return []
    return [str(cache.path_for(spec.artifact, plugin_id=spec.id))]


def as_dependency_error(spec: PluginSpec, exc: ArtifactError) -> PluginExecutionError:
    """An artifact that cannot be had is a `dependency` error: never retried."""
    return PluginExecutionError.of(
        ErrorType.DEPENDENCY, str(exc), plugin_id=spec.id, artifact_error=exc.reason,
        artifact_sha256=exc.sha256, **exc.details)


def forget_other_code(spec: PluginSpec, paths: list[str]) -> None:
    """Drop this plugin's top-level package from sys.modules when it was imported from
    somewhere else (an earlier revision's artifact), so the next import reads `paths`.
    Matters only where plugin code runs in a long-lived process (unsandboxed)."""
    top = spec.entrypoint.partition(":")[0].split(".")[0]
    module = sys.modules.get(top)
    if module is None or not paths:
        return
    locations = [getattr(module, "__file__", None) or "",
                 *list(getattr(module, "__path__", []) or [])]
    if any(loc.startswith(paths[0] + os.sep) for loc in locations if loc):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@contextlib.contextmanager
def on_sys_path(paths: list[str]) -> Iterator[None]:
    """`paths` first on sys.path for the duration (a forked run inherits them)."""
    added = [p for p in paths if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for path in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)


class ArtifactRunner:
    """Wraps a Runner: a plugin revision with an artifact runs with the artifact's unpacked
    directory in `ctx.code_paths` (a warm sandbox's zygote puts them on its sys.path and
    may read them), first on sys.path for the in-process runner, and readable by the
    sandbox's Landlock and audit layers (added to the run's read_paths)."""

    def __init__(self, inner: Runner, cache: ArtifactCache) -> None:
        self.inner = inner
        self.cache = cache

    def run(self, spec: PluginSpec, ctx: PluginContext, payload: Any) -> RunReport:
        if spec.artifact is None:
            return self.inner.run(spec, ctx, payload)
        try:
            paths = artifact_code_paths(spec, self.cache)
        except ArtifactError as exc:
            raise as_dependency_error(spec, exc) from None
        forget_other_code(spec, paths)
        ctx.code_paths = (*paths, *[p for p in ctx.code_paths if p not in paths])
        permissions = spec.permissions.model_copy(
            update={"read_paths": [*spec.permissions.read_paths, *paths]})
        with on_sys_path(paths):
            return self.inner.run(spec.model_copy(update={"permissions": permissions}),
                                  ctx, payload)
