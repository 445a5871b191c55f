"""Checkpoints on the object store: ``jobs/<id>/checkpoints/<name>/`` plus one ``.tar`` of it.

A checkpoint directory is what :func:`bird_core.checkpoint.save_checkpoint` writes: the student
(safetensors), the method state (FairDistill φ), the optimizer state, ``meta.json`` and its own
``manifest.json``. Publishing follows publish-then-manifest: the old manifest is deleted first,
every other file is uploaded, the manifest goes last. The archive (one object, written with one
PUT, so it is atomic) is what users download; its size and sha256 are what the jobs database
records, and the client checks them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bird_core.checkpoint import MANIFEST, CheckpointError, read_manifest
from service.storage import ObjectNotFoundError, ObjectStore, join_key

__all__ = [
    "PublishedCheckpoint",
    "checkpoint_prefix",
    "download_checkpoint",
    "publish_checkpoint",
]


@dataclass(frozen=True)
class PublishedCheckpoint:
    """Where a published checkpoint's archive is, and what it must hash to."""

    name: str
    prefix: str  # the directory (store-relative)
    archive_key: str  # the .tar (store-relative)
    uri: str  # the archive's full URI
    size: int
    sha256: str
    epoch: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (travels inside ``ray.train.report`` metrics)."""
        return asdict(self)


def checkpoint_prefix(base: str, name: str) -> str:
    """``<base>/<name>`` — e.g. ``jobs/7/checkpoints/best``."""
    return join_key(base, name)


def _archive(directory: Path) -> bytes:
    """The directory as an uncompressed tar, its files at the top level.

    Members are added in sorted order with fixed metadata so the same files give the same
    bytes (and the same sha256).
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.iterdir()):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def publish_checkpoint(
    store: ObjectStore, directory: str | Path, base: str, name: str
) -> PublishedCheckpoint:
    """Upload the checkpoint in ``directory`` as ``<base>/<name>/`` and ``<base>/<name>.tar``.

    The local checkpoint is verified against its own manifest first, so a corrupt directory is
    never published.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)  # raises CheckpointError when incomplete or corrupt
    prefix = checkpoint_prefix(base, name)
    store.delete(join_key(prefix, MANIFEST))
    for file_name in sorted(manifest["files"]):
        store.put_file(join_key(prefix, file_name), directory / file_name)
    store.put_file(join_key(prefix, MANIFEST), directory / MANIFEST)
    data = _archive(directory)
    archive_key = f"{prefix}.tar"
    store.put_bytes(archive_key, data)
    meta = json.loads((directory / "meta.json").read_text())
    return PublishedCheckpoint(
        name=name,
        prefix=prefix,
        archive_key=archive_key,
        uri=store.uri(archive_key),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        epoch=meta.get("epoch"),
    )


def download_checkpoint(store: ObjectStore, base: str, name: str, destination: str | Path) -> Path:
    """Fetch ``<base>/<name>/`` into ``destination/<name>`` and verify it; return that path.

    Only a directory whose manifest is present is read (the manifest is written last). A
    directory caught in the middle of a new publish (its manifest deleted, or files of the
    new version under the old manifest: a run killed while publishing) is read from
    ``<base>/<name>.tar`` instead, which every publish replaces in one atomic put and which
    carries its own manifest.
    """
    prefix = checkpoint_prefix(base, name)
    target = Path(destination) / name
    target.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads(store.get_bytes(join_key(prefix, MANIFEST)))
        for file_name in manifest["files"]:
            store.get_file(join_key(prefix, file_name), target / file_name)
        (target / MANIFEST).write_text(json.dumps(manifest))
        read_manifest(target)  # sizes and sha256 of every file
        return target
    except (ObjectNotFoundError, CheckpointError) as error:
        directory_error = error
    try:
        archive = store.get_bytes(f"{prefix}.tar")
    except ObjectNotFoundError:
        if isinstance(directory_error, ObjectNotFoundError):
            raise ObjectNotFoundError(
                f"no published checkpoint at {store.uri(prefix)} (its manifest is missing)",
                store.uri(join_key(prefix, MANIFEST)),
            ) from None
        raise directory_error from None
    for stale in target.iterdir():
        stale.unlink()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or Path(member.name).name != member.name:
                raise CheckpointError(f"{store.uri(prefix)}.tar holds an unexpected entry")
            extracted = tar.extractfile(member)
            assert extracted is not None
            (target / member.name).write_bytes(extracted.read())
    read_manifest(target)
    return target
