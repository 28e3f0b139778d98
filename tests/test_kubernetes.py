"""deploy/kubernetes, checked without a cluster: every overlay (and each with every component) renders
with `kubectl kustomize`, and each object validates strictly against Kubernetes K8S_VERSION's schemas; every
smartspec container runs a command this CLI accepts, with the flags `smartspec up` gives its children,
configured only by variables that name real flags; probes, ports and Services match what the services
bind; the router finds its verifier and drafters by DNS through headless Services; NetworkPolicies let
only the router reach them; the GPU overlay puts one GPU under each model service."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from router.discovery import parse_address
from router.server import parse_drafters
from smartspec.config import ENV_PREFIX, env_name
from tests.cli_surface import NOT_FLAGS, flags, given_flags, parse_service, up_flags

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir())
COMPONENTS = sorted(path.name for path in (KUBERNETES / "components").iterdir())
# The Kubernetes version whose schemas every object must satisfy (kubernetes-validate ships them).
K8S_VERSION = "1.33"
# What $(POD_NAMESPACE) and a Secret's value stand for when a container's command line is parsed here.
NAMESPACE = "cell-a"
SECRET = "from-a-secret"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CACHE_DIR = re.search(r"SMARTSPEC_CACHE_DIR=(\S+)", DOCKERFILE).group(1)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The API groups of built-in kinds these manifests may use: no custom resources.
BUILT_IN = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}
# The router's close after its drain waits this long at most for the step in progress (Scheduler.close).
CLOSE_S = 10

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

VARIANTS = [*OVERLAYS, *(f"{overlay}+{'+'.join(COMPONENTS)}" for overlay in OVERLAYS)]


Docs = tuple[dict[str, Any], ...]


def render(variant: str, scratch: Path) -> Docs:
    """The objects `kubectl kustomize` renders for an overlay, or for 'OVERLAY+COMPONENT+...' (a
    kustomization written under `scratch` that adds those components to the overlay)."""
    overlay, *components = variant.split("+")
    root = KUBERNETES / "overlays" / overlay
    if components:
        root = scratch / variant
        root.mkdir()
        relative = lambda path: os.path.relpath(path, root)  # noqa: E731 (kustomize refuses absolute paths)
        (root / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [relative(KUBERNETES / "overlays" / overlay)],
            "components": [relative(KUBERNETES / "components" / name) for name in components],
        }))
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {variant}: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Docs]:
    scratch = tmp_path_factory.mktemp("kustomize")
    return {variant: render(variant, scratch) for variant in VARIANTS}


def objects(docs: Docs, kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in docs if obj["kind"] == kind}


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and In/NotIn/Exists expressions) against a pod's labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) or (op == "Exists" and value is None):
            return False
    return True


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


class Container:
    """A smartspec container of a rendered workload: its command line with $(VAR) expanded and its
    environment as the process sees it (envFrom ConfigMaps, then env; Secrets and fields as placeholders)."""

    def __init__(self, docs: Docs, workload: dict, spec: dict) -> None:
        self.workload, self.spec, self.pod = workload, spec, workload["spec"]["template"]["spec"]
        self.name = workload["metadata"]["name"]
        configmaps = objects(docs, "ConfigMap")
        self.env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            self.env.update(configmaps[source["configMapRef"]["name"]]["data"])
        self.secret_env: set[str] = set()
        for var in spec.get("env", []):
            if "value" in var:
                self.env[var["name"]] = var["value"]
            elif "secretKeyRef" in var["valueFrom"]:
                self.env[var["name"]] = SECRET
                self.secret_env.add(var["name"])
            else:
                assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", var
                self.env[var["name"]] = NAMESPACE
        self.argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: self.env[m.group(1)], part) for part in spec["args"]]
        self.smartspec_env = {key: value for key, value in self.env.items() if key.startswith(ENV_PREFIX)}

    def parse(self, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
        return parse_service(self.argv, self.smartspec_env, monkeypatch)

    def port(self, name: str) -> int:
        return next(port["containerPort"] for port in self.spec["ports"] if port["name"] == name)

    @property
    def role(self) -> str:
        """verifier, router, or the drafter's kind."""
        return self.argv[self.argv.index("--kind") + 1] if self.argv[1] == "drafter" else self.argv[1]


def containers(docs: Docs) -> Iterator[Container]:
    for workload in objects(docs, "Deployment").values():
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            if spec["image"].split(":")[0] == "smartspec":
                yield Container(docs, workload, spec)


def by_role(docs: Docs) -> dict[str, Container]:
    found = {container.role: container for container in containers(docs)}
    assert set(found) == {"router", "verifier", "prompt_lookup", "draft_model", "tree"}, sorted(found)
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_strictly_against_the_named_kubernetes_version(variant, rendered):
    docs = rendered[variant]
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    assert f"{K8S_VERSION}.0" in all_versions(), f"kubernetes-validate has no schemas for {K8S_VERSION}"
    for obj in docs:
        assert obj["apiVersion"] in BUILT_IN and obj["kind"] != "CustomResourceDefinition", f"{obj['kind']} {obj['apiVersion']}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as err:
            pytest.fail(f"{variant}: {obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {K8S_VERSION}: {err}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_a_valid_serve_command_with_real_flags_and_what_up_gives_its_children(variant, rendered, monkeypatch):
    docs = rendered[variant]
    wanted = up_flags(redis_url="redis://redis:6379/0")
    for role, container in by_role(docs).items():
        args = container.parse(monkeypatch)
        assert (args.command, args.host) == ("serve", "0.0.0.0"), f"{container.name} must bind all interfaces in its pod"
        assert args.port == container.port("grpc"), container.name
        unknown = set(container.smartspec_env) - {env_name(flag) for flag in flags(args)} - NOT_FLAGS
        assert not unknown, f"{container.name}: {sorted(unknown)} name no flag of `smartspec {' '.join(container.argv[:2])}`"
        missing = wanted[role] - given_flags(container.argv, container.smartspec_env, args)
        assert not missing, f"{container.name} does not set {sorted(missing)}, which `smartspec up` gives its {role}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_check_health_on_the_bound_port_allow_a_model_load_and_survive_a_busy_forward(variant, rendered, monkeypatch):
    docs = rendered[variant]
    for container in by_role(docs).values():
        args = container.parse(monkeypatch)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec[kind]
            if args.command == "serve" and getattr(args, "tls_cert", ""):  # kubelet's gRPC probes cannot speak TLS
                assert probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}, (container.name, kind)
                assert container.port("http") == args.http_port
            else:
                assert probe["grpc"] == {"port": args.port}, (container.name, kind)
        startup, liveness = container.spec["startupProbe"], container.spec["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, f"{container.name}: too short for a model load"
        if container.role == "router":
            assert startup["periodSeconds"] * startup["failureThreshold"] >= args.startup_timeout_s
        assert liveness["timeoutSeconds"] >= 10 and liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, container.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_outlasts_the_prestop_delay_and_the_drain(variant, rendered, monkeypatch):
    docs = rendered[variant]
    for container in by_role(docs).values():
        args = container.parse(monkeypatch)
        command = container.spec["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", container.name
        # The router drains its batch (grace), closes its loop, then its calls (grace); a worker its calls.
        drain = 2 * args.grace_s + CLOSE_S if container.role == "router" else args.grace_s
        assert container.pod["terminationGracePeriodSeconds"] > int(command[1]) + drain, container.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_router_finds_its_replicas_by_dns_through_headless_services_on_the_ports_they_bind(variant, rendered, monkeypatch):
    docs = rendered[variant]
    roles = by_role(docs)
    router = roles["router"].parse(monkeypatch)
    services = objects(docs, "Service")
    targets = {"verifier": address for address in router.verifier} | parse_drafters(router.drafter_address)
    assert len(router.verifier) == 1 and set(targets) == {"verifier", "prompt_lookup", "draft_model", "tree"}
    for role, address in targets.items():
        target = parse_address(address)
        assert target is not None and target.resolver is None, f"{role}: {address} is not dns:///NAME:PORT"
        name, namespace, *rest = target.name.split(".")
        assert namespace == NAMESPACE and rest == ["svc", "cluster", "local"], address
        service, container = services[name], roles[role]
        assert service["spec"]["clusterIP"] == "None", f"{name} must be headless: DNS then answers with every ready pod"
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(container.workload)), name
        (port,) = service["spec"]["ports"]
        assert port["port"] == target.port and container.port(port["targetPort"]) == container.parse(monkeypatch).port, address
        assert not service["spec"].get("publishNotReadyAddresses"), f"{name}: a pod still loading must not be in DNS"


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_service_in_front_of_the_routers_serves_grpc_and_http_and_the_token_and_tls_come_from_secrets(variant, rendered, monkeypatch):
    docs = rendered[variant]
    router = by_role(docs)["router"]
    args = router.parse(monkeypatch)
    (front,) = [s for s in objects(docs, "Service").values() if s["spec"].get("clusterIP") != "None"
                and matches({"matchLabels": s["spec"]["selector"]}, pod_labels(router.workload))]
    ports = {port["name"]: router.port(port["targetPort"]) for port in front["spec"]["ports"]}
    assert ports["grpc"] == args.port and ports["http"] == args.http_port and ports["metrics"] == args.metrics_port
    assert args.auth_token == SECRET and env_name("--auth-token") in router.secret_env
    volumes = {volume["name"]: volume for volume in router.pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in router.spec["volumeMounts"]}
    for path in filter(None, (args.tls_cert, args.tls_key)):
        assert "secret" in mounts[str(Path(path).parent)], f"{path} is not read from a Secret"
    assert bool(args.tls_cert) == ("tls" in variant.split("+"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_pod_has_its_own_cache_resources_and_the_images_user(variant, rendered, monkeypatch):
    docs = rendered[variant]
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1)
    for container in by_role(docs).values():
        volumes = {volume["name"]: volume for volume in container.pod["volumes"]}
        (cache,) = [m for m in container.spec["volumeMounts"] if m["mountPath"] == CACHE_DIR]
        assert "emptyDir" in volumes[cache["name"]] and container.env["SMARTSPEC_CACHE_DIR"] == CACHE_DIR, container.name
        resources = container.spec["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], container.name
        assert str(container.pod["securityContext"]["runAsUser"]) == uid, container.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_router_reaches_the_verifiers_and_drafters_and_dns_redis_and_the_collector_stay_reachable(variant, rendered, monkeypatch):
    docs = rendered[variant]
    roles = by_role(docs)
    router = roles["router"]
    args = router.parse(monkeypatch)
    policies = objects(docs, "NetworkPolicy").values()

    def rules(pod: dict[str, str], direction: str) -> list[dict] | None:
        """The rules of every policy that isolates `pod` in `direction` (None: not isolated)."""
        chosen = [p for p in policies if matches(p["spec"]["podSelector"], pod) and direction.capitalize() in p["spec"]["policyTypes"]]
        return None if not chosen else [rule for p in chosen for rule in p["spec"].get(direction, [])]

    def allows(rule_list: list[dict] | None, port: int, peer: dict[str, str] | None, protocol: str = "TCP") -> bool:
        """Whether traffic on `port` from/to a pod labelled `peer` (None: outside the cell) is allowed."""
        if rule_list is None:
            return True
        for rule in rule_list:
            peers = rule.get("from", rule.get("to"))
            peer_ok = peers is None or (peer is not None and any("podSelector" in p and matches(p["podSelector"], peer) for p in peers))
            if peer_ok and any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in rule["ports"]):
                return True
        return False

    router_labels = pod_labels(router.workload)
    otlp_port = int(args.otlp_endpoint.rsplit(":", 1)[1])
    redis_port = int(args.redis_url.split("//", 1)[1].split("/")[0].rsplit(":", 1)[1])
    for role, worker in roles.items():
        if role == "router":
            continue
        port, labels = worker.parse(monkeypatch).port, pod_labels(worker.workload)
        assert allows(rules(labels, "ingress"), port, router_labels) and allows(rules(router_labels, "egress"), port, labels), role
        assert not allows(rules(labels, "ingress"), port, None), f"{role} is reachable from outside its cell"
        other = {**labels, "app.kubernetes.io/component": "client"}  # another pod of the namespace
        assert not allows(rules(labels, "ingress"), port, other), f"{role} is reachable by pods other than the router"
        for protocol in ("UDP", "TCP"):
            assert allows(rules(labels, "egress"), 53, None, protocol), f"{role}: DNS over {protocol}"
        assert allows(rules(labels, "egress"), otlp_port, None), f"{role}: the collector"
    for protocol in ("UDP", "TCP"):
        assert allows(rules(router_labels, "egress"), 53, None, protocol)
    assert allows(rules(router_labels, "egress"), redis_port, None) and allows(rules(router_labels, "egress"), otlp_port, None)
    assert allows(rules(router_labels, "ingress"), args.port, None) and allows(rules(router_labels, "ingress"), args.http_port, None)
    (redis,) = [d for d in objects(docs, "Deployment").values() if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:")]
    assert allows(rules(pod_labels(redis), "ingress"), redis_port, router_labels)


@pytest.mark.parametrize("variant", VARIANTS)
def test_verifiers_and_drafters_have_disruption_budgets_and_redis_is_where_the_router_looks(variant, rendered, monkeypatch):
    docs = rendered[variant]
    budgets = objects(docs, "PodDisruptionBudget").values()
    roles = by_role(docs)
    for role, container in roles.items():
        if role != "router":
            assert any(matches(b["spec"]["selector"], pod_labels(container.workload)) for b in budgets), f"{role} has no PodDisruptionBudget"
    host_port = roles["router"].parse(monkeypatch).redis_url.split("//", 1)[1].split("/")[0]
    host, port = host_port.rsplit(":", 1)
    assert objects(docs, "Service")[host]["spec"]["ports"][0]["port"] == int(port)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gpu_overlay_runs_each_model_service_on_one_gpu_in_bfloat16_from_a_read_many_volume(variant, rendered, monkeypatch):
    docs = rendered[variant]
    gpu = variant.split("+")[0] == "gpu"
    for role, container in by_role(docs).items():
        args = container.parse(monkeypatch)
        image_tag = container.spec["image"].split(":")[1]
        assert image_tag == (f"{VERSION}-cuda" if gpu else VERSION), f"{container.name}: {container.spec['image']}"
        gpus = container.spec["resources"].get("limits", {}).get("nvidia.com/gpu")
        if role in ("verifier", "draft_model", "tree"):
            assert (args.device, args.dtype) == (("cuda", "bfloat16") if gpu else ("cpu", "float32")), container.name
            assert gpus == (1 if gpu else None), container.name
            model = args.target_model if role == "verifier" else args.draft_model
            if not gpu:
                assert model == "embedded"
                continue
            claims = objects(docs, "PersistentVolumeClaim")
            volumes = {v["name"]: v for v in container.pod["volumes"]}
            (mount,) = [m for m in container.spec["volumeMounts"] if model.startswith(m["mountPath"] + "/")]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert mount["readOnly"] and claim["readOnly"] and claims[claim["claimName"]]["spec"]["accessModes"] == ["ReadOnlyMany"]
        else:
            assert gpus is None, f"{container.name} needs no GPU"
    roles = by_role(docs)
    assert roles["router"].parse(monkeypatch).target_model == roles["verifier"].parse(monkeypatch).target_model


def test_the_collector_component_runs_the_compose_collector_with_its_config_and_turns_tracing_on(rendered, monkeypatch):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["otel-collector"]
    for variant, docs in rendered.items():
        deployments, services = objects(docs, "Deployment"), objects(docs, "Service")
        for container in by_role(docs).values():
            args = container.parse(monkeypatch)
            if "otel-collector" not in variant:
                assert args.trace_exporter == "off" and "otel-collector" not in deployments
                continue
            assert args.trace_exporter == "otlp", container.name
            host, port = args.otlp_endpoint.removeprefix("http://").rsplit(":", 1)
            assert services[host]["spec"]["ports"][0]["port"] == int(port)
        if "otel-collector" in variant:
            (collector,) = deployments["otel-collector"]["spec"]["template"]["spec"]["containers"]
            assert collector["image"] == compose["image"] and collector["args"] == compose["command"]
            source = compose["volumes"][0].split(":")[0]
            config = next(c for c in objects(docs, "ConfigMap").values() if c["metadata"]["name"].startswith("otel-collector-config"))
            assert config["data"]["config.yaml"] == (ROOT / source).read_text()
