"""Per-plugin-revision environments: a sandboxed plugin's `requires.packages`, installed
for it alone and put on its zygotes' path.

Each environment lives in `<cache>/envs/<key>/site/` (the cache of artifact_cache.py),
where the key hashes what decides its content: the plugin's code (its artifact's sha256,
or its id when its code is installed on the workers), its requirements (normalized), the
package sources (index and find-links settings) and the interpreter (implementation,
version, platform). Two revisions with the same code and requirements share one; no other
plugin's code ever shares it. It is built once per host by a helper process
(env_install.py) and then only looked up: the warm sandboxes of the revision, in every
pool process, put it on their path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pluginpool.policy.errors import ArtifactError, ErrorType, PluginExecutionError
from pluginpool.pool.artifact_cache import default_cache_dir, owned_directory
from pluginpool.pool.sandbox import env_gc, env_install
from pluginpool.pool.sandbox.env_install import InstallRequest, InstallResult
from pluginpool.tasks.settings import Settings, child_process_env
from pluginpool.tasks.spec import PluginSpec

INTERPRETER_QUERY = ("import sys, sysconfig; print(sys.implementation.cache_tag,"
                     " sys.version.split()[0], sysconfig.get_platform())")
KEYS_REMEMBERED = 4096
HELPER_START_S = 1.0
"""Beyond the wait for the install: the helper's own start and its answer (the whole wait
stays inside Celery's soft limit, setup + run + 2 s)."""


def normalized_requirements(requirements: list[str]) -> list[str]:
    """Each PEP 508 requirement in one canonical spelling (name normalized, extras and
    specifiers sorted), sorted and without duplicates: equal sets hash alike."""
    out = set()
    for text in requirements:
        req = Requirement(text)
        extras = f"[{','.join(sorted(canonicalize_name(e) for e in req.extras))}]" \
            if req.extras else ""
        where = f" @ {req.url}" if req.url else str(req.specifier)
        marker = f"; {req.marker}" if req.marker is not None else ""
        out.add(f"{canonicalize_name(req.name)}{extras}{where}{marker}")
    return sorted(out)


@functools.lru_cache(maxsize=8)
def interpreter_tag(interpreter: str) -> str:
    """What an environment's binaries depend on: implementation, version and platform of
    the interpreter the zygotes run (asked once, unless it is this one)."""
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        import sysconfig
        return (f"{sys.implementation.cache_tag} {sys.version.split()[0]}"
                f" {sysconfig.get_platform()}")
    done = subprocess.run([interpreter, "-I", "-c", INTERPRETER_QUERY], capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout.strip()


@dataclass(frozen=True)
class PackageSources:
    """Where requirements come from: the index (None: the installer's default; "none":
    no index) and find-links (wheel directories or flat pages)."""

    index_url: str | None = None
    find_links: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> PackageSources:
        return cls(settings.package_index_url, tuple(settings.find_links))


def environment_key(spec: PluginSpec, *, sources: PackageSources, interpreter: str) -> str:
    """The hash an environment is cached under (see the module docstring)."""
    code = spec.artifact.sha256 if spec.artifact is not None else f"plugin:{spec.id}"
    material = json.dumps({
        "code": code, "requirements": normalized_requirements(spec.requires.packages),
        "index_url": sources.index_url, "find_links": list(sources.find_links),
        "python": interpreter_tag(interpreter)}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def code_found_in(spec: PluginSpec, paths: tuple[str, ...]) -> bool:
    """Whether the plugin's top-level module is in `paths` (its artifact, plugin paths):
    then its zygote needs nothing of the worker's site-packages. Finds, never imports."""
    top = spec.entrypoint.partition(":")[0].split(".")[0]
    return importlib.machinery.PathFinder.find_spec(top, list(paths)) is not None


def _uv_binary() -> str | None:
    """uv's binary as the `uv` package installs it; None: fall back to pip."""
    try:
        import uv
        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return None


def unmet_from(requirements: list[str], message: str) -> list[dict[str, str]]:
    """The requirements the installer's message names (all of them if it names none),
    in the shape `requires` checks report them."""
    text = message.lower()
    named = [r for r in requirements
             if canonicalize_name(Requirement(r).name) in text
             or Requirement(r).name.lower() in text]
    return [{"requirement": r, "installed": "none"} for r in (named or requirements)]


class Environments:
    """This host's environments, as one pool process sees them."""

    def __init__(self, root: Path, *, sources: PackageSources, interpreter: str,
                 install_timeout_s: float, helper_start_s: float = HELPER_START_S) -> None:
        self.root = root
        self.helper_start_s = helper_start_s
        self.sources = sources
        self.interpreter = interpreter
        self.install_timeout_s = install_timeout_s
        self._ready: dict[str, str] = {}
        self._marked: dict[str, float] = {}
        self._key_of: dict[tuple[str, int], str] = {}
        self._uv: str | None = None
        self._uv_looked_up = False

    @classmethod
    def from_settings(cls, settings: Settings, *, interpreter: str) -> Environments:
        return cls(default_cache_dir(settings), sources=PackageSources.from_settings(settings),
                   interpreter=interpreter, install_timeout_s=settings.env_install_timeout_s)

    @property
    def envs_dir(self) -> Path:
        return self.root / "envs"

    def site_for(self, spec: PluginSpec, *, wait_s: float) -> str:
        """The revision's site directory, installed first if it is new on this host (waiting
        at most `wait_s`; the install goes on if this job stops waiting). Raises a
        `dependency` error when it cannot be installed, `timeout` when still installing."""
        key = environment_key(spec, sources=self.sources, interpreter=self.interpreter)
        site = self._ready.get(key)
        if site is not None and os.path.isdir(site):  # (unless swept: env_gc.py)
            self._mark_used(key)
            return site
        try:
            owned_directory(self.root)
        except ArtifactError as exc:
            raise PluginExecutionError.of(
                ErrorType.DEPENDENCY, str(exc), plugin_id=spec.id, environment=key,
                install_error="cache") from None
        site = env_install.site_of(str(self.envs_dir), key)
        direct = [r for r in spec.requires.packages if Requirement(r).url]
        if direct:  # `name @ URL` would bypass the deployment's package sources
            raise PluginExecutionError.of(
                ErrorType.DEPENDENCY, "requires.packages may not name URLs (`name @ URL`):"
                " packages come from the deployment's index and find-links only",
                plugin_id=spec.id, environment=key, install_error="direct_reference",
                unmet_packages=[{"requirement": r, "installed": "none"} for r in direct])
        if not os.path.isdir(site):
            result = self._install(spec, key, wait_s=wait_s)
            site = result.site or site
        self._ready[key] = site
        self._mark_used(key)
        return site

    def note_use(self, spec: PluginSpec) -> None:
        """A run of the revision on a warm sandbox: its environment is in use (env_gc.py
        removes only environments unused for `env_keep_s`), marked once a minute."""
        if not spec.requires.packages:
            return
        revision = (spec.id, spec.revision)
        key = self._key_of.get(revision)
        if key is None:
            if len(self._key_of) >= KEYS_REMEMBERED:
                self._key_of.clear()
            key = self._key_of[revision] = environment_key(
                spec, sources=self.sources, interpreter=self.interpreter)
        self._mark_used(key)

    def _mark_used(self, key: str) -> None:
        """Its last use, for the sweep of unused environments (env_gc.py); once a minute."""
        now = time.monotonic()
        if now - self._marked.get(key, -env_gc.TOUCH_EVERY_S) >= env_gc.TOUCH_EVERY_S:
            self._marked[key] = now
            env_gc.mark_used(str(self.envs_dir), key)

    def current_keys(self, specs: list[PluginSpec]) -> set[str]:
        """The environments the registered revisions resolve to (never swept)."""
        return {environment_key(spec, sources=self.sources, interpreter=self.interpreter)
                for spec in specs if spec.isolation.sandboxed and spec.requires.packages}

    def _install(self, spec: PluginSpec, key: str, *, wait_s: float) -> InstallResult:
        if not self._uv_looked_up:
            self._uv, self._uv_looked_up = _uv_binary(), True
        request = InstallRequest(
            envs_dir=str(self.envs_dir), key=key,
            requirements=normalized_requirements(spec.requires.packages),
            interpreter=self.interpreter, timeout_s=self.install_timeout_s,
            index_url=self.sources.index_url, find_links=list(self.sources.find_links),
            uv=self._uv, cache_dir=str(self.root))
        # Its own session: a job that stops waiting (or a pool child killed) leaves the
        # install running to its end. Package-source variables of the worker's environment
        # (UV_*, PIP_*) are dropped: the settings are the only sources.
        env = {k: v for k, v in child_process_env().items()
               if not k.startswith(("UV_", "PIP_"))}
        proc = subprocess.Popen(
            [sys.executable, "-I", env_install.__file__], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            out, _ = proc.communicate(request.encode(), timeout=wait_s + self.helper_start_s)
        except subprocess.TimeoutExpired:
            raise PluginExecutionError.of(
                ErrorType.TIMEOUT, "the plugin's environment is still being installed (longer"
                " than setup_timeout_ms); the install goes on, and later jobs use it",
                plugin_id=spec.id, phase="environment", environment=key,
                limit="setup_timeout_ms", limit_value=spec.resource_limits.setup_timeout_ms,
            ) from None
        try:
            result = InstallResult.decode(out)
        except (ValueError, TypeError):
            result = InstallResult(ok=False, reason="error",
                                   message=f"the install helper exited {proc.returncode}")
        if not result.ok:
            raise PluginExecutionError.of(
                ErrorType.DEPENDENCY, "requires.packages cannot be installed: "
                + (result.message.strip().splitlines() or ["(no output)"])[-1].strip()[:500],
                plugin_id=spec.id, environment=key, install_error=result.reason,
                installer=result.installer, resolver_message=result.message,
                unmet_packages=unmet_from(list(spec.requires.packages), result.message))
        return result
