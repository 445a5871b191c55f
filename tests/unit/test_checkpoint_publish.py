"""Publishing a checkpoint to the store and reading it back, including a reader that meets a
publish cut off half-way (a run killed while it wrote a new ``best``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bird_core.checkpoint import MANIFEST, CheckpointError
from service.storage import LocalStore, ObjectNotFoundError, join_key
from workers.checkpoints import checkpoint_prefix, download_checkpoint, publish_checkpoint


def _checkpoint(directory: Path, epoch: int, payload: bytes) -> Path:
    """A checkpoint directory as ``bird_core.checkpoint`` writes it: files, then the manifest."""
    directory.mkdir(parents=True)
    files = {"student.safetensors": payload, "meta.json": json.dumps({"epoch": epoch}).encode()}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    manifest = {
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        }
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_a_published_checkpoint_reads_back(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, _checkpoint(tmp_path / "e1", 1, b"one" * 100), "jobs/1/ckpt", "best")
    got = download_checkpoint(store, "jobs/1/ckpt", "best", tmp_path / "out")
    assert (got / "student.safetensors").read_bytes() == b"one" * 100


@pytest.mark.parametrize("cut", ["manifest deleted", "new file under the old manifest"])
def test_a_publish_cut_off_half_way_is_read_from_the_archive(tmp_path: Path, cut: str) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, _checkpoint(tmp_path / "e1", 1, b"one" * 100), "jobs/1/ckpt", "best")
    prefix = checkpoint_prefix("jobs/1/ckpt", "best")
    # What a publish of epoch 2 leaves when killed before it wrote the new manifest.
    if cut == "manifest deleted":
        store.delete(join_key(prefix, MANIFEST))
    else:
        store.put_bytes(join_key(prefix, "student.safetensors"), b"two" * 120)
    got = download_checkpoint(store, "jobs/1/ckpt", "best", tmp_path / "out")
    assert (got / "student.safetensors").read_bytes() == b"one" * 100
    assert json.loads((got / "meta.json").read_text()) == {"epoch": 1}


def test_no_manifest_and_no_archive_is_not_found(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ObjectNotFoundError, match="manifest is missing"):
        download_checkpoint(store, "jobs/1/ckpt", "best", tmp_path / "out")


def test_a_corrupt_directory_without_an_archive_stays_an_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish_checkpoint(store, _checkpoint(tmp_path / "e1", 1, b"one" * 100), "jobs/1/ckpt", "best")
    prefix = checkpoint_prefix("jobs/1/ckpt", "best")
    store.put_bytes(join_key(prefix, "student.safetensors"), b"two" * 120)
    store.delete(f"{prefix}.tar")
    with pytest.raises(CheckpointError):
        download_checkpoint(store, "jobs/1/ckpt", "best", tmp_path / "out")
