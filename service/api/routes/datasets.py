"""Datasets as tenant resources: upload, list, describe, delete (``service.tenant_datasets``).

Every route builds the store key from the caller's tenant and the dataset's name, so another
tenant's dataset answers exactly like a missing one (404 ``dataset 'x' not found``). Uploads
go straight to the object store through presigned PUT URLs (S3), one per file, or, with a
local store, through ``PUT /datasets/{name}/files/{path}`` under the caller's key.
"""

from __future__ import annotations

import os
import tempfile
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import Connection

from bird_datasets.format import DatasetError
from service.api.deps import AppState, Caller, DbDep, StateDep
from service.api.schemas import (
    DatasetCreate,
    DatasetDescription,
    DatasetList,
    DatasetPublic,
    DatasetUpload,
    UploadURL,
    error_responses,
)
from service.storage import MANIFEST_NAME, LocalStore, ObjectNotFoundError, S3Store
from service.tenant_data import (
    DATASET_NAME_PATTERN,
    DATASETS,
    DatasetExists,
    DatasetNotFound,
    delete_dataset,
    describe_tenant_dataset,
    list_datasets,
    upload_keys,
)

__all__ = [
    "DatasetName",
    "FilePath",
    "delete_resource",
    "list_resources",
    "receive_upload",
    "register_upload",
    "router",
]

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=error_responses(401, 422, 503))

DatasetName = Annotated[
    str,
    Path(pattern=DATASET_NAME_PATTERN, description="The dataset's name (datasets/<name>)."),
]
FilePath = Annotated[
    str,
    Path(
        max_length=255,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$",
        description="A file of the dataset, relative to it.",
    ),
]
_CHUNK = 1 << 20


def _invalid(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def _not_found(exc: DatasetNotFound) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


def _upload_url(
    state: AppState, request: Request, kind: str, name: str, path: str, key: str
) -> str:
    store = state.store
    if isinstance(store, S3Store):
        return store.presigned_put_url(key, state.settings.presign_expiry_s)
    return str(request.url_for(f"upload_{kind.removesuffix('s')}_file", name=name, path=path))


async def register_upload(
    kind: str, body: DatasetCreate, request: Request, db: DbDep, state: AppState
) -> DatasetUpload:
    """``POST /datasets`` and ``POST /teachers``: check the file list, answer the upload URLs
    (the manifest last); 409 if a complete one of that name exists."""
    paths = [entry.path for entry in body.files]
    if MANIFEST_NAME not in paths:
        raise _invalid(("body", "files"), f"the files must include {MANIFEST_NAME}")
    if len(set(paths)) != len(paths):
        raise _invalid(("body", "files"), "a path is listed twice")
    limit = state.settings.max_upload_bytes
    for index, entry in enumerate(body.files):
        if entry.size > limit:
            raise _invalid(
                ("body", "files", index, "size"),
                f"{entry.path} is larger than this deployment accepts ({limit} bytes)",
            )

    def work(_connection: Connection, caller: Caller) -> DatasetUpload:
        try:
            keys = upload_keys(state.store, caller.tenant_id, body.name, paths, kind)
        except DatasetExists as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        uploads = [
            UploadURL(path=path, url=_upload_url(state, request, kind, body.name, path, key))
            for path, key in keys.items()
        ]
        # The manifest last: the order to send them in.
        uploads.sort(key=lambda upload: upload.path == MANIFEST_NAME)
        return DatasetUpload(
            name=body.name,
            uri=f"{kind}/{body.name}",
            expires_in_s=state.settings.presign_expiry_s,
            uploads=uploads,
        )

    return await db.read(work)


async def receive_upload(
    kind: str, name: str, path: str, request: Request, db: DbDep, state: AppState
) -> Response:
    """A local store's upload route: the request body becomes ``path`` of the caller's
    ``kind``/``name``; 404 on S3 (uploads go to the presigned URLs)."""
    store = state.store
    if not isinstance(store, LocalStore):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"uploads go to the presigned URLs that POST /{kind} answers",
        )
    with tempfile.NamedTemporaryFile(delete=False) as spool:
        try:
            async for chunk in request.stream():
                spool.write(chunk)
            spool.close()

            def work(_connection: Connection, caller: Caller) -> None:
                try:
                    [key] = upload_keys(store, caller.tenant_id, name, [path], kind).values()
                except DatasetExists as exc:
                    raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
                store.put_file(key, spool.name)

            await db.read(work)
        finally:
            os.unlink(spool.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def list_resources(kind: str, db: DbDep, state: AppState) -> DatasetList:
    """The caller's datasets (or teachers), then the shared ones."""

    def work(_connection: Connection, caller: Caller) -> DatasetList:
        rows = list_datasets(state.store, caller.tenant_id, kind)
        return DatasetList(items=[DatasetPublic(**row.__dict__) for row in rows])

    return await db.read(work)


async def delete_resource(kind: str, name: str, db: DbDep, state: AppState) -> Response:
    """Delete the caller's dataset (or teacher) ``name``; 404 if there is none."""

    def work(_connection: Connection, caller: Caller) -> None:
        try:
            delete_dataset(state.store, caller.tenant_id, name, kind)
        except DatasetNotFound as exc:
            raise _not_found(exc) from None

    await db.read(work)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetUpload,
    summary="Register a dataset upload: one upload URL per file",
    responses=error_responses(400, 409, _409="A dataset of that name exists already."),
)
async def create_dataset(
    body: DatasetCreate, request: Request, db: DbDep, state: StateDep
) -> DatasetUpload:
    """Upload URLs for every file of the dataset ``body.name`` of the caller; PUT each file to
    its URL, ``manifest.json`` last: the dataset exists (jobs can name ``datasets/<name>``)
    once its manifest does. 409 if a complete dataset of that name exists."""
    return await register_upload(DATASETS, body, request, db, state)


@router.put(
    "/{name}/files/{path:path}",
    name="upload_dataset_file",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Upload one file of a dataset (local object store only)",
    responses=error_responses(
        404,
        409,
        413,
        _404="The deployment's store is S3: use the presigned URLs of POST /datasets.",
        _409="A dataset of that name exists already.",
    ),
)
async def upload_dataset_file(
    name: DatasetName, path: FilePath, request: Request, db: DbDep, state: StateDep
) -> Response:
    """Store the request body as ``path`` of the caller's dataset ``name`` (a local store: the
    upload URLs ``POST /datasets`` hands out); bodies up to ``BIRD_MAX_UPLOAD_BYTES``."""
    return await receive_upload(DATASETS, name, path, request, db, state)


@router.get("", response_model=DatasetList, summary="List the caller's and the shared datasets")
async def get_datasets(db: DbDep, state: StateDep) -> DatasetList:
    """The caller's datasets (``datasets/<name>``), then the shared ones
    (``shared/datasets/<name>``), each by name; uploads without a manifest are not listed."""
    return await list_resources(DATASETS, db, state)


@router.get(
    "/{name}",
    response_model=DatasetDescription,
    summary="Describe a dataset: rows per split × class × group",
    responses=error_responses(
        404, 409, _404="No such dataset.", _409="The dataset's files are not a valid dataset."
    ),
)
async def get_dataset(name: DatasetName, db: DbDep, state: StateDep) -> DatasetDescription:
    """The caller's dataset ``name``: what ``bird datasets describe`` shows, as JSON and as the
    same table (``table``)."""

    def work(_connection: Connection, caller: Caller) -> DatasetDescription:
        try:
            return DatasetDescription(
                **describe_tenant_dataset(state.store, caller.tenant_id, name)
            )
        except DatasetNotFound as exc:
            raise _not_found(exc) from None
        except (DatasetError, ObjectNotFoundError):
            # A part missing or broken: the tenant's upload, not an outage.
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"dataset {name!r} is not a valid bird dataset: check your copy with "
                "'bird datasets validate', then delete it and upload it again",
            ) from None

    return await db.read(work)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a dataset",
    responses=error_responses(404, _404="No such dataset."),
)
async def remove_dataset(name: DatasetName, db: DbDep, state: StateDep) -> Response:
    """Delete the caller's dataset ``name`` (or an unfinished upload of it). Jobs that already
    computed its features keep them; new jobs naming it are refused."""
    return await delete_resource(DATASETS, name, db, state)
