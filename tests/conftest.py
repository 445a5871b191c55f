"""Small shared fixtures: tiny synthetic datasets that train in milliseconds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bird_core.data.base import DatasetSplits, Split

NUM_CLASSES = 3
NUM_GROUPS = 2
IMAGE_SIZE = 8
TABULAR_FEATURES = 5


def make_image_split(n: int, seed: int, size: int = IMAGE_SIZE) -> Split:
    """``n`` rows of uint8 ``[3, size, size]`` images; every (class, group) cell is populated.

    Labels cycle 0, 1, 2 and groups alternate every three rows, so each of the six cells holds
    ``n / 6`` rows. The class shifts the mean brightness of one channel so a model can learn it.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    label = rows % NUM_CLASSES
    group = (rows // NUM_CLASSES) % NUM_GROUPS
    x = torch.randint(0, 160, (n, 3, size, size), generator=generator)
    x[torch.arange(n), label] += 80  # class signal: the channel of the class is brighter
    return Split(x.to(torch.uint8), label.long(), group.long())


def make_tabular_split(n: int, seed: int) -> Split:
    """``n`` rows of float32 ``[TABULAR_FEATURES]`` features with cycling labels and groups."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    label = rows % NUM_CLASSES
    group = (rows // NUM_CLASSES) % NUM_GROUPS
    x = torch.randn(n, TABULAR_FEATURES, generator=generator)
    x[:, 0] += label.float()
    return Split(x, label.long(), group.long())


@pytest.fixture(scope="module")
def single_thread():
    """Run torch on one thread: tiny models are dominated by OpenMP start-up and barrier costs
    (tens of milliseconds per op on a busy two-core machine, against microseconds on one thread).
    The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


IMAGE_PREPROCESSING = {"kind": "image", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="session")
def tiny_image_data() -> DatasetSplits:
    """96 train / 48 val / 48 test 8×8 RGB images, 3 classes, 2 groups."""
    return DatasetSplits(
        name="tiny-images",
        train=make_image_split(96, seed=0),
        val=make_image_split(48, seed=1),
        test=make_image_split(48, seed=2),
        num_classes=NUM_CLASSES,
        num_groups=NUM_GROUPS,
        task="multiclass",
        preprocessing=dict(IMAGE_PREPROCESSING),
    )


@pytest.fixture(scope="session")
def tiny_tabular_data() -> DatasetSplits:
    """60 train / 30 val / 30 test rows of 5 features, 3 classes, 2 groups."""
    return DatasetSplits(
        name="tiny-tabular",
        train=make_tabular_split(60, seed=0),
        val=make_tabular_split(30, seed=1),
        test=make_tabular_split(30, seed=2),
        num_classes=NUM_CLASSES,
        num_groups=NUM_GROUPS,
        task="multiclass",
        preprocessing={
            "kind": "tabular",
            "mean": [0.0] * TABULAR_FEATURES,
            "std": [1.0] * TABULAR_FEATURES,
        },
    )


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray cluster of one node with 2 CPUs, shared by every Ray test of the session; yields
    its address.

    Started the way a deployment starts one, ``ray start --head`` in a process of its own, so
    the worker processes of the tests join a separate cluster as ``bird worker`` does in
    docker-compose. This process joins it as a driver. Defined here, once: a session fixture
    imported by two conftest files would start Ray twice.
    """
    import contextlib
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import ray

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        # Workers inherit the node's environment; keep them from touching real AWS.
        "AWS_EC2_METADATA_DISABLED": "true",
        # The Train controller polls its workers every 2 s by default; each Ray Train test run
        # would spend seconds waiting on that poll alone.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A throwaway cluster on loopback: no auth token to share with its drivers.
        "RAY_AUTH_MODE": "disabled",
    }
    log = tmp_path_factory.mktemp("ray") / "head.log"
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    # This process and the worker processes the tests start join without a token too.
    previous_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            break
        except (ConnectionError, RuntimeError) as error:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail(f"ray start --head failed ({error}): {log.read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield address
    finally:
        ray.shutdown()
        if previous_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth_mode
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
        # A throwaway cluster: its graceful stop can take half a minute; don't wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the node is left
