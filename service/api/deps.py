"""The API's shared state and its FastAPI dependencies (DB session, store, settings, caller).

Everything here is plain sync code: endpoints are ``def`` functions that FastAPI runs in its
thread pool, each with one SQLAlchemy session from a sized connection pool.

Authentication reads ``Authorization: Bearer <key>`` itself (so that a missing, a malformed and
an unknown key each get their own clear 401) and declares the scheme with
:class:`fastapi.security.HTTPBearer` so that the OpenAPI document and ``/docs`` know about it.
Keys are never logged or echoed back.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlparse

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.auth import authenticate
from service.settings import Settings
from service.storage import (
    InvalidKeyError,
    LocalStore,
    ObjectStore,
    S3Store,
    StorageError,
    open_store,
    validate_key,
    validate_prefix,
)

__all__ = [
    "AppState",
    "Caller",
    "CallerDep",
    "SessionDep",
    "SettingsDep",
    "StateDep",
    "StoreDep",
    "UnresolvableURI",
    "bearer_scheme",
    "current_caller",
    "get_session",
    "get_settings",
    "get_state",
    "get_store",
]

# S3 bucket naming rules (3-63 lower-case letters, digits, dots, hyphens). Checked before a
# user-supplied s3:// URI reaches boto3, whose own validation error would read like an outage.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Stores opened for URIs outside the deployment's store (another bucket, a local directory) are
# cached: building a boto3 client costs tens of milliseconds. Bounded, least recently used out.
_STORE_CACHE_SIZE = 64


class UnresolvableURI(ValueError):
    """A URI that does not name a place bird can read (bad scheme, bucket or key)."""


@dataclass
class AppState:
    """What every request shares: settings, the engine and its sessions, the object store."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    # Readiness probes run here so that a hung dependency cannot hold a probe past its deadline.
    probes: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="bird-probe")
    )
    _stores: OrderedDict[str, ObjectStore] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_local(self) -> bool:
        """Whether the deployment's store is a local directory (served under ``/files``)."""
        return isinstance(self.store, LocalStore)

    def _cached_store(self, url: str) -> ObjectStore:
        with self._lock:
            store = self._stores.get(url)
            if store is not None:
                self._stores.move_to_end(url)
                return store
        store = open_store(url, self.settings)
        with self._lock:
            self._stores[url] = store
            while len(self._stores) > _STORE_CACHE_SIZE:
                self._stores.popitem(last=False)
        return store

    def resolve_dataset(self, uri: str) -> tuple[ObjectStore, str]:
        """The store and prefix a job spec's ``dataset.uri`` names.

        ``s3://bucket/prefix`` (on the deployment's S3 endpoint) and ``file:///abs/dir`` or an
        absolute path open a store there, with the dataset at its root; anything else is a
        prefix inside the deployment's own store (``datasets/fmnist``). Raises
        :class:`UnresolvableURI` for what cannot be a dataset location.
        """
        try:
            if "://" in uri:
                parsed = urlparse(uri)
                scheme = parsed.scheme.lower()
                if scheme == "s3":
                    if not _BUCKET_RE.match(parsed.netloc):
                        raise UnresolvableURI(f"{parsed.netloc!r} is not a valid S3 bucket name")
                    prefix = validate_prefix(parsed.path.lstrip("/"))
                    return self._cached_store(f"s3://{parsed.netloc}"), prefix
                if scheme == "file":
                    if parsed.netloc not in ("", "localhost"):
                        raise UnresolvableURI("file URIs must name a local path")
                    path = unquote(parsed.path)
                    if not path.startswith("/"):
                        raise UnresolvableURI("file URIs must name an absolute path")
                    return self._cached_store(str(Path(path))), ""
                raise UnresolvableURI(
                    f"unsupported scheme {parsed.scheme!r}: use s3://bucket/prefix, an absolute "
                    "local path, or a prefix in the deployment's store"
                )
            if uri.startswith("/"):
                if "\x00" in uri:
                    raise UnresolvableURI("paths must not contain NUL characters")
                return self._cached_store(str(Path(uri))), ""
            prefix = validate_prefix(uri)
            if not prefix:
                raise UnresolvableURI("the store root is not a dataset; name a prefix")
            return self.store, prefix
        except InvalidKeyError as exc:
            raise UnresolvableURI(str(exc)) from None
        except StorageError as exc:
            raise UnresolvableURI(str(exc)) from None

    def resolve_object(self, uri: str) -> tuple[ObjectStore, str]:
        """The store and key of an object recorded by a worker (a checkpoint archive).

        Accepts a store-relative key, a URI inside the deployment's store, or (S3) a URI in
        another bucket of the same endpoint. A local file outside the deployment's store is
        refused: the API never serves arbitrary files of its machine.
        """
        try:
            if "://" not in uri:
                return self.store, validate_key(uri)
            parsed = urlparse(uri)
            scheme = parsed.scheme.lower()
            store = self.store
            if scheme == "s3":
                key = parsed.path.lstrip("/")
                if isinstance(store, S3Store) and parsed.netloc == store.bucket:
                    if not store.prefix:
                        return store, validate_key(key)
                    if key.startswith(store.prefix + "/"):
                        return store, validate_key(key[len(store.prefix) + 1 :])
                if not _BUCKET_RE.match(parsed.netloc):
                    raise UnresolvableURI(f"{parsed.netloc!r} is not a valid S3 bucket name")
                return self._cached_store(f"s3://{parsed.netloc}"), validate_key(key)
            if scheme == "file" and isinstance(store, LocalStore):
                path = Path(unquote(parsed.path))
                try:
                    relative = path.relative_to(store.root)
                except ValueError:
                    raise UnresolvableURI(f"{uri} lies outside the deployment's store") from None
                return store, validate_key(relative.as_posix())
            raise UnresolvableURI(f"{uri} is not in the deployment's object store")
        except InvalidKeyError as exc:
            raise UnresolvableURI(str(exc)) from None


@dataclass(frozen=True)
class Caller:
    """The authenticated tenant of a request."""

    tenant_id: int
    tenant_name: str


# The trivial dependencies are ``async``: FastAPI runs a sync dependency in its thread pool, and
# every hop to a worker thread and back costs two context switches for nothing when there is
# no I/O to wait for.


async def get_state(request: Request) -> AppState:
    """The application's :class:`AppState` (set by ``create_app``)."""
    return request.app.state.bird


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    """The deployment's settings."""
    return state.settings


async def get_store(state: StateDep) -> ObjectStore:
    """The deployment's object store."""
    return state.store


# auto_error=False: the scheme only documents the header; the dependency below reads and checks
# it, so each way of getting it wrong gets its own message.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (`bird keys create --tenant NAME`), sent as `Bearer <key>`.",
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _authenticate(request: Request, session: Session) -> Caller:
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise _unauthorized("missing Authorization header: send 'Authorization: Bearer <API key>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized("malformed Authorization header: expected 'Bearer <API key>'")
    tenant = authenticate(session, token)
    if tenant is None:
        raise _unauthorized("invalid API key: it is unknown or was revoked")
    return Caller(tenant_id=tenant.id, tenant_name=tenant.name)


@dataclass(frozen=True)
class _Scope:
    session: Session
    caller: Caller


def _request_scope(
    request: Request,
    state: StateDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Iterator[_Scope]:
    """Open the request's session and authenticate the caller with it, in one thread-pool hop.

    Every endpoint that touches the database is authenticated, so the session and the caller
    come from this one dependency (FastAPI caches it per request): one hop to open the session
    and check the key, one for the endpoint, one to close the session.
    """
    with state.sessions() as session:
        yield _Scope(session=session, caller=_authenticate(request, session))


_ScopeDep = Annotated[_Scope, Depends(_request_scope)]


async def get_session(scope: _ScopeDep) -> Session:
    """The request's session (authenticated requests only), closed after the response."""
    return scope.session


async def current_caller(scope: _ScopeDep) -> Caller:
    """The tenant whose API key the request carries; 401 (with ``WWW-Authenticate``) if none.

    Missing, malformed (not ``Bearer <key>``) and unknown or revoked keys each get their own
    message; the key itself is never echoed or logged.
    """
    return scope.caller


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[Caller, Depends(current_caller)]
