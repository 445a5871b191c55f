"""The one resolver of dataset URIs (bird_datasets/location.py), as the API, the worker and
the CLI use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bird_datasets.format import DatasetError
from bird_datasets.location import DatasetURIError, resolve_dataset_uri
from service.settings import Settings
from service.storage import LocalStore, S3Store, StorageError


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", s3_endpoint_url="http://127.0.0.1:9")


def test_a_relative_name_is_a_prefix_of_the_deployment_store(tmp_path: Path, settings):
    deployment = LocalStore(tmp_path / "store")
    store, prefix = resolve_dataset_uri("datasets/fmnist/", settings, deployment)
    assert store is deployment and prefix == "datasets/fmnist"


def test_without_a_deployment_store_a_relative_name_is_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store, prefix = resolve_dataset_uri("ds/fmnist", Settings())
    assert isinstance(store, LocalStore) and prefix == ""
    assert store.root == (tmp_path / "ds" / "fmnist").resolve()


def test_s3_and_local_uris_open_a_store_at_the_dataset(tmp_path: Path, settings):
    deployment = LocalStore(tmp_path / "store")
    store, prefix = resolve_dataset_uri("s3://bird-data/datasets/x", settings, deployment)
    assert isinstance(store, S3Store) and prefix == ""
    assert store.uri() == "s3://bird-data/datasets/x"
    assert store.endpoint_url == "http://127.0.0.1:9"  # the deployment's endpoint
    for uri in (str(tmp_path / "d"), (tmp_path / "d").as_uri()):
        store, prefix = resolve_dataset_uri(uri, settings, deployment)
        assert isinstance(store, LocalStore) and store.root == (tmp_path / "d").resolve()
        assert prefix == ""


def test_the_opener_is_used_for_stores_of_their_own(tmp_path: Path, settings):
    opened: list[str] = []

    def opener(url: str) -> LocalStore:
        opened.append(url)
        return LocalStore(tmp_path / "opened")

    resolve_dataset_uri("s3://bird-data/a/b", settings, LocalStore(tmp_path), opener=opener)
    resolve_dataset_uri("s3://bird-data", settings, LocalStore(tmp_path), opener=opener)
    assert opened == ["s3://bird-data/a/b", "s3://bird-data"]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("s3://Not_A_Bucket/x", "'Not_A_Bucket' is not a valid S3 bucket name"),
        ("s3://bird-data/a/../b", "'..' segments are not allowed"),
        ("file://host/x", "file URIs must name a local path"),
        ("../etc", "'..' segments are not allowed"),
        ("datasets//x", "empty path segments"),
        ("", "it is empty"),
        ("./", "'.' segments are not allowed"),
        ("data\x00sets", "NUL"),
    ],
)
def test_what_cannot_name_a_dataset_has_one_message(tmp_path: Path, settings, uri, reason):
    with pytest.raises(DatasetURIError) as raised:
        resolve_dataset_uri(uri, settings, LocalStore(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"dataset URI {uri!r} is invalid: ") and reason in message
    # Every caller's error handling sees it: a dataset error is a storage error.
    assert isinstance(raised.value, DatasetError) and isinstance(raised.value, StorageError)
