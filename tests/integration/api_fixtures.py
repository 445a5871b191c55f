"""Fixtures for the REST API: the real app under uvicorn on loopback, real PostgreSQL, real S3.

The server, its PostgreSQL schema and its S3 bucket (on the session's moto server) are built once
per test module: starting them costs about a second, and tests stay independent because each one
gets a fresh tenant and API key (jobs are invisible across tenants).

Fixtures:

* ``live_api`` — the app on S3 (moto) + PostgreSQL; a :class:`LiveAPI` with a fresh tenant.
* ``live_api_local`` — the same app on a :class:`~service.storage.LocalStore` (file serving).
* ``tiny_dataset`` — publishes a valid six-row dataset into ``live_api``'s store; its URI.

Helpers: :func:`serve` (any ASGI app on a free loopback port), :func:`publish_tiny_dataset`,
:func:`publish_checkpoint` (a ``<name>.tar`` archive plus its checkpoint record), and
:func:`job_spec`.

``tests/integration/conftest.py`` imports the fixtures, so every integration module sees them.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import uvicorn
from botocore.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bird_datasets.format import DatasetMeta
from bird_datasets.writer import DatasetArrays, write_dataset
from service import queue
from service.api import create_app
from service.auth import CreatedKey, create_key
from service.db import make_engine, session_factory, upgrade
from service.settings import Settings
from service.storage import LocalStore, ObjectStore, store_from_settings
from tests.integration.db_fixtures import _admin_engine, pg_schema_url

S3_KEY_ID = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"
# Published by the operator for every tenant (read-only shared data).
TINY_DATASET_PREFIX = "shared/datasets/tiny"
# Environment that keeps every AWS SDK in the process on the fake credentials (see conftest's
# aws_isolated_env; that fixture is function-scoped, these servers live for a module).
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": S3_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@contextmanager
def serve(app: Any, startup_timeout_s: float = 20.0, *, access_log: bool = False) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on 127.0.0.1 and a free port; yield its base URL.

    Port 0 lets the OS pick the port at bind time; the bound port is read back from the
    server's socket. The server is stopped (lifespan shutdown included) on exit. With
    ``access_log``, uvicorn logs every request at info level as ``bird serve`` does.
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail("the API server did not start", pytrace=False)
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@dataclass
class LiveAPI:
    """A running API and what a test needs to talk to it and to look behind it."""

    base_url: str
    api_key: str
    tenant_id: int
    engine: Engine
    store: ObjectStore
    settings: Settings
    _tenants: list[str] = field(default_factory=list, repr=False)

    def new_key(self, tenant: str | None = None) -> CreatedKey:
        """A key for ``tenant`` (default: a new tenant), e.g. to check tenant isolation."""
        with self.session() as session:
            return create_key(session, tenant or f"tenant-{uuid.uuid4().hex[:10]}")

    def session(self) -> Session:
        """A new session on the API's database (close it: use ``with``)."""
        return session_factory(self.engine)()

    def headers(self, key: str | None = None) -> dict[str, str]:
        """The Authorization header for ``key`` (default: this tenant's)."""
        return {"Authorization": f"Bearer {key or self.api_key}"}


@dataclass
class _Server:
    base_url: str
    engine: Engine
    store: ObjectStore
    settings: Settings

    def live(self) -> LiveAPI:
        with session_factory(self.engine)() as session:
            created = create_key(session, f"tenant-{uuid.uuid4().hex[:10]}")
        return LiveAPI(
            base_url=self.base_url,
            api_key=created.key,
            tenant_id=created.tenant_id,
            engine=self.engine,
            store=self.store,
            settings=self.settings,
        )


@contextmanager
def _aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name in _AWS_UNSET:
            patch.delenv(name, raising=False)
        for name, value in _AWS_ENV.items():
            patch.setenv(name, value)
        yield


@contextmanager
def _pg_schema() -> Iterator[str]:
    """A fresh, migrated PostgreSQL schema for one module; yields its URL; dropped after."""
    admin = _admin_engine()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = pg_schema_url(schema)
        upgrade(url)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '30s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def _bucket(endpoint: str, name_prefix: str = "bird-api") -> Iterator[str]:
    """A fresh bucket on the moto server; emptied and deleted afterwards."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        config=Config(s3={"addressing_style": "path"}),
    )
    name = f"{name_prefix}-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


@contextmanager
def _running(settings: Settings) -> Iterator[_Server]:
    engine = make_engine(settings.resolved_database_url, pool_size=10, max_overflow=10)
    store = store_from_settings(settings)
    try:
        with serve(create_app(settings, engine=engine, store=store)) as base_url:
            yield _Server(base_url=base_url, engine=engine, store=store, settings=settings)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def _api_s3_server(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    with _aws_env(), _pg_schema() as db_url, _bucket(s3_server) as bucket:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("api-s3"),
            database_url=db_url,
            store_url=f"s3://{bucket}/bird",
            s3_endpoint_url=s3_server,
            s3_access_key_id=S3_KEY_ID,
            s3_secret_access_key=S3_SECRET,
            s3_region=S3_REGION,
        )
        with _running(settings) as server:
            yield server


@pytest.fixture(scope="module")
def _api_local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    data_dir = tmp_path_factory.mktemp("api-local")
    with _pg_schema() as db_url:
        settings = Settings(
            data_dir=data_dir, database_url=db_url, store_url=str(data_dir / "store")
        )
        with _running(settings) as server:
            yield server


@pytest.fixture
def live_api(_api_s3_server: _Server) -> LiveAPI:
    """The API on PostgreSQL and the moto S3 store, with a fresh tenant and key for this test."""
    return _api_s3_server.live()


@pytest.fixture
def live_api_local(_api_local_server: _Server) -> LiveAPI:
    """The API on PostgreSQL and a LocalStore (files served by the API), fresh tenant and key."""
    return _api_local_server.live()


def publish_tiny_dataset(store: ObjectStore, prefix: str = TINY_DATASET_PREFIX) -> str:
    """Publish a valid image bird dataset (RGB, 8x8) of six rows (two per split) at
    ``prefix``: the default teacher and student of a job take it."""
    meta = DatasetMeta(
        name="tiny", task="multiclass", input="image", num_classes=2, num_groups=2,
        image_shape=(3, 8, 8),
    )  # fmt: skip
    rng = np.random.default_rng(0)

    def split() -> DatasetArrays:
        images = rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
        return DatasetArrays(label=np.array([0, 1]), group=np.array([0, 1]), images=images)

    write_dataset(
        store, prefix, splits={"train": split(), "val": split(), "test": split()}, meta=meta
    )
    return prefix


@pytest.fixture
def tiny_dataset(live_api: LiveAPI) -> str:
    """The store-relative URI of a tiny dataset in ``live_api``'s store (published once)."""
    if not live_api.store.exists(f"{TINY_DATASET_PREFIX}/manifest.json"):
        publish_tiny_dataset(live_api.store)
    return TINY_DATASET_PREFIX


@pytest.fixture
def tiny_dataset_local(live_api_local: LiveAPI) -> str:
    """The same tiny dataset in ``live_api_local``'s store."""
    if not live_api_local.store.exists(f"{TINY_DATASET_PREFIX}/manifest.json"):
        publish_tiny_dataset(live_api_local.store)
    return TINY_DATASET_PREFIX


def job_spec(dataset: str, **overrides: Any) -> dict[str, Any]:
    """A small valid job spec on ``dataset``; top-level keys of ``overrides`` replace defaults."""
    spec: dict[str, Any] = {
        "dataset": {"uri": dataset},
        "student": {"model": "small_cnn", "options": {"width": 4}},
        "method": {"name": "bkd", "options": {"lambda_kd": 1.0}},
        "training": {"epochs": 1, "batch_size": 4},
    }
    spec.update(overrides)
    return spec


def checkpoint_tar(files: Mapping[str, bytes]) -> bytes:
    """A checkpoint archive: ``files`` at the top level of an uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def publish_checkpoint(
    api: LiveAPI, job_id: int, name: str = "best", files: Mapping[str, bytes] | None = None
) -> bytes:
    """Upload ``jobs/<id>/checkpoints/<name>.tar`` and record it as the worker does; its bytes."""
    files = files or {
        "manifest.json": b'{"files": {}}',
        "student.safetensors": uuid.uuid4().bytes * 64,
        "meta.json": b'{"epoch": 1}',
    }
    data = checkpoint_tar(files)
    key = f"jobs/{job_id}/checkpoints/{name}.tar"
    api.store.put_bytes(key, data)
    with api.session() as session:
        queue.add_checkpoint(
            session,
            job_id,
            name,
            api.store.uri(key),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
    return data


def local_root(api: LiveAPI) -> Path:
    """The directory of a LocalStore-backed API's store."""
    assert isinstance(api.store, LocalStore)
    return api.store.root
