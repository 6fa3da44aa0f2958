"""compose.yaml and deploy/env.example: valid by the compose specification's schema, and in agreement
with the code they deploy (variable names, console scripts, ports, routes, health checks).

The schema is the compose-spec JSON schema that check-jsonschema ships (its vendored copy of
compose-spec/compose-spec ``schema/compose-spec.json``), validated with jsonschema.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import pytest
from deploy.render_nginx import LOCATIONS, TEMPLATE, placeholders, relay_servers

from rapidphoto_contract.settings import RelayConfig, WorkerConfig
from tests.deploy.files import (
    DEPLOYABLES,
    ENV_EXAMPLE,
    ROOT,
    compose_raw,
    compose_resolved,
    console_scripts,
    environment_of,
    interpolated_variables,
    read_dotenv,
    stages,
)

#: Variables compose.yaml interpolates that are not settings of our processes (env.example marks
#: them "compose only").
COMPOSE_ONLY = {"RAPIDPHOTO_PUBLIC_PORT", "REDIS_MAXMEMORY", "RAPIDPHOTO_REDIS_URL"}
SECRET = "compose-test-secret-at-least-32-bytes-long-xx"


class _Recording(dict[str, str]):
    """An empty environment that remembers every name it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def variables_read_by(config: type[RelayConfig | WorkerConfig]) -> set[str]:
    """Every variable ``config.from_env`` reads: PROTOCOL §2's names, as the code spells them."""
    env = _Recording()
    config.from_env(env)
    return env.asked


#: What each deployable reads.
READS: dict[str, type[RelayConfig | WorkerConfig]] = {
    "rapidphoto-relay": RelayConfig,
    "rapidphoto-worker": WorkerConfig,
}


def settings_variables() -> set[str]:
    """Every variable a deployable reads."""
    return set().union(*(variables_read_by(config) for config in READS.values()))


def example_env() -> dict[str, str]:
    env = read_dotenv(ENV_EXAMPLE)
    env["JWT_SECRET"] = SECRET
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_resolved(example_env())


def services(compose: Mapping[str, Any], package: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The services built from ``package``'s Dockerfile."""
    dockerfile = (DEPLOYABLES[package] / "Dockerfile").relative_to(ROOT).as_posix()
    for name, service in compose["services"].items():
        if service.get("build", {}).get("dockerfile") == dockerfile:
            yield name, service


def relay_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(services(compose, "rapidphoto-relay"))


def test_settings_variables_are_spec_section_2() -> None:
    names = settings_variables()
    assert {"REDIS_URL", "JWT_SECRET", "RELAY_PORT", "SESSION_LOG_MAXLEN"} <= names
    # PROTOCOL §2's table: 19 names; the request head deadline and pending cap (issue 9);
    # RELAY_WORKERS (issue 12); RELAY_MAX_SESSIONS_PER_STREAM (issue 11); the cluster mode's
    # four (issue 13)
    assert len(names) == 27


def test_each_deployable_reads_what_it_uses() -> None:
    relay, worker = variables_read_by(RelayConfig), variables_read_by(WorkerConfig)
    assert relay & worker == {"REDIS_URL", "REDIS_CLUSTER", "QUEUE_REDIS_URL"}
    assert worker == {
        "REDIS_URL",
        "REDIS_CLUSTER",
        "QUEUE_REDIS_URL",
        "REDIS_WAIT_REPLICAS",
        "REDIS_WAIT_TIMEOUT_MS",
        "SESSION_TTL_SECONDS",
        "SESSION_LOG_MAXLEN",
    }


# --- schema ----------------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


@pytest.mark.parametrize("resolved", [False, True], ids=["as-written", "interpolated"])
def test_compose_file_is_valid_by_the_compose_spec_schema(resolved: bool) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    document = compose_resolved(example_env()) if resolved else compose_raw()
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_validation_catches_mistakes() -> None:
    """The schema is strict enough to matter: a misspelt key or a bad condition fails."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    document = compose_raw()
    document["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(document)
    document = compose_raw()
    document["services"]["nginx"]["depends_on"]["relay-1"]["condition"] = "service_ready"
    assert not validator.is_valid(document)


# --- compose and the code ----------------------------------------------------------------------


def test_our_services_set_only_variables_the_code_reads(compose: dict[str, Any]) -> None:
    names = settings_variables()
    for package in DEPLOYABLES:
        found = list(services(compose, package))
        assert found, f"no service runs {package}"
        reads = variables_read_by(READS[package])
        assert reads <= names
        for name, service in found:
            unknown = set(environment_of(service)) - reads
            assert not unknown, f"{name} sets {sorted(unknown)}, which no setting reads"


def test_every_relay_setting_is_configurable(compose: dict[str, Any]) -> None:
    for name, service in relay_services(compose).items():
        assert set(environment_of(service)) == variables_read_by(RelayConfig), name


def test_workers_get_no_secrets(compose: dict[str, Any]) -> None:
    for name, service in services(compose, "rapidphoto-worker"):
        env = environment_of(service)
        assert set(env) == variables_read_by(WorkerConfig), name
        assert not any(n.startswith("JWT_") for n in env), name


def test_compose_defaults_are_the_spec_defaults() -> None:
    """With nothing in .env but the secret, the relays run on PROTOCOL §2's defaults."""
    resolved = compose_resolved({"JWT_SECRET": SECRET})
    for name, service in relay_services(resolved).items():
        settings = RelayConfig.from_env(environment_of(service))
        expected = RelayConfig(
            redis_url="redis://redis:6379/0", jwt_secret=SECRET, relay_host="0.0.0.0"
        )
        assert settings == expected, name


def test_env_example_documents_every_variable_compose_reads() -> None:
    interpolated = interpolated_variables(compose_raw())
    example = read_dotenv(ENV_EXAMPLE)
    assert set(example) == interpolated
    assert set(example) - COMPOSE_ONLY <= settings_variables()
    text = ENV_EXAMPLE.read_text()
    section = text.index("# --- compose only")
    for name in example:
        # The compose-only names, and only they, are in the file's last section.
        assert (text.index(f"\n{name}=") > section) == (name in COMPOSE_ONLY), name


def test_env_example_holds_no_secret_and_spec_defaults() -> None:
    example = read_dotenv(ENV_EXAMPLE)
    assert example["JWT_SECRET"] == ""
    assert example["JWT_PUBLIC_KEY"] == ""
    spec = {k: v for k, v in example.items() if k not in COMPOSE_ONLY}
    assert RelayConfig.from_env(spec) == RelayConfig()
    assert WorkerConfig.from_env(spec) == WorkerConfig()


def test_dot_env_is_never_committed() -> None:
    done = subprocess.run(
        ["git", "check-ignore", "--quiet", ".env"], cwd=ROOT, capture_output=True, check=False
    )
    assert done.returncode == 0, ".env is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked.stdout == ""


def test_images_run_the_console_scripts_of_their_packages(compose: dict[str, Any]) -> None:
    for package, directory in DEPLOYABLES.items():
        for name, service in services(compose, package):
            assert service["build"]["context"] == "."
            assert "command" not in service, name
            assert "entrypoint" not in service, name
            entrypoint = json.loads(stages(directory / "Dockerfile")[-1].all("ENTRYPOINT")[-1])
            assert entrypoint[0] in console_scripts(directory), name


def test_two_workers_and_two_relays(compose: dict[str, Any]) -> None:
    workers = dict(services(compose, "rapidphoto-worker"))
    assert sum(s.get("deploy", {}).get("replicas", 1) for s in workers.values()) == 2
    assert len(relay_services(compose)) == 2


# --- ports, nginx -----------------------------------------------------------------------------------


def test_only_nginx_is_published(compose: dict[str, Any]) -> None:
    published = {name for name, s in compose["services"].items() if s.get("ports")}
    assert published == {"nginx"}
    nginx = compose["services"]["nginx"]
    assert nginx["ports"] == ["8080:8080"]
    assert environment_of(nginx)["NGINX_LISTEN"] == "8080"


def test_nginx_reaches_every_relay_on_its_port(compose: dict[str, Any]) -> None:
    relays = relay_services(compose)
    dockerfile_port = stages(DEPLOYABLES["rapidphoto-relay"] / "Dockerfile")[-1].env()["RELAY_PORT"]
    addresses = []
    for name, service in relays.items():
        env = environment_of(service)
        assert env["RELAY_PORT"] == dockerfile_port
        assert env["RELAY_HOST"] == "0.0.0.0"
        addresses.append(f"{name}:{env['RELAY_PORT']}")
    nginx_env = environment_of(compose["services"]["nginx"])
    assert nginx_env["NGINX_RELAY_SERVERS"] == relay_servers(addresses)


def test_nginx_environment_fills_the_template_exactly(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    env = environment_of(nginx)
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    assert env["NGINX_ENVSUBST_FILTER"] == "^NGINX_"
    values = {k for k in env if not k.startswith("NGINX_ENVSUBST_")}
    assert values == placeholders(TEMPLATE.read_text())
    mounts = {m.split(":")[0]: m.split(":")[1] for m in nginx["volumes"]}
    assert mounts == {
        f"./{TEMPLATE.relative_to(ROOT).as_posix()}": "/etc/nginx/templates/nginx.conf.template",
        # nginx resolves a relative include against the main file's directory, /etc/nginx.
        f"./{LOCATIONS.relative_to(ROOT).as_posix()}": f"/etc/nginx/{LOCATIONS.name}",
    }
    assert nginx["image"].startswith("nginx:1.")


# --- start-up order, health, shutdown -------------------------------------------------------------


def has_healthcheck(compose: Mapping[str, Any], name: str) -> bool:
    service = compose["services"][name]
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    dockerfile = service.get("build", {}).get("dockerfile")
    return bool(dockerfile) and bool(stages(ROOT / dockerfile)[-1].all("HEALTHCHECK"))


def test_start_up_is_gated_on_health(compose: dict[str, Any]) -> None:
    graph = {
        name: set(service.get("depends_on", {})) for name, service in compose["services"].items()
    }
    relays = set(relay_services(compose))
    workers = {name for name, _ in services(compose, "rapidphoto-worker")}
    for name in relays | workers:
        assert graph[name] == {"redis"}, name
    assert graph["nginx"] == relays
    for name, service in compose["services"].items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert has_healthcheck(compose, dependency), dependency
    # Every service but the one-shot job that creates the cluster (it runs, then exits).
    one_shot = {n for n, s in compose["services"].items() if s.get("restart") == "no"}
    assert one_shot == {"redis-cluster-init"}
    assert all(has_healthcheck(compose, name) for name in set(compose["services"]) - one_shot)


def test_the_cluster_profile_runs_the_deployables_on_a_redis_cluster() -> None:
    """PROTOCOL §9: six cluster nodes and their one-shot init in the "cluster" profile; with the
    .env the profile's comment gives, relays and workers read a cluster node, the queue stays on
    the standalone "redis"."""
    env = {
        **example_env(),
        "REDIS_CLUSTER": "1",
        "RAPIDPHOTO_REDIS_URL": "redis://redis-node-1:6379/0",
        "REDIS_WAIT_REPLICAS": "1",
    }
    resolved = compose_resolved(env)
    nodes = {n: s for n, s in resolved["services"].items() if n.startswith("redis-node-")}
    assert len(nodes) == 6
    for name, node in nodes.items():
        assert node["profiles"] == ["cluster"], name
        options = dict(zip(node["command"][1::2], node["command"][2::2], strict=True))
        assert options["--cluster-enabled"] == "yes"
        assert options["--cluster-node-timeout"] == "1000"
        assert options["--cluster-require-full-coverage"] == "no"
    init = resolved["services"]["redis-cluster-init"]
    assert init["profiles"] == ["cluster"]
    assert set(init["depends_on"]) == set(nodes)
    assert "--cluster-replicas 1" in init["command"][-1]
    for package, config in READS.items():
        for name, service in services(resolved, package):
            settings = config.from_env(environment_of(service))
            assert settings.redis_cluster, name
            assert settings.redis_url == "redis://redis-node-1:6379/0", name
            assert settings.queue_redis_url == "redis://redis:6379/0", name


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_shutdown_has_time_for_a_clean_stop(compose: dict[str, Any]) -> None:
    for name in relay_services(compose):
        # PROTOCOL §5: all streams closed within 5 s of SIGTERM.
        assert seconds(compose["services"][name]["stop_grace_period"]) >= 10
    for name, service in services(compose, "rapidphoto-worker"):
        assert seconds(service["stop_grace_period"]) >= 10, name
    assert seconds(compose["services"]["redis"]["stop_grace_period"]) >= 10


def test_redis_keeps_state_and_logs_across_restarts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-alpine)?", redis["image"])
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in compose["volumes"]
    assert "ports" not in redis


_ROUTES = """
import json, sys
from rapidphoto_contract.settings import RelayConfig
from rapidphoto_relay.app import create_app
app = create_app(RelayConfig(jwt_secret=sys.argv[1]))
print(json.dumps(sorted({route.path for route in app.routes})))
"""


def relay_routes() -> set[str]:
    """The relay app's route paths, as ``create_app`` builds them.

    Read in a child interpreter: this test is about paths, and the relay's own suites are where its
    import-time warnings are judged (filterwarnings = error here would fail on them instead).
    """
    done = subprocess.run(
        [sys.executable, "-c", _ROUTES, SECRET], capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout))


def test_health_check_paths_are_relay_routes() -> None:
    paths = relay_routes()
    check = (ROOT / "deploy" / "docker" / "relay_healthcheck.py").read_text()
    (url,) = re.findall(r'url = f"http://127\.0\.0\.1:\{port\}(/[\w/]+)"', check)
    assert url == "/health/live"
    assert url in paths
    # nginx sends everything under /api/upload/sessions/ to the unbuffered stream location: the
    # relay's routes there must all be streams, and both PROTOCOL §5 streams must be there.
    streams = sorted(p for p in paths if p.startswith("/api/upload/sessions/"))
    assert streams
    assert all(p.endswith("/stream") for p in streams)
    assert "/api/upload/sessions/notifications/stream" in streams
    assert "/metrics" in paths  # hidden at nginx, scraped per relay
