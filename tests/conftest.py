"""Shared fixtures: tiny synthetic datasets that train in milliseconds, the session's Ray
cluster, its S3 server and the dataset with teacher features the Ray tests share."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bird_core.data.base import DatasetSplits, Split

# Session fixtures shared by the integration and the e2e tests, registered here once (a
# session fixture imported by two conftest files would run twice): the moto S3 server, and
# the dataset with teacher features that the Ray tests train on.
from tests.integration.train_fixtures import fm_features  # noqa: F401
from tests.s3_fixtures import s3_server  # noqa: F401

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


class RayHead:
    """A Ray cluster of one node with 2 CPUs, started as ``ray start --head`` in a process of
    its own (the way a deployment starts one), so the worker processes of the tests join a
    separate cluster as ``bird worker`` does in docker-compose."""

    def __init__(self) -> None:
        def free_port() -> int:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                return probe.getsockname()[1]

        self.port, dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {
            **os.environ,
            # Workers inherit the node's environment; keep them from touching real AWS.
            "AWS_EC2_METADATA_DISABLED": "true",
            # The Train controller polls its workers every 2 s by default; each Ray Train test
            # run would spend seconds waiting on that poll alone.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A throwaway cluster on loopback: no auth token to share with its drivers.
            "RAY_AUTH_MODE": "disabled",
            # Every Ray Train run starts a preemption-watcher actor (a process of its own) to
            # react to spot-instance notices; a single local node gets none.
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            # The node's worker processes inherit this: Ray Train's placement-group cleaner
            # asks this cluster's State API, instead of scanning the machine for a Ray
            # instance (which fails when other Ray clusters run here too, as they do when
            # several test sessions share a machine).
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        }
        self.log = Path(tempfile.mkdtemp(prefix="bird-ray-")) / "head.log"
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        self.process = subprocess.Popen(
            [
                ray_cli,
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                # Ray Train's placement-group cleaner asks the dashboard's State API; without
                # it the placement groups of trials that ASHA stopped stay reserved.
                "--include-dashboard=true",
                f"--dashboard-port={dashboard_port}",
                "--dashboard-host=127.0.0.1",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def connect(self, timeout_s: float = 60) -> None:
        """Join the cluster as a driver (waits for the head to come up)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                return
            except (ConnectionError, RuntimeError) as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        f"ray start --head failed ({error}): {self.log.read_text()[-2000:]}"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node: SIGTERM (``ray start --block`` stops its node on it), then SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        # A throwaway cluster: its graceful stop can take half a minute; don't wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the node is left


_RAY_HEAD = pytest.StashKey[RayHead]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs on the session's Ray cluster (directly or through another
    fixture) as ``ray``: ``pytest -m ray`` runs exactly the Ray tests."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


class RayTestTime:
    """Adds up the time of the ``ray`` tests (setup, call and teardown: the cluster and the
    shared feature precompute are paid in the first one's setup) and prints the total at the end
    of the session, so the Ray tests' share of CI time is in every test log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "ray" in report.keywords:
            self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.seconds:
            total = sum(self.seconds.values())
            terminalreporter.write_line(
                f"Ray tests: {len(self.seconds)} tests, {total:.1f} s "
                f"({total / 60:.2f} min) of setup, call and teardown"
            )


def pytest_configure(config: pytest.Config) -> None:
    """Register the Ray test-time summary."""
    config.pluginmanager.register(RayTestTime(), "bird-ray-test-time")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Ray head in the background as soon as the session is known to need it, so its
    start-up (seconds) overlaps the tests that run before the first Ray test."""
    if any(item.get_closest_marker("ray") for item in session.items):
        session.config.stash[_RAY_HEAD] = RayHead()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop a head that was started but never used (e.g. the Ray tests were deselected)."""
    head = config.stash.get(_RAY_HEAD, None)
    if head is not None:
        head.stop()


@pytest.fixture(scope="session")
def ray_local(request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's Ray cluster (one node, 2 CPUs), shared by every Ray test; yields its address.

    Its head was started after collection (:func:`pytest_collection_finish`); this process joins
    it as a driver. Defined here, once: a session fixture imported by two conftest files would
    start Ray twice.
    """
    import ray

    head = request.config.stash.get(_RAY_HEAD, None)
    if head is None:  # collected without the fixture in sight (e.g. requested dynamically)
        head = request.config.stash[_RAY_HEAD] = RayHead()
    # This process and the worker processes the tests start join without a token too.
    previous_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head.connect()
    try:
        yield head.address
    finally:
        ray.shutdown()
        if previous_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth_mode
        head.stop()
        del request.config.stash[_RAY_HEAD]
