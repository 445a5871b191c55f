"""Object storage: one interface over S3 (boto3; MinIO and moto alike) and a local directory.

Everything bird persists between processes — datasets, teacher-feature shards, checkpoints,
logs — goes through :class:`ObjectStore`. Two backends implement it:

* :class:`S3Store` — a bucket plus a key prefix on any S3-compatible endpoint.
* :class:`LocalStore` — a directory; the embedded default (``<data_dir>/store``). Writes are
  atomic (temporary file in the same directory, then ``os.replace``), so a reader never sees a
  half-written object.

Keys are relative POSIX paths (``jobs/42/checkpoints/best/model.safetensors``), checked by
:func:`validate_key` on every call, so a key can never address anything outside its store or
its :func:`scoped` view. Prefixes (for :meth:`ObjectStore.list` and
:meth:`ObjectStore.delete_prefix`) are *directory* prefixes: ``jobs/4`` means ``jobs/4/...``
and never matches ``jobs/42/...``.

Artifact sets (feature shards, checkpoints) are published with :func:`publish`: every file is
uploaded first and ``<prefix>/manifest.json`` is written last, carrying each file's size and
sha256. A set without a manifest does not exist: readers go through :func:`read_manifest`,
:func:`list_artifact_sets`, :func:`verify` and :func:`fetch_verified` and trust nothing else.

Every error is a :class:`StorageError` whose message names the full URI of the object involved
(``s3://bucket/prefix/key`` or ``file:///abs/path/key``); botocore exceptions never escape.

This module is part of the service layer: it must never import torch or ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn
from urllib.parse import quote, unquote, urlparse

import boto3
import pyarrow.fs
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.settings import Settings

__all__ = [
    "MANIFEST_NAME",
    "BucketNotFoundError",
    "ChecksumMismatchError",
    "InvalidKeyError",
    "LocalStore",
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "S3Store",
    "ScopedStore",
    "StorageAuthError",
    "StorageError",
    "fetch_verified",
    "join_key",
    "list_artifact_sets",
    "map_client_error",
    "open_store",
    "publish",
    "read_manifest",
    "scoped",
    "store_from_settings",
    "valid_bucket_name",
    "validate_key",
    "validate_prefix",
    "verify",
]

MiB = 1024 * 1024
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
# S3 caps presigned URLs (SigV4) at seven days.
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
# Streaming copies and hashes read this much at a time: large enough to keep syscalls and HTTP
# reads cheap, small enough that hashing a multi-GB shard never holds more than this in memory.
_CHUNK = 1 * MiB
# LocalStore writes go to a hidden temporary file next to the target first; list() skips them.
_TMP_PREFIX = ".bird-tmp-"
# S3 bucket naming rules (3-63 lower-case letters, digits, dots, hyphens).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class StorageError(Exception):
    """Base class of every object-store error; ``uri`` names the object or prefix involved."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class ObjectNotFoundError(StorageError):
    """The object does not exist."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist."""


class StorageAuthError(StorageError):
    """The credentials were rejected (unknown key, bad signature) or access was denied."""


class ChecksumMismatchError(StorageError):
    """An object's size or sha256 differs from what its manifest records."""


class ManifestError(StorageError):
    """A manifest is missing (the artifact set is incomplete or absent) or malformed."""


class InvalidKeyError(StorageError, ValueError):
    """A key or prefix is not a safe relative POSIX path."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def validate_key(key: str) -> str:
    """Check that ``key`` is a safe relative POSIX key and return it unchanged.

    Rejected with :class:`InvalidKeyError` (naming the key): non-strings, empty keys, absolute
    paths, backslashes, empty segments (``a//b``, a trailing ``/``), ``.`` and ``..`` segments,
    and NUL or other control characters. These rules make a key mean the same object on S3 and
    on a filesystem, and make it impossible for a key to climb out of a store or scoped view.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"invalid key {key!r}: keys must be strings")
    if not key:
        raise InvalidKeyError("invalid key '': keys must not be empty")
    if key.startswith("/"):
        raise InvalidKeyError(f"invalid key {key!r}: keys must be relative, not absolute")
    if "\\" in key:
        raise InvalidKeyError(f"invalid key {key!r}: backslashes are not allowed; use '/'")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in key):
        raise InvalidKeyError(f"invalid key {key!r}: control characters are not allowed")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKeyError(f"invalid key {key!r}: empty path segments are not allowed")
        if segment in (".", ".."):
            raise InvalidKeyError(f"invalid key {key!r}: '{segment}' segments are not allowed")
    return key


def validate_prefix(prefix: str) -> str:
    """Normalise a directory prefix: ``""`` (everything) or a valid key, trailing ``/`` dropped.

    Raises :class:`InvalidKeyError` for anything :func:`validate_key` rejects.
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"invalid prefix {prefix!r}: prefixes must be strings")
    if prefix == "":
        return ""
    # One trailing slash is the usual way to spell a directory prefix; accept and drop it.
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped == "":
        raise InvalidKeyError("invalid prefix '/': prefixes must be relative")
    try:
        return validate_key(stripped)
    except InvalidKeyError as exc:
        raise InvalidKeyError(str(exc).replace("invalid key", "invalid prefix", 1)) from None


def valid_bucket_name(name: str) -> bool:
    """Whether ``name`` follows S3's bucket naming rules.

    Checked before a user-supplied ``s3://`` URI reaches boto3, whose own validation error
    would read like an outage.
    """
    return isinstance(name, str) and bool(_BUCKET_RE.match(name))


def join_key(*parts: str) -> str:
    """Join key fragments with ``/``, skipping empty ones (``join_key("", "a")`` is ``"a"``)."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing: its key (relative to the store it was listed from) and size."""

    key: str
    size: int


class ObjectStore(ABC):
    """A flat namespace of byte objects addressed by relative POSIX keys.

    All methods validate their key with :func:`validate_key`; errors are :class:`StorageError`
    subclasses whose message names the full URI.
    """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any existing object atomically."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` only if no object exists there; True if created.

        Atomic against concurrent writers (S3 ``If-None-Match: *``; a hard link locally), so it
        serves as a lock or a first-writer-wins marker.
        """

    @abstractmethod
    def put_file(self, key: str, path: Path | str) -> None:
        """Upload the local file ``path`` to ``key``, streaming (multipart on S3)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the whole object. Raises :class:`ObjectNotFoundError` if it is missing."""

    @abstractmethod
    def get_file(self, key: str, path: Path | str) -> None:
        """Download ``key`` to ``path`` (streaming, via a temporary file renamed into place)."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """Open the object as a binary read stream; the caller closes it."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under the directory prefix ``prefix`` (``""``: all), sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing object is not an error (as on S3)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the directory prefix ``prefix`` (``""``: everything)."""

    @abstractmethod
    def presigned_get_url(self, key: str, expires_s: int = 900) -> str:
        """Where a client can GET the object: a presigned URL (S3), or ``/files/<key>`` (local).

        A local directory cannot sign URLs, so :class:`LocalStore` returns the path under which
        the bird API serves the store; the API resolves it against its own base URL.
        """

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI of ``key`` (``""``: the store's own base URI)."""

    @abstractmethod
    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and the base path under which this store's keys live.

        ``f"{base}/{key}"`` on the returned filesystem is the object ``key`` of this store
        (for Ray Data / Ray Train storage and pyarrow.parquet).
        """

    @abstractmethod
    def ping(self) -> None:
        """Check that the store is reachable (for readiness probes); raise StorageError if not."""


# --------------------------------------------------------------------------------------------
# Local directory
# --------------------------------------------------------------------------------------------


class LocalStore(ObjectStore):
    """An object store in a local directory; the embedded default.

    Writes are atomic: a hidden temporary file in the target's directory, fsynced, then
    ``os.replace``. The root is created lazily on the first write so that merely opening a
    store (e.g. in a readiness probe) has no side effects.

    Limitation compared to S3: a key cannot be both an object and a directory prefix
    (``a`` and ``a/b``); such a write fails with a :class:`StorageError`.
    """

    def __init__(self, root: Path | str) -> None:
        # Resolve once so URIs are absolute and the symlink-escape check has a fixed anchor.
        self.root = Path(os.path.realpath(Path(root).expanduser()))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root.joinpath(*key.split("/"))
        # Keys cannot contain "..", but a symlink planted inside the store could still point
        # outside it; resolving catches that.
        resolved = Path(os.path.realpath(path))
        if resolved != self.root and self.root not in resolved.parents:
            raise InvalidKeyError(
                f"invalid key {key!r}: {self.uri(key)} resolves outside the store root ({resolved})"
            )
        return path

    def _prefix_path(self, prefix: str) -> tuple[str, Path]:
        prefix = validate_prefix(prefix)
        return prefix, (self._path(prefix) if prefix else self.root)

    @contextlib.contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Translate OS errors into StorageErrors that name ``uri``."""
        try:
            yield
        except StorageError:
            raise
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"object not found: {uri}", uri) from None
        except NotADirectoryError:
            raise StorageError(
                f"cannot access {uri}: a parent of this key is an object, not a prefix", uri
            ) from None
        except PermissionError as exc:
            raise StorageAuthError(f"permission denied on {uri}: {exc.strerror}", uri) from None
        except OSError as exc:
            raise StorageError(f"I/O error on {uri}: {exc}", uri) from None

    def _write_atomic(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        path = self._path(key)
        uri = self.uri(key)
        with self._errors(uri):
            if path.is_dir():
                raise StorageError(f"cannot write {uri}: a prefix with this name exists", uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                    handle.flush()
                    # Durability before visibility: a manifest must never point at a file whose
                    # bytes are still only in the page cache when the machine dies.
                    os.fsync(handle.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise

    # -- ObjectStore ----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically."""
        self._write_atomic(key, lambda handle: handle.write(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write a complete temporary file, then hard-link it into place (fails if present)."""
        path = self._path(key)
        uri = self.uri(key)
        with self._errors(uri):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp_name, path)
                except FileExistsError:
                    return False
                return True
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)

    def put_file(self, key: str, path: Path | str) -> None:
        """Copy the local file ``path`` to ``key`` (streamed) atomically."""
        source = Path(path)
        with open(source, "rb") as src:
            self._write_atomic(key, lambda handle: shutil.copyfileobj(src, handle, _CHUNK))

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object."""
        path = self._path(key)
        with self._errors(self.uri(key)):
            return path.read_bytes()

    def get_file(self, key: str, path: Path | str) -> None:
        """Copy the object to ``path`` through a temporary file renamed into place."""
        with self.open_read(key) as src:
            _stream_to_file(src, Path(path))

    def open_read(self, key: str) -> BinaryIO:
        """Open the object for binary reading."""
        path = self._path(key)
        with self._errors(self.uri(key)):
            return open(path, "rb")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under ``prefix`` (directory semantics), sorted by key."""
        prefix, base = self._prefix_path(prefix)
        found: list[ObjectInfo] = []
        with self._errors(self.uri(prefix)):
            if not base.is_dir():
                return []
            for dirpath, _dirnames, filenames in os.walk(base):
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for name in filenames:
                    if name.startswith(_TMP_PREFIX):
                        continue  # an in-flight atomic write, not an object yet
                    full = Path(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):  # deleted while listing
                        key = name if rel_dir == "." else f"{rel_dir}/{name}"
                        found.append(ObjectInfo(key=key, size=full.stat().st_size))
        found.sort(key=lambda info: info.key)
        return found

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object (a directory prefix is not)."""
        path = self._path(key)
        with self._errors(self.uri(key)):
            return path.is_file()

    def delete(self, key: str) -> None:
        """Delete ``key`` if it exists."""
        path = self._path(key)
        with self._errors(self.uri(key)):
            if path.is_dir():
                return  # a prefix, not an object: nothing to delete, as on S3
            # Parent directories are left in place: removing them could race a concurrent
            # writer that has just created its temporary file there.
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under ``prefix``."""
        prefix, base = self._prefix_path(prefix)
        with self._errors(self.uri(prefix)):
            if not base.exists():
                return
            if base == self.root:
                for child in base.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif base.is_dir():
                shutil.rmtree(base)

    def presigned_get_url(self, key: str, expires_s: int = 900) -> str:
        """The API-served path ``/files/<key>`` for the object.

        A local directory cannot mint signed URLs, so downloads go through the bird API, which
        serves ``/files/<key>`` from this store under its own authentication. ``expires_s`` is
        validated for interface parity and otherwise unused.
        """
        validate_key(key)
        _check_expiry(expires_s)
        return "/files/" + quote(key, safe="/")

    def uri(self, key: str = "") -> str:
        """``file:///abs/root/key`` (``""``: the root)."""
        if key == "":
            return self.root.as_uri()
        validate_key(key)
        return self.root.joinpath(*key.split("/")).as_uri()

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """``LocalFileSystem()`` and the absolute root directory."""
        return pyarrow.fs.LocalFileSystem(), self.root.as_posix()

    def ping(self) -> None:
        """Check that the root exists (or can be created) and is a writable directory."""
        with self._errors(self.uri()):
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise StorageAuthError(f"store root {self.uri()} is not writable", self.uri())


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_BUCKET_CODES = frozenset({"NoSuchBucket"})
_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "Forbidden",
        "ExpiredToken",
        "InvalidToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
    }
)


def map_client_error(exc: ClientError, uri: str, bucket_uri: str | None = None) -> StorageError:
    """Translate a botocore ``ClientError`` into the matching :class:`StorageError`.

    ``uri`` is the object (or prefix) being accessed, ``bucket_uri`` (``s3://bucket``) the
    bucket, named by :class:`BucketNotFoundError`. NoSuchKey/404 → :class:`ObjectNotFoundError`,
    NoSuchBucket → :class:`BucketNotFoundError`, InvalidAccessKeyId/SignatureDoesNotMatch/
    AccessDenied/403 → :class:`StorageAuthError`, anything else → :class:`StorageError`.
    """
    error = exc.response.get("Error", {}) or {}
    code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    message = error.get("Message") or code
    if code in _BUCKET_CODES:
        bucket = bucket_uri or uri
        return BucketNotFoundError(f"bucket not found: {bucket} (while accessing {uri})", uri)
    if code in _NOT_FOUND_CODES:
        return ObjectNotFoundError(f"object not found: {uri}", uri)
    if code in _AUTH_CODES:
        return StorageAuthError(
            f"access to {uri} refused ({code}: {message}); check the S3 credentials and the "
            "bucket policy",
            uri,
        )
    return StorageError(f"S3 error on {uri}: {code}: {message}", uri)


class _S3Reader(io.RawIOBase):
    """A raw stream over a GetObject body that maps botocore read errors to StorageErrors."""

    def __init__(self, body: Any, uri: str) -> None:
        super().__init__()
        self._body = body
        self._uri = uri

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            chunk = self._body.read(len(view))
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StorageError(f"error reading {self._uri}: {exc}", self._uri) from None
        view[: len(chunk)] = chunk
        return len(chunk)

    def readall(self) -> bytes:
        # One read of the remaining body instead of RawIOBase's default 8 KiB loop.
        try:
            return self._body.read()
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StorageError(f"error reading {self._uri}: {exc}", self._uri) from None

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


# One boto3 session for the process: a fresh session reloads the S3 service model (~150 ms),
# while a client from a warm one takes milliseconds, and open_store() may run per request.
# Credentials are given per client, so stores with different keys still share it. Sessions are
# not thread-safe, so clients are made under a lock (the clients themselves are thread-safe).
_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _shared_session() -> boto3.session.Session:
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


class S3Store(ObjectStore):
    """A bucket and key prefix on an S3-compatible endpoint (AWS, MinIO, moto).

    ``endpoint_url=None`` means AWS itself; credentials left as None use boto3's default chain.
    ``public_endpoint_url`` is the same endpoint as clients outside the deployment reach it
    (presigned URLs are signed for it; default: ``endpoint_url``).
    ``multipart_threshold``/``multipart_chunksize`` control when and how ``put_file``/``get_file``
    switch to multipart transfers; ``page_size`` is the ListObjectsV2 page size (tests shrink it
    to exercise pagination).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        *,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        page_size: int = 1000,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be in 1..1000, got {page_size}")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self.page_size = page_size
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            # The classic (pure-Python) transfer manager behaves the same everywhere; the CRT
            # one is picked only on some instance types and ignores part of this config.
            preferred_transfer_client="classic",
        )
        self.client = self._make_client(endpoint_url)
        # Only signs URLs (no request is sent through it): made on the first presign.
        self._presign_client: Any = None
        self._bucket_seen = False

    def _make_client(self, endpoint_url: str | None) -> Any:
        """A boto3 S3 client for ``endpoint_url`` with this store's region and credentials."""
        config_kwargs: dict[str, Any] = {
            "signature_version": "s3v4",
            "retries": {"max_attempts": 5, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        if endpoint_url is not None:
            # MinIO and moto serve buckets as paths, not as virtual hosts; and many
            # S3-compatible servers reject the default flexible (CRC) checksums of recent
            # botocore, so only send them where the API requires one. Integrity is covered
            # end to end by the sha256 in manifests anyway.
            config_kwargs.update(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        with _SESSION_LOCK:
            return _shared_session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=self.region,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret_access_key,
                config=Config(**config_kwargs),
            )

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r}, endpoint_url={self.endpoint_url!r})"

    # -- helpers ------------------------------------------------------------------------------

    @property
    def bucket_uri(self) -> str:
        """``s3://bucket``."""
        return f"s3://{self.bucket}"

    def _full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        """The S3 string prefix for a directory prefix: always ends in '/' unless empty."""
        prefix = validate_prefix(prefix)
        full = join_key(self.prefix, prefix)
        return f"{full}/" if full else ""

    def _raise(self, exc: Exception, uri: str) -> NoReturn:
        """Re-raise any boto3/botocore failure as a StorageError naming ``uri``."""
        if isinstance(exc, ClientError):
            raise map_client_error(exc, uri, self.bucket_uri) from None
        # boto3's S3UploadFailedError wraps the ClientError only as its implicit context.
        context = exc.__context__
        if isinstance(context, ClientError):
            raise map_client_error(context, uri, self.bucket_uri) from None
        if isinstance(exc, NoCredentialsError):
            raise StorageAuthError(f"no S3 credentials configured to access {uri}", uri) from None
        raise StorageError(f"S3 request for {uri} failed: {exc}", uri) from None

    @contextlib.contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            self._raise(exc, uri)

    def _head_not_found(self, uri: str) -> bool:
        """After a bare 404 on HEAD: True if the bucket exists (so the *object* is missing).

        HEAD responses have no body, so a missing bucket and a missing key both come back as
        "404"; one HeadBucket tells them apart. Raises BucketNotFoundError otherwise.
        """
        if self._bucket_seen:
            return True
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in _NOT_FOUND_CODES | _BUCKET_CODES:
                raise BucketNotFoundError(
                    f"bucket not found: {self.bucket_uri} (while accessing {uri})", uri
                ) from None
            self._raise(exc, uri)
        except (BotoCoreError, Boto3Error) as exc:
            self._raise(exc, uri)
        self._bucket_seen = True
        return True

    def _is_head_404(self, exc: Exception) -> bool:
        candidates = [exc, exc.__context__]
        for candidate in candidates:
            if isinstance(candidate, ClientError):
                code = str(candidate.response.get("Error", {}).get("Code"))
                if code in _NOT_FOUND_CODES:
                    return True
        return False

    # -- ObjectStore ----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        """PutObject ``data`` to ``key``."""
        full = self._full_key(key)
        with self._errors(self.uri(key)):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """PutObject with ``If-None-Match: *``; a 412 means another writer was first."""
        full = self._full_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            self._raise(exc, self.uri(key))
        except (BotoCoreError, Boto3Error) as exc:
            self._raise(exc, self.uri(key))
        return True

    def put_file(self, key: str, path: Path | str) -> None:
        """Upload ``path`` with boto3's transfer manager (multipart above the threshold)."""
        full = self._full_key(key)
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"cannot upload {source} to {self.uri(key)}: no such file")
        with self._errors(self.uri(key)):
            self.client.upload_file(str(source), self.bucket, full, Config=self.transfer_config)

    def get_bytes(self, key: str) -> bytes:
        """GetObject and read the whole body."""
        with self.open_read(key) as stream:
            return stream.read()

    def get_file(self, key: str, path: Path | str) -> None:
        """Download with boto3's transfer manager into a temp file, then rename into place."""
        full = self._full_key(key)
        uri = self.uri(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, full, tmp_name, Config=self.transfer_config)
            except (ClientError, BotoCoreError, Boto3Error) as exc:
                # download_file starts with a HEAD, whose 404 cannot name the missing thing.
                if self._is_head_404(exc) and self._head_not_found(uri):
                    raise ObjectNotFoundError(f"object not found: {uri}", uri) from None
                self._raise(exc, uri)
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def open_read(self, key: str) -> BinaryIO:
        """GetObject as a buffered binary stream."""
        full = self._full_key(key)
        uri = self.uri(key)
        with self._errors(uri):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        reader = io.BufferedReader(_S3Reader(response["Body"], uri), buffer_size=_CHUNK)
        return reader  # type: ignore[return-value]  # BufferedReader is a binary stream

    def _list_full(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(full key, size) of everything under ``prefix``, following every page."""
        full_prefix = self._full_prefix(prefix)
        with self._errors(self.uri(validate_prefix(prefix))):
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=full_prefix,
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"], int(item["Size"])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """ListObjectsV2 under ``prefix``, following every page."""
        strip = len(f"{self.prefix}/") if self.prefix else 0
        found = [
            ObjectInfo(key=key[strip:], size=size)
            for key, size in self._list_full(prefix)
            # "a/b/" is a folder marker (made by consoles, and by pyarrow's create_dir), not an
            # object; it cannot be addressed by a valid key anyway.
            if not key.endswith("/")
        ]
        found.sort(key=lambda info: info.key)
        return found

    def exists(self, key: str) -> bool:
        """HeadObject; a missing object is False, a missing bucket an error."""
        full = self._full_key(key)
        uri = self.uri(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if self._is_head_404(exc) and self._head_not_found(uri):
                return False
            self._raise(exc, uri)
        except (BotoCoreError, Boto3Error) as exc:
            self._raise(exc, uri)
        return True

    def delete(self, key: str) -> None:
        """DeleteObject (idempotent)."""
        full = self._full_key(key)
        with self._errors(self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> None:
        """List ``prefix`` and DeleteObjects in batches of 1000 (the API maximum).

        Folder markers under the prefix go too, so nothing of the prefix is left behind.
        """
        full_keys = [key for key, _size in self._list_full(prefix)]
        uri = self.uri(validate_prefix(prefix))
        for start in range(0, len(full_keys), 1000):
            batch = [{"Key": key} for key in full_keys[start : start + 1000]]
            with self._errors(uri):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                failed_uri = f"s3://{self.bucket}/{first.get('Key')}"
                raise StorageError(
                    f"could not delete {len(errors)} object(s) under {uri}, e.g. {failed_uri}: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    uri,
                )

    def presigned_get_url(self, key: str, expires_s: int = 900) -> str:
        """A SigV4-presigned GetObject URL valid for ``expires_s`` seconds (at most 7 days),
        on the public endpoint when the store has one (a SigV4 signature covers the host)."""
        full = self._full_key(key)
        _check_expiry(expires_s)
        client = self.client
        if self.public_endpoint_url not in (None, self.endpoint_url):
            if self._presign_client is None:
                self._presign_client = self._make_client(self.public_endpoint_url)
            client = self._presign_client
        with self._errors(self.uri(key)):
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )

    def presigned_put_url(self, key: str, expires_s: int = 900) -> str:
        """A SigV4-presigned PutObject URL for ``key`` alone, valid for ``expires_s`` seconds:
        whoever holds it can write that one object and nothing else."""
        full = self._full_key(key)
        _check_expiry(expires_s)
        with self._errors(self.uri(key)):
            return self.client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )

    def uri(self, key: str = "") -> str:
        """``s3://bucket/prefix/key`` (``""``: ``s3://bucket/prefix``)."""
        if key == "":
            return f"s3://{join_key(self.bucket, self.prefix)}"
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """``pyarrow.fs.S3FileSystem`` on the same endpoint and credentials, and ``bucket/prefix``.

        pyarrow wants the endpoint as ``host:port`` plus a separate scheme, and paths without
        ``s3://``; that is the shape Ray Train's ``storage_filesystem``/``storage_path`` take.
        """
        # allow_delayed_open: small files become one PutObject instead of a multipart upload
        # started when the stream opens (fewer requests, and no multipart for tiny checkpoints).
        kwargs: dict[str, Any] = {"region": self.region, "allow_delayed_open": True}
        if self._access_key_id is not None and self._secret_access_key is not None:
            kwargs.update(access_key=self._access_key_id, secret_key=self._secret_access_key)
        if self.endpoint_url is not None:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(
                endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https"
            )
        return pyarrow.fs.S3FileSystem(**kwargs), join_key(self.bucket, self.prefix)

    def ping(self) -> None:
        """HeadBucket: the endpoint answers, the bucket exists, the credentials are accepted."""
        uri = self.bucket_uri
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in _NOT_FOUND_CODES | _BUCKET_CODES:
                raise BucketNotFoundError(f"bucket not found: {uri}", uri) from None
            self._raise(exc, uri)
        except (BotoCoreError, Boto3Error) as exc:
            self._raise(exc, uri)


# --------------------------------------------------------------------------------------------
# Scoped views
# --------------------------------------------------------------------------------------------


class ScopedStore(ObjectStore):
    """A view of ``inner`` restricted to ``prefix`` (e.g. ``tenants/acme/jobs/42``).

    Keys are relative to the prefix and validated like any key, so with no ``..``, no absolute
    paths and no backslashes they cannot address anything outside it.
    """

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        prefix = validate_prefix(prefix)
        if not prefix:
            raise InvalidKeyError("invalid prefix '': a scoped view needs a non-empty prefix")
        self.inner = inner
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"ScopedStore({self.inner!r}, {self.prefix!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{validate_key(key)}"

    def _prefix(self, prefix: str) -> str:
        return join_key(self.prefix, validate_prefix(prefix))

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``prefix/key``."""
        self.inner.put_bytes(self._key(key), data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``prefix/key`` only if absent."""
        return self.inner.put_if_absent(self._key(key), data)

    def put_file(self, key: str, path: Path | str) -> None:
        """Upload ``path`` to ``prefix/key``."""
        self.inner.put_file(self._key(key), path)

    def get_bytes(self, key: str) -> bytes:
        """Read ``prefix/key``."""
        return self.inner.get_bytes(self._key(key))

    def get_file(self, key: str, path: Path | str) -> None:
        """Download ``prefix/key`` to ``path``."""
        self.inner.get_file(self._key(key), path)

    def open_read(self, key: str) -> BinaryIO:
        """Open ``prefix/key`` for reading."""
        return self.inner.open_read(self._key(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under ``prefix`` within the view, keys relative to the view."""
        strip = len(self.prefix) + 1
        return [
            ObjectInfo(key=info.key[strip:], size=info.size)
            for info in self.inner.list(self._prefix(prefix))
        ]

    def exists(self, key: str) -> bool:
        """Whether ``prefix/key`` exists."""
        return self.inner.exists(self._key(key))

    def delete(self, key: str) -> None:
        """Delete ``prefix/key``."""
        self.inner.delete(self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under ``prefix`` within the view (``""``: the whole view)."""
        self.inner.delete_prefix(self._prefix(prefix))

    def presigned_get_url(self, key: str, expires_s: int = 900) -> str:
        """The inner store's URL for ``prefix/key``."""
        return self.inner.presigned_get_url(self._key(key), expires_s)

    def uri(self, key: str = "") -> str:
        """The full URI of ``prefix/key`` (``""``: of the view's prefix)."""
        return self.inner.uri(self._key(key) if key else self.prefix)

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The inner filesystem, with the base path extended by the view's prefix."""
        fs, base = self.inner.pyarrow_filesystem()
        return fs, (f"{base.rstrip('/')}/{self.prefix}" if base else self.prefix)

    def ping(self) -> None:
        """Ping the inner store."""
        self.inner.ping()


def scoped(store: ObjectStore, prefix: str) -> ObjectStore:
    """A view of ``store`` restricted to ``prefix``; its keys cannot escape that prefix."""
    return ScopedStore(store, prefix)


# --------------------------------------------------------------------------------------------
# Opening stores
# --------------------------------------------------------------------------------------------


def _secret(value: Any) -> str | None:
    return None if value is None else value.get_secret_value()


def open_store(url: str, settings: Settings) -> ObjectStore:
    """Open the store at ``url``.

    ``s3://bucket/prefix`` → :class:`S3Store` with the endpoint, region and credentials from
    ``settings``; ``file:///abs/dir`` or a plain path → :class:`LocalStore`. Other URL schemes
    (``gs://``, ``http://``, ...) are rejected rather than being mistaken for a directory name.
    """
    if "://" in url:
        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        if scheme == "s3":
            if not parsed.netloc:
                raise StorageError(f"invalid store URL {url!r}: no bucket after s3://")
            return S3Store(
                bucket=parsed.netloc,
                prefix=parsed.path.strip("/"),
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                access_key_id=_secret(settings.s3_access_key_id),
                secret_access_key=_secret(settings.s3_secret_access_key),
                public_endpoint_url=settings.s3_public_endpoint_url,
            )
        if scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"invalid store URL {url!r}: file URLs must be local")
            return LocalStore(Path(unquote(parsed.path)))
        raise StorageError(f"unsupported store URL {url!r}: use s3://bucket/prefix or a path")
    return LocalStore(Path(url))


def store_from_settings(settings: Settings) -> ObjectStore:
    """The deployment's store: ``settings.resolved_store_url`` opened with :func:`open_store`."""
    return open_store(settings.resolved_store_url, settings)


# --------------------------------------------------------------------------------------------
# Publish-then-manifest
# --------------------------------------------------------------------------------------------


class ManifestEntry(BaseModel):
    """Size and sha256 (lower-case hex) of one file of an artifact set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """The last object written for an artifact set; its presence means the set is complete.

    ``files`` maps names relative to the set's prefix to their size and sha256.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = MANIFEST_FORMAT_VERSION
    created_at: datetime
    files: dict[str, ManifestEntry]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _names_are_keys(cls, files: dict[str, ManifestEntry]) -> dict[str, ManifestEntry]:
        for name in files:
            validate_key(name)
        return files

    def to_json(self) -> bytes:
        """The canonical serialisation (sorted file names, UTF-8)."""
        payload = self.model_dump(mode="json")
        payload["files"] = dict(sorted(payload["files"].items()))
        return json.dumps(payload, indent=2, ensure_ascii=False).encode("utf-8")


def _manifest_key(prefix: str) -> str:
    return join_key(validate_prefix(prefix), MANIFEST_NAME)


class _Hasher:
    """sha256 and byte count of a stream, computed chunk by chunk."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.size += len(chunk)

    def consume(self, stream: BinaryIO) -> _Hasher:
        while chunk := stream.read(_CHUNK):
            self.update(chunk)
        return self


def publish(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, Path | bytes],
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Upload an artifact set under ``prefix`` and then, last, its ``manifest.json``.

    ``files`` maps names relative to ``prefix`` to a local path (streamed, hashed while read
    once before upload) or the bytes themselves. If the prefix already holds a manifest it is
    deleted *first*, so a reader never sees an old manifest describing new, half-uploaded files:
    during a re-publish the set simply does not exist.
    """
    prefix = validate_prefix(prefix)
    manifest_uri = store.uri(_manifest_key(prefix))
    if not files:
        raise ManifestError(f"refusing to publish an empty artifact set at {manifest_uri}")
    for name in files:
        validate_key(name)
        if name == MANIFEST_NAME:
            raise ManifestError(
                f"cannot publish a file named {MANIFEST_NAME!r} at {manifest_uri}: "
                "the name is reserved for the manifest"
            )
    meta = dict(metadata or {})
    try:
        json.dumps(meta)  # fail before uploading anything, not after
    except (TypeError, ValueError) as exc:
        raise ManifestError(
            f"metadata for {manifest_uri} is not JSON-serialisable: {exc}"
        ) from None

    store.delete(_manifest_key(prefix))
    entries: dict[str, ManifestEntry] = {}
    for name in sorted(files):
        content = files[name]
        key = join_key(prefix, name)
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            entries[name] = ManifestEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            store.put_bytes(key, data)
        else:
            with open(content, "rb") as handle:
                hasher = _Hasher().consume(handle)
            entries[name] = ManifestEntry(size=hasher.size, sha256=hasher.sha.hexdigest())
            store.put_file(key, content)
    manifest = Manifest(created_at=datetime.now(timezone.utc), files=entries, metadata=meta)
    store.put_bytes(_manifest_key(prefix), manifest.to_json())
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> Manifest:
    """Read and validate ``<prefix>/manifest.json``.

    Raises :class:`ManifestError` if it is missing (the artifact set is incomplete or does not
    exist) or malformed.
    """
    key = _manifest_key(prefix)
    uri = store.uri(key)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFoundError:
        raise ManifestError(
            f"no manifest at {uri}: the artifact set is incomplete or does not exist", uri
        ) from None
    try:
        return Manifest.model_validate_json(raw)
    except (ValidationError, InvalidKeyError, ValueError) as exc:
        raise ManifestError(f"invalid manifest at {uri}: {exc}", uri) from None


def _check_entry(uri: str, entry: ManifestEntry, size: int, sha256: str) -> None:
    if size != entry.size:
        raise ChecksumMismatchError(
            f"size mismatch for {uri}: the manifest says {entry.size} bytes, the object has {size}",
            uri,
        )
    if sha256 != entry.sha256:
        raise ChecksumMismatchError(
            f"sha256 mismatch for {uri}: the manifest says {entry.sha256}, "
            f"the object hashes to {sha256}",
            uri,
        )


def verify(store: ObjectStore, prefix: str, manifest: Manifest) -> None:
    """Check every file of ``manifest`` under ``prefix``: present, right size, right sha256.

    Objects are hashed as they stream, never held whole in memory. Raises
    :class:`ObjectNotFoundError` or :class:`ChecksumMismatchError` naming the object's URI.
    """
    prefix = validate_prefix(prefix)
    for name, entry in sorted(manifest.files.items()):
        key = join_key(prefix, name)
        with store.open_read(key) as stream:
            hasher = _Hasher().consume(stream)
        _check_entry(store.uri(key), entry, hasher.size, hasher.sha.hexdigest())


def fetch_verified(store: ObjectStore, key: str, manifest_entry: ManifestEntry) -> bytes:
    """Get ``key`` and check it against its manifest entry before handing it out."""
    data = store.get_bytes(key)
    _check_entry(store.uri(key), manifest_entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def list_artifact_sets(store: ObjectStore, prefix: str = "") -> list[str]:
    """Prefixes under ``prefix`` that hold a manifest, i.e. complete artifact sets, sorted.

    A prefix with files but no manifest is an unfinished (or abandoned) upload and is left out.
    The store root itself is reported as ``""`` if it holds a manifest.
    """
    sets = []
    for info in store.list(prefix):
        if info.key == MANIFEST_NAME:
            sets.append("")
        elif info.key.endswith("/" + MANIFEST_NAME):
            sets.append(info.key[: -len(MANIFEST_NAME) - 1])
    return sorted(sets)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _check_expiry(expires_s: int) -> None:
    if not 1 <= expires_s <= MAX_PRESIGN_EXPIRY_S:
        raise ValueError(f"expires_s must be in 1..{MAX_PRESIGN_EXPIRY_S}, got {expires_s}")


def _stream_to_file(src: BinaryIO, dest: Path) -> None:
    """Write ``src`` to ``dest`` through a temporary file in the same directory + rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            shutil.copyfileobj(src, handle, _CHUNK)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
