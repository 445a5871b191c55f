"""Fixtures for integration tests: real servers on loopback, never mocks.

Sections:

* Object storage — a fresh bucket per test on the session's moto S3 server (``s3_server``, HTTP,
  in a thread of this process, from ``tests/conftest.py``), S3 and local stores, and a
  ``store`` fixture parametrised over both.

Add fixtures for other servers (PostgreSQL, Ray, ...) in their own section below.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from service.settings import Settings
from service.storage import LocalStore, ObjectStore, S3Store
from tests.integration.api_fixtures import (  # noqa: F401
    _api_local_server,
    _api_s3_server,
    live_api,
    live_api_local,
    tiny_dataset,
    tiny_dataset_local,
)

# The database fixtures live in db_fixtures.py; importing them here makes them visible to every
# integration test module.
from tests.integration.db_fixtures import (  # noqa: F401
    db_engine,
    db_session,
    db_tenant_id,
    db_url,
    pg_empty_url,
    pg_url,
    sqlite_empty_url,
    sqlite_url,
)
from tests.integration.train_fixtures import train_data, train_data_local  # noqa: F401
from tests.s3_fixtures import S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, S3_STORE_PREFIX

# ============================================================================================
# Object storage
# ============================================================================================

# The moto server itself (``s3_server``) is a session fixture of ``tests/conftest.py``: one
# server for the integration and the e2e tests.


@pytest.fixture
def aws_isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make every AWS SDK in this process (boto3, pyarrow's C++ SDK) see only fake credentials.

    No profile, no config files, no instance-metadata lookups: nothing can pick up real
    credentials or try to reach AWS or 169.254.169.254. Undone by monkeypatch after the test.
    """
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def _admin_client(endpoint: str, service: str = "s3") -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY_ID,
        aws_secret_access_key=S3_SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def s3_client(s3_server: str, aws_isolated_env: None) -> Any:
    """A plain boto3 S3 client on the moto server, for test setup and inspection."""
    return _admin_client(s3_server)


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    """A fresh, uniquely named bucket; emptied and deleted after the test."""
    name = f"bird-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    # Tests hold large objects (multipart uploads); free the server's memory as we go.
    try:
        paginator = s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for item in page.get("Contents", []):
                s3_client.delete_object(Bucket=name, Key=item["Key"])
        s3_client.delete_bucket(Bucket=name)
    except s3_client.exceptions.NoSuchBucket:
        pass


@pytest.fixture
def s3_settings(s3_server: str, s3_bucket: str, tmp_path: Path) -> Settings:
    """Settings pointing at the moto server, with ``store_url`` = ``s3://<bucket>/bird``."""
    return Settings(
        s3_endpoint_url=s3_server,
        s3_access_key_id=S3_ACCESS_KEY_ID,
        s3_secret_access_key=S3_SECRET_ACCESS_KEY,
        s3_region=S3_REGION,
        data_dir=tmp_path,
        store_url=f"s3://{s3_bucket}/{S3_STORE_PREFIX}",
    )


@pytest.fixture
def make_s3_store(s3_settings: Settings, s3_bucket: str) -> Callable[..., S3Store]:
    """Factory for S3Stores on the test bucket; keyword arguments override the defaults.

    E.g. ``make_s3_store(page_size=2)`` or ``make_s3_store(multipart_threshold=5 * 2**20)``.
    """

    def make(**overrides: Any) -> S3Store:
        kwargs: dict[str, Any] = {
            "bucket": s3_bucket,
            "prefix": S3_STORE_PREFIX,
            "endpoint_url": s3_settings.s3_endpoint_url,
            "region": S3_REGION,
            "access_key_id": S3_ACCESS_KEY_ID,
            "secret_access_key": S3_SECRET_ACCESS_KEY,
        }
        kwargs.update(overrides)
        return S3Store(**kwargs)

    return make


@pytest.fixture
def s3_store(make_s3_store: Callable[..., S3Store]) -> S3Store:
    """An S3Store on the per-test bucket under the prefix ``bird``."""
    return make_s3_store()


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A LocalStore in ``<tmp_path>/store``."""
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each backend in turn: tests using it run once on a LocalStore and once on an S3Store."""
    return request.getfixturevalue(f"{request.param}_store")


def _set_moto_auth(endpoint: str, initial_no_auth_action_count: str) -> str:
    """Set moto's auth enforcement (``"0"``: from now on, ``"inf"``: never); returns the old."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_no_auth_action_count.encode(),
        # Not urllib's default form encoding, which the server would parse away from the body.
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@pytest.fixture
def s3_auth_enforced(s3_server: str, s3_bucket: str) -> Iterator[tuple[str, str]]:
    """Turn on moto's IAM authentication for the duration of one test.

    Before switching it on, creates an IAM user with an access key (and no policies) and yields
    ``(access_key_id, secret_access_key)``: a key moto knows, for tests of a wrong secret or of
    a denied action; any other key is unknown (InvalidAccessKeyId). Depends on ``s3_bucket`` so
    that the bucket is created before, and deleted after, enforcement. Moto counts auth state
    process-wide, so this is restored even if the test fails.
    """
    iam = _admin_client(s3_server, "iam")
    user = f"bird-test-{uuid.uuid4().hex[:12]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    previous = _set_moto_auth(s3_server, "0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _set_moto_auth(s3_server, previous)
