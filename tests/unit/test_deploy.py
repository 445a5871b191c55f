"""The production deployment files, checked offline: no docker, no cluster, no network.

- ``docker-compose.yml``: structure, references (depends_on, volumes, profiles), healthchecks, the
  GPU reservation, and that every bird container is configured only through ``BIRD_*`` variables
  that are fields of :class:`service.settings.Settings` and that validate once interpolated.
- ``deploy/k8s/``: every manifest validates against the Kubernetes JSON schemas bundled in the
  ``kubernetes-validate`` package (strict: unknown fields are errors); the KubeRay ``RayCluster``
  against the trimmed schema vendored in ``deploy/k8s/schemas/`` (its pod templates against the
  Kubernetes definitions); then the cross-references (Settings fields, Secret and ConfigMap keys,
  selectors, probe ports, the Ray head address, image and Ray versions).
- ``deploy/Dockerfile``: targets, commands, the torch sources of each image, ``.dockerignore``.

Each checker returns a list of problems, so that the tests can also show it catching a broken
copy of the files.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from service.settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
RAYCLUSTER_SCHEMA = K8S_DIR / "schemas" / "raycluster.schema.json"
LOCAL_DIR = REPO_ROOT / "deploy" / "local"
LOCAL_OVERRIDE = LOCAL_DIR / "compose.yml"
COMPOSE_TEST_SCRIPT = REPO_ROOT / "scripts" / "compose_test.py"
K8S_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"

# The oldest Kubernetes release the manifests promise to work with, and the newest bundled one.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

SETTINGS_ENV = {f"BIRD_{name.upper()}" for name in Settings.model_fields}


def project_packages() -> list[str]:
    """The top-level packages the distribution ships ([tool.setuptools.packages.find])."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


API_COMMAND = ["bird", "serve", "--api-only"]
WORKER_COMMAND = ["bird", "worker"]
MIGRATE_COMMAND = ["bird", "db", "upgrade"]

# docker-compose.yml
BIRD_SERVICES = {"migrate", "ray-head", "ray-worker", "ray-worker-cpu", "api", "worker"}
REQUIRED_SERVICES = BIRD_SERVICES | {"postgres", "minio", "minio-init"}
HEALTHCHECKED = {"postgres", "minio", "api", "ray-head"}
ONE_SHOT = {"migrate", "minio-init"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# --------------------------------------------------------------------------------------------
# Compose: loading and ${VAR:-default} interpolation
# --------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-d}``,
    ``${VAR:?error}``; an unset variable without a default becomes the empty string."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"required variable {name} is unset: {arg}")
        return value or ""

    return _INTERPOLATION.sub(substitute, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable that the compose file interpolates, with its ``:-`` default (or None)."""
    found: dict[str, str | None] = {}
    for match in _INTERPOLATION.finditer(text):
        name = match["braced"] or match["named"]
        if name is None:
            continue
        default = match["arg"] if match["op"] in (":-", "-") else None
        if name in found and found[name] != default:
            raise AssertionError(f"{name} has two defaults: {found[name]!r} and {default!r}")
        found[name] = default
    return found


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


@cache
def _compose_text() -> str:
    return COMPOSE_FILE.read_text()


def load_compose() -> dict[str, Any]:
    """The compose file as written (YAML anchors and merge keys resolved, not interpolated)."""
    return yaml.safe_load(_compose_text())


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose accepts a mapping or a KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on_of(service: Mapping[str, Any]) -> dict[str, str]:
    """``depends_on`` as {target: condition} (the list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {
        target: (spec or {}).get("condition", "service_started") for target, spec in deps.items()
    }


def gpu_reservations(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return [device for device in devices if "gpu" in (device.get("capabilities") or [])]


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings built from BIRD_* variables exactly as a container would see them."""
    values = {name.removeprefix("BIRD_").lower(): value for name, value in env.items()}
    return Settings(**values)


# --------------------------------------------------------------------------------------------
# Compose: the checker
# --------------------------------------------------------------------------------------------


def compose_problems(compose: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services") or {}
    declared_volumes = set((compose.get("volumes") or {}).keys())

    for name in sorted(REQUIRED_SERVICES - services.keys()):
        problems.append(f"service {name} is missing")

    built_from_dockerfile = {
        name
        for name, service in services.items()
        if isinstance(service.get("build"), dict)
        and service["build"].get("dockerfile") == "deploy/Dockerfile"
    }
    if built_from_dockerfile != BIRD_SERVICES & services.keys():
        problems.append(
            f"services built from deploy/Dockerfile {sorted(built_from_dockerfile)} are not "
            f"the bird services {sorted(BIRD_SERVICES)}"
        )

    for name, service in services.items():
        if name in BIRD_SERVICES:
            for variable in environment_of(service):
                if variable not in SETTINGS_ENV:
                    problems.append(f"{name}: {variable} is not a BIRD_* field of Settings")

        for target, condition in depends_on_of(service).items():
            if target not in services:
                problems.append(f"{name}: depends_on {target}, which is not a service")
                continue
            if condition not in DEPENDS_ON_CONDITIONS:
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
            if condition == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: waits for {target} to be healthy; it has no healthcheck")
            if target in ONE_SHOT and condition != "service_completed_successfully":
                problems.append(f"{name}: must wait for one-shot {target} to complete")
            if services[target].get("profiles") and not set(service.get("profiles") or []) >= set(
                services[target]["profiles"]
            ):
                problems.append(f"{name}: depends on {target}, which only runs in a profile")

        for mount in service.get("volumes") or []:
            source = mount.get("source") if isinstance(mount, dict) else mount.split(":", 1)[0]
            if mount_is_named(source) and source not in declared_volumes:
                problems.append(f"{name}: volume {source} is not declared under volumes")

    for name in sorted(HEALTHCHECKED & services.keys()):
        test = (services[name].get("healthcheck") or {}).get("test")
        if not test or services[name]["healthcheck"].get("disable"):
            problems.append(f"{name}: no healthcheck")
    if "api" in services and "/readyz" not in json.dumps(services["api"].get("healthcheck")):
        problems.append("api: the healthcheck must probe /readyz")

    for name, mount_point in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        mounts = [m for m in services.get(name, {}).get("volumes") or [] if isinstance(m, str)]
        if not any(
            mount_is_named(m.split(":")[0]) and m.split(":")[1] == mount_point for m in mounts
        ):
            problems.append(f"{name}: {mount_point} must be a named volume")

    gpu = services.get("ray-worker", {})
    if not gpu_reservations(gpu):
        problems.append("ray-worker: no GPU device reservation (capabilities: [gpu])")
    if "gpu" not in (gpu.get("profiles") or []):
        problems.append("ray-worker: must run under the gpu profile")
    cpu = services.get("ray-worker-cpu", {})
    if gpu_reservations(cpu):
        problems.append("ray-worker-cpu: must not reserve a GPU")
    if "cpu" not in (cpu.get("profiles") or []):
        problems.append("ray-worker-cpu: must run under the cpu profile")

    expected_commands = {"api": API_COMMAND, "worker": WORKER_COMMAND, "migrate": MIGRATE_COMMAND}
    for name, command in expected_commands.items():
        if name in services and services[name].get("command") != command:
            problems.append(f"{name}: command must be {command}")
    for name in ("api", "worker"):
        deps = depends_on_of(services.get(name, {}))
        if deps.get("migrate") != "service_completed_successfully":
            problems.append(f"{name}: must start after migrate completed successfully")
    return problems


def mount_is_named(source: str) -> bool:
    """A named volume, as opposed to a bind mount (a path)."""
    return bool(source) and not source.startswith(("/", ".", "~", "$"))


# --------------------------------------------------------------------------------------------
# Compose: tests
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_bird_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must see only what a test hands it, not BIRD_* variables of this shell."""
    for name in list(os.environ):
        if name.startswith("BIRD_"):
            monkeypatch.delenv(name)


def test_compose_file_is_consistent():
    assert compose_problems(load_compose()) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["services"]["api"]["environment"].update(BIRD_DATABSE_URL="x"),
            "api: BIRD_DATABSE_URL is not a BIRD_* field of Settings",
        ),
        (
            lambda c: c["services"]["worker"]["environment"].update(RAY_ADDRESS="x"),
            "worker: RAY_ADDRESS is not a BIRD_* field of Settings",
        ),
        (
            lambda c: c["services"]["api"]["depends_on"].update(redis={"condition": "x"}),
            "api: depends_on redis, which is not a service",
        ),
        (
            lambda c: c["services"]["worker"]["volumes"].append("scratch:/scratch"),
            "worker: volume scratch is not declared under volumes",
        ),
        (
            lambda c: c["services"]["ray-head"].pop("healthcheck"),
            "ray-head: no healthcheck",
        ),
        (
            lambda c: c["services"]["ray-worker"].pop("deploy"),
            "ray-worker: no GPU device reservation (capabilities: [gpu])",
        ),
        (
            lambda c: c["services"]["api"]["depends_on"].update(
                migrate={"condition": "service_started"}
            ),
            "api: must wait for one-shot migrate to complete",
        ),
        (
            lambda c: c["services"]["worker"]["depends_on"].update(
                {"ray-worker": {"condition": "service_started"}}
            ),
            "worker: depends on ray-worker, which only runs in a profile",
        ),
        (
            lambda c: c["services"]["postgres"].update(volumes=["./pg:/var/lib/postgresql/data"]),
            "postgres: /var/lib/postgresql/data must be a named volume",
        ),
        (lambda c: c["services"].pop("minio-init"), "service minio-init is missing"),
    ],
)
def test_compose_checker_catches_broken_files(mutate, expected):
    compose = copy.deepcopy(load_compose())
    mutate(compose)
    assert expected in compose_problems(compose)


def test_bird_services_share_one_environment():
    """The x-bird-env anchor: every bird container sees the same BIRD_* values (the API adds
    only where it binds and the S3 address its presigned URLs are signed for)."""
    compose = load_compose()
    services = compose["services"]
    shared = environment_of({"environment": compose["x-bird-env"]})
    assert "BIRD_DATABASE_URL" in shared
    for name in sorted(BIRD_SERVICES):
        env = environment_of(services[name])
        assert {key: env[key] for key in shared} == shared, name
    api_extra = environment_of(services["api"]).keys() - shared.keys()
    assert api_extra == {"BIRD_API_HOST", "BIRD_API_PORT", "BIRD_S3_PUBLIC_ENDPOINT_URL"}


@pytest.mark.parametrize("service", sorted(BIRD_SERVICES))
def test_compose_environment_validates_as_settings(service, no_bird_env):
    compose = interpolate_tree(load_compose(), env={})  # every ${VAR:-default} at its default
    settings = settings_from_env(environment_of(compose["services"][service]))
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.store_url == "s3://bird/store"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None
    # Credentials come from the same variables as MinIO's and PostgreSQL's own.
    minio_env = environment_of(compose["services"]["minio"])
    assert settings.s3_access_key_id.get_secret_value() == minio_env["MINIO_ROOT_USER"]
    assert settings.s3_secret_access_key.get_secret_value() == minio_env["MINIO_ROOT_PASSWORD"]
    pg = environment_of(compose["services"]["postgres"])
    assert settings.database_url == (
        f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{pg['POSTGRES_DB']}"
    )
    if service == "api":
        assert settings.api_host == "0.0.0.0"


def test_compose_environment_that_settings_rejects_is_caught(no_bird_env):
    compose = interpolate_tree(load_compose(), env={})
    env = environment_of(compose["services"]["api"]) | {"BIRD_API_PORT": "http"}
    with pytest.raises(pydantic.ValidationError, match="api_port"):
        settings_from_env(env)
    env = environment_of(compose["services"]["worker"]) | {"BIRD_DATABASE_URL": "mysql://x"}
    with pytest.raises(pydantic.ValidationError, match="database_url"):
        settings_from_env(env)


def test_interpolation_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/$SET/$$SET", env) == (
        "v/d/d//v/$SET"
    )
    with pytest.raises(ValueError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", env)


def test_every_compose_variable_has_a_default_documented_in_env_example():
    variables = compose_variables(_compose_text())
    without_default = sorted(name for name, default in variables.items() if default is None)
    assert without_default == [], "compose must start without a .env file"
    example = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert set(example) - {"COMPOSE_PROFILES"} == set(variables), "documented == used"
    for name, default in variables.items():
        assert example[name] == default, f"{name}: .env.example and the compose default differ"
    assert example["COMPOSE_PROFILES"] in {"gpu", "cpu"}
    assert not any(name.startswith("BIRD_") for name in variables), (
        "compose-level variables must not look like Settings fields"
    )


def test_ray_addresses_point_at_the_head():
    compose = interpolate_tree(load_compose(), env={})
    services = compose["services"]
    head_command = services["ray-head"]["command"]
    assert head_command[:4] == ["ray", "start", "--head", "--block"]
    head_port = next(arg.split("=")[1] for arg in head_command if arg.startswith("--port="))
    gcs_address = f"ray-head:{head_port}"
    assert environment_of(services["worker"])["BIRD_RAY_ADDRESS"] == gcs_address
    for node in ("ray-worker", "ray-worker-cpu"):
        command = services[node]["command"]
        assert command[:2] == ["ray", "start"] and "--block" in command
        assert f"--address={gcs_address}" in command, node
        assert depends_on_of(services[node]) == {"ray-head": "service_healthy"}
    assert "--num-gpus=0" in services["ray-worker-cpu"]["command"]
    # The worker image, so that Ray and Python are the same version on every node.
    for name in ("ray-head", "ray-worker", "ray-worker-cpu", "worker"):
        assert services[name]["build"]["target"] == "worker", name
    for name in ("api", "migrate"):
        assert services[name]["build"]["target"] == "api", name


def test_api_port_and_healthcheck_agree():
    compose = interpolate_tree(load_compose(), env={})
    api = compose["services"]["api"]
    port = environment_of(api)["BIRD_API_PORT"]
    assert any(mapping.endswith(f":{port}") for mapping in api["ports"])
    assert f"127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])


def compose_cli() -> list[str]:
    """The compose CLI that `make compose-test` uses (scripts/compose_test.py picks it).

    Missing, it is a failure, not a skip: `make install-dev` installs Debian's docker-compose
    (its `config` needs no Docker daemon), so every machine that runs the tests has one.
    """
    script = compose_test_script()
    try:
        return script.compose_cli()
    except script.Failure as error:
        pytest.fail(f"{error} (`make install-dev` does it)", pytrace=False)


@pytest.mark.parametrize(
    ("profile", "files"),
    [
        ("gpu", [COMPOSE_FILE]),
        ("cpu", [COMPOSE_FILE]),
        ("cpu", [COMPOSE_FILE, LOCAL_OVERRIDE]),
    ],
    ids=["gpu", "cpu", "cpu+local-override"],
)
def test_compose_cli_accepts_the_file(profile, files):
    """The compose CLI's own schema validation and merge (no daemon needed), also of the
    local test's override on top of docker-compose.yml."""
    env = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    file_args = [arg for path in files for arg in ("-f", str(path))]
    command = [*compose_cli(), "--project-directory", str(REPO_ROOT), *file_args]
    result = subprocess.run(
        [*command, "--profile", profile, "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    if LOCAL_OVERRIDE in files:
        assert merged["postgres"]["image"] == compose_test_script().POSTGRES_IMAGE
        assert merged["minio"]["image"] == compose_test_script().S3_IMAGE
        # What the override does not name is docker-compose.yml's, e.g. the bird services.
        assert merged["api"]["command"] == API_COMMAND
        assert (
            merged["postgres"]["healthcheck"]["test"]
            == (load_compose()["services"]["postgres"]["healthcheck"]["test"])
        )


# --------------------------------------------------------------------------------------------
# The local compose test (`make compose-test`): deploy/local/ and scripts/compose_test.py
# --------------------------------------------------------------------------------------------

# What an override may change in a service whose image it swaps: the image, and for a stand-in
# that is another program (moto for MinIO), how it starts and how its health is probed.
OVERRIDE_KEYS = {"image", "command", "entrypoint", "healthcheck"}


@cache
def compose_test_script() -> Any:
    """scripts/compose_test.py as a module (its stand-in image names and compose CLI choice)."""
    spec = importlib.util.spec_from_file_location("compose_test", COMPOSE_TEST_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_override() -> dict[str, Any]:
    return yaml.safe_load(LOCAL_OVERRIDE.read_text())


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, everything else
    (sequences included, as for command and entrypoint) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_compose(base[key], value) if key in base else value
        return merged
    return override


def override_problems(compose: Mapping[str, Any], override: Mapping[str, Any]) -> list[str]:
    """The override swaps exactly the images that come from a registry, and nothing else."""
    problems: list[str] = []
    services = compose.get("services") or {}
    swapped = override.get("services") or {}
    if set(override) != {"services"}:
        problems.append(
            f"the override may only change services, not {sorted(set(override) - {'services'})}"
        )
    pulled = {name for name, service in services.items() if "build" not in service}
    for name in sorted(pulled - swapped.keys()):
        problems.append(f"{name}: its image {services[name].get('image')} is not swapped")
    script = compose_test_script()
    stand_ins = set(script.LOCAL_DOCKERFILES)
    for name, service in swapped.items():
        if name not in services:
            problems.append(f"{name}: not a service of docker-compose.yml")
            continue
        if name not in pulled:
            problems.append(f"{name}: built from deploy/Dockerfile; the override must not touch it")
        if set(service) - OVERRIDE_KEYS:
            problems.append(f"{name}: changes {sorted(set(service) - OVERRIDE_KEYS)}")
        if service.get("image") not in stand_ins:
            problems.append(f"{name}: {service.get('image')} is not a stand-in the script builds")
    if set(swapped.get("postgres", {})) - {"image"}:
        problems.append("postgres: the stand-in must run with the service's own settings")
    return problems


def test_local_override_swaps_exactly_the_unpullable_images():
    compose, override = load_compose(), load_override()
    assert override_problems(compose, override) == []
    # The merged stack passes the same checks as docker-compose.yml itself.
    assert compose_problems(merge_compose(compose, override)) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["services"].pop("postgres"), "postgres: its image postgres:16 is not swapped"),
        (
            lambda o: o["services"].update(api={"image": "bird-local/python:3.11-bookworm"}),
            "api: built from deploy/Dockerfile; the override must not touch it",
        ),
        (
            lambda o: o["services"]["minio"].update(environment={"X": "1"}),
            "minio: changes ['environment']",
        ),
        (
            lambda o: o["services"]["postgres"].update(command=["postgres", "-c", "fsync=off"]),
            "postgres: the stand-in must run with the service's own settings",
        ),
        (
            lambda o: o["services"]["minio-init"].update(image="minio/mc:latest"),
            "minio-init: minio/mc:latest is not a stand-in the script builds",
        ),
        (lambda o: o.update(volumes={"x": {}}), "may only change services, not ['volumes']"),
    ],
)
def test_override_checker_catches_broken_files(mutate, expected):
    override = copy.deepcopy(load_override())
    mutate(override)
    problems = override_problems(load_compose(), override)
    assert any(expected in problem for problem in problems), problems


def test_stand_ins_take_the_settings_of_the_services_they_replace():
    """The stand-ins read the variables, paths and ports docker-compose.yml gives the real
    images, so the services run them unchanged."""
    services = load_compose()["services"]
    override = load_override()["services"]
    entrypoint = (LOCAL_DIR / "postgres-entrypoint.sh").read_text()
    for variable in environment_of(services["postgres"]):
        assert f"${{{variable}" in entrypoint, variable
    (data_mount,) = services["postgres"]["volumes"]
    assert f"PGDATA=${{PGDATA:-{data_mount.split(':')[1]}}}" in entrypoint
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "postgresql-15" in (LOCAL_DIR / "postgres.Dockerfile").read_text()

    # moto listens where bird and the bucket one-shot look for MinIO.
    endpoint = load_compose()["x-bird-env"]["BIRD_S3_ENDPOINT_URL"]
    port = endpoint.rsplit(":", 1)[1]
    assert override["minio"]["command"][-2:] == ["--port", port]
    assert f"127.0.0.1:{port}/" in " ".join(override["minio"]["healthcheck"]["test"])
    init_script = override["minio-init"]["command"][0]
    assert f'endpoint_url="{endpoint}"' in init_script
    for variable in environment_of(services["minio-init"]):
        assert f'os.environ["{variable}"]' in init_script, variable


def test_compose_test_builds_the_dockerfile_on_its_base_image_arguments():
    """The script replaces exactly the base images of deploy/Dockerfile, whose defaults stay
    the public images; the stand-ins' Dockerfiles declare the arguments it passes."""
    script = compose_test_script()
    from_args = {re.fullmatch(r"\$\{(\w+)\}", s["base"]).group(1) for s in _dockerfile()[1]}
    assert set(script.BASE_IMAGE_ARGS) == from_args
    for arg in from_args:
        default = dockerfile_args()[arg]
        assert "/" in default or ":" in default, default
        assert not default.startswith("bird-local/"), default
    assert {"python:3.11-slim-bookworm", "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime"} == {
        dockerfile_args()[arg] for arg in from_args
    }
    for image, (dockerfile, build_args) in script.LOCAL_DOCKERFILES.items():
        assert image.startswith("bird-local/"), image
        global_args, _ = parse_dockerfile((LOCAL_DIR / dockerfile).read_text())
        assert set(build_args) <= set(global_args), (dockerfile, build_args)
    # The Makefile's target runs the script (with the Makefile's torch).
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^compose-test:.*\n(\t.*\n)*\t.*scripts/compose_test\.py", makefile, re.M)


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def load_kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def load_manifests() -> list[dict[str, Any]]:
    """Every document of every file the kustomization lists, in order."""
    documents = []
    for resource in load_kustomization()["resources"]:
        text = (K8S_DIR / resource).read_text()
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template in a manifest."""
    kind, spec = document["kind"], document.get("spec") or {}
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield kind, spec["template"]["spec"]
    elif kind == "RayCluster":
        yield "headGroupSpec", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]


def containers(document: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(document):
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            yield (
                f"{document['kind']}/{document['metadata']['name']} {where} {container['name']}",
                container,
            )


@cache
def k8s_definitions(version: str) -> dict[str, Any]:
    return schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )


def raycluster_validator(version: str) -> jsonschema.Validator:
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    definitions = Resource.from_contents(k8s_definitions(version))
    registry = Registry().with_resource(K8S_DEFINITIONS_URI, definitions)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_problems(document: Mapping[str, Any], version: str) -> list[str]:
    """Validation against the bundled Kubernetes schemas (strict) or the vendored RayCluster."""
    label = f"{document.get('kind')}/{document.get('metadata', {}).get('name')} (k8s {version})"
    if document.get("apiVersion") == "ray.io/v1":
        errors = raycluster_validator(version).iter_errors(document)
        return [f"{label}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(dict(document), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{label}: {'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{label}: {error.message}"]
    return []


def k8s_problems(documents: list[dict[str, Any]]) -> list[str]:
    """Cross-references that the schemas cannot see."""
    problems: list[str] = []
    configmaps = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Secret"}

    for configmap in configmaps.values():
        for key in configmap.get("data") or {}:
            if key not in SETTINGS_ENV:
                problems.append(
                    f"ConfigMap/{configmap['metadata']['name']}: {key} is no Settings field"
                )

    for document in documents:
        for where, container in containers(document):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef") or {}
                known = configmaps if "configMapRef" in source else secrets
                if ref.get("name") not in known:
                    problems.append(
                        f"{where}: envFrom {ref.get('name')} is not in the kustomization"
                    )
            for variable in container.get("env", []):
                name = variable["name"]
                if name.startswith("BIRD_") and name not in SETTINGS_ENV:
                    problems.append(f"{where}: {name} is not a BIRD_* field of Settings")
                value_from = variable.get("valueFrom") or {}
                for ref_kind, known in (("secretKeyRef", secrets), ("configMapKeyRef", configmaps)):
                    ref = value_from.get(ref_kind)
                    if ref is None:
                        continue
                    if ref["name"] not in known:
                        problems.append(
                            f"{where}: {ref_kind} {ref['name']} is not in the kustomization"
                        )
                    elif ref["key"] not in resource_keys(known[ref["name"]]):
                        problems.append(f"{where}: {ref['name']} has no key {ref['key']}")

    for service in (d for d in documents if d["kind"] == "Service"):
        selector = service["spec"].get("selector") or {}
        targets = [
            d
            for d in documents
            if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        if len(targets) != 1:
            problems.append(
                f"Service/{service['metadata']['name']}: selects {len(targets)} Deployments"
            )
            continue
        port_names = {
            port.get("name")
            for _, container in containers(targets[0])
            for port in container.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in port_names:
                problems.append(
                    f"Service/{service['metadata']['name']}: no container port {target}"
                )

    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selector.items() <= labels.items():
            problems.append(
                f"Deployment/{deployment['metadata']['name']}: selector misses its pods"
            )

    for cluster in (d for d in documents if d["kind"] == "RayCluster"):
        groups = cluster["spec"].get("workerGroupSpecs") or []
        gpu_groups = [g for g in groups if group_gpus(g) > 0]
        if not gpu_groups:
            problems.append(f"RayCluster/{cluster['metadata']['name']}: no GPU worker group")
        for group in groups:
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if not low <= group.get("replicas", low) <= high:
                problems.append(
                    f"RayCluster worker group {group['groupName']}: replicas out of range"
                )
    return problems


def resource_keys(document: Mapping[str, Any]) -> set[str]:
    return set(document.get("data") or {}) | set(document.get("stringData") or {})


def group_gpus(group: Mapping[str, Any]) -> int:
    return sum(
        int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for container in group["template"]["spec"]["containers"]
    )


def container_env(documents: list[dict[str, Any]], container: Mapping[str, Any]) -> dict[str, str]:
    """The environment a container gets, with Secret and ConfigMap references resolved."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= by_name["ConfigMap", source["configMapRef"]["name"]]["data"]
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif ref := (variable.get("valueFrom") or {}).get("secretKeyRef"):
            secret = by_name["Secret", ref["name"]]
            env[variable["name"]] = (secret.get("stringData") or {})[ref["key"]]
    return env


def named_container(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (_, container), *others = containers(find(documents, kind, name))
    assert not others, f"{kind}/{name} should run one container"
    return container


def test_kustomization_lists_every_manifest():
    kustomization = load_kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(d["kind"] for d in load_manifests())
    expected = ["Namespace", "ConfigMap", "Secret", "Job", "RayCluster", "Service"]
    assert kinds == sorted([*expected, "Deployment", "Deployment"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_their_schemas(version):
    problems = [p for document in load_manifests() for p in schema_problems(document, version)]
    assert problems == []


def test_k8s_cross_references_hold():
    assert k8s_problems(load_manifests()) == []


def _mutated(documents, kind, name, mutate):
    documents = copy.deepcopy(documents)
    mutate(find(documents, kind, name))
    return documents


def _first_container(document):
    return next(containers(document))[1]


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "expected"),
    [
        (
            "Deployment",
            "bird-api",
            lambda d: _first_container(d)["env"].append({"name": "BIRD_RAY_ADRESS", "value": "x"}),
            "BIRD_RAY_ADRESS is not a BIRD_* field of Settings",
        ),
        (
            "ConfigMap",
            "bird-config",
            lambda d: d["data"].update(BIRD_WORKERS="4"),
            "BIRD_WORKERS is no Settings field",
        ),
        (
            "Deployment",
            "bird-worker",
            lambda d: _first_container(d)["env"][0]["valueFrom"]["secretKeyRef"].update(key="db"),
            "bird-secrets has no key db",
        ),
        (
            "Deployment",
            "bird-worker",
            lambda d: _first_container(d)["envFrom"][0]["configMapRef"].update(name="other"),
            "envFrom other is not in the kustomization",
        ),
        (
            "Service",
            "bird-api",
            lambda d: d["spec"]["selector"].update({"app.kubernetes.io/component": "web"}),
            "Service/bird-api: selects 0 Deployments",
        ),
        (
            "Service",
            "bird-api",
            lambda d: d["spec"]["ports"][0].update(targetPort="metrics"),
            "Service/bird-api: no container port metrics",
        ),
        (
            "RayCluster",
            "bird-ray",
            lambda d: _first_gpu_limits(d).pop("nvidia.com/gpu"),
            "RayCluster/bird-ray: no GPU worker group",
        ),
    ],
)
def test_k8s_checker_catches_broken_manifests(kind, name, mutate, expected):
    problems = k8s_problems(_mutated(load_manifests(), kind, name, mutate))
    assert any(expected in problem for problem in problems), problems


def _first_gpu_limits(cluster):
    return cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "expected"),
    [
        (  # a typo in a field name
            "Deployment",
            "bird-api",
            lambda d: _first_container(d).update(
                readinesProbe=_first_container(d)["readinessProbe"]
            ),
            "'readinesProbe' was unexpected",
        ),
        (
            "Service",
            "bird-api",
            lambda d: d["spec"]["ports"][0].update(port="8000"),
            "'8000' is not of type 'integer'",
        ),
        (
            "Job",
            "bird-db-migrate",
            lambda d: d["spec"]["template"]["spec"].pop("containers"),
            "'containers' is a required property",
        ),
        (  # a typo in a RayCluster field (the vendored schema)
            "RayCluster",
            "bird-ray",
            lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")),
            "'workerGroupSpec' was unexpected",
        ),
        (  # ray start parameters are strings
            "RayCluster",
            "bird-ray",
            lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            "0 is not of type 'string'",
        ),
        (  # inside a RayCluster pod template: the Kubernetes definitions apply
            "RayCluster",
            "bird-ray",
            lambda d: _first_container(d).update(imagePullPolice="Always"),
            "'imagePullPolice' was unexpected",
        ),
        (
            "RayCluster",
            "bird-ray",
            lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
            "'groupName' is a required property",
        ),
    ],
)
def test_schema_validation_catches_broken_manifests(kind, name, mutate, expected):
    document = find(_mutated(load_manifests(), kind, name, mutate), kind, name)
    problems = schema_problems(document, K8S_VERSIONS[0])
    assert any(expected in problem for problem in problems), problems


def test_api_deployment_probes_and_commands():
    documents = load_manifests()
    api = named_container(documents, "Deployment", "bird-api")
    assert api["args"] == API_COMMAND
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_by_name = {port["name"]: port["containerPort"] for port in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["port"] in port_by_name
    env = container_env(documents, api)
    assert int(env["BIRD_API_PORT"]) == port_by_name["http"]
    assert env["BIRD_API_HOST"] == "0.0.0.0"
    migrate = named_container(documents, "Job", "bird-db-migrate")
    assert migrate["args"] == MIGRATE_COMMAND
    # The worker keeps the image's ENTRYPOINT (which joins the Ray cluster): args, not command.
    worker = named_container(documents, "Deployment", "bird-worker")
    assert "command" not in worker and worker["args"] == WORKER_COMMAND


@pytest.mark.parametrize(
    ("kind", "name"),
    [("Deployment", "bird-api"), ("Deployment", "bird-worker"), ("Job", "bird-db-migrate")],
)
def test_k8s_environment_validates_as_settings(kind, name, no_bird_env):
    documents = load_manifests()
    env = container_env(documents, named_container(documents, kind, name))
    settings = settings_from_env(env)
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.store_url is not None and settings.store_url.startswith("s3://")


def test_secrets_are_references_never_literals():
    """Secret values reach containers through secretKeyRef only; the Secret is a template."""
    documents = load_manifests()
    secret_names = {"BIRD_DATABASE_URL", "BIRD_S3_ACCESS_KEY_ID", "BIRD_S3_SECRET_ACCESS_KEY"}
    for document in documents:
        for where, container in containers(document):
            for variable in container.get("env", []):
                if variable["name"] in secret_names:
                    assert "secretKeyRef" in variable.get("valueFrom", {}), where
    assert not secret_names & set(find(documents, "ConfigMap", "bird-config")["data"])
    secret = find(documents, "Secret", "bird-secrets")
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())


def test_raycluster_matches_the_worker_image_and_address():
    documents = load_manifests()
    cluster = find(documents, "RayCluster", "bird-ray")
    head = cluster["spec"]["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    gcs_port = next(
        p["containerPort"] for p in head_container["ports"] if p["name"] == "gcs-server"
    )
    # KubeRay names the head Service <cluster>-head-svc.
    address = find(documents, "ConfigMap", "bird-config")["data"]["BIRD_RAY_ADDRESS"]
    assert address == f"{cluster['metadata']['name']}-head-svc:{gcs_port}"
    assert not address.startswith(("ray://", "auto"))
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert group_gpus(head) == 0
    worker_image = named_container(documents, "Deployment", "bird-worker")["image"]
    for _, container in containers(cluster):
        assert container["image"] == worker_image
    assert cluster["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    for where, spec in pod_specs(cluster):
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, where


def test_pods_run_as_the_image_user():
    uid = int(dockerfile_user("worker").split(":")[0])
    assert uid == int(dockerfile_user("api").split(":")[0])
    for document in load_manifests():
        for where, spec in pod_specs(document):
            context = spec.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser") == uid, where
            assert spec.get("enableServiceLinks") is False, where


def test_kubectl_kustomize_renders_the_manifests():
    """Where kubectl is installed: its built-in kustomize renders the directory offline."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(load_manifests())
    namespace = load_kustomization()["namespace"]
    for document in rendered:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "bird"
        assert schema_problems(document, K8S_VERSIONS[0]) == []


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------

_HEREDOC = re.compile(r"<<-?([\"']?)([A-Za-z_][A-Za-z0-9_]*)\1")


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(global ARG defaults, stages); a stage is {name, base, instructions: [(INSTR, args, body)]}
    with continuation lines joined and heredoc bodies attached to their instruction."""
    lines = text.splitlines()
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        instruction, _, args = line.strip().partition(" ")
        instruction, args = instruction.upper(), args.strip()
        body = None
        if heredoc := _HEREDOC.search(args):
            end = lines.index(heredoc.group(2), i)
            body, i = "\n".join(lines[i:end]), end + 1
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append({"name": name.strip().lower(), "base": base.strip(), "instructions": []})
        elif not stages:
            if instruction == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            stages[-1]["instructions"].append((instruction, args, body))
    return global_args, stages


@cache
def _dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def _dockerfile() -> tuple[dict[str, str], list[dict[str, Any]]]:
    return parse_dockerfile(_dockerfile_text())


def dockerfile_args() -> dict[str, str]:
    return _dockerfile()[0]


def stage(name: str) -> dict[str, Any]:
    matches = [s for s in _dockerfile()[1] if s["name"] == name]
    assert len(matches) == 1, f"one stage {name} expected"
    return matches[0]


def instructions(stage_: Mapping[str, Any], kind: str) -> list[tuple[str, str | None]]:
    return [
        (args, body) for instruction, args, body in stage_["instructions"] if instruction == kind
    ]


def exec_form(stage_: Mapping[str, Any], kind: str) -> list[str] | None:
    """The last CMD or ENTRYPOINT of a stage, which must be in exec (JSON) form."""
    found = instructions(stage_, kind)
    if not found:
        return None
    value = json.loads(found[-1][0])
    assert isinstance(value, list), f"{kind} must be in exec form"
    return value


def expand_args(text: str, args: Mapping[str, str]) -> str:
    """Build arguments expanded (``$NAME`` / ``${NAME}``); other variables are left alone."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def stage_args(stage_: Mapping[str, Any]) -> dict[str, str]:
    """Build-argument defaults visible in a stage: its own ARGs, or the global default of an
    ARG it re-declares without one."""
    args = {}
    for declaration, _ in instructions(stage_, "ARG"):
        key, has_default, default = declaration.partition("=")
        if has_default:
            args[key] = default
        elif key in dockerfile_args():
            args[key] = dockerfile_args()[key]
    return args


def resolved_base(stage_: Mapping[str, Any]) -> str:
    return expand_args(stage_["base"], dockerfile_args())


def dockerfile_user(name: str) -> str:
    users = instructions(stage(name), "USER")
    assert users, f"stage {name} must drop root"
    return users[-1][0]


_PIP_OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
}


def pip_installs(stage_: Mapping[str, Any]) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of every `pip install` in the stage's RUN instructions."""
    installs = []
    for args, _ in instructions(stage_, "RUN"):
        args = expand_args(args, stage_args(stage_))
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            if "pip" not in words or "install" not in words:
                continue
            words = words[words.index("install") + 1 :]
            options, requirements = [], []
            while words:
                word = words.pop(0)
                if word.startswith("-"):
                    options.append(word)
                    if word in _PIP_OPTIONS_WITH_VALUE and words:
                        options.append(words.pop(0))
                else:
                    requirements.append(word)
            installs.append((options, requirements))
    return installs


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


# Syntax that only BuildKit (or a Dockerfile frontend image fetched from a registry) understands:
# the classic builder rejects it, and `make compose-test` builds where no registry is reachable.
_BUILDKIT_ONLY = re.compile(r"--(?:mount|chmod|link|parents|exclude|checksum)\b|<<-?[\"']?\w")


def dockerfile_problems() -> list[str]:
    problems = []
    api, worker = stage("api"), stage("worker")
    if re.match(r"#\s*syntax\s*=", _dockerfile_text()):
        problems.append("a `# syntax=` line makes BuildKit fetch a frontend image from a registry")
    for stage_ in _dockerfile()[1]:
        for instruction, args, body in stage_["instructions"]:
            if body is not None or _BUILDKIT_ONLY.search(args):
                problems.append(
                    f"{stage_['name']}: `{instruction} {args[:60]}` needs BuildKit "
                    "(the classic builder must build this file)"
                )
    if not resolved_base(api).startswith("python:3.11-slim"):
        problems.append(f"api: base {resolved_base(api)} is not python:3.11-slim")
    if not re.fullmatch(
        r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", resolved_base(worker)
    ):
        problems.append(f"worker: base {resolved_base(worker)} is not a CUDA PyTorch runtime")

    for name, stage_ in (("api", api), ("worker", worker)):
        for options, requirements in pip_installs(stage_):
            torch = [r for r in requirements if requirement_name(r) in ("torch", "torchvision")]
            if name == "worker" and torch:
                problems.append(f"worker: reinstalls {torch}; torch comes from the CUDA base")
            if name == "api" and torch and not any(o.endswith("/whl/cpu") for o in options):
                problems.append(f"api: installs {torch} from an index that is not the CPU one")
            if "." in requirements and not {"-c", "--constraint"} & set(options):
                problems.append(f"{name}: installs bird without the torch constraint")
        for args, _ in instructions(stage_, "ENV"):
            for variable in re.findall(r"(BIRD_\w+)=", args):
                if variable not in SETTINGS_ENV:
                    problems.append(f"{name}: ENV {variable} is not a field of Settings")
    return problems


def test_dockerfile_has_both_targets_from_the_right_bases():
    assert {s["name"] for s in _dockerfile()[1]} >= {"api", "worker"}
    assert dockerfile_problems() == []


def test_dockerfile_commands():
    api, worker = stage("api"), stage("worker")
    assert exec_form(api, "ENTRYPOINT") is None
    assert exec_form(api, "CMD") == API_COMMAND
    assert exec_form(worker, "CMD") == WORKER_COMMAND
    entrypoint = exec_form(worker, "ENTRYPOINT")
    assert entrypoint is not None and len(entrypoint) == 1
    # The entrypoint script is copied from deploy/, made executable, and hands over to the
    # command.
    copies = [shlex.split(args) for args, _ in instructions(worker, "COPY")]
    sources = [words[0] for words in copies if words[-1] == entrypoint[0]]
    assert len(sources) == 1, copies
    runs = " ".join(args for args, _ in instructions(worker, "RUN"))
    assert f"chmod 0755 {entrypoint[0]}" in runs
    script = (REPO_ROOT / sources[0]).read_text()
    assert script.startswith("#!/bin/sh") and script.rstrip().endswith('exec "$@"')
    assert '"${1:-}" = "bird" ] && [ "${2:-}" = "worker" ]' in script
    assert "ray://*" in script, "a Ray Client address needs no local node"
    assert re.search(
        r"ray start --address=\"\$\{BIRD_RAY_ADDRESS\}\" --num-cpus=0 --num-gpus=0", script
    )


def test_dockerfile_torch_sources():
    """CUDA torch only in the worker (from its base image); the API gets the CPU wheels."""
    api_torch = [
        (options, requirements)
        for options, requirements in pip_installs(stage("api"))
        if any(requirement_name(r) == "torch" for r in requirements)
    ]
    assert len(api_torch) == 1
    assert "--index-url" in api_torch[0][0]
    # The same torch release in both images: the one the worker's base image ships.
    base_torch = re.search(r"pytorch:([\d.]+)-", resolved_base(stage("worker"))).group(1)
    assert f"torch=={base_torch}" in api_torch[0][1]
    worker_runs = " ".join(args for args, _ in instructions(stage("worker"), "RUN"))
    assert "torch.version.cuda" in worker_runs, "the worker build asserts a CUDA torch"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime", "python:3.11", "not a CUDA PyTorch"),
        (
            '. "ray[default,client]==${RAY_VERSION}"',
            '. torch "ray[default,client]==${RAY_VERSION}"',
            "worker: reinstalls ['torch']",
        ),
        ('--index-url "${TORCH_CPU_INDEX}"', "", "api: installs ['torch==2.8.0'"),
        ("BIRD_API_HOST=0.0.0.0", "BIRD_HOST=0.0.0.0", "ENV BIRD_HOST is not a field"),
        ("# bird images", "# syntax=docker/dockerfile:1.7\n# bird images", "a `# syntax=` line"),
        (
            "RUN chmod 0755 /usr/local/bin/bird-entrypoint",
            "COPY --chmod=0755 deploy/bird-entrypoint.sh /usr/local/bin/",
            "worker: `COPY --chmod=0755",
        ),
        (
            "RUN chmod 0755 /usr/local/bin/bird-entrypoint",
            'COPY <<"EOF" /usr/local/bin/bird-entrypoint\n#!/bin/sh\nEOF',
            "needs BuildKit",
        ),
    ],
)
def test_dockerfile_checker_catches_broken_files(old, new, expected, monkeypatch):
    text = DOCKERFILE.read_text()
    assert old in text
    broken = text.replace(old, new, 1)
    monkeypatch.setattr(f"{__name__}._dockerfile_text", lambda: broken)
    assert any(expected in problem for problem in dockerfile_problems()), dockerfile_problems()


def test_parse_dockerfile_handles_continuations_and_heredocs():
    global_args, stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=x\nFROM ${BASE} AS one\n"
        'RUN a \\\n    && b\nCOPY <<"EOF" /s\nline1\nRUN not-an-instruction\nEOF\nCMD ["c"]\n'
    )
    assert global_args == {"BASE": "x"}
    (one,) = stages
    assert one["instructions"] == [
        ("RUN", "a && b", None),
        ("COPY", '<<"EOF" /s', "line1\nRUN not-an-instruction"),
        ("CMD", '["c"]', None),
    ]


def dockerignore_excludes(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a directory rule
    covers what lies under it."""
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts)
        ):
            excluded = not negated
    return excluded


def dockerignore_rules() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerignore_sends_what_the_images_install_and_nothing_secret():
    """The images copy the source tree (``COPY . .``) and install it from pyproject.toml: every
    package it installs is sent whatever its name (no list of directories to keep in step),
    and secrets, local data and caches are not."""
    rules = dockerignore_rules()
    sources = set()
    for name in ("api", "worker"):
        for args, body in instructions(stage(name), "COPY"):
            if body is None and "--from" not in args:
                sources.update(shlex.split(args)[:-1])
    assert {".", "pyproject.toml", "README.md"} <= sources
    packages = project_packages()
    assert {"bird_core", "service", "workers"} <= set(packages)
    for source in sorted(sources - {"."}):
        assert (REPO_ROOT / source).exists(), source
        assert not dockerignore_excludes(source, rules), source
    for package in packages:
        for path in (REPO_ROOT / package).rglob("*"):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if path.is_file() and "__pycache__" not in path.parts:
                assert not dockerignore_excludes(relative, rules), relative
    for private in (
        ".env",
        ".env.local",
        ".git/config",
        ".venv/bin/python",
        "bird-data/bird.db",
        "service/__pycache__/a.pyc",
        "bird.egg-info/PKG-INFO",
        "tests/unit/test_deploy.py",
    ):
        assert dockerignore_excludes(private, rules), private


def test_package_ships_its_non_python_files():
    """The images install bird as a wheel (`pip install .`): every non-Python file inside the
    packages (the dashboard page, migration templates) must be declared as package data, or
    it is missing from the images although the editable development install has it."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = (
        pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {})
    )
    missing = []
    for top in project_packages():
        for path in (REPO_ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(REPO_ROOT)
            shipped = False
            for package, patterns in package_data.items():
                package_dir = Path(*package.split(".")) if package not in ("", "*") else None
                if package_dir is not None and package_dir not in relative.parents:
                    continue
                inside = relative.relative_to(package_dir) if package_dir else Path(relative.name)
                shipped |= any(fnmatch.fnmatch(inside.as_posix(), p) for p in patterns)
            if not shipped:
                missing.append(relative.as_posix())
    assert missing == [], (
        "add them to [tool.setuptools.package-data] in pyproject.toml, e.g. "
        'service = ["dashboard/*", "migrations/*.mako"]'
    )
