"""The identity of a dataset's contents: one sha256, whatever store or prefix holds it.

The feature cache keys teacher features by it (``workers/features.py``) and a trained teacher
records it (``workers/teacher_training.py``), so both agree on when two datasets are the same.
"""

from __future__ import annotations

import hashlib
import json

from service.storage import Manifest, ObjectStore, read_manifest

__all__ = ["dataset_fingerprint", "manifest_fingerprint"]


def manifest_fingerprint(manifest: Manifest) -> str:
    """sha256 over the manifest's file checksums (name → sha256, sorted).

    Each part's sha256 covers its bytes, so equal fingerprints mean equal rows; the manifest's
    timestamp and metadata do not take part (a re-publish of the same rows keeps its identity).
    """
    canonical = json.dumps({k: v.sha256 for k, v in manifest.files.items()}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dataset_fingerprint(store: ObjectStore, prefix: str) -> tuple[str, Manifest]:
    """The fingerprint of the dataset at ``prefix`` (see :func:`manifest_fingerprint`) and its
    manifest, read once."""
    manifest = read_manifest(store, prefix)
    return manifest_fingerprint(manifest), manifest
