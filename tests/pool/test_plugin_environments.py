"""Per-plugin-revision environments on a real prefork worker, installed for real by uv from
local wheels, with no network: `PLUGINPOOL_PACKAGE_INDEX_URL=none` and the wheels of
`ppdemo_dep` 1.0 and 2.0, built at test time, as the only find-links directory.

One worker for the module (2 pool processes), started before any plugin is registered,
with no plugin path: each plugin's code is an artifact, its packages an environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pluginpool.policy.errors import CircuitOpenError, ErrorType, PluginExecutionError
from pluginpool.pool.sandbox import env_install
from pluginpool.pool.sandbox.env_install import InstallRequest, InstallResult
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from tests.conftest import spawn_worker
from tests.fleet_packages import dependency_wheel, manifest, variant

PLUGIN_CODE = '''\
import sys


def sees(ctx, payload):
    try:
        import celery  # installed in the worker's environment, not in the plugin's
        celery_visible = True
    except ImportError:
        celery_visible = False
    return {"celery_visible": celery_visible, "no_site": bool(sys.flags.no_site)}


def run(ctx, payload):
    import ppdemo_dep
    return {"dep": ppdemo_dep.VERSION, "dep_file": ppdemo_dep.__file__, **sees(ctx, payload)}


def plain(ctx, payload):
    return {"ok": True}


class HangsInSetup:
    def __init__(self, ctx):
        import time
        time.sleep(3600)

    def run(self, ctx, payload):
        return "never"
'''


SWEEP_KEEP_S = 3.0
"""The module's worker sweeps every second the environments unused for this long that no
registered revision uses (pool/sandbox/env_gc.py): every other test's are current."""


@dataclass
class Envs:
    client: PluginClient
    worker: ManagedProcess
    root: Path
    wheels: Path
    plugin_wheel: Path

    @property
    def envs_dir(self) -> Path:
        return self.root / "cache" / "envs"

    def installs(self) -> list[dict[str, Any]]:
        log = self.envs_dir / env_install.INSTALL_LOG
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def register(self, plugin_id: str, requirements: list[str], *, wheel: Path | None = None,
                 entry: str = "run", **extra: object) -> None:
        table: dict[str, object] = {"name": plugin_id, "entrypoint": f"envpkg:{entry}",
                                    "source": str(wheel or self.plugin_wheel), **extra}
        if requirements:
            table["requires"] = {"packages": requirements}
        self.client.register(manifest(self.root / f"{plugin_id}.toml", {plugin_id: table}))


def plugin_wheel(root: Path) -> Path:
    from pluginpool.tasks.artifacts import build_wheel

    package = root / "plugin-src" / "envpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN_CODE, encoding="utf-8")
    work = root / "plugin-build"
    work.mkdir()
    return build_wheel(package, plugin_id="env-plugin", version="1.0", work_dir=work)


@pytest.fixture(scope="module")
def envs(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envs]:
    root = tmp_path_factory.mktemp("envs")
    wheels = root / "wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        shutil.copy(dependency_wheel(root / "dep-build", version=version), wheels)
    settings = Settings(_env_file=None, redis_url=redis_url,  # type: ignore[call-arg]
                        key_prefix=f"ppenv:{uuid.uuid4().hex[:8]}:", plugin_paths=[],
                        artifact_cache_dir=str(root / "cache"), package_index_url="none",
                        find_links=[str(wheels)], fleet_reconcile_s=2.0,
                        env_keep_s=SWEEP_KEEP_S, env_sweep_s=1.0)
    client = PluginClient(settings)
    worker = spawn_worker(client, root, concurrency=2)
    yield Envs(client, worker, root, wheels, plugin_wheel(root))
    worker.stop()
    client.close()


def test_conflicting_versions_each_see_their_own_on_one_worker(envs: Envs) -> None:
    """Two plugins requiring ppdemo_dep 1.0 and 2.0 run on the same worker; each imports
    its own version from its own environment, and neither sees the worker's packages."""
    envs.register("env-v1", ["ppdemo_dep==1.0"])
    envs.register("env-v2", ["ppdemo_dep==2.0"])
    jobs = {plugin: envs.client.submit(plugin, {}) for plugin in ("env-v1", "env-v2")}
    one, two = (jobs[p].result(timeout=30) for p in ("env-v1", "env-v2"))
    assert (one["dep"], two["dep"]) == ("1.0", "2.0")
    assert jobs["env-v1"].meta["worker"] == jobs["env-v2"].meta["worker"]
    envs_dir = str(envs.envs_dir.resolve())
    assert one["dep_file"].startswith(envs_dir) and two["dep_file"].startswith(envs_dir)
    assert Path(one["dep_file"]).parts[-4] != Path(two["dep_file"]).parts[-4]
    assert one["no_site"] and not one["celery_visible"]  # the worker's site-packages: hidden
    # A plugin without requirements sees the worker's site-packages, as it always did.
    envs.register("env-none", [], entry="sees")
    assert envs.client.submit("env-none", {}).result(timeout=30) == {
        "celery_visible": True, "no_site": False}


def test_a_second_run_reuses_the_environment(envs: Envs) -> None:
    """A new warm sandbox of the same revision (another instance) takes the environment as
    it is: no second install, the same directory (inode and mtime unchanged)."""
    envs.register("env-reuse", ["ppdemo_dep==1.0"],
                  wheel=variant(envs.plugin_wheel, envs.root / "reuse.whl", tag="reuse"))
    first = envs.client.submit("env-reuse", {})
    assert first.result(timeout=30)["dep"] == "1.0"
    env_dir = Path(first.result(timeout=1)["dep_file"]).parents[2]
    before = env_dir.stat()
    installs = [i for i in envs.installs() if i["key"] == env_dir.name]
    assert [(i["ok"], i["installed"]) for i in installs] == [(True, True)]
    for _ in range(2):
        iid = envs.client.load("env-reuse")  # a new zygote, so the environment is looked up
        assert envs.client.submit("env-reuse", {}, instance_id=iid).result(timeout=30)[
            "dep"] == "1.0"
    after = env_dir.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [i for i in envs.installs() if i["key"] == env_dir.name] == installs


def test_an_unresolvable_requirement_is_a_dependency_error_and_the_worker_lives_on(
        envs: Envs) -> None:
    """ppdemo_dep==3.0 exists nowhere: a `dependency` error with the resolver's own words,
    never retried, opening the plugin's breaker at once (as every dependency error does);
    the same worker process then serves other jobs."""
    pid = envs.worker.pid
    envs.register("env-bad", ["ppdemo_dep==3.0"], breaker={"open_ms": 60_000})
    job = envs.client.submit("env-bad", {})
    with pytest.raises(PluginExecutionError) as info:
        job.result(timeout=30)
    error = info.value
    assert error.type is ErrorType.DEPENDENCY
    assert error.details["attempt"] == 1
    assert error.details["install_error"] == "unresolvable"
    assert "ppdemo-dep==3.0" in error.details["resolver_message"]
    assert "unsatisfiable" in error.message
    assert error.details["unmet_packages"] == [
        {"requirement": "ppdemo_dep==3.0", "installed": "none"}]
    assert not [p for p in envs.envs_dir.iterdir() if p.name.startswith(".")]  # no scratch
    def refused_at_submit() -> bool:  # once this producer heard the breaker open (its
        try:  # transition and the job's result travel on two connections)
            envs.client.submit("env-bad", {})
        except CircuitOpenError:
            return True
        return False

    assert wait_until(refused_at_submit, timeout_s=15)
    envs.register("env-after", [], entry="plain")
    assert envs.client.submit("env-after", {}).result(timeout=30) == {"ok": True}
    assert envs.worker.alive() and envs.worker.pid == pid


def test_two_pool_processes_racing_for_a_new_environment_install_it_once(envs: Envs) -> None:
    """Two jobs of a new revision, on two instances, submitted at once to a worker with 2
    pool processes: both succeed, one install ran."""
    envs.register("env-race", ["ppdemo_dep==2.0"],
                  wheel=variant(envs.plugin_wheel, envs.root / "race.whl", tag="race"))
    jobs = [envs.client.submit("env-race", {}, instance_id=envs.client.load("env-race"))
            for _ in range(2)]
    results = [job.result(timeout=30) for job in jobs]
    assert [r["dep"] for r in results] == ["2.0", "2.0"]
    key = Path(results[0]["dep_file"]).parents[2].name
    lines = [i for i in envs.installs() if i["key"] == key]
    assert [i for i in lines if i["installed"]] == lines[:1] and lines[0]["ok"]
    assert all(i["ok"] and not i["installed"] for i in lines[1:])  # waited for the first


def test_helpers_waiting_on_the_lock_install_once(envs: Envs, tmp_path: Path) -> None:
    """The lock itself, made to be contended: two install helpers (real processes, real uv)
    start while the environment's lock is held; once released, one installs and the
    other finds the environment there."""
    import fcntl

    import uv

    request = InstallRequest(
        envs_dir=str(tmp_path / "envs"), key="contended", requirements=["ppdemo-dep==1.0"],
        interpreter=sys.executable, timeout_s=60, index_url="none",
        find_links=[str(envs.wheels)], uv=uv.find_uv_bin(), cache_dir=str(tmp_path))
    os.makedirs(request.envs_dir)
    lock = os.open(os.path.join(request.envs_dir, "contended.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    helpers = [subprocess.Popen([sys.executable, "-I", env_install.__file__],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for _ in range(2)]
    for helper in helpers:
        assert helper.stdin is not None
        helper.stdin.write(request.encode())
        helper.stdin.close()
    lock_path = os.path.realpath(os.path.join(request.envs_dir, "contended.lock"))

    def holds_lock_file(pid: int) -> bool:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        return any(_readlink(f"/proc/{pid}/fd/{fd}") == lock_path for fd in fds)

    assert wait_until(lambda: all(holds_lock_file(h.pid) for h in helpers), timeout_s=20)
    assert all(helper.poll() is None for helper in helpers)  # waiting, not installing
    os.close(lock)
    results = []
    for helper in helpers:
        assert helper.stdout is not None and helper.wait(timeout=30) == 0
        results.append(InstallResult.decode(helper.stdout.read()))
        helper.stdout.close()
    assert all(r.ok for r in results)
    assert sorted(r.installed for r in results) == [False, True]
    log = (Path(request.envs_dir) / env_install.INSTALL_LOG).read_text().splitlines()
    assert sorted(json.loads(line)["installed"] for line in log) == [False, True]


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_a_job_that_stops_waiting_leaves_the_install_to_land(envs: Envs, tmp_path: Path) -> None:
    """An install that outlasts the job's wait (here: another holder of the lock) fails
    that job with `timeout` (phase environment) without touching the install, which lands
    once it can; the next lookup finds it without installing again."""
    import fcntl

    from pluginpool.pool.sandbox.environments import Environments, PackageSources
    from pluginpool.tasks.spec import PluginSpec

    environments = Environments(tmp_path, sources=PackageSources("none", (str(envs.wheels),)),
                                interpreter=sys.executable, install_timeout_s=60,
                                helper_start_s=0.5)
    spec = PluginSpec.model_validate({"id": "slow", "name": "slow", "entrypoint": "m:f",
                                      "requires": {"packages": ["ppdemo_dep==2.0"]}})
    (tmp_path / "envs").mkdir(mode=0o700)
    tmp_path.chmod(0o700)
    lock = os.open(tmp_path / "envs" / f"{_key(environments, spec)}.lock",
                   os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    with pytest.raises(PluginExecutionError) as info:
        environments.site_for(spec, wait_s=0.5)
    assert info.value.type is ErrorType.TIMEOUT
    assert info.value.details["phase"] == "environment"
    os.close(lock)
    site = env_install.site_of(str(tmp_path / "envs"), _key(environments, spec))
    assert wait_until(lambda: os.path.isdir(site), timeout_s=30)
    assert environments.site_for(spec, wait_s=5) == site
    assert len((tmp_path / "envs" / env_install.INSTALL_LOG).read_text().splitlines()) == 1


def test_without_uv_pip_installs_the_environment(envs: Envs, tmp_path: Path) -> None:
    """The fallback installer (`python -m pip install --target`) gives the same layout."""
    request = InstallRequest(
        envs_dir=str(tmp_path / "envs"), key="pip", requirements=["ppdemo-dep==2.0"],
        interpreter=sys.executable, timeout_s=60, index_url="none",
        find_links=[str(envs.wheels)], uv=None, cache_dir=str(tmp_path))
    result = env_install.install(request)
    assert result.ok and result.installed and result.installer == "pip"
    assert result.site is not None
    assert (Path(result.site) / "ppdemo_dep" / "__init__.py").read_text() == "VERSION = '2.0'\n"


def _key(environments: Any, spec: Any) -> str:
    from pluginpool.pool.sandbox.environments import environment_key

    return environment_key(spec, sources=environments.sources,
                           interpreter=environments.interpreter)


def test_a_requirement_naming_a_url_is_refused(tmp_path: Path) -> None:
    """`name @ URL` would fetch from anywhere, past the deployment's package sources (an
    offline deployment included): refused before any install, a `dependency` error."""
    from pluginpool.pool.sandbox.environments import Environments, PackageSources
    from pluginpool.tasks.spec import PluginSpec

    environments = Environments(tmp_path / "cache", sources=PackageSources("none", ()),
                                interpreter=sys.executable, install_timeout_s=60)
    spec = PluginSpec.model_validate({
        "id": "url", "name": "url", "entrypoint": "m:f", "requires": {"packages": [
            "ppdemo_dep @ https://example.invalid/ppdemo_dep-1.0-py3-none-any.whl"]}})
    with pytest.raises(PluginExecutionError) as info:
        environments.site_for(spec, wait_s=5)
    assert info.value.type is ErrorType.DEPENDENCY
    assert info.value.details["install_error"] == "direct_reference"
    assert not (tmp_path / "cache" / "envs").exists()


def test_a_requirement_naming_a_url_is_refused_at_register(client: PluginClient) -> None:
    """Before, it registered and every job failed at the worker (above, which stays for a
    spec registered before this check)."""
    from pluginpool.policy.errors import ManifestError, UnknownPluginError
    from pluginpool.tasks.spec import PluginSpec

    spec = PluginSpec.model_validate({
        "id": "url-at-register", "name": "url", "entrypoint": "m:f", "requires": {
            "packages": ["ppdemo_dep @ file:///tmp/ppdemo_dep-1.0-py3-none-any.whl"]}})
    with pytest.raises(ManifestError) as info:
        client.register(spec)
    assert "names a URL" in str(info.value)
    with pytest.raises(UnknownPluginError):
        client.spec("url-at-register")


def test_an_environment_no_registered_revision_uses_is_swept_once_unused(envs: Envs) -> None:
    """A new revision with other requirements gets a new environment; the old revision's is
    removed from disk once unused for env_keep_s, the current one stays and is reused."""
    wheel = variant(envs.plugin_wheel, envs.root / "sweep.whl", tag="sweep")
    envs.register("env-sweep", ["ppdemo_dep==1.0"], wheel=wheel)
    old = Path(envs.client.submit("env-sweep", {}).result(timeout=30)["dep_file"]).parents[2]
    envs.register("env-sweep", ["ppdemo_dep==2.0"], wheel=wheel)
    assert wait_until(lambda: envs.client.submit("env-sweep", {}).result(timeout=30)[
        "dep"] == "2.0", timeout_s=30)
    new = Path(envs.client.submit("env-sweep", {}).result(timeout=30)["dep_file"]).parents[2]
    assert new != old and old.is_dir()
    assert wait_until(lambda: not old.exists(), timeout_s=SWEEP_KEEP_S + 30), \
        "the old revision's environment was not swept"
    assert wait_until(lambda: not [p for p in envs.envs_dir.iterdir()  # renamed, then deleted
                                   if p.name.startswith(f".{old.name}")], timeout_s=30)
    installs = [i for i in envs.installs() if i["key"] == new.name and i["installed"]]
    time.sleep(SWEEP_KEEP_S + 2)  # past its keep time: still there, being current
    assert new.is_dir()
    assert envs.client.submit("env-sweep", {}, instance_id=envs.client.load("env-sweep")
                              ).result(timeout=30)["dep"] == "2.0"
    assert [i for i in envs.installs() if i["key"] == new.name and i["installed"]] == installs


def test_a_setup_after_a_long_install_gets_what_is_left_of_its_budget(envs: Envs) -> None:
    """An install that took most of `setup_timeout_ms` (here: it waited 4 s of 6 on another
    holder of its lock) leaves the setup the rest, at least 1 s: a setup that hangs is
    stopped as a setup timeout, before Celery's soft limit (setup 6 s + run 1 s + 2 s)
    would end the job. Given the whole 6 s after the install, it reached the soft limit."""
    import fcntl

    from pluginpool.pool.sandbox.environments import Environments, PackageSources

    envs.register("env-prime", ["ppdemo_dep==1.0"])  # the worker has its envs directory
    assert envs.client.submit("env-prime", {}).result(timeout=60)["dep"] == "1.0"
    envs.register("env-late-setup", ["ppdemo_dep>=1.0,<2"], entry="HangsInSetup",
                  wheel=variant(envs.plugin_wheel, envs.root / "late.whl", tag="late"),
                  resource_limits={"setup_timeout_ms": 6000, "timeout_ms": 1000})
    spec = envs.client.spec("env-late-setup")
    settings = envs.client.settings
    environments = Environments(envs.root / "unused",
                                sources=PackageSources.from_settings(settings),
                                interpreter=sys.executable, install_timeout_s=60)
    lock = os.open(envs.envs_dir / f"{_key(environments, spec)}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        job = envs.client.submit("env-late-setup", {})
        time.sleep(4.0)
    finally:
        os.close(lock)
    with pytest.raises(PluginExecutionError) as info:
        job.result(timeout=60)
    elapsed = time.monotonic() - started
    assert info.value.type is ErrorType.TIMEOUT
    assert info.value.details["phase"] == "setup"
    assert info.value.message == "setup exceeded its time limit and was killed"
    assert elapsed < spec.deadlines.celery_soft_s, elapsed
    # Cut on what was left (at least 1 s), not on the whole 6 s: the install did wait.
    assert info.value.details["usage"]["wall_ms"] < 4500, info.value.details["usage"]
