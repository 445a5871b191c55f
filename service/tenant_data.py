"""A tenant's datasets and teachers in the deployment's store: register, list, describe, delete.

A tenant's dataset ``<name>`` lives under ``tenants/<id>/datasets/<name>/`` and its teacher
under ``tenants/<id>/teachers/<name>/`` (:func:`bird_datasets.location.tenant_prefix`), so the
name a job gives (``datasets/<name>``, ``teachers/<name>``) resolves to it and to nothing of
another tenant. Operators publish read-only ones for everyone under ``shared/datasets/`` and
``shared/teachers/``; they are listed, never written or deleted here.

A dataset or teacher exists once its ``manifest.json`` does: an upload sends the other files
first and the manifest last (``bird datasets push`` and ``bird teachers push`` do), as
``service.storage.publish`` writes it.

Every function takes the tenant and builds the key itself: no caller can name a key outside
the tenant's prefix, so another tenant's dataset and a missing one are the same
:class:`DatasetNotFound`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bird_datasets.describe import describe_dataset, render_description
from bird_datasets.location import SHARED_PREFIX, tenant_prefix
from service.storage import (
    MANIFEST_NAME,
    Manifest,
    ObjectNotFoundError,
    ObjectStore,
    join_key,
)

__all__ = [
    "DATASETS",
    "DATASET_NAME_PATTERN",
    "TEACHERS",
    "DatasetExists",
    "DatasetNotFound",
    "DatasetSummary",
    "dataset_key",
    "delete_dataset",
    "describe_tenant_dataset",
    "list_datasets",
    "summary",
    "upload_keys",
]

# Lower-case, digits, '.', '_' and '-': a single path segment, the same on S3 and in a directory.
DATASET_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
DATASETS = "datasets"
TEACHERS = "teachers"
# What a listing shows of each kind's manifest metadata.
_SUMMARY_FIELDS = {
    DATASETS: ("name", "task", "num_classes", "num_groups"),
    TEACHERS: ("arch", "options", "num_classes", "test_accuracy", "test_delta_mean_deo"),
}


def _singular(kind: str) -> str:
    return kind.removesuffix("s")


class DatasetNotFound(LookupError):
    """No dataset (or teacher) of that name in the caller's space (another tenant's looks the
    same)."""

    def __init__(self, name: str, kind: str = DATASETS) -> None:
        super().__init__(f"{_singular(kind)} {name!r} not found")
        self.name = name


class DatasetExists(Exception):
    """A complete dataset (or teacher) of that name exists already: delete it before uploading
    again."""

    def __init__(self, name: str, kind: str = DATASETS) -> None:
        super().__init__(
            f"{_singular(kind)} {name!r} already exists; delete it (DELETE /{kind}/{name}) to "
            "upload it again"
        )
        self.name = name


@dataclass(frozen=True)
class DatasetSummary:
    """One row of a dataset listing: the name a job uses, its size and when it was made."""

    name: str
    uri: str
    shared: bool
    files: int
    size: int
    created_at: Any
    description: dict[str, Any]


def dataset_key(tenant_id: int, name: str, kind: str = DATASETS) -> str:
    """The store prefix of tenant ``tenant_id``'s dataset (or teacher: ``kind``) ``name``."""
    return join_key(tenant_prefix(tenant_id), kind, name)


def _manifest(store: ObjectStore, prefix: str) -> Manifest | None:
    try:
        return Manifest.model_validate_json(store.get_bytes(join_key(prefix, MANIFEST_NAME)))
    except ObjectNotFoundError:
        return None
    except ValueError:
        return None  # an upload in progress (or a broken one): not a dataset yet


def _names(store: ObjectStore, root: str) -> list[str]:
    """Names of the datasets under ``root`` that have a manifest."""
    names = set()
    for info in store.list(root):
        rest = info.key[len(root) + 1 :]
        name, _, tail = rest.partition("/")
        if tail == MANIFEST_NAME:
            names.add(name)
    return sorted(names)


def list_datasets(store: ObjectStore, tenant_id: int, kind: str = DATASETS) -> list[DatasetSummary]:
    """The tenant's own datasets (or teachers: ``kind``), then the shared ones, each sorted by
    name."""
    rows: list[DatasetSummary] = []
    for root, uri_root, shared in (
        (join_key(tenant_prefix(tenant_id), kind), kind, False),
        (join_key(SHARED_PREFIX, kind), join_key(SHARED_PREFIX, kind), True),
    ):
        for name in _names(store, root):
            manifest = _manifest(store, join_key(root, name))
            if manifest is None:
                continue
            rows.append(
                DatasetSummary(
                    name=name,
                    uri=join_key(uri_root, name),
                    shared=shared,
                    files=len(manifest.files),
                    size=sum(entry.size for entry in manifest.files.values()),
                    created_at=manifest.created_at,
                    description={
                        k: manifest.metadata.get(k)
                        for k in _SUMMARY_FIELDS[kind]
                        if k in manifest.metadata
                    },
                )
            )
    return rows


def describe_tenant_dataset(store: ObjectStore, tenant_id: int, name: str) -> dict[str, Any]:
    """The counts per split × class × group of the tenant's dataset ``name`` and the table
    ``bird datasets describe`` prints (``table``); :class:`DatasetNotFound` if there is none."""
    prefix = dataset_key(tenant_id, name)
    if _manifest(store, prefix) is None:
        raise DatasetNotFound(name)
    description = describe_dataset(store, prefix)
    # The name the tenant uses, never where the store keeps it.
    description["uri"] = join_key(DATASETS, name)
    description["table"] = render_description(description)
    return description


def summary(store: ObjectStore, tenant_id: int, name: str, kind: str) -> DatasetSummary:
    """The listing row of the tenant's own dataset (or teacher) ``name``;
    :class:`DatasetNotFound` if there is none."""
    for row in list_datasets(store, tenant_id, kind):
        if not row.shared and row.name == name:
            return row
    raise DatasetNotFound(name, kind)


def delete_dataset(store: ObjectStore, tenant_id: int, name: str, kind: str = DATASETS) -> None:
    """Delete the tenant's dataset (or teacher) ``name`` and any unfinished upload of it; jobs
    already running keep their copy of its features. :class:`DatasetNotFound` if nothing is
    there."""
    prefix = dataset_key(tenant_id, name, kind)
    if not store.list(prefix):
        raise DatasetNotFound(name, kind)
    store.delete_prefix(prefix)


def upload_keys(
    store: ObjectStore, tenant_id: int, name: str, paths: list[str], kind: str = DATASETS
) -> dict[str, str]:
    """The store key of each file ``paths`` of an upload of the tenant's dataset (or teacher)
    ``name``.

    :class:`DatasetExists` if a complete one of that name is there (an unfinished upload may
    be sent again). The paths are validated keys relative to it.
    """
    prefix = dataset_key(tenant_id, name, kind)
    if _manifest(store, prefix) is not None:
        raise DatasetExists(name, kind)
    return {path: join_key(prefix, path) for path in paths}
