"""docker-compose.yml, the Dockerfile and the Kubernetes manifests, checked without a
Docker engine or a cluster: parsed, and their services, images, commands, ports, probes
and queues cross-checked against pluginpool itself (every command is parsed by the real
CLI parser; every queue is a registered example plugin's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pluginpool.pool.tools.cli import build_parser
from pluginpool.tasks.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
EXAMPLE_PLUGINS = {spec.id for spec in load_manifest(ROOT / "examples" / "plugins.toml")}


def cli_args(argv: list[str]) -> Any:
    """Parse a command as `pluginpool` would; a typo or unknown option fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a valid pluginpool command: {argv}")


def plugins_of(argv: list[str]) -> set[str]:
    args = cli_args(argv)
    assert args.command == "worker"
    assert args.plugins != "all", "worker groups name their plugins"
    plugins = set(args.plugins.split(","))
    assert plugins <= EXAMPLE_PLUGINS, plugins - EXAMPLE_PLUGINS
    return plugins


# -- Dockerfile ---------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    lines = []
    for raw in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        raw = raw.strip()
        if raw and not raw.startswith("#"):
            instruction, _, rest = raw.partition(" ")
            lines.append((instruction.upper(), rest.strip()))
    return lines


def test_dockerfile_runs_as_non_root_and_installs_the_project() -> None:
    instructions = dockerfile()
    kinds = [kind for kind, _ in instructions]
    assert kinds[0] == "FROM"
    user = [rest for kind, rest in instructions if kind == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    copied = {rest.split()[0] for kind, rest in instructions if kind == "COPY"}
    for source in copied:
        assert (ROOT / source).exists(), source
    assert {"policy", "tasks", "pool", "pyproject.toml"} <= copied
    assert any("pip install" in rest for kind, rest in instructions if kind == "RUN")
    entrypoint = [rest for kind, rest in instructions if kind == "ENTRYPOINT"][-1]
    # An init as PID 1 (tini, installed by the image): it reaps the zygote guardians
    # re-parented to it, which Celery's main process would leave as zombies.
    assert yaml.safe_load(entrypoint) == ["tini", "--", "pluginpool"]
    assert any("tini" in rest for kind, rest in instructions if kind == "RUN")
    cli_args(yaml.safe_load([rest for kind, rest in instructions if kind == "CMD"][-1]))
    exposed = {int(port) for kind, rest in instructions if kind == "EXPOSE"
               for port in rest.split()}
    assert exposed == {8008, 5555}


# -- docker-compose.yml -------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_has_the_whole_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "register", "worker", "worker-heavy", "aggregator",
                             "flower", "producer"}
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert "redis-data" in compose["volumes"]


def test_compose_commands_are_valid_pluginpool_commands(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        assert service["image"] == "pluginpool:latest" and service["build"] == "."
        args = cli_args(service["command"])
        assert service["environment"]["PLUGINPOOL_REDIS_URL"].startswith("redis://redis:")
        if args.command in ("aggregator", "flower"):
            published = {int(p.split(":")[-1]) for p in service["ports"]}
            assert published == {args.port}
            assert (args.host if args.command == "aggregator" else args.address) == "0.0.0.0"


def test_compose_workers_are_locked_down_and_split_into_groups(compose: dict[str, Any]) -> None:
    services = compose["services"]
    general = plugins_of(services["worker"]["command"])
    heavy = plugins_of(services["worker-heavy"]["command"])
    assert general and heavy and not general & heavy
    for name in ("worker", "worker-heavy"):
        service = services[name]
        profile = next(o for o in service["security_opt"] if o.startswith("seccomp="))
        assert (ROOT / profile.split("=", 1)[1]).is_file()
        assert "no-new-privileges:true" in service["security_opt"]
        assert service["cap_drop"] == ["ALL"] and service["read_only"] is True
        assert "/workspaces" in service["tmpfs"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["worker"]["healthcheck"]["test"][1:] == ["pluginpool", "check-health"]


# -- Kubernetes ---------------------------------------------------------------------------

def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / "base" / name):
            resources[(doc["kind"], doc["metadata"]["name"])] = doc
    assert all((K8S / "base" / f).is_file() for f in kustomization["resources"])
    return resources


def deployments(base: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for (kind, name), doc in base.items() if kind == "Deployment"}


def test_every_deployment_is_locked_down_limited_and_probed(base: Any) -> None:
    deps = deployments(base)
    assert set(deps) == {"worker-general", "worker-heavy", "aggregator", "flower"}
    for name, doc in deps.items():
        pod = doc["spec"]["template"]["spec"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= \
            doc["spec"]["template"]["metadata"]["labels"].items()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        [container] = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        cli_args(container["args"])
        readiness = container["readinessProbe"]["exec"]["command"]
        assert readiness == ["pluginpool", "check-health"], name
        assert "livenessProbe" in container


def test_worker_groups_have_their_own_plugins_probes_and_seccomp(base: Any) -> None:
    groups = {}
    for name, doc in deployments(base).items():
        if not name.startswith("worker-"):
            continue
        pod = doc["spec"]["template"]["spec"]
        [container] = pod["containers"]
        groups[name] = plugins_of(container["args"])
        liveness = " ".join(container["livenessProbe"]["exec"]["command"])
        assert "pluginpool check-health --worker" in liveness
        node = container["args"][container["args"].index("--name") + 1]
        assert node.split("@")[1] in liveness  # probes this very worker's heartbeat
        assert pod["securityContext"]["seccompProfile"]["type"] == "Localhost"
        assert pod["terminationGracePeriodSeconds"] >= 60  # running plugins may finish
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/workspaces" in mounts
    assert not groups["worker-general"] & groups["worker-heavy"]


def test_keda_scales_each_group_on_its_own_queues(base: Any) -> None:
    deps = deployments(base)
    scaled = {name: doc for (kind, name), doc in base.items() if kind == "ScaledObject"}
    assert set(scaled) == {"worker-general", "worker-heavy"}
    for name, doc in scaled.items():
        target = doc["spec"]["scaleTargetRef"]["name"]
        [container] = deps[target]["spec"]["template"]["spec"]["containers"]
        queues = {t["metadata"]["listName"] for t in doc["spec"]["triggers"]}
        assert all(t["type"] == "redis" for t in doc["spec"]["triggers"])
        assert queues == {f"plugins.{p}" for p in plugins_of(container["args"])}, name


def test_pdbs_and_services_select_existing_pods(base: Any) -> None:
    deps = deployments(base)
    labels = [doc["spec"]["template"]["metadata"]["labels"] for doc in deps.values()]
    for (kind, name), doc in base.items():
        if kind == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        elif kind == "Service":
            selector = doc["spec"]["selector"]
            target = next(d for d in deps.values() if selector.items() <=
                          d["spec"]["template"]["metadata"]["labels"].items())
            ports = {p["name"] for p in target["spec"]["template"]["spec"]["containers"][0]
                     ["ports"]}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports
        else:
            continue
        assert any(selector.items() <= pod.items() for pod in labels), (kind, name)


@pytest.mark.parametrize("overlay", ["production", "hpa"])
def test_overlays_reference_what_exists(overlay: str, base: Any) -> None:
    folder = K8S / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (folder / resource).exists(), resource
    for patch in kustomization.get("patches", []):
        assert (folder / patch["path"]).is_file()
        target = patch["target"]
        assert any(kind == target["kind"] and target.get("name", name) == name
                   for kind, name in base), target
    for extra in kustomization["resources"][1:]:
        for doc in load_all(folder / extra):
            if doc["kind"] == "HorizontalPodAutoscaler":
                assert (("Deployment", doc["spec"]["scaleTargetRef"]["name"]) in base)


def test_seccomp_profile_keeps_what_the_sandbox_needs() -> None:
    import json

    profile = json.loads((ROOT / "deploy" / "seccomp-worker.json").read_text())
    denied = {name for rule in profile["syscalls"] for name in rule["names"]
              if rule["action"] != "SCMP_ACT_ALLOW"}
    assert {"mount", "unshare", "ptrace", "bpf", "init_module"} <= denied
    assert not denied & {"fork", "clone", "prctl", "seccomp", "landlock_create_ruleset",
                         "landlock_add_rule", "landlock_restrict_self", "wait4"}


def test_flower_and_the_api_require_credentials(compose: dict[str, Any], base: Any) -> None:
    """Flower (basic auth, its API included) and the aggregator's API (tokens) are never
    open on the network: compose refuses to start without the secrets, Kubernetes reads them
    from Secrets."""
    services = compose["services"]
    flower_env = services["flower"]["environment"]
    assert flower_env["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "FLOWER_UNAUTHENTICATED_API" not in flower_env
    assert services["aggregator"]["environment"]["PLUGINPOOL_API_TOKENS"].startswith(
        "${PLUGINPOOL_API_TOKENS:?")
    for name, variable in (("flower", "FLOWER_BASIC_AUTH"),
                           ("aggregator", "PLUGINPOOL_API_TOKENS")):
        container = deployments(base)[name]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item for item in container.get("env", [])}
        assert env[variable]["valueFrom"]["secretKeyRef"]["key"] == variable
