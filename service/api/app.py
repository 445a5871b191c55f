"""The FastAPI application: ``create_app(settings)`` wires settings, database, store and routes.

Errors are answered as JSON ``{"detail": ...}`` with the status that says whose fault it was:
a body that cannot be read 400, no valid key 401, unknown or foreign job 404, a transition the
job's state forbids 409, a body over the limit 413, bad input 422 (FastAPI's field-level shape,
bounded: see ``service.api.edges``), a tenant's queue full 429, the database or object store
unreachable 503 (429 and 503 with ``Retry-After``). A 500 means a bug; its traceback goes to the
log, never to the client. Nothing secret is logged: not the keys (a query string carrying one is
redacted from the access log), not the Authorization header, not the database URL's password.
"""

from __future__ import annotations

import gc
import logging
import math
import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine, event, make_url
from sqlalchemy.exc import DataError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import queue
from service.api.deps import READ_THREADS, WRITE_THREADS, AppState
from service.api.edges import AccessLogRedaction, BodyLimitMiddleware, bounded_errors
from service.api.routes import checkpoints, datasets, health, jobs, teachers
from service.api.schemas import error_responses
from service.db import make_engine, session_factory
from service.settings import Settings
from service.storage import (
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    store_from_settings,
)

__all__ = ["DASHBOARD_DIR", "create_app"]

log = logging.getLogger("bird.api")

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
# When a client that was refused for a full queue, or for an outage, should try again. A full
# queue drains as workers claim jobs, at a pace the API cannot know; a minute is a polite poll.
QUEUE_FULL_RETRY_AFTER_S = 60
UNAVAILABLE_RETRY_AFTER_S = 5

# Connections per API process on PostgreSQL, in two pools: autocommit connections for reads and
# transactional ones for writes, (pool_size, max_overflow) each. At most READ_THREADS and
# WRITE_THREADS threads use them at once, so pools that keep that many connections never churn
# and never make a thread wait; the overflow covers the readiness probe's threads. At most 32
# connections per API process in all.
PG_READ_POOL = (READ_THREADS, 4)
PG_WRITE_POOL = (WRITE_THREADS, 4)
# No pooled connection is older than this: one left idle behind a NAT or a load balancer that
# silently forgets idle flows (AWS's NAT gateway: 350 s) is replaced before that happens.
PG_POOL_RECYCLE_S = 300

_DESCRIPTION = """
Fair knowledge distillation as a service. Submit a job spec (dataset, teacher, student, method,
hyper-parameters, optional search), follow its state and metrics, download the distilled
student.

Every endpoint except `/healthz` and `/readyz` needs `Authorization: Bearer <API key>`; a job is
visible only to its tenant.
"""


def _detail(code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """The methods that some route of ``app`` serves at the request's path."""
    return [
        method
        for method in _HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in app.router.routes
        )
    ]


def _register_errors(app: FastAPI) -> None:
    """Map the service layer's exceptions to HTTP answers."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape (loc, msg, type, input), bounded: a large body is never echoed back.
        # An input holding NaN (Python's JSON parser accepts it) or a lone surrogate must not
        # turn a 422 into a 500 while rendering.
        errors = bounded_errors(_json_safe(jsonable_encoder(exc.errors())))
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette names the methods of the one route it tried; a path served by several
            # routes (GET and POST /jobs) supports all of theirs.
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed(app, request))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(queue.JobNotFound)
    async def job_not_found(_request: Request, exc: queue.JobNotFound) -> JSONResponse:
        return _detail(status.HTTP_404_NOT_FOUND, str(exc))

    @app.exception_handler(queue.IllegalTransition)
    async def illegal_transition(_request: Request, exc: queue.IllegalTransition) -> JSONResponse:
        return _detail(status.HTTP_409_CONFLICT, str(exc))

    @app.exception_handler(queue.IdempotencyConflict)
    async def idempotency_conflict(
        _request: Request, exc: queue.IdempotencyConflict
    ) -> JSONResponse:
        return _detail(status.HTTP_409_CONFLICT, str(exc))

    @app.exception_handler(queue.QueueFull)
    async def queue_full(_request: Request, exc: queue.QueueFull) -> JSONResponse:
        return _detail(
            status.HTTP_429_TOO_MANY_REQUESTS,
            str(exc),
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )

    @app.exception_handler(StorageError)
    async def storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, ObjectNotFoundError):
            return _detail(status.HTTP_404_NOT_FOUND, str(exc))
        if isinstance(exc, InvalidKeyError):
            return _detail(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
        log.warning("object store error: %s", exc)
        return _detail(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"object store unavailable: {exc}",
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        # The message of a connection error names host and port, never the password.
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        log.warning("database unavailable: %s", first[0] if first else type(exc).__name__)
        return _detail(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "database unavailable; try again shortly",
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    for exc_class in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(exc_class, database_unavailable)

    @app.exception_handler(DataError)
    async def data_error(_request: Request, exc: DataError) -> JSONResponse:
        # A value the schema let through but the database refuses (out of its range).
        return _detail(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "a value is out of range for the database"
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _detail(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal server error")


def _discard_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout hook: refuse a pooled PostgreSQL connection that the server has closed.

    What ``pool_pre_ping`` is for, without its round trip. A server that restarts, or ends an
    idle session (``pg_terminate_backend``, ``idle_session_timeout``), sends an error and closes
    the socket, so an idle pooled connection with anything to read is dead (or, at best,
    carrying an unsolicited message); a zero-timeout ``poll()`` sees that in a system call.
    ``DisconnectionError`` makes the pool discard the connection and hand out a fresh one. A
    peer that vanished without closing (a dead route) is seen neither here nor by a
    ``SELECT 1`` until TCP gives up. Whenever a query does find its connection dead, the pool
    drops it and every older connection, and reads are retried once on a fresh connection
    (``AppState.read``); writes answer 503.
    """
    try:
        closed = bool(dbapi_connection.closed) or dbapi_connection.pgconn.status != 0
        if not closed:
            poller = select.poll()
            poller.register(dbapi_connection.pgconn.socket, select.POLLIN | select.POLLPRI)
            closed = bool(poller.poll(0))
    except Exception:  # a connection that cannot even be inspected is not worth keeping
        closed = True
    if closed:
        raise DisconnectionError("the database closed this pooled connection")


def _make_engine(settings: Settings, *, reads: bool = False) -> Engine:
    """The API's engine for writes, or (``reads``, PostgreSQL only) for reads: autocommit."""
    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        return make_engine(url)
    # The hook below reads psycopg 3's connection; other drivers keep the pre-ping.
    cheap_ping = hasattr(select, "poll") and make_url(url).get_driver_name() == "psycopg"
    pool_size, max_overflow = PG_READ_POOL if reads else PG_WRITE_POOL
    engine = make_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=PG_POOL_RECYCLE_S,
        pool_pre_ping=not cheap_ping,
        # A pool of its own rather than engine.execution_options(): switching a pooled
        # connection to autocommit and back at every checkout costs about half as much CPU as
        # a small query.
        **({"isolation_level": "AUTOCOMMIT"} if reads else {}),
    )
    if cheap_ping:
        event.listen(engine, "checkout", _discard_if_closed)
    return engine


def create_app(
    settings: Settings, *, engine: Engine | None = None, store: ObjectStore | None = None
) -> FastAPI:
    """The bird API for ``settings``.

    ``engine`` and ``store`` default to the database and object store the settings name (an
    engine created here is disposed when the app shuts down; one passed in belongs to the
    caller). The database must already be migrated (``bird db upgrade``).
    """
    owned: list[Engine] = []
    if engine is None:
        engine = _make_engine(settings)
        owned.append(engine)
        if engine.dialect.name == "postgresql":
            owned.append(_make_engine(settings, reads=True))
    # Reads: autocommit connections, which send a read's queries and nothing else. From a pool
    # of their own on PostgreSQL; otherwise (SQLite, an engine passed in) from the same pool,
    # switched to autocommit at each checkout.
    read_engine = (
        owned[1] if len(owned) > 1 else engine.execution_options(isolation_level="AUTOCOMMIT")
    )
    store = store if store is not None else store_from_settings(settings)
    state = AppState(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        read_engine=read_engine,
        store=store,
    )

    # uvicorn writes the access log itself; this filter redacts keys sent in query strings
    # (which the API refuses) before a line is written. Installed while the app runs.
    redaction = AccessLogRedaction()
    access_log = logging.getLogger("uvicorn.access")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        access_log.addFilter(redaction)
        # Everything imported and built so far (FastAPI, pydantic, SQLAlchemy, boto3: some
        # 150,000 objects) lives as long as the process. Left in the cyclic collector's oldest
        # generation, it makes every full collection walk all of it: a 40-180 ms pause of the
        # whole server, several times a minute under load, which is what the slowest 1% of
        # requests would wait for. Frozen, a full collection looks at new objects only.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            access_log.removeFilter(redaction)
            gc.unfreeze()
            state.probes.shutdown(wait=False, cancel_futures=True)
            for owned_engine in owned:
                owned_engine.dispose()

    app = FastAPI(
        title="bird",
        version="0.1.0",
        summary="Fair knowledge distillation as a service",
        description=_DESCRIPTION,
        lifespan=lifespan,
        # Any request, on any path, may carry a body over the limit.
        responses=error_responses(413),
    )
    app.state.bird = state
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        upload_max_bytes=settings.max_upload_bytes,
    )
    _register_errors(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(datasets.router)
    app.include_router(teachers.router)

    if DASHBOARD_DIR.is_dir():
        app.mount("/ui", StaticFiles(directory=DASHBOARD_DIR, html=True), name="ui")

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/ui/")

    return app
