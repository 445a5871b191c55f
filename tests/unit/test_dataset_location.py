"""The one resolver of dataset URIs (bird_datasets/location.py), as the API, the worker and
the CLI use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bird_datasets.format import DatasetError
from bird_datasets.location import (
    DatasetURIError,
    is_external_uri,
    resolve_dataset_uri,
    resolve_tenant_key,
    tenant_prefix,
)
from service.settings import Settings
from service.storage import LocalStore, S3Store, StorageError


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A single-user install: URIs outside the store are allowed."""
    return Settings(
        data_dir=tmp_path / "data", s3_endpoint_url="http://127.0.0.1:9", allow_external_uris=True
    )


@pytest.fixture
def shared_settings(tmp_path: Path) -> Settings:
    """A multi-tenant deployment: the default."""
    return Settings(data_dir=tmp_path / "data", s3_endpoint_url="http://127.0.0.1:9")


def test_external_uris_are_refused_by_default() -> None:
    assert Settings().allow_external_uris is False


def test_a_tenants_name_lies_in_its_own_space_and_shared_names_are_as_written(
    tmp_path: Path, shared_settings: Settings
) -> None:
    deployment = LocalStore(tmp_path / "store")
    assert tenant_prefix(7) == "tenants/7"
    for uri, key in [
        ("datasets/fmnist", "tenants/7/datasets/fmnist"),
        ("datasets/fmnist/", "tenants/7/datasets/fmnist"),
        # Another tenant's prefix, named by tenant 7, is a name inside tenant 7's space.
        ("tenants/3/datasets/x", "tenants/7/tenants/3/datasets/x"),
        ("jobs/12/checkpoints", "tenants/7/jobs/12/checkpoints"),
        ("shared/datasets/fmnist", "shared/datasets/fmnist"),
        ("shared", "shared"),
        ("sharedx/y", "tenants/7/sharedx/y"),
    ]:
        store, prefix = resolve_dataset_uri(uri, shared_settings, deployment, tenant_id=7)
        assert store is deployment and prefix == key, uri
        assert resolve_tenant_key(uri, 7) == key
    # Without a tenant (operators' tools) names are keys from the store's root.
    assert resolve_tenant_key("datasets/fmnist", None) == "datasets/fmnist"


@pytest.mark.parametrize(
    "uri",
    [
        "/etc/passwd",
        "/proc/self/environ",
        "file:///etc/passwd",
        "file://localhost/tmp/x",
        "s3://other-bucket/datasets/x",
        "s3://Not_A_Bucket/x",
        "gs://bucket/x",
        "C:\\data",
        "\\\\host\\share",
    ],
)
def test_a_deployment_refuses_what_lies_outside_the_store_before_reading(
    tmp_path: Path, shared_settings: Settings, uri: str
) -> None:
    opened: list[str] = []

    def opener(url: str) -> LocalStore:
        opened.append(url)
        return LocalStore(tmp_path / "opened")

    with pytest.raises(DatasetURIError) as raised:
        resolve_dataset_uri(
            uri, shared_settings, LocalStore(tmp_path / "store"), tenant_id=1, opener=opener
        )
    # One message from the form alone: nothing was opened, so it cannot depend on what exists.
    assert str(raised.value) == (
        f"dataset URI {uri!r} is refused: name one of your own (datasets/<name>) or a shared "
        "one (shared/...); absolute paths, file:// and s3:// URIs are not accepted by this "
        "deployment"
    )
    assert opened == []
    assert is_external_uri(uri)


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
