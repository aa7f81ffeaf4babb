"""Per-plugin-revision environments: what the first job of a revision with
`requires.packages` costs when its environment is new on the host (the install), and when
it is cached, beside the same revision with no requirements.

One `pluginpool worker --plugins 'env-*'` (2 processes), no package index
(`PLUGINPOOL_PACKAGE_INDEX_URL=none`), local wheels as the only find-links directory.
Each round registers plugins whose code is a fresh artifact (so a fresh environment key)
and times submit → result of one job each:

- `no_requirements`: a new revision without requirements (its zygote starts);
- `new_environment`: a new revision requiring the package set: install, then as above;
- `cached_environment`: a new instance of that revision (another zygote) finds it built.

Two package sets: one small package (`ppdemo_dep`), and five packages of 50 modules each.
The first round starts with an empty installer cache; later rounds reuse the downloaded
wheels (as a worker host does), but never an environment. The installer alone (the
install helper run directly, uv and the pip fallback) is timed on the same sets.
Run: `python -m bench.environments [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.common import bench_redis_url, pluginpool_worker, write_result
from pluginpool.pool.sandbox import env_install
from pluginpool.tasks.artifacts import build_wheel
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from pluginpool.tasks.spec import PluginSpec

PLUGIN_CODE = ("def run(ctx, payload):\n"
               "    import importlib\n"
               "    return [importlib.import_module(n).VERSION for n in payload['modules']]\n")
WIDE = [f"ppbench_wide{n}" for n in range(5)]
SETS = {"one_package": (["ppdemo_dep==1.0"], ["ppdemo_dep"]),
        "five_packages_250_modules": ([f"{n}==1.0" for n in WIDE], WIDE)}


def dependency_wheel(root: Path, name: str, *, modules: int) -> Path:
    project = root / f"{name}-src"
    package = project / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = '1.0'\n" + "".join(
        f"from . import m{i}\n" for i in range(modules)))
    for i in range(modules):
        (package / f"m{i}.py").write_text(
            "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n\n" for j in range(40)))
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\n')
    work = root / f"{name}-build"
    work.mkdir()
    return build_wheel(project, plugin_id=name.replace("_", "-"), version="1.0", work_dir=work)


def plugin_wheel(root: Path) -> bytes:
    package = root / "plugin" / "envbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN_CODE)
    work = root / "plugin-build"
    work.mkdir()
    return build_wheel(package, plugin_id="envbench", version="1.0",
                       work_dir=work).read_bytes()


def fresh_artifact(data: bytes, out: Path, tag: str) -> str:
    """The same wheel with another zip comment: same code, a new sha256 (a new key)."""
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = tag.encode()
    out.write_bytes(buffer.getvalue())
    return str(out)


def first_job_ms(client: PluginClient, plugin_id: str, modules: list[str],
                 instance_id: str | None = None) -> float:
    started = time.perf_counter()
    client.submit(plugin_id, {"modules": modules}, instance_id=instance_id).result(timeout=120)
    return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> dict[str, object]:
    return {"first_ms": round(samples[0], 1), "p50_ms": round(statistics.median(samples), 1),
            "max_ms": round(max(samples), 1), "samples_ms": [round(s, 1) for s in samples]}


def through_worker(client: PluginClient, root: Path, code: bytes, rounds: int
                   ) -> dict[str, object]:
    out: dict[str, object] = {}
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in SETS}
    for n in range(rounds):
        for set_name, (requirements, modules) in SETS.items():
            for kind, reqs in (("no_requirements", []), ("new_environment", requirements)):
                plugin_id = f"env-{set_name.split('_')[0]}-{kind.split('_')[0]}-{n}"
                source = fresh_artifact(code, root / f"{plugin_id}.whl", plugin_id)
                client.register(PluginSpec(
                    id=plugin_id, name=plugin_id, entrypoint="envbench:run", source=source,
                    requires={"packages": reqs}))  # type: ignore[arg-type]
                mods = modules if reqs else []
                timings[set_name].setdefault(kind, []).append(
                    first_job_ms(client, plugin_id, mods))
                if reqs:
                    timings[set_name].setdefault("cached_environment", []).append(
                        first_job_ms(client, plugin_id, mods, client.load(plugin_id)))
    for set_name, kinds in timings.items():
        out[set_name] = {kind: summary(samples) for kind, samples in kinds.items()}
    return out


def installer_alone(root: Path, wheels: Path, rounds: int) -> dict[str, object]:
    import uv

    out: dict[str, object] = {}
    for installer, binary in (("uv", str(uv.find_uv_bin())), ("pip", None)):
        cache = root / f"alone-{installer}"
        for set_name, (requirements, _) in SETS.items():
            samples = []
            for n in range(rounds):
                request = env_install.InstallRequest(
                    envs_dir=str(cache / "envs"), key=f"{set_name}-{n}",
                    requirements=requirements, interpreter=sys.executable, timeout_s=300,
                    index_url="none", find_links=[str(wheels)], uv=binary,
                    cache_dir=str(cache))
                result = env_install.install(request)
                if not result.ok:
                    sys.exit(f"{installer} failed: {result.message}")
                samples.append(result.seconds * 1000)
            out[f"{installer}_{set_name}"] = summary(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pp-bench-envs-"))
    wheels = root / "wheels"
    wheels.mkdir()
    for wheel in [dependency_wheel(root, "ppdemo_dep", modules=0),
                  *(dependency_wheel(root, name, modules=50) for name in WIDE)]:
        (wheels / wheel.name).write_bytes(wheel.read_bytes())
    url = bench_redis_url(root)
    cache = root / "cache"
    settings = Settings(_env_file=None, redis_url=url,  # type: ignore[call-arg]
                        artifact_cache_dir=str(cache))
    env = {**os.environ, "PLUGINPOOL_REDIS_URL": url, "PLUGINPOOL_PLUGIN_PATHS": "[]",
           "PLUGINPOOL_ARTIFACT_CACHE_DIR": str(cache), "PLUGINPOOL_PACKAGE_INDEX_URL": "none",
           "PLUGINPOOL_FIND_LINKS": json.dumps([str(wheels)])}
    code = plugin_wheel(root)
    with PluginClient(settings) as client:
        worker = pluginpool_worker(client, env, root, plugins="env-*", concurrency=2,
                                   node="bench-envs@localhost")
        try:
            result: dict[str, object] = {
                "first_job": through_worker(client, root, code, args.rounds)}
        finally:
            worker.stop()
    log = cache / "envs" / env_install.INSTALL_LOG
    installs = [json.loads(line) for line in log.read_text().splitlines()]
    result["installs_in_worker"] = {
        "count": sum(1 for i in installs if i["installed"]),
        "installer_p50_ms": round(statistics.median(
            i["seconds"] * 1000 for i in installs if i["installed"]), 1)}
    result["installer_alone"] = installer_alone(root, wheels, args.rounds)
    result["note"] = json.dumps({"rounds": args.rounds, "concurrency": 2,
                                 "load_average": os.getloadavg()[0]})
    write_result("environments", result)


if __name__ == "__main__":
    main()
