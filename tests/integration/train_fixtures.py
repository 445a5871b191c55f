"""A tiny FashionMNIST-S with EfficientNet teacher features in the moto S3 endpoint.

Computed once per session (``fm_features``, registered by ``tests/conftest.py``): precomputing
features costs a Ray Data run, and the Ray tests of every module train on the same data.
``train_data``/``train_data_local`` are imported by ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bird_datasets.format import DatasetMeta
from service.settings import Settings
from service.spec import JobSpec
from service.storage import LocalStore, ObjectStore, store_from_settings
from tests.integration.api_fixtures import S3_KEY_ID, S3_REGION, S3_SECRET, _bucket
from workers.features import FeatureSet

DATASET_PREFIX = "datasets/fm"
# 400 train rows (360 after BIRD's meta slice), 300 val, 200 test: seconds per epoch.
SIZES = {"train_size": 400, "test_size": 100, "val_fraction": 0.005, "seed": 3}


@dataclass
class TrainData:
    """Everything a training test needs: the store, its settings and the published features."""

    store: ObjectStore
    store_url: str
    settings: Settings
    features: FeatureSet
    meta: DatasetMeta
    splits: Any  # bird_core DatasetSplits (test split for independent evaluation)

    def spec(self, **overrides: Any) -> JobSpec:
        """A small job spec on this dataset; ``overrides`` replace top-level sections."""
        base: dict[str, Any] = {
            "dataset": {"uri": DATASET_PREFIX},
            "student": {"model": "small_cnn", "options": {"width": 8, "embed_dim": 32}},
            "method": {"name": "bird"},
            "training": {"epochs": 2, "batch_size": 32},
            "resources": {"workers": 1, "cpus_per_worker": 0.5},
            "seed": 0,
        }
        base.update(overrides)
        return JobSpec.model_validate(base)


# The teacher of every job in the tests; the pipeline asks for the same (the spec's defaults,
# image size 32, 3 probe epochs, seed 0), so a job finds these features already published.
TEACHER = {"kind": "efficientnet_lite0_probe", "num_classes": 10, "image_size": 32}
PROBE_EPOCHS = 3


def precompute_fm_features(store: ObjectStore, preprocessing: dict, **kwargs: Any) -> FeatureSet:
    """The tests' teacher's features of the dataset at ``DATASET_PREFIX`` in ``store``: found
    published, or computed (``kwargs`` go to ``precompute_features``)."""
    from workers.features import precompute_features
    from workers.teachers import TeacherSource

    return precompute_features(
        store,
        DATASET_PREFIX,
        TeacherSource(**TEACHER),
        dataset_preprocessing=preprocessing,
        batch_size=128,
        probe_epochs=PROBE_EPOCHS,
        **kwargs,
    )


def copy_dataset_and_features(
    source: TrainData, target: ObjectStore, dataset_prefix: str = DATASET_PREFIX
) -> None:
    """Copy the dataset (to ``dataset_prefix``) and its published features (manifests last)
    into ``target``. Features are keyed by the dataset's content, so they are found wherever
    the dataset lies."""
    for prefix, to in ((DATASET_PREFIX, dataset_prefix), (source.features.prefix, None)):
        infos = sorted(source.store.list(prefix), key=lambda i: i.key.endswith("manifest.json"))
        for info in infos:
            key = info.key if to is None else to + info.key[len(prefix) :]
            target.put_bytes(key, source.store.get_bytes(info.key))


@pytest.fixture(scope="session")
def fm_features(s3_server: str, ray_local: str) -> Iterator[TrainData]:
    """FashionMNIST-S (small) and its teacher features in a bucket of their own, for the session.

    Precomputing features costs a Ray Data run with the teacher; the Ray tests share this one.
    Training tests read from it (each run under its own prefix); e2e tests copy it into the
    API's bucket; the feature tests check it against the source rows.
    """
    from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
    from bird_datasets.reader import read_dataset_meta
    from workers.datasets import load_splits

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with _bucket(s3_server, "bird-fm") as bucket:
        settings = Settings(
            s3_endpoint_url=s3_server,
            s3_access_key_id=S3_KEY_ID,
            s3_secret_access_key=S3_SECRET,
            s3_region=S3_REGION,
            store_url=f"s3://{bucket}/bird",
        )
        store = store_from_settings(settings)
        prepare_fashion_mnist_s(store, DATASET_PREFIX, **SIZES)
        splits = load_splits(store, DATASET_PREFIX)
        features = precompute_fm_features(store, splits.preprocessing)
        meta = read_dataset_meta(store, DATASET_PREFIX)
        yield TrainData(store, settings.resolved_store_url, settings, features, meta, splits)


@pytest.fixture(scope="module")
def train_data(fm_features: TrainData) -> TrainData:
    """The session's dataset and features on S3; each test's runs write under their own prefix."""
    return fm_features


@pytest.fixture(scope="module")
def train_data_local(train_data: TrainData, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    """The same dataset and features copied into a local-directory store.

    Tests that are about Ray Train rather than S3 run here: the moto server answers from a
    thread of the test process, and every Ray storage request to it costs test time.
    """
    root = tmp_path_factory.mktemp("train-local")
    store = LocalStore(root)
    copy_dataset_and_features(train_data, store)
    return TrainData(
        store,
        str(root),
        Settings(data_dir=root),
        train_data.features,
        train_data.meta,
        train_data.splits,
    )
