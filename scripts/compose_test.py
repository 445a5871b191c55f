#!/usr/bin/env python3
"""`make compose-test`: the docker-compose deployment built and run for real, a job through it.

On a machine that reaches no container registry (only the package registries), this:

1. **base images** — builds local stand-ins for the public base images from Debian's packages:
   ``debootstrap`` of Debian bookworm imported as ``bird-local/debian``; on it Python 3.11
   (``python.Dockerfile``), torch + torchvision from wheels this machine's pip finds
   (``pip download``; installed from a bind mount, then ``docker commit``), PostgreSQL
   (``postgres.Dockerfile``) and moto's S3 server (``s3.Dockerfile``, MinIO is not packaged).
   The Debian and torch images are kept between runs (``--rebuild-base`` makes them anew);
   the others are ``docker build`` runs that the layer cache makes instant when nothing changed.
2. **api image**, 3. **worker image** — ``deploy/Dockerfile``, its base images given as build
   arguments (the torch stand-in for both).
4. **up** — ``docker-compose.yml`` plus ``deploy/local/compose.yml`` (which swaps only the
   PostgreSQL and MinIO images), profile ``cpu`` with two CPU Ray nodes
   (``--scale ray-worker-cpu=2``), on free host ports; waits for the API's ``/readyz`` and for
   every Ray node (head, two CPU nodes, the job worker's own node) to be alive.
5. **dataset** — a small FashionMNIST-S written from the host into the stack's S3 endpoint.
6. **job** — an API key (``bird keys create`` in the api container), then ``POST /jobs``: BIRD
   with 2 Ray Train ranks, ``placement: spread``, from the host over HTTP. Once the first epoch
   is reported, the rank placement is read from Ray (the dashboard's Train state: which node ran
   which rank): one rank per CPU node, the nodes sharing nothing but S3 and PostgreSQL.
7. **node loss** — the CPU node container of rank 1 is stopped (``docker stop``) mid-training;
   the run must restore from its last checkpoint on the node that remains and the job succeed,
   with every epoch's metrics exactly once and the restore in the job's log.
8. **download** — the ``best`` checkpoint through the API (a 307 to a URL presigned for the
   public S3 address), verified, loaded with ``load_student``; evaluated on the host, it gives
   the test metrics the job reported.
9. **down** — ``docker compose down -v`` (also after a failure, unless ``--keep``).

Each phase's time is printed (and written as JSON with ``--json``); any failure exits 1.
Needs: root (debootstrap), Docker Engine and a compose CLI (``docker compose`` or Debian's
``docker-compose``), and bird installed in this Python (``make compose-test`` does that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
LOCAL_DIR = ROOT / "deploy" / "local"
OVERRIDE_FILE = LOCAL_DIR / "compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROJECT = "bird-compose-test"

# The local stand-ins. deploy/local/compose.yml names POSTGRES_IMAGE and S3_IMAGE
# (tests/unit/test_deploy.py checks that the two files agree).
DEBIAN_SUITE = "bookworm"
DEBIAN_IMAGE = "bird-local/debian:bookworm"
PYTHON_IMAGE = "bird-local/python:3.11-bookworm"
POSTGRES_IMAGE = "bird-local/postgres:15"
S3_IMAGE = "bird-local/s3:moto-5.1.22"
LOCAL_DOCKERFILES = {
    PYTHON_IMAGE: ("python.Dockerfile", {"DEBIAN_IMAGE": DEBIAN_IMAGE}),
    POSTGRES_IMAGE: ("postgres.Dockerfile", {"DEBIAN_IMAGE": DEBIAN_IMAGE}),
    S3_IMAGE: ("s3.Dockerfile", {"PYTHON_IMAGE": PYTHON_IMAGE}),
}
# The torch the Makefile installs on these machines: its wheels lie on local disk here.
DEFAULT_TORCH_SPEC = "torch==2.14.1 torchvision==0.29.1"
API_IMAGE = "bird-api:compose-test"
WORKER_IMAGE = "bird-worker:compose-test"
# Build arguments of deploy/Dockerfile that name its base images (both get the torch stand-in).
BASE_IMAGE_ARGS = ("PYTHON_IMAGE", "WORKER_BASE_IMAGE")

# Compose-level settings of the run (the rest keep docker-compose.yml's defaults). Set here so a
# developer's .env (passwords, COMPOSE_PROFILES=gpu) cannot change what is tested.
S3_USER, S3_PASSWORD, S3_BUCKET = "bird", "bird-minio-secret", "bird"
CPU_NODES = 2

DATASET_PREFIX = "datasets/fm"
# Large enough that an epoch outlasts stopping a node (seconds, on two busy cores).
DATASET_SIZES = {"train_size": 8000, "test_size": 400, "val_fraction": 0.01, "seed": 3}
EPOCHS = 8
JOB_SPEC: dict[str, Any] = {
    "dataset": {"uri": DATASET_PREFIX},
    "teacher": {"image_size": 32, "probe_epochs": 3},
    "student": {"model": "small_cnn", "options": {"width": 8, "embed_dim": 32}},
    "method": {"name": "bird"},
    "training": {"epochs": EPOCHS, "batch_size": 32},
    # Half a CPU per rank: when a node is lost, Ray rebuilds the dataset blocks that lived on it
    # with tasks of one CPU each, which must find a CPU beside the two ranks restored on the
    # remaining node (2 CPUs).
    "resources": {"workers": 2, "cpus_per_worker": 0.5, "placement": "spread"},
    "max_attempts": 3,
}
# Test metrics recomputed on the host against those the job reported (percentages).
METRIC_TOLERANCE = 1e-3


class Failure(Exception):
    """A phase failed; the message says what was expected and what happened."""


# -- running commands ----------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs commands, their output into one log file (shown in part when a command fails)."""

    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __call__(
        self, *args: str | Path, capture: bool = False, check: bool = True, timeout: float = 3600
    ) -> str:
        command = [str(a) for a in args]
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            process = subprocess.run(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                text=True,
                timeout=timeout,
            )
        if check and process.returncode != 0:
            tail = self.log.read_text().splitlines()[-25:]
            raise Failure(
                f"`{' '.join(command)}` exited {process.returncode}; last lines of {self.log}:\n"
                + "\n".join(tail)
            )
        return process.stdout if capture else ""


def compose_cli() -> list[str]:
    """``docker compose`` (the v2 plugin) where it exists, else Debian's ``docker-compose``."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    raise Failure(
        "no compose CLI: install the docker compose plugin, or Debian's docker-compose "
        "(apt-get install docker-compose)"
    )


def image_exists(image: str) -> bool:
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    return inspect.returncode == 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (from the ephemeral range: never one of the fixed ones)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 2) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Failure:
            raise
        except Exception as error:  # a service still starting: try again
            last_error = error
        time.sleep(every_s)
    raise Failure(
        f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})"
    )


def http_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


# -- phases --------------------------------------------------------------------------------------


@dataclass
class Phases:
    """Times each phase; prints and collects the results."""

    times: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        print(f"==> {name}", flush=True)
        record: dict[str, Any] = {"phase": name}
        started = time.monotonic()
        try:
            yield record
        except BaseException:
            record.update(seconds=round(time.monotonic() - started, 1), ok=False)
            self.times.append(record)
            print(f"    FAILED after {record['seconds']} s", flush=True)
            raise
        record.update(seconds=round(time.monotonic() - started, 1), ok=True)
        self.times.append(record)
        note = f"  ({record['note']})" if "note" in record else ""
        print(f"    {record['seconds']} s{note}", flush=True)


def build_debian_image(run: Runner, mirror: str, ca_bundle: Path | None) -> None:
    """``debootstrap`` of Debian into a directory, imported as DEBIAN_IMAGE.

    The build host's CA bundle goes in as an extra CA (where the host reaches the package
    registries through a TLS-inspecting proxy, pip inside the builds must trust what the host
    trusts); apt uses the same plain-HTTP mirror as debootstrap.
    """
    if shutil.which("debootstrap") is None:
        raise Failure("debootstrap is missing: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="bird-rootfs-") as rootfs:
        run("debootstrap", "--variant=minbase", DEBIAN_SUITE, rootfs, mirror, timeout=1800)
        root = Path(rootfs)
        (root / "etc/apt/sources.list").write_text(
            f"deb {mirror} {DEBIAN_SUITE} main\n"
            f"deb {mirror} {DEBIAN_SUITE}-updates main\n"
            f"deb {mirror.rstrip('/')}-security {DEBIAN_SUITE}-security main\n"
        )
        if ca_bundle is not None and ca_bundle.is_file():
            target = root / "usr/local/share/ca-certificates/build-host.crt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca_bundle, target)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", DEBIAN_IMAGE], stdin=tar.stdout, capture_output=True
        )
        tar.wait()
        if tar.returncode != 0 or imported.returncode != 0:
            raise Failure(f"docker import of the Debian rootfs failed: {imported.stderr!r}")


def torch_image_name(torch_spec: str) -> str:
    """``bird-local/torch:<versions>`` for a spec like ``torch==2.14.1 torchvision==0.29.1``."""
    versions = [part.split("==", 1)[1] for part in torch_spec.split() if "==" in part]
    if len(versions) != 2:
        raise Failure(f"--torch-spec needs exact torch and torchvision versions: {torch_spec!r}")
    return f"bird-local/torch:{'-'.join(versions)}"


def build_torch_image(run: Runner, torch_spec: str, image: str) -> None:
    """PYTHON_IMAGE plus torch and torchvision, from the wheels this machine's pip finds.

    The wheels are gathered with ``pip download`` (from local wheel directories where pip is
    configured with them, else from the package index), bind-mounted into a container that
    installs them with ``--no-index``, and the container is committed: the wheels never
    become a layer of the image.
    """
    container = f"{PROJECT}-torch-build"
    run("docker", "rm", "-f", container, check=False)
    with tempfile.TemporaryDirectory(prefix="bird-wheels-") as wheels:
        run(
            sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", wheels,
            *torch_spec.split(),
        )  # fmt: skip
        os.chmod(wheels, 0o755)
        install = (
            f"pip install --no-cache-dir --no-index --find-links /wheels {torch_spec} && "
            "python -c 'import torch, torchvision; print(torch.__version__)'"
        )
        run(
            "docker", "run", "--name", container, "-v", f"{wheels}:/wheels:ro",
            PYTHON_IMAGE, "sh", "-c", install,
        )  # fmt: skip
    run("docker", "commit", "--change", 'CMD ["python3"]', container, image)
    run("docker", "rm", container)


def build_local_image(run: Runner, image: str) -> None:
    dockerfile, args = LOCAL_DOCKERFILES[image]
    build_args = [f"--build-arg={key}={value}" for key, value in args.items()]
    run("docker", "build", "-f", LOCAL_DIR / dockerfile, *build_args, "-t", image, LOCAL_DIR)


def build_bird_image(run: Runner, target: str, image: str, base: str) -> None:
    # The classic builder builds every stage up to the target, so both base images are given.
    build_args = [f"--build-arg={arg}={base}" for arg in BASE_IMAGE_ARGS]
    run("docker", "build", "-f", DOCKERFILE, "--target", target, *build_args, "-t", image, ".")


@dataclass
class Stack:
    """The running compose project: its CLI, ports and helpers."""

    run: Runner
    cli: list[str]
    ports: dict[str, int]

    def compose(self, *args: str, capture: bool = False, check: bool = True) -> str:
        files = ["-f", str(COMPOSE_FILE), "-f", str(OVERRIDE_FILE)]
        return self.run(
            *self.cli, "-p", PROJECT, "--project-directory", str(ROOT), *files, *args,
            capture=capture, check=check,
        )  # fmt: skip

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['API_PORT']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['MINIO_API_PORT']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['RAY_DASHBOARD_PORT']}"

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, capture=True).split()

    def container_ip(self, container: str) -> str:
        template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        return self.run("docker", "inspect", "-f", template, container, capture=True).split()[0]

    def container_name(self, container: str) -> str:
        return self.run("docker", "inspect", "-f", "{{.Name}}", container, capture=True).strip(
            "/\n"
        )

    def ray_nodes(self) -> list[dict[str, Any]]:
        """Ray's alive nodes (state API of the head's dashboard)."""
        answer = http_json(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=true")
        nodes = answer["data"]["result"]["result"]
        return [node for node in nodes if node.get("state") == "ALIVE"]

    def train_runs(self) -> list[dict[str, Any]]:
        """Ray Train's runs with their attempts and workers (world rank, node)."""
        return http_json(f"{self.dashboard_url}/api/train/v2/runs/v1")["train_runs"]


def environment(ports: dict[str, int]) -> dict[str, str]:
    return {
        **os.environ,
        **{name: str(port) for name, port in ports.items()},
        "COMPOSE_PROFILES": "cpu",
        "API_IMAGE": API_IMAGE,
        "WORKER_IMAGE": WORKER_IMAGE,
        "MINIO_ROOT_USER": S3_USER,
        "MINIO_ROOT_PASSWORD": S3_PASSWORD,
        "S3_BUCKET": S3_BUCKET,
        "S3_PUBLIC_URL": f"http://127.0.0.1:{ports['MINIO_API_PORT']}",
        "LOG_LEVEL": "info",
    }


def bring_up(stack: Stack, record: dict[str, Any]) -> None:
    stack.compose("down", "-v", "--remove-orphans", check=False)  # what a failed run left
    up = ("up", "-d", "--no-build", "--scale", f"ray-worker-cpu={CPU_NODES}")
    retried = False
    try:
        stack.compose(*up)
    except Failure as error:
        # docker-compose v1 gives up at once when a dependency reports unhealthy while it
        # starts (seen once on a busy 2-core machine, likely the Ray head's slow `ray status`
        # healthcheck); `up` again waits for the same conditions and starts what is missing.
        print(f"    `up` failed, once more: {str(error).splitlines()[-1]}", flush=True)
        retried = True
        stack.compose(*up)

    def ready() -> bool:
        with urllib.request.urlopen(f"{stack.api_url}/readyz", timeout=5) as response:
            return response.status == 200

    wait_for("the API's /readyz", ready, timeout_s=600)
    if len(stack.containers("ray-worker-cpu")) != CPU_NODES:
        raise Failure(f"expected {CPU_NODES} ray-worker-cpu containers")

    # A Ray node that is slow to start on a busy machine exits, and its restart policy starts
    # it again (on a new address, maybe): the addresses are read anew each time.
    def all_nodes() -> list[dict[str, Any]] | None:
        expected = {stack.container_ip(c) for c in stack.containers("ray-worker-cpu")}
        expected |= {stack.container_ip(c) for c in stack.containers("worker")}
        nodes = stack.ray_nodes()
        return nodes if expected <= {node["node_ip"] for node in nodes} else None

    nodes = wait_for("every Ray node to be alive", all_nodes, timeout_s=600, every_s=3)
    record["note"] = f"{len(nodes)} Ray nodes alive" + (" (`up` run twice)" if retried else "")


def write_dataset(stack: Stack) -> Any:
    """FashionMNIST-S (small) into the stack's bucket from the host; returns its splits."""
    from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
    from service.settings import Settings
    from service.storage import open_store
    from workers.datasets import load_splits

    settings = Settings(
        s3_endpoint_url=stack.s3_url,
        s3_access_key_id=S3_USER,
        s3_secret_access_key=S3_PASSWORD,
    )
    store = open_store(f"s3://{S3_BUCKET}/store", settings)
    prepare_fashion_mnist_s(store, DATASET_PREFIX, **DATASET_SIZES)
    return load_splits(store, DATASET_PREFIX)


def create_key(stack: Stack) -> str:
    output = stack.compose(
        "exec", "-T", "api", "bird", "keys", "create", "--tenant", "compose-test", capture=True
    )
    key = output.strip().splitlines()[-1].strip()
    if not key.startswith("bird_"):
        raise Failure(f"bird keys create printed no key: {output!r}")
    return key


def val_epochs(client: Any, job_id: int) -> list[int]:
    series = client.metrics(job_id)["series"]
    return sorted(
        p["epoch"]
        for p in series
        if p["split"] == "val" and p["name"] == "objective" and p["trial"] is None
    )


def placement(stack: Stack, names: dict[str, str]) -> list[dict[str, Any]]:
    """Every attempt of the job's training run: (world rank, node container) of each worker."""
    runs = stack.train_runs()
    if not runs:
        return []
    run = max(runs, key=lambda r: r.get("start_time_ns") or 0)
    attempts = []
    for attempt in sorted(run.get("attempts", []), key=lambda a: a.get("start_time_ns") or 0):
        workers = sorted(attempt.get("workers", []), key=lambda w: w["world_rank"])
        attempts.append(
            {
                "status": attempt.get("status"),
                "ranks": {w["world_rank"]: names.get(w["node_ip"], w["node_ip"]) for w in workers},
            }
        )
    return attempts


def run_job(stack: Stack, key: str, record: dict[str, Any], results: dict[str, Any]) -> Any:
    from service.client import BirdClient

    client = BirdClient(stack.api_url, key, timeout=60)
    job = client.submit(JOB_SPEC)
    job_id = job["id"]
    results["job_id"] = job_id
    # Ray names nodes by address; the containers' names say which node is which.
    names = {
        stack.container_ip(c): stack.container_name(c) for c in stack.containers("ray-worker-cpu")
    }
    results["nodes"] = names

    def first_epoch() -> bool:
        state = client.get_job(job_id)["state"]
        if state in ("failed", "cancelled", "succeeded"):
            raise Failure(
                f"job {job_id} ended {state} before its first epoch: {client.get_job(job_id)}"
            )
        return bool(val_epochs(client, job_id))

    wait_for(f"job {job_id}'s first epoch", first_epoch, timeout_s=1800, every_s=1)
    attempts = wait_for(
        "the rank placement in Ray's Train state", lambda: placement(stack, names), 60
    )
    first = attempts[-1]["ranks"]
    results["placement_before"] = first
    record["note"] = f"job {job_id}: ranks {first}"
    if len(set(first.values())) != 2:
        raise Failure(f"the 2 ranks did not spread over 2 nodes: {first}")
    return client


def lose_a_node(stack: Stack, client: Any, record: dict[str, Any], results: dict[str, Any]) -> None:
    job_id = results["job_id"]
    victim_name = results["placement_before"][1]
    victim = next(
        c for c in stack.containers("ray-worker-cpu") if stack.container_name(c) == victim_name
    )
    epochs_before = val_epochs(client, job_id)
    stack.run("docker", "stop", "--time", "5", victim)
    results["stopped"] = {"container": victim_name, "after_epochs": epochs_before}
    print(f"    stopped {victim_name} (rank 1) after epoch {max(epochs_before)}", flush=True)

    def finished() -> dict[str, Any] | None:
        job = client.get_job(job_id)
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(f"job {job_id} to finish", finished, timeout_s=1200, every_s=2)
    if job["state"] != "succeeded":
        raise Failure(f"job {job_id} ended {job['state']}: {job.get('error')}")
    if max(epochs_before) >= EPOCHS:
        raise Failure("the node stopped after the last epoch: nothing was restored (more epochs?)")
    epochs = val_epochs(client, job_id)
    results["epochs"] = epochs
    if epochs != list(range(1, EPOCHS + 1)):
        raise Failure(f"every epoch's metrics once expected, got epochs {epochs}")
    messages = [line["message"] for line in client.logs(job_id)["items"]]
    restores = [m for m in messages if "resumed from the checkpoint" in m]
    results["restore_log"] = restores
    if not restores:
        raise Failure(f"no restore in the job's log: {messages[-20:]}")
    attempts = placement(stack, results["nodes"])
    results["attempts"] = attempts
    survivor = next(n for n in results["placement_before"].values() if n != victim_name)
    last = attempts[-1]["ranks"]
    if set(last.values()) != {survivor}:
        raise Failure(f"the last attempt should run both ranks on {survivor}: {attempts}")
    record["note"] = f"{len(attempts)} attempts; restored on {survivor}; epochs {epochs}"


def check_download(
    client: Any,
    job_id: int,
    splits: Any,
    stack: Stack,
    record: dict[str, Any],
    results: dict[str, Any],
) -> None:
    from bird_core.checkpoint import load_student
    from bird_core.train import evaluate

    records = {c["name"]: c for c in client.checkpoints(job_id)}
    url = records["best"]["url"]
    if not url.startswith(stack.s3_url):
        raise Failure(f"the best checkpoint's URL is not presigned for {stack.s3_url}: {url}")
    with tempfile.TemporaryDirectory(prefix="bird-ckpt-") as directory:
        path = client.download_checkpoint(job_id, "best", directory)
        student = load_student(path)
        test = evaluate(student.model, student.preprocess, splits.test, splits.task)
    reported = client.metrics(job_id)["latest"]["test"]
    compared = {}
    for name in ("auroc", "accuracy", "f1", "delta_mean_deo", "delta_max_deo"):
        compared[name] = (round(test[name], 4), reported[name])
        if abs(test[name] - reported[name]) > METRIC_TOLERANCE:
            raise Failure(
                f"test {name}: {test[name]} on the host, {reported[name]} reported by the job"
            )
    results["test_metrics"] = compared
    record["note"] = f"best of epoch {student.meta.get('epoch')}: test auroc {test['auroc']:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rebuild-base", action="store_true", help="rebuild the Debian and torch stand-ins"
    )
    parser.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", DEFAULT_TORCH_SPEC))
    parser.add_argument("--debian-mirror", default="http://deb.debian.org/debian")
    parser.add_argument(
        "--ca-bundle", type=Path, default=Path("/etc/ssl/certs/ca-certificates.crt")
    )
    parser.add_argument("--json", type=Path, help="write the phase times and results here")
    parser.add_argument("--log", type=Path, help="command output (default: a temporary file)")
    args = parser.parse_args()

    log = args.log or Path(tempfile.mkstemp(prefix="bird-compose-test-", suffix=".log")[1])
    names = ("API_PORT", "MINIO_API_PORT", "MINIO_CONSOLE_PORT", "RAY_DASHBOARD_PORT")
    ports = {name: free_port() for name in names}
    run = Runner(log, environment(ports))
    phases = Phases()
    results: dict[str, Any] = {"ports": ports}
    torch_image = torch_image_name(args.torch_spec)
    stack: Stack | None = None
    failure: str | None = None
    print(f"compose test: command output in {log}", flush=True)
    try:
        with phases("base images") as record:
            built = []
            if args.rebuild_base or not image_exists(DEBIAN_IMAGE):
                build_debian_image(run, args.debian_mirror, args.ca_bundle)
                built.append(DEBIAN_IMAGE)
            build_local_image(run, PYTHON_IMAGE)
            if args.rebuild_base or not image_exists(torch_image):
                build_torch_image(run, args.torch_spec, torch_image)
                built.append(torch_image)
            for image in (POSTGRES_IMAGE, S3_IMAGE):
                build_local_image(run, image)
            record["note"] = "built anew: " + (", ".join(built) or "none (cached)")
        with phases("api image"):
            build_bird_image(run, "api", API_IMAGE, torch_image)
        with phases("worker image"):
            build_bird_image(run, "worker", WORKER_IMAGE, torch_image)
        stack = Stack(run, compose_cli(), ports)
        with phases("up (healthy)") as record:
            bring_up(stack, record)
        with phases("dataset") as record:
            splits = write_dataset(stack)
            record["note"] = (
                f"{len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test rows"
            )
        with phases("job to its first epoch") as record:
            client = run_job(stack, create_key(stack), record, results)
        with phases("node stopped, restore, job finished") as record:
            lose_a_node(stack, client, record, results)
        with phases("presigned download, load_student") as record:
            check_download(client, results["job_id"], splits, stack, record, results)
    except (Failure, subprocess.TimeoutExpired) as error:
        failure = str(error)
    except Exception as error:
        failure = f"{type(error).__name__}: {error}"
    finally:
        if stack is not None and failure is not None:
            print(stack.compose("logs", "--tail", "30", capture=True, check=False)[-6000:])
            status = ["exec", "-T", "ray-head", "ray", "status"]
            print(stack.compose(*status, capture=True, check=False)[-3000:])
        if stack is not None and not args.keep:
            with phases("down -v"):
                stack.compose("down", "-v", "--remove-orphans", check=False)

    print("\nphase                                   seconds")
    for record in phases.times:
        flag = "" if record["ok"] else "  FAILED"
        print(f"{record['phase']:38s} {record['seconds']:8.1f}{flag}")
    total = sum(record["seconds"] for record in phases.times)
    print(f"{'total':38s} {total:8.1f}")
    for key in ("placement_before", "stopped", "attempts", "restore_log", "test_metrics"):
        if key in results:
            print(f"{key}: {json.dumps(results[key])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"phases": phases.times, "failure": failure, **results}, indent=2)
        )
    if failure:
        print(f"\nFAILED: {failure}", file=sys.stderr)
        return 1
    print("\ncompose test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
