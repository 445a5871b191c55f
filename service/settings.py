"""Deployment settings: one ``pydantic-settings`` class, environment variables prefixed ``BIRD_``.

The embedded default needs no configuration at all: a SQLite file and a local object-store
directory under ``./bird-data/``, a local Ray started on demand. Production points the same
fields at PostgreSQL, S3/MinIO and a Ray cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a bird process needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="BIRD_", extra="forbid", frozen=True)

    data_dir: Path = Field(
        default=Path("bird-data"), description="Root of the embedded defaults (SQLite, store)."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. "
        "Default: sqlite:///<data_dir>/bird.db.",
    )
    store_url: str | None = Field(
        default=None,
        description="Object store: s3://bucket/prefix or a local directory. "
        "Default: <data_dir>/store.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); None means AWS."
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint as clients outside the deployment reach it: presigned "
        "download URLs point there. Default: s3_endpoint_url.",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    presign_expiry_s: int = Field(
        default=900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned URLs."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster address (ray://host:10001, auto); None: local."
    )
    api_host: str = Field(default="127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port the API binds to.")
    lease_s: int = Field(default=60, ge=5, description="Job lease length; heartbeats renew it.")
    heartbeat_s: int = Field(default=10, ge=1, description="Seconds between worker heartbeats.")
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body the API reads; a larger one is refused with 413.",
    )
    max_queued_per_tenant: int = Field(
        default=100,
        ge=1,
        description="Queued jobs a tenant may have at once; a submit beyond it is refused with "
        "429 and Retry-After.",
    )
    max_running_per_tenant: int | None = Field(
        default=None,
        ge=1,
        description="Running jobs a tenant may have at once; the claim leaves the tenant's "
        "other jobs queued. None: no limit (fair sharing still applies).",
    )
    max_upload_bytes: int = Field(
        default=4 * 1024**3,
        ge=1024,
        le=5 * 1024**4,
        description="Largest file one dataset upload may declare (POST /datasets); with a "
        "local store also the largest body PUT to the API's upload route.",
    )
    allow_external_uris: bool = Field(
        default=False,
        description="Let job specs name data outside the tenant's space: absolute paths, "
        "file:// and s3:// URIs (any bucket the deployment's credentials reach). Only for a "
        "single-user install: with it, every tenant reads whatever the deployment can.",
    )
    resource_wait_s: int = Field(
        default=600,
        ge=0,
        description="How long a job waits (stage waiting_for_resources) for the Ray cluster to "
        "have room for its training or a trial before it fails.",
    )
    stop_grace_s: int = Field(
        default=15,
        ge=1,
        description="After a cancel, how long a job's Ray run has to stop on its own (writing a "
        "final checkpoint) before the worker kills it.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_student_params: int = Field(
        default=100_000_000,
        ge=1_000,
        le=100_000_000_000,
        description="The most parameters a job's student may have (checked at submit).",
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("database_url must be a sqlite:// or postgresql:// URL")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``data_dir``."""
        # Absolute: Ray actors (the Train controller writes metrics) run in another directory.
        if self.database_url is None:
            return f"sqlite:///{(self.data_dir.resolve() / 'bird.db').as_posix()}"
        prefix = "sqlite:///"
        path = self.database_url[len(prefix) :]
        if self.database_url.startswith(prefix) and path and not path.startswith(("/", ":")):
            return f"{prefix}{Path(path).resolve().as_posix()}"
        return self.database_url

    @property
    def resolved_store_url(self) -> str:
        """The object-store URL, defaulting to a directory under ``data_dir``."""
        if self.store_url is None:
            return str(self.data_dir.resolve() / "store")
        if "://" not in self.store_url:
            return str(Path(self.store_url).resolve())  # absolute, for the same reason
        return self.store_url
