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
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs shared by every Ray test of the session (integration and e2e).

    Defined here, once: a session fixture imported by two conftest files would start Ray twice.
    """
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Workers inherit this process's environment; keep them from touching real AWS.
        runtime_env={
            "env_vars": {
                "AWS_EC2_METADATA_DISABLED": "true",
                # The Train controller polls its workers every 2 s by default; each Ray Train
                # test run would spend seconds waiting on that poll alone.
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            }
        },
    )
    try:
        yield
    finally:
        ray.shutdown()
