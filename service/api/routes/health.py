"""Liveness and readiness probes (no authentication: orchestrators call them)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import AppState, StateDep
from service.api.schemas import Health

__all__ = ["PROBE_TIMEOUT_S", "router"]

router = APIRouter(tags=["health"])

# A readiness probe answers within this many seconds even when a dependency hangs (S3 retries
# with back-off for ~12 s; a database behind a dead route waits for TCP): a quick "no" beats no
# answer. A healthy HeadBucket or SELECT 1 takes milliseconds. Give the orchestrator's probe a
# timeout above this (Kubernetes: timeoutSeconds >= 3).
PROBE_TIMEOUT_S = 2.0


def _first_line(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text_}"[:300]


def _check_database(state: AppState) -> None:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_store(state: AppState) -> None:
    state.store.ping()


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    """200 ``{"status": "ok"}`` whenever the process can answer at all."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: the database and the object store answer",
    responses={503: {"model": Health, "description": "A dependency is unreachable."}},
)
def readyz(state: StateDep) -> JSONResponse:
    """200 when ``SELECT 1`` and the store's ping both succeed; 503 naming what failed."""
    checks: dict[str, Callable[[AppState], None]] = {
        "database": _check_database,
        "store": _check_store,
    }
    futures = {name: state.probes.submit(check, state) for name, check in checks.items()}
    # One deadline for both checks, which run side by side.
    done, _pending = concurrent.futures.wait(futures.values(), timeout=PROBE_TIMEOUT_S)
    results: dict[str, str] = {}
    for name, future in futures.items():
        if future not in done:
            results[name] = f"no answer within {PROBE_TIMEOUT_S:g} s"
            continue
        exc = future.exception()
        # Any failure is "not ready", described in one line.
        results[name] = "ok" if exc is None else _first_line(exc)
    ready = all(value == "ok" for value in results.values())
    body = Health(status="ok" if ready else "unavailable", checks=results)
    code = status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)
