"""API keys: created once, shown once, stored as sha256 only.

A key looks like ``bird_<43 url-safe characters>`` (256 bits from ``secrets``). The database
keeps its sha256 and its first 8 characters (to tell keys apart in listings and logs); nothing
can recover a key from what is stored. Verification hashes the presented key and looks the hash
up together with its tenant, so it costs one indexed query (one round trip) and never compares
secrets character by character. Nothing is cached: a revoked key is refused by the very next
request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant

KEY_PREFIX = "bird_"
# Longer strings are refused without a lookup (a real key is 48 characters).
MAX_KEY_LENGTH = 256
MAX_TENANT_NAME = 200


@dataclass(frozen=True)
class CreatedKey:
    """A freshly created key: ``key`` is shown to the user once and never stored."""

    key: str
    key_prefix: str
    tenant_id: int
    tenant_name: str


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> CreatedKey:
    """Create a key for ``tenant_name`` (the tenant is created if new) and commit."""
    name = tenant_name.strip()
    if not name or len(name) > MAX_TENANT_NAME or not name.isprintable():
        raise ValueError(
            f"tenant name must be 1–{MAX_TENANT_NAME} printable characters, got {tenant_name!r}"
        )
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_prefix=key[:8], key_hash=hash_key(key)))
    session.commit()
    return CreatedKey(key=key, key_prefix=key[:8], tenant_id=tenant.id, tenant_name=name)


def may_be_key(key: str) -> bool:
    """Whether ``key`` has a key's shape at all (anything else is refused without a lookup)."""
    return key.startswith(KEY_PREFIX) and len(key) <= MAX_KEY_LENGTH


# The tenant of a key, revoked keys excluded: one indexed join (api_keys.key_hash is unique).
# Built once: constructing a statement (and its cache key) costs more CPU than running it.
_KEY_OWNER = (
    select(Tenant.id, Tenant.name)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None for an unknown or revoked key.

    One query: the key's row joined to its tenant, revoked keys excluded.
    """
    if not may_be_key(key):
        return None
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


def key_owner(connection: Connection | Session, key: str) -> tuple[int, str] | None:
    """``(tenant id, tenant name)`` of ``key``, or None for an unknown or revoked key.

    The check :func:`authenticate` makes, as one Core query built once and returning two
    columns (no ORM object): what the API runs on every request.
    """
    if not may_be_key(key):
        return None
    row = connection.execute(_KEY_OWNER, {"key_hash": hash_key(key)}).first()
    return None if row is None else (row.id, row.name)
