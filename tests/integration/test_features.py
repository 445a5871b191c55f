"""Teacher features precomputed once with Ray Data into a real S3 endpoint, and reused."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bird_core.data import load_fashion_mnist_s
from bird_core.preprocess import Preprocessor
from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from service.storage import ChecksumMismatchError, LocalStore, ObjectStore, join_key
from tests.integration.train_fixtures import SIZES as TRAIN_SIZES
from tests.integration.train_fixtures import (
    TrainData,
    copy_dataset_and_features,
    precompute_fm_features,
)
from workers import features as features_module
from workers.datasets import load_splits
from workers.features import (
    FEATURES_PREFIX,
    LOCK_NAME,
    find_features,
    iter_batches,
    load_feature_table,
    precompute_features,
    read_feature_split,
    verify_features,
)
from workers.teachers import TeacherSource

# A smaller set for the tests that compute features themselves.
SIZES = {"train_size": 120, "test_size": 20, "val_fraction": 0.005, "seed": 3}
TEACHER = TeacherSource(kind="efficientnet_lite0_probe", num_classes=10, image_size=32)


def _prepare(store: ObjectStore) -> dict:
    prepare_fashion_mnist_s(store, "datasets/fm", **SIZES)
    return load_splits(store, "datasets/fm").preprocessing


def _precompute(store: ObjectStore, preprocessing: dict, **kwargs):
    return precompute_features(
        store,
        "datasets/fm",
        TEACHER,
        dataset_preprocessing=preprocessing,
        batch_size=64,
        probe_epochs=3,
        **kwargs,
    )


def test_efficientnet_features_in_s3_match_the_source_rows(fm_features: TrainData):
    # The session's features, computed once with Ray Data into the S3 endpoint (fm_features).
    s3_store, feats = fm_features.store, fm_features.features
    preprocessing = fm_features.splits.preprocessing

    verify_features(s3_store, feats)  # every shard's sha256 against the manifest
    assert s3_store.exists(join_key(feats.prefix, "manifest.json"))
    table = load_feature_table(s3_store, feats).sort_by("id")
    source = load_fashion_mnist_s(**TRAIN_SIZES)
    expected_label = np.concatenate([source.train.label, source.val.label, source.test.label])
    expected_group = np.concatenate([source.train.group, source.val.group, source.test.group])
    assert table.num_rows == len(expected_label)
    np.testing.assert_array_equal(table.column("label").to_numpy(), expected_label)
    np.testing.assert_array_equal(table.column("group").to_numpy(), expected_group)
    assert feats.metadata["dims"] == {"embedding": 1280, "logits": 10}
    assert feats.metadata["counts"]["train"] == len(source.train)
    embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(embedding).all() and embedding.std() > 0

    # The training side: a Ray Data dataset per split, batches with the teacher's outputs.
    student_pre = Preprocessor.from_config(preprocessing)
    train = read_feature_split(s3_store, feats, "train")
    batches = list(iter_batches(train, 32, student_pre))
    assert sum(len(b.label) for b in batches) == len(source.train)
    first = batches[0]
    assert first.x.dtype == torch.float32 and first.x.shape[1:] == (3, 28, 28)
    assert first.teacher_embedding.shape == (len(first.label), 1280)
    assert first.teacher_logits.shape == (len(first.label), 10)
    train_ids = np.concatenate([np.asarray(r["id"]) for r in train.iter_batches(batch_size=None)])
    splits = table.column("split").to_numpy(zero_copy_only=False)
    expected_ids = table.column("id").to_numpy()[splits == "train"]
    assert sorted(train_ids.tolist()) == sorted(expected_ids.tolist())


def test_second_request_reuses_shards_without_running_the_teacher(
    fm_features: TrainData, monkeypatch: pytest.MonkeyPatch
):
    first = fm_features.features

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although the features were cached")

    monkeypatch.setattr(features_module, "compute_features", no_teacher)
    monkeypatch.setattr(features_module.TeacherEmbedder, "__call__", no_teacher)
    second = precompute_fm_features(fm_features.store, fm_features.splits.preprocessing)
    assert second.key == first.key and second.manifest == first.manifest


def test_corrupt_shard_is_reported_with_its_uri_or_recomputed(
    ray_local, fm_features: TrainData, local_store
):
    copy_dataset_and_features(fm_features, local_store)
    feats = fm_features.features
    shard = feats.shards[0]
    data = bytearray(local_store.get_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    local_store.put_bytes(shard, bytes(data))

    def request(**kwargs):
        return precompute_fm_features(local_store, fm_features.splits.preprocessing, **kwargs)

    with pytest.raises(ChecksumMismatchError) as info:
        request()
    assert local_store.uri(shard) in str(info.value)

    # A precompute killed half-way left its lock 61 s ago, never renewed since: the recompute
    # takes it over at once instead of waiting for a run that will never publish.
    abandoned = {"run": "killed", "at": time.time() - 61}
    local_store.put_bytes(join_key(feats.prefix, LOCK_NAME), json.dumps(abandoned).encode())
    repaired = request(recompute_corrupt=True, wait_timeout_s=5)
    verify_features(local_store, repaired)
    assert repaired.key == feats.key
    assert repaired.shards != feats.shards  # a new run's shards, under its own prefix


def test_concurrent_requests_publish_one_complete_set(ray_local, local_store):
    preprocessing = _prepare(local_store)
    results, errors = [], []

    def request() -> None:
        try:
            results.append(_precompute(local_store, preprocessing))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2 and results[0].manifest == results[1].manifest
    # Only one run computed: the other waited on its lock and reused the published set.
    runs = {
        info.key.split("/")[2] for info in local_store.list(FEATURES_PREFIX) if "/run-" in info.key
    }
    assert len(runs) == 1
    published = find_features(local_store, results[0].key)
    assert published is not None
    verify_features(local_store, published)
    for shard in published.shards:
        pq.read_table(io.BytesIO(local_store.get_bytes(shard)))


def test_features_go_to_the_cache_store_keyed_by_content_never_into_the_dataset(
    ray_local, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    # The dataset's store (a tenant's upload, a shared dataset) is only read; the features
    # land in the deployment's store, and the same content elsewhere finds them there.
    data = LocalStore(tmp_path / "data")
    cache = LocalStore(tmp_path / "cache")
    preprocessing = _prepare(data)
    before = {info.key: data.get_bytes(info.key) for info in data.list("")}
    first = _precompute(data, preprocessing, cache_store=cache)
    assert {info.key: data.get_bytes(info.key) for info in data.list("")} == before
    assert first.prefix.startswith(FEATURES_PREFIX + "/")
    assert cache.exists(join_key(first.prefix, "manifest.json"))
    verify_features(cache, first)
    assert {info.key.split("/")[0] for info in cache.list("")} == {FEATURES_PREFIX}

    elsewhere = LocalStore(tmp_path / "elsewhere")
    for info in data.list("datasets/fm"):
        elsewhere.put_bytes(
            "tenants/9/" + info.key, data.get_bytes(info.key)
        )  # manifest order does not matter here: nothing reads it concurrently

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although features of this content were cached")

    monkeypatch.setattr(features_module, "compute_features", no_teacher)
    second = precompute_features(
        elsewhere,
        "tenants/9/datasets/fm",
        TEACHER,
        dataset_preprocessing=preprocessing,
        batch_size=64,
        probe_epochs=3,
        cache_store=cache,
    )
    assert second.key == first.key and second.manifest == first.manifest
