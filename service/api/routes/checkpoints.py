"""Checkpoint downloads: the list with presigned URLs, one archive, and local-store files.

A checkpoint record names one archive ``jobs/<id>/checkpoints/<name>.tar`` (see
``service.api.schemas``). With an S3 store the API hands out presigned URLs and answers a
download with a 307 to one, so the bytes never pass through the API process. A local store
cannot sign URLs: the API serves the file itself, under the caller's key, from
``/jobs/{id}/checkpoints/{name}`` and from ``/files/<key>`` (the paths ``LocalStore`` returns as
its "presigned" URLs), and only files under ``jobs/<id>/`` of a job of the caller's tenant.
"""

from __future__ import annotations

import os
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import Connection, select

from service import queue
from service.api.deps import AppState, Caller, DbDep, StateDep, UnresolvableURI
from service.api.routes.jobs import JOB_ID_MAX, JobId, owned_job_id
from service.api.schemas import CheckpointPublic, error_responses
from service.models import TERMINAL_STATES, Checkpoint, Job, JobState
from service.storage import InvalidKeyError, LocalStore, ObjectStore, validate_key

__all__ = ["router"]

# Every route: a key to check (401), path parameters to validate (422), a database to ask (503).
router = APIRouter(tags=["checkpoints"], responses=error_responses(401, 422, 503))

CheckpointName = Annotated[
    str, Path(min_length=1, max_length=200, description="best, last, or another name.")
]
_TAR = "application/x-tar"


def _local_file(store: LocalStore, key: str) -> FilePath | None:
    """The file of ``key`` in a local store, or None if there is none (or it escapes)."""
    try:
        validate_key(key)
    except InvalidKeyError:
        return None
    path = store.root.joinpath(*key.split("/"))
    # A symlink planted in the store must not lead outside it.
    resolved = FilePath(os.path.realpath(path))
    if store.root not in resolved.parents or not resolved.is_file():
        return None
    return resolved


def _absolute(request: Request, url: str) -> str:
    """A local store's ``/files/...`` path made absolute against this API's base URL."""
    if url.startswith("/"):
        return str(request.base_url).rstrip("/") + url
    return url


def _url(state: AppState, request: Request, row: Checkpoint) -> str:
    try:
        store, key = state.resolve_object(row.uri)
    except UnresolvableURI:
        # Not downloadable from here; the per-checkpoint route explains why with a 404.
        return str(request.url_for("download_checkpoint", job_id=row.job_id, name=row.name))
    return _absolute(request, store.presigned_get_url(key, state.settings.presign_expiry_s))


def _checksum_headers(row: Checkpoint) -> dict[str, str]:
    return {"X-Bird-Sha256": row.sha256, "X-Bird-Size": str(row.size)}


@router.get(
    "/jobs/{job_id}/checkpoints",
    response_model=list[CheckpointPublic],
    summary="List a job's checkpoints with download URLs",
    responses=error_responses(404),
)
async def list_checkpoints(
    job_id: JobId, request: Request, db: DbDep, state: StateDep
) -> list[CheckpointPublic]:
    """Names, sizes, sha256 and download URLs (presigned for S3) of the job's checkpoints."""

    def work(connection: Connection, caller: Caller) -> list[CheckpointPublic]:
        owned_job_id(connection, caller, job_id)
        rows = connection.execute(
            select(Checkpoint.__table__)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.name)
        ).all()
        return [
            CheckpointPublic.from_row(row, _url(state, request, row), state.object_name(row.uri))
            for row in rows
        ]

    return await db.read(work)


def _no_checkpoints(connection: Connection, job_id: int) -> str:
    """What a job without checkpoints has: "none yet" while it may still write one."""
    state = connection.scalar(select(Job.state).where(Job.id == job_id))
    return "none" if state is not None and JobState(state) in TERMINAL_STATES else "none yet"


@router.get(
    "/jobs/{job_id}/checkpoints/{name}",
    name="download_checkpoint",
    summary="Download a checkpoint archive",
    response_class=Response,
    responses={
        200: {"description": "The archive (local store).", "content": {_TAR: {}}},
        307: {"description": "Redirect to a presigned S3 URL of the archive."},
        **error_responses(404, _404="No such job or checkpoint, or the archive is missing."),
    },
)
async def download_checkpoint(
    job_id: JobId, name: CheckpointName, db: DbDep, state: StateDep
) -> Response:
    """The checkpoint archive ``<name>.tar``: a 307 to a presigned URL (S3) or the file itself
    (local store). Headers ``X-Bird-Sha256`` and ``X-Bird-Size`` describe the archive."""

    def work(connection: Connection, caller: Caller) -> Response:
        owned_job_id(connection, caller, job_id)
        row = connection.execute(
            select(Checkpoint.__table__).where(Checkpoint.job_id == job_id, Checkpoint.name == name)
        ).first()
        if row is None:
            names = connection.scalars(
                select(Checkpoint.name).where(Checkpoint.job_id == job_id).order_by(Checkpoint.name)
            ).all()
            have = ", ".join(names) or _no_checkpoints(connection, job_id)
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"job {job_id} has no checkpoint named {name!r} (it has: {have})",
            )
        try:
            store, key = state.resolve_object(row.uri)
        except UnresolvableURI as exc:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"checkpoint {name!r} cannot be downloaded here: {exc}"
            ) from None
        headers = _checksum_headers(row)
        if isinstance(store, LocalStore):
            path = _local_file(store, key)
            if path is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"checkpoint {name!r} of job {job_id} is recorded at "
                    f"{state.object_name(row.uri)}, "
                    "but the archive is not in the store",
                )
            return FileResponse(path, media_type=_TAR, filename=f"{name}.tar", headers=headers)
        url = store.presigned_get_url(key, state.settings.presign_expiry_s)
        return RedirectResponse(
            url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers
        )

    return await db.read(work)


def _job_of_key(key: str) -> int | None:
    """The job id of a key ``jobs/<id>/...``, or None for any other key."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "jobs" or not parts[1].isdigit():
        return None
    job_id = int(parts[1])
    return job_id if 1 <= job_id <= JOB_ID_MAX and str(job_id) == parts[1] else None


@router.get(
    "/files/{key:path}",
    summary="A file of the local object store (local deployments only)",
    response_class=Response,
    responses={
        200: {
            "description": "The file.",
            "content": {"application/octet-stream": {}, _TAR: {}},
        },
        **error_responses(404, _404="No such file, not one of the caller's jobs, or an S3 store."),
    },
)
async def get_file(key: str, db: DbDep, state: StateDep) -> Response:
    """Serve ``<store>/<key>`` of a local store, for keys under ``jobs/<id>/`` of the caller's
    jobs: the URLs ``LocalStore.presigned_get_url`` hands out. 404 with an S3 store."""
    store: ObjectStore = state.store
    if not isinstance(store, LocalStore):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "not found: /files serves a local object store only; this deployment uses S3 "
            "(download through the presigned URLs)",
        )
    not_found = HTTPException(status.HTTP_404_NOT_FOUND, f"file {key!r} not found")
    job_id = _job_of_key(key)
    if job_id is None:
        raise not_found

    def work(connection: Connection, caller: Caller) -> Response:
        try:
            owned_job_id(connection, caller, job_id)
        except queue.JobNotFound:
            raise not_found from None
        path = _local_file(store, key)
        if path is None:
            raise not_found
        media = _TAR if key.endswith(".tar") else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=path.name)

    return await db.read(work)
