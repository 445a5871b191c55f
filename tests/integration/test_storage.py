"""service.storage against a real S3 HTTP endpoint (moto server) and a local directory.

Most tests take the ``store`` fixture and run on both backends; S3-only behaviour (multipart,
pagination, presigned URLs, bucket and credential errors) is tested on the moto server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from service.settings import Settings
from service.storage import (
    MANIFEST_NAME,
    BucketNotFoundError,
    ChecksumMismatchError,
    InvalidKeyError,
    LocalStore,
    ManifestError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    StorageAuthError,
    StorageError,
    fetch_verified,
    list_artifact_sets,
    map_client_error,
    open_store,
    publish,
    read_manifest,
    scoped,
    store_from_settings,
    validate_key,
    verify,
)
from tests.s3_fixtures import S3_STORE_PREFIX

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]

BAD_KEYS = [
    "",
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "a\\b",
    "a/",
    "./a",
    "a/./b",
    "a\x00b",
    "a\nb",
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Basic operations, both backends
# ---------------------------------------------------------------------------------------------


def test_put_get_bytes_round_trip(store: ObjectStore):
    store.put_bytes("a/b/c.bin", b"hello")
    assert store.get_bytes("a/b/c.bin") == b"hello"
    store.put_bytes("a/b/c.bin", b"replaced")  # overwrite
    assert store.get_bytes("a/b/c.bin") == b"replaced"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    with store.open_read("a/b/c.bin") as stream:
        assert stream.read(3) == b"rep"
        assert stream.read() == b"laced"


def test_put_get_file_round_trip(store: ObjectStore, tmp_path: Path):
    source = tmp_path / "source.bin"
    payload = os.urandom(300_000)
    source.write_bytes(payload)
    store.put_file("files/source.bin", source)
    assert store.get_bytes("files/source.bin") == payload

    dest = tmp_path / "out" / "nested" / "copy.bin"  # parent directories are created
    store.get_file("files/source.bin", dest)
    assert dest.read_bytes() == payload
    # The download went through a temporary file that was renamed away.
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]


def test_get_file_of_missing_object_leaves_nothing_behind(store: ObjectStore, tmp_path: Path):
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir()
    with pytest.raises(ObjectNotFoundError) as info:
        store.get_file("nope.bin", dest_dir / "nope.bin")
    assert store.uri("nope.bin") in str(info.value)
    assert list(dest_dir.iterdir()) == []


def test_exists_delete_and_delete_prefix(store: ObjectStore):
    for key in ["jobs/4/a", "jobs/4/sub/b", "jobs/42/c", "other"]:
        store.put_bytes(key, key.encode())
    assert store.exists("jobs/4/a")
    assert not store.exists("jobs/4")  # a prefix is not an object
    assert not store.exists("missing")

    store.delete("jobs/4/a")
    assert not store.exists("jobs/4/a")
    store.delete("jobs/4/a")  # deleting a missing object is not an error

    # Directory semantics: deleting "jobs/4" must not touch "jobs/42".
    store.delete_prefix("jobs/4")
    assert [info.key for info in store.list()] == ["jobs/42/c", "other"]
    store.delete_prefix("does/not/exist")

    store.delete_prefix("")
    assert store.list() == []


def test_list_uses_directory_prefixes_and_reports_sizes(store: ObjectStore):
    store.put_bytes("jobs/4/a", b"1")
    store.put_bytes("jobs/4/sub/b", b"22")
    store.put_bytes("jobs/42/c", b"333")
    expected = [ObjectInfo("jobs/4/a", 1), ObjectInfo("jobs/4/sub/b", 2)]
    assert store.list("jobs/4") == expected
    assert store.list("jobs/4/") == expected
    assert [info.key for info in store.list()] == ["jobs/4/a", "jobs/4/sub/b", "jobs/42/c"]
    assert store.list("nothing/here") == []


def test_local_store_writes_atomically_and_hides_temp_files(local_store: LocalStore):
    local_store.put_bytes("x/y.bin", b"data")
    # An in-flight write of another process: a temp file next to its target.
    (local_store.root / "x" / ".bird-tmp-abc123").write_bytes(b"partial")
    assert [info.key for info in local_store.list()] == ["x/y.bin"]
    assert sorted(p.name for p in (local_store.root / "x").iterdir()) == [
        ".bird-tmp-abc123",
        "y.bin",
    ]


def test_local_store_rejects_symlinks_out_of_the_root(local_store: LocalStore, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    local_store.root.mkdir(parents=True)
    (local_store.root / "link").symlink_to(outside)
    with pytest.raises(InvalidKeyError, match="outside the store root"):
        local_store.get_bytes("link/secret")


def test_uri_formats(s3_store: S3Store, local_store: LocalStore):
    assert s3_store.uri("a/b.parquet") == f"s3://{s3_store.bucket}/bird/a/b.parquet"
    assert s3_store.uri() == f"s3://{s3_store.bucket}/bird"
    assert local_store.uri("a/b.parquet") == (local_store.root / "a" / "b.parquet").as_uri()
    assert local_store.uri("a/b.parquet").startswith("file:///")


def test_ping(s3_store: S3Store, local_store: LocalStore):
    s3_store.ping()
    local_store.ping()
    assert local_store.root.is_dir()


# ---------------------------------------------------------------------------------------------
# S3 specifics: multipart, pagination, presigned URLs
# ---------------------------------------------------------------------------------------------


def test_multipart_upload_of_a_12mb_file(
    make_s3_store: Callable[..., S3Store], s3_client: Any, tmp_path: Path
):
    store = make_s3_store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    source = tmp_path / "big.bin"
    payload = os.urandom(12 * MiB)
    source.write_bytes(payload)

    store.put_file("big/big.bin", source)

    head = s3_client.head_object(Bucket=store.bucket, Key="bird/big/big.bin")
    assert head["ContentLength"] == 12 * MiB
    # A multipart object's ETag is "<md5 of part md5s>-<part count>": 5 + 5 + 2 MiB.
    assert head["ETag"].strip('"').endswith("-3")

    dest = tmp_path / "big.copy"
    store.get_file("big/big.bin", dest)
    assert _sha256(dest.read_bytes()) == _sha256(payload)
    with store.open_read("big/big.bin") as stream:
        digest = hashlib.sha256()
        while chunk := stream.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == _sha256(payload)


def test_list_follows_every_page(make_s3_store: Callable[..., S3Store]):
    store = make_s3_store(page_size=2)
    calls: list[str] = []
    store.client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kwargs: calls.append("list")
    )
    keys = [f"many/{i:02d}.bin" for i in range(7)]
    for key in keys:
        store.put_bytes(key, b"x" * len(key))
    store.put_bytes("manyother/z.bin", b"not under the prefix")

    listed = store.list("many")

    assert [info.key for info in listed] == keys
    assert all(info.size == len(info.key) for info in listed)
    assert len(calls) == 4  # 7 keys at 2 per page

    calls.clear()
    store.delete_prefix("many")  # deletion lists through the same pages
    assert len(calls) == 4
    assert [info.key for info in store.list()] == ["manyother/z.bin"]


def test_presigned_url_downloads_over_http(s3_store: S3Store):
    s3_store.put_bytes("downloads/model.safetensors", b"weights")
    url = s3_store.presigned_get_url("downloads/model.safetensors", expires_s=60)
    assert url.startswith(s3_store.endpoint_url + "/")
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"weights"


def test_presigned_url_is_signed_for_the_public_endpoint(
    make_s3_store: Any, s3_settings: Settings, s3_bucket: str
):
    """Clients outside the deployment reach S3 at another address than bird's processes (the
    host's published port, not http://minio:9000): presigned URLs are signed for that one,
    while the store's own requests keep the internal endpoint."""
    internal = s3_settings.s3_endpoint_url
    assert internal is not None and "127.0.0.1" in internal
    public = internal.replace("127.0.0.1", "localhost")
    settings = s3_settings.model_copy(update={"s3_public_endpoint_url": public})
    store = open_store(f"s3://{s3_bucket}/{S3_STORE_PREFIX}", settings)
    assert isinstance(store, S3Store) and store.endpoint_url == internal
    store.put_bytes("downloads/public.bin", b"through the public address")
    url = store.presigned_get_url("downloads/public.bin", expires_s=60)
    assert url.startswith(public + "/") and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"through the public address"
    # Without a public endpoint the URL is on the one endpoint there is.
    default = make_s3_store().presigned_get_url("downloads/public.bin", expires_s=60)
    assert default.startswith(internal + "/")


def test_presigned_url_on_a_local_store_is_an_api_path(local_store: LocalStore):
    local_store.put_bytes("jobs/1/checkpoints/best/model file.bin", b"w")
    url = local_store.presigned_get_url("jobs/1/checkpoints/best/model file.bin", 60)
    assert url == "/files/jobs/1/checkpoints/best/model%20file.bin"
    scoped_view = scoped(local_store, "jobs/1")
    assert scoped_view.presigned_get_url("checkpoints/best/model file.bin") == url


@pytest.mark.parametrize("expires_s", [0, -5, 8 * 24 * 3600])
def test_presigned_url_expiry_is_bounded(store: ObjectStore, expires_s: int):
    with pytest.raises(ValueError, match="expires_s"):
        store.presigned_get_url("a", expires_s)


# ---------------------------------------------------------------------------------------------
# Keys and scoped views
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_rejects_unsafe_keys(key: str):
    with pytest.raises(InvalidKeyError) as info:
        validate_key(key)
    assert repr(key) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("key", ["a", "a/b/c.parquet", "tenants/acme/jobs/42/x", "a b/ü..x"])
def test_validate_key_accepts_relative_keys(key: str):
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a\\b", ""])
def test_every_operation_validates_its_key(store: ObjectStore, key: str, tmp_path: Path):
    source = tmp_path / "f"
    source.write_bytes(b"x")
    operations = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, source),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.open_read(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.presigned_get_url(key, 60),
    ]
    if key:  # "" is a valid prefix (everything) and uri("") the base URI
        operations += [
            lambda: store.uri(key),
            lambda: store.list(key),
            lambda: store.delete_prefix(key),
        ]
    for operation in operations:
        with pytest.raises(InvalidKeyError):
            operation()
    assert store.list() == []


def test_scoped_view_cannot_escape_its_prefix(store: ObjectStore):
    store.put_bytes("tenants/acme/jobs/43/secret", b"other job")
    store.put_bytes("tenants/acme/jobs/420/other", b"similar prefix")
    view = scoped(store, "tenants/acme/jobs/42/")

    view.put_bytes("checkpoints/best/model.bin", b"mine")
    assert store.get_bytes("tenants/acme/jobs/42/checkpoints/best/model.bin") == b"mine"
    assert view.list() == [ObjectInfo("checkpoints/best/model.bin", 4)]
    assert view.uri("checkpoints/best/model.bin") == store.uri(
        "tenants/acme/jobs/42/checkpoints/best/model.bin"
    )

    for key in ["../43/secret", "../../../x", "/tenants/acme/jobs/43/secret", "a\\..\\b"]:
        with pytest.raises(InvalidKeyError):
            view.get_bytes(key)
        with pytest.raises(InvalidKeyError):
            view.put_bytes(key, b"overwrite")
    with pytest.raises(InvalidKeyError):
        view.delete_prefix("..")

    view.delete_prefix("")  # empties the view, and only the view
    assert view.list() == []
    assert store.get_bytes("tenants/acme/jobs/43/secret") == b"other job"
    assert store.exists("tenants/acme/jobs/420/other")

    nested = scoped(view, "checkpoints")
    nested.put_bytes("last/x", b"1")
    assert store.exists("tenants/acme/jobs/42/checkpoints/last/x")

    for bad in ["../x", "/abs", "", "a//b"]:
        with pytest.raises(InvalidKeyError):
            scoped(store, bad)


# ---------------------------------------------------------------------------------------------
# Publish-then-manifest
# ---------------------------------------------------------------------------------------------


def _record_puts(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every put on ``store`` in order (the store works as before)."""
    order: list[str] = []
    for name in ("put_bytes", "put_file"):
        original = getattr(store, name)

        def recording(key: str, content: Any, _original: Any = original) -> None:
            order.append(key)
            _original(key, content)

        monkeypatch.setattr(store, name, recording)
    return order


def test_publish_writes_the_manifest_last(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shard = tmp_path / "part-0.parquet"
    shard.write_bytes(os.urandom(50_000))
    order = _record_puts(store, monkeypatch)

    manifest = publish(
        store,
        "features/abc123",
        {"part-0.parquet": shard, "nested/part-1.parquet": b"second shard", "z.json": b"{}"},
        metadata={"rows": {"part-0.parquet": 10, "nested/part-1.parquet": 3}},
    )

    assert order[-1] == f"features/abc123/{MANIFEST_NAME}"
    assert sorted(order[:-1]) == [
        "features/abc123/nested/part-1.parquet",
        "features/abc123/part-0.parquet",
        "features/abc123/z.json",
    ]
    raw = json.loads(store.get_bytes(f"features/abc123/{MANIFEST_NAME}"))
    assert raw["format_version"] == 1
    assert raw["created_at"]
    assert raw["metadata"] == {"rows": {"part-0.parquet": 10, "nested/part-1.parquet": 3}}
    assert raw["files"]["part-0.parquet"] == {
        "size": 50_000,
        "sha256": _sha256(shard.read_bytes()),
    }
    assert raw["files"]["nested/part-1.parquet"]["sha256"] == _sha256(b"second shard")

    read_back = read_manifest(store, "features/abc123")
    assert read_back == manifest
    verify(store, "features/abc123", read_back)
    entry = read_back.files["nested/part-1.parquet"]
    assert fetch_verified(store, "features/abc123/nested/part-1.parquet", entry) == b"second shard"


def test_republish_removes_the_old_manifest_first(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
):
    publish(store, "ckpt/last", {"model.bin": b"epoch 1"})
    seen_during_upload: list[bool] = []
    original = store.put_bytes

    def put_bytes(key: str, data: bytes) -> None:
        if not key.endswith(MANIFEST_NAME):
            seen_during_upload.append(store.exists(f"ckpt/last/{MANIFEST_NAME}"))
        original(key, data)

    monkeypatch.setattr(store, "put_bytes", put_bytes)
    manifest = publish(store, "ckpt/last", {"model.bin": b"epoch 2"})
    assert seen_during_upload == [False]  # no stale manifest while the new files land
    assert read_manifest(store, "ckpt/last") == manifest
    verify(store, "ckpt/last", manifest)


def test_publish_rejects_bad_input_before_uploading(store: ObjectStore):
    with pytest.raises(ManifestError, match="reserved"):
        publish(store, "sets/a", {MANIFEST_NAME: b"x"})
    with pytest.raises(InvalidKeyError):
        publish(store, "sets/a", {"../escape": b"x"})
    with pytest.raises(ManifestError, match="JSON"):
        publish(store, "sets/a", {"f": b"x"}, metadata={"bad": object()})
    with pytest.raises(ManifestError, match="empty"):
        publish(store, "sets/a", {})
    assert store.list() == []


def test_altered_or_truncated_objects_fail_verification(store: ObjectStore):
    payload = os.urandom(10_000)
    manifest = publish(store, "sets/s1", {"shard.bin": payload})
    key = "sets/s1/shard.bin"
    uri = store.uri(key)

    store.put_bytes(key, payload[:-1])  # truncated
    with pytest.raises(ChecksumMismatchError, match="size mismatch") as info:
        verify(store, "sets/s1", manifest)
    assert uri in str(info.value)
    with pytest.raises(ChecksumMismatchError) as info:
        fetch_verified(store, key, manifest.files["shard.bin"])
    assert uri in str(info.value)

    altered = bytes([payload[0] ^ 0xFF]) + payload[1:]  # same size, one byte flipped
    store.put_bytes(key, altered)
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch") as info:
        verify(store, "sets/s1", manifest)
    assert uri in str(info.value)
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        fetch_verified(store, key, manifest.files["shard.bin"])


def test_missing_objects_are_reported_with_their_uri(store: ObjectStore, tmp_path: Path):
    manifest = publish(store, "sets/s2", {"a.bin": b"a", "b.bin": b"b"})
    store.delete("sets/s2/b.bin")
    uri = store.uri("sets/s2/b.bin")

    with pytest.raises(ObjectNotFoundError) as info:
        verify(store, "sets/s2", manifest)
    assert uri in str(info.value)
    assert info.value.uri == uri
    for operation in (
        lambda: store.get_bytes("sets/s2/b.bin"),
        lambda: store.open_read("sets/s2/b.bin"),
        lambda: store.get_file("sets/s2/b.bin", tmp_path / "b.bin"),
        lambda: fetch_verified(store, "sets/s2/b.bin", manifest.files["b.bin"]),
    ):
        with pytest.raises(ObjectNotFoundError) as info:
            operation()
        assert uri in str(info.value)


def test_missing_or_malformed_manifest(store: ObjectStore):
    store.put_bytes("sets/partial/shard.bin", b"uploaded, but never published")
    uri = store.uri(f"sets/partial/{MANIFEST_NAME}")
    with pytest.raises(ManifestError) as info:
        read_manifest(store, "sets/partial")
    assert str(info.value) == (
        f"no manifest at {uri}: the artifact set is incomplete or does not exist"
    )

    store.put_bytes(f"sets/partial/{MANIFEST_NAME}", b'{"format_version": 2}')
    with pytest.raises(ManifestError, match="invalid manifest") as info:
        read_manifest(store, "sets/partial")
    assert uri in str(info.value)

    # A manifest naming a file outside its prefix is rejected, not followed.
    evil = {
        "format_version": 1,
        "created_at": "2025-01-01T00:00:00Z",
        "files": {"../other/x": {"size": 1, "sha256": "0" * 64}},
        "metadata": {},
    }
    store.put_bytes(f"sets/partial/{MANIFEST_NAME}", json.dumps(evil).encode())
    with pytest.raises(ManifestError, match="invalid manifest"):
        read_manifest(store, "sets/partial")


def test_list_artifact_sets_trusts_only_manifests(store: ObjectStore):
    publish(store, "features/k1", {"part-0.parquet": b"1"})
    publish(store, "features/k3/inner", {"part-0.parquet": b"3"})
    store.put_bytes("features/k2/part-0.parquet", b"an upload that never finished")
    store.put_bytes("elsewhere/x/manifest.json.tmp", b"not a manifest")

    assert list_artifact_sets(store, "features") == ["features/k1", "features/k3/inner"]
    assert list_artifact_sets(store) == ["features/k1", "features/k3/inner"]
    assert list_artifact_sets(scoped(store, "features")) == ["k1", "k3/inner"]


# ---------------------------------------------------------------------------------------------
# Bucket and credential errors
# ---------------------------------------------------------------------------------------------


def test_missing_bucket_is_named(make_s3_store: Callable[..., S3Store], tmp_path: Path):
    store = make_s3_store(bucket="bird-no-such-bucket")
    source = tmp_path / "f"
    source.write_bytes(b"x")
    operations = [
        lambda: store.get_bytes("datasets/x/part-0.parquet"),
        lambda: store.put_bytes("datasets/x/part-0.parquet", b"x"),
        lambda: store.put_file("datasets/x/part-0.parquet", source),
        lambda: store.get_file("datasets/x/part-0.parquet", tmp_path / "out"),
        lambda: store.exists("datasets/x/part-0.parquet"),
        lambda: store.list("datasets"),
        lambda: store.ping(),
    ]
    for operation in operations:
        with pytest.raises(BucketNotFoundError) as info:
            operation()
        assert "s3://bird-no-such-bucket" in str(info.value)
    with pytest.raises(BucketNotFoundError) as info:
        store.get_bytes("datasets/x/part-0.parquet")
    assert "s3://bird-no-such-bucket/bird/datasets/x/part-0.parquet" in str(info.value)


def test_unknown_access_key_is_an_auth_error(
    make_s3_store: Callable[..., S3Store], s3_auth_enforced: tuple[str, str], tmp_path: Path
):
    store = make_s3_store(access_key_id="AKIAUNKNOWNUNKNOWN00", secret_access_key="nope")
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for operation in (
        lambda: store.get_bytes("a/b"),
        lambda: store.put_bytes("a/b", b"x"),
        lambda: store.put_file("a/b", source),
        lambda: store.exists("a/b"),
        lambda: store.list("a"),
        lambda: store.ping(),
    ):
        with pytest.raises(StorageAuthError) as info:
            operation()
        assert f"s3://{store.bucket}" in str(info.value)
        assert info.value.__cause__ is None  # no botocore traceback attached


def test_wrong_secret_is_an_auth_error(
    make_s3_store: Callable[..., S3Store], s3_auth_enforced: tuple[str, str]
):
    access_key_id, secret = s3_auth_enforced
    store = make_s3_store(access_key_id=access_key_id, secret_access_key=secret + "wrong")
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch") as info:
        store.get_bytes("a/b")
    assert store.uri("a/b") in str(info.value)

    # The right secret gets through authentication; the user has no policy, so it is denied.
    store = make_s3_store(access_key_id=access_key_id, secret_access_key=secret)
    with pytest.raises(StorageAuthError, match="AccessDenied"):
        store.get_bytes("a/b")


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        ("NoSuchKey", 404, ObjectNotFoundError),
        ("404", 404, ObjectNotFoundError),
        ("NoSuchBucket", 404, BucketNotFoundError),
        ("InvalidAccessKeyId", 403, StorageAuthError),
        ("SignatureDoesNotMatch", 403, StorageAuthError),
        ("403", 403, StorageAuthError),
        ("AccessDenied", 403, StorageAuthError),
        ("SlowDown", 503, StorageError),
    ],
)
def test_client_error_mapping(code: str, status: int, error_type: type[StorageError]):
    exc = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )
    uri = "s3://bucket/datasets/x/part-0.parquet"
    mapped = map_client_error(exc, uri, "s3://bucket")
    assert type(mapped) is error_type
    assert uri in str(mapped)
    assert mapped.uri == uri


# ---------------------------------------------------------------------------------------------
# pyarrow, opening stores, layering
# ---------------------------------------------------------------------------------------------


def test_pyarrow_filesystem_reads_and_writes_the_same_objects(store: ObjectStore):
    fs, base = store.pyarrow_filesystem()
    assert not base.startswith("s3://")
    table = pa.table({"label": [0, 1, 2], "group": [1, 0, 1], "x": [[0.5], [1.5], [2.5]]})
    fs.create_dir(f"{base}/datasets/toy")  # needed locally, a no-op on S3
    pq.write_table(table, f"{base}/datasets/toy/part-0.parquet", filesystem=fs)

    assert store.exists("datasets/toy/part-0.parquet")
    read_back = pq.read_table(pa.BufferReader(store.get_bytes("datasets/toy/part-0.parquet")))
    assert read_back.equals(table)

    # And the other way round, through a scoped view's filesystem.
    store.put_bytes("datasets/toy/part-1.parquet", store.get_bytes("datasets/toy/part-0.parquet"))
    view_fs, view_base = scoped(store, "datasets/toy").pyarrow_filesystem()
    assert pq.read_table(f"{view_base}/part-1.parquet", filesystem=view_fs).equals(table)


def test_pyarrow_filesystem_writes_large_files_in_parts(store: ObjectStore):
    # 12 MiB is over pyarrow's part size, so on S3 this is a multipart upload by the C++ SDK.
    fs, base = store.pyarrow_filesystem()
    payload = os.urandom(12 * MiB)
    fs.create_dir(f"{base}/raw")
    with fs.open_output_stream(f"{base}/raw/big.bin") as stream:
        stream.write(payload)
    assert store.list("raw") == [ObjectInfo("raw/big.bin", 12 * MiB)]
    with store.open_read("raw/big.bin") as stream:
        assert _sha256(stream.read()) == _sha256(payload)


def test_open_store_and_store_from_settings(s3_settings: Settings, tmp_path: Path):
    s3 = store_from_settings(s3_settings)
    assert isinstance(s3, S3Store)
    assert s3.endpoint_url == s3_settings.s3_endpoint_url
    assert s3.uri("k") == f"{s3_settings.store_url}/k"
    s3.put_bytes("k", b"v")
    assert s3.get_bytes("k") == b"v"

    local = open_store((tmp_path / "dir").as_uri(), s3_settings)
    assert isinstance(local, LocalStore)
    assert local.root == (tmp_path / "dir").resolve()
    assert isinstance(open_store(str(tmp_path / "plain"), s3_settings), LocalStore)

    default = store_from_settings(Settings(data_dir=tmp_path / "data"))
    assert isinstance(default, LocalStore)
    assert default.root == (tmp_path / "data" / "store").resolve()
    assert not default.root.exists()  # opening a store has no side effects

    with pytest.raises(StorageError, match="unsupported store URL"):
        open_store("gs://bucket/x", s3_settings)


def test_storage_imports_neither_torch_nor_ray():
    probe = (
        "import sys, service.storage; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
