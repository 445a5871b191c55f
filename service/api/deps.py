"""The API's shared state and its FastAPI dependencies (database, store, settings, caller).

Endpoints are ``async``; the blocking part of one (SQLAlchemy, the object store) runs in a
worker thread as one call, :meth:`Db.read` or :meth:`Db.write`, with a connection from a pool
sized to the threads allowed. Every hop to a worker thread and back costs two context switches
and a wake-up of the event loop, so a request makes as few as it can: one to check the caller's
key, one for the endpoint's work. (A ``def`` endpoint would make four: FastAPI runs a sync
endpoint, its response validation, and each half of a sync ``yield`` dependency in the thread
pool.) Request parsing, response validation and serialisation stay on the event loop.

Reads get a Core :class:`~sqlalchemy.engine.Connection` in autocommit mode: a read costs its
queries and nothing else (no ``BEGIN``, no ``ROLLBACK`` when the connection goes back to the
pool, no ORM identity map). Under PostgreSQL's default READ COMMITTED every statement of a
transaction sees a fresh snapshot anyway, so this changes nothing about what a read can see. A
read whose connection turns out to be dead (the database restarted) is run once more on a fresh
connection. Writes get a transactional ORM session, committed by the queue operation that does
the writing; they are never retried.

Authentication reads ``Authorization: Bearer <key>`` itself (so that a missing, a malformed and
an unknown key each get their own clear 401; a key in the query string is refused with a 401
of its own, even next to a valid header) and declares the scheme with
:class:`fastapi.security.HTTPBearer` so that the OpenAPI document and ``/docs`` know about it.
The key is checked against the database on every request (nothing is cached: a revoked key is
refused at once), before the request's parameters and body are validated. Keys are never logged
or echoed back.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote, urlparse

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from bird_datasets.location import resolve_dataset_uri
from service.api.edges import credential_in_query
from service.auth import key_owner, may_be_key
from service.settings import Settings
from service.storage import (
    InvalidKeyError,
    LocalStore,
    ObjectStore,
    S3Store,
    open_store,
    scoped,
    valid_bucket_name,
    validate_key,
)

__all__ = [
    "READ_THREADS",
    "WRITE_THREADS",
    "AppState",
    "Caller",
    "CallerDep",
    "Db",
    "DbDep",
    "SettingsDep",
    "StateDep",
    "StoreDep",
    "UnresolvableURI",
    "bearer_scheme",
    "current_caller",
    "get_db",
    "get_settings",
    "get_state",
    "get_store",
]

P = ParamSpec("P")
T = TypeVar("T")

# Worker threads that run reads (key checks included) and writes at once, per API process; the
# two connection pools are sized to match, so neither churns nor makes a thread wait. A few
# threads keep two CPUs busy; more only add context switches and contention for the GIL, while
# a request waiting for a thread waits on the event loop, at no cost. Writes have threads of
# their own: a submit checks its dataset in the object store, and a slow store must not hold up
# the reads.
READ_THREADS = 16
WRITE_THREADS = 8
# Stores opened for URIs outside the deployment's store (another bucket, a local directory) are
# cached: building a boto3 client costs tens of milliseconds. Bounded, least recently used out.
_STORE_CACHE_SIZE = 64


class UnresolvableURI(ValueError):
    """A URI that does not name a place bird can read (bad scheme, bucket or key)."""


@dataclass
class AppState:
    """What every request shares: settings, the engines and sessions, the object store.

    ``sessions`` are transactional (writes); ``read_engine`` hands out autocommit connections
    (reads: no ``BEGIN``/``ROLLBACK`` round trips). :meth:`run_read` and :meth:`run_write` run
    work in worker threads, at most ``READ_THREADS`` and ``WRITE_THREADS`` at once.
    """

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    read_engine: Engine
    store: ObjectStore
    # Readiness probes run here so that a hung dependency cannot hold a probe past its deadline.
    probes: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="bird-probe")
    )
    read_threads: CapacityLimiter = field(default_factory=lambda: CapacityLimiter(READ_THREADS))
    write_threads: CapacityLimiter = field(default_factory=lambda: CapacityLimiter(WRITE_THREADS))
    _stores: OrderedDict[str, ObjectStore] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def run_read(
        self, work: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """:meth:`read` in a worker thread (one of at most ``READ_THREADS``)."""
        call = functools.partial(self.read, work, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self.read_threads)

    async def run_write(
        self, work: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """:meth:`write` in a worker thread (one of at most ``WRITE_THREADS``)."""
        call = functools.partial(self.write, work, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self.write_threads)

    def read(
        self, work: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``work(connection, ...)`` on an autocommit connection (blocking: a worker thread's).

        A connection found dead on first use (the database restarted or closed it) has already
        been discarded by the pool, and so has every connection opened before it; the read runs
        once more on a fresh one. A second failure is raised (the API answers 503).
        """
        try:
            with self.read_engine.connect() as connection:
                return work(connection, *args, **kwargs)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self.read_engine.connect() as connection:
            return work(connection, *args, **kwargs)

    def write(
        self, work: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``work(session, ...)`` on a transactional session; ``work`` commits what it writes.

        Never retried: whether a write that failed mid-way took effect is for ``work`` (the
        queue's operations are idempotent where it matters) and the client to find out.
        """
        with self.sessions() as session:
            return work(session, *args, **kwargs)

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

    def _dataset_store(self, url: str) -> ObjectStore:
        """A store rooted at a dataset outside the deployment's store: one cached client per
        bucket (or directory), viewed at the dataset's prefix."""
        if url.startswith("s3://"):
            bucket, _, prefix = url.removeprefix("s3://").partition("/")
            store = self._cached_store(f"s3://{bucket}")
            return scoped(store, prefix) if prefix else store
        return self._cached_store(url)

    def resolve_dataset(self, uri: str, tenant_id: int | None = None) -> tuple[ObjectStore, str]:
        """The store and prefix a job spec's ``dataset.uri`` names in the space of tenant
        ``tenant_id`` (see :func:`bird_datasets.location.resolve_dataset_uri`). Raises
        :class:`~bird_datasets.location.DatasetURIError`."""
        return resolve_dataset_uri(
            uri, self.settings, self.store, tenant_id=tenant_id, opener=self._dataset_store
        )

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
                if not valid_bucket_name(parsed.netloc):
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

    def object_name(self, uri: str | None) -> str | None:
        """How a tenant reads a stored object's URI: its key (``jobs/<id>/checkpoints/best.tar``).
        The bucket, the deployment's prefix and the server's directories are the deployment's,
        not the tenant's, as in the job errors the workers redact; downloads go by ``url``."""
        if uri is None:
            return None
        try:
            return self.resolve_object(uri)[1]
        except UnresolvableURI:
            return uri.rstrip("/").rsplit("/", 1)[-1]  # the name alone, never the location


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


def _bearer_token(request: Request) -> str:
    """The key of ``Authorization: Bearer <key>``; 401 when the header is missing or malformed,
    or when the query string carries a key (whatever the header says)."""
    parameter = credential_in_query(request.scope.get("query_string", b""))
    if parameter is not None:
        raise _unauthorized(
            f"API keys are accepted only in the Authorization header, never in the URL "
            f"(query parameter {parameter!r}): URLs are written to logs. Send "
            "'Authorization: Bearer <API key>', and revoke a key that was sent in a URL."
        )
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise _unauthorized("missing Authorization header: send 'Authorization: Bearer <API key>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized("malformed Authorization header: expected 'Bearer <API key>'")
    return token


def _lookup_caller(connection: Connection, token: str) -> Caller | None:
    owner = key_owner(connection, token)
    return None if owner is None else Caller(tenant_id=owner[0], tenant_name=owner[1])


@dataclass(frozen=True)
class Db:
    """The database access of an authenticated request.

    ``await db.read(work, *args)`` runs ``work(connection, caller, *args)`` on an autocommit
    Core connection, ``await db.write(work, *args)`` runs ``work(session, caller, *args)`` on a
    transactional ORM session; either in one thread-pool hop, which also hands the connection
    back to the pool before the response is sent. ``work`` is plain blocking code: queries,
    object-store calls, building the response model.
    """

    state: AppState
    caller: Caller

    async def read(
        self,
        work: Callable[Concatenate[Connection, Caller, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``work(connection, caller, ...)`` on an autocommit connection, in a worker thread."""
        return await self.state.run_read(work, self.caller, *args, **kwargs)

    async def write(
        self,
        work: Callable[Concatenate[Session, Caller, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``work(session, caller, ...)`` on a transactional session, in a worker thread."""
        return await self.state.run_write(work, self.caller, *args, **kwargs)


async def get_db(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Db:
    """The request's :class:`Db`, for the tenant whose API key it carries; 401 if none.

    Missing, malformed (not ``Bearer <key>``) and unknown or revoked keys each get their own
    message (with ``WWW-Authenticate``); the key itself is never echoed or logged. The key is
    looked up in the database on every request (one query, one thread-pool hop) before the
    request's parameters and body are validated; a string that cannot be a key at all is
    refused without asking the database. (One flat dependency: each level of FastAPI's
    dependency tree costs CPU on every request.)
    """
    token = _bearer_token(request)
    state: AppState = request.app.state.bird
    caller = None
    if may_be_key(token):
        caller = await state.run_read(_lookup_caller, token)
    if caller is None:
        raise _unauthorized("invalid API key: it is unknown or was revoked")
    return Db(state=state, caller=caller)


DbDep = Annotated[Db, Depends(get_db)]


async def current_caller(db: DbDep) -> Caller:
    """The authenticated tenant of the request (see :func:`get_db`); 401 if none."""
    return db.caller


CallerDep = Annotated[Caller, Depends(current_caller)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
