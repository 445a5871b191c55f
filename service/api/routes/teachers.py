"""Teachers as tenant resources: upload, list, show, delete (``service.tenant_data``).

A teacher is the directory ``bird teachers train --out DIR`` writes (``model.safetensors``,
``teacher.json``, ``manifest.json``); uploaded, it lives under ``tenants/<id>/teachers/<name>/``
and a job names it ``{"kind": "model", "weights_uri": "teachers/<name>"}``. The routes are the
datasets' (``service.api.routes.datasets``) for the kind ``teachers``: another tenant's teacher
answers exactly like a missing one.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import Response
from sqlalchemy import Connection

from service.api.deps import Caller, DbDep, StateDep
from service.api.routes.datasets import (
    DatasetName,
    FilePath,
    delete_resource,
    list_resources,
    receive_upload,
    register_upload,
)
from service.api.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetPublic,
    DatasetUpload,
    error_responses,
)
from service.tenant_data import TEACHERS, DatasetNotFound, summary

__all__ = ["router"]

router = APIRouter(prefix="/teachers", tags=["teachers"], responses=error_responses(401, 422, 503))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetUpload,
    summary="Register a teacher upload: one upload URL per file",
    responses=error_responses(400, 409, _409="A teacher of that name exists already."),
)
async def create_teacher(
    body: DatasetCreate, request: Request, db: DbDep, state: StateDep
) -> DatasetUpload:
    """Upload URLs for every file of the caller's teacher ``body.name`` (the directory
    ``bird teachers train --out`` writes); PUT each, ``manifest.json`` last."""
    return await register_upload(TEACHERS, body, request, db, state)


@router.put(
    "/{name}/files/{path:path}",
    name="upload_teacher_file",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Upload one file of a teacher (local object store only)",
    responses=error_responses(
        404,
        409,
        413,
        _404="The deployment's store is S3: use the presigned URLs of POST /teachers.",
        _409="A teacher of that name exists already.",
    ),
)
async def upload_teacher_file(
    name: DatasetName, path: FilePath, request: Request, db: DbDep, state: StateDep
) -> Response:
    """Store the request body as ``path`` of the caller's teacher ``name`` (a local store)."""
    return await receive_upload(TEACHERS, name, path, request, db, state)


@router.get("", response_model=DatasetList, summary="List the caller's and the shared teachers")
async def get_teachers(db: DbDep, state: StateDep) -> DatasetList:
    """The caller's teachers (``teachers/<name>``), then the shared ones."""
    return await list_resources(TEACHERS, db, state)


@router.get(
    "/{name}",
    response_model=DatasetPublic,
    summary="Show a teacher",
    responses=error_responses(404, _404="No such teacher."),
)
async def get_teacher(name: DatasetName, db: DbDep, state: StateDep) -> DatasetPublic:
    """The caller's teacher ``name``: files, size and what its metadata says (architecture,
    options, test scores)."""

    def work(_connection: Connection, caller: Caller) -> DatasetPublic:
        try:
            return DatasetPublic(**summary(state.store, caller.tenant_id, name, TEACHERS).__dict__)
        except DatasetNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    return await db.read(work)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a teacher",
    responses=error_responses(404, _404="No such teacher."),
)
async def remove_teacher(name: DatasetName, db: DbDep, state: StateDep) -> Response:
    """Delete the caller's teacher ``name``; jobs naming it are then refused by the worker."""
    return await delete_resource(TEACHERS, name, db, state)
