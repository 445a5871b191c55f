"""Teachers as the service sees them, without torch: where a spec's weights are, and what a
teacher published by ``bird teachers train`` says about itself.

A published teacher is an artifact set (``model.safetensors``, ``teacher.json``,
``manifest.json`` written last; see ``workers/teacher_training.py``). The API reads its
``teacher.json`` when a job is submitted, to check the teacher against the dataset
(:func:`service.compat.check_spec_against`); the worker reads the same record through
:func:`published_teacher` and :func:`resolve_teacher_key` when it loads the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from service.storage import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    InvalidKeyError,
    Manifest,
    ManifestError,
    ObjectNotFoundError,
    ObjectStore,
    fetch_verified,
    join_key,
    read_manifest,
    validate_key,
)
from service.students import architecture_facts

__all__ = [
    "TEACHER_JSON",
    "TEACHER_WEIGHTS",
    "PublishedTeacher",
    "TeacherFacts",
    "TeacherRecordError",
    "published_teacher",
    "read_teacher_facts",
    "resolve_teacher_key",
]

# Names inside a published teacher (``bird teachers train`` writes them).
TEACHER_JSON = "teacher.json"
TEACHER_WEIGHTS = "model.safetensors"


class TeacherRecordError(ValueError):
    """A teacher's weights URI or published record is unusable; the message names the URI."""


@dataclass(frozen=True)
class PublishedTeacher:
    """A teacher published as an artifact set: its prefix, the weights' name, the manifest."""

    prefix: str
    weights_name: str
    manifest: Manifest


def resolve_teacher_key(store: ObjectStore, uri: str) -> str:
    """The key in ``store`` that a teacher's ``weights_uri`` names: a key, or a full URI under
    the store's base (``s3://bucket/prefix/key``, ``file:///root/key``).

    Teachers are read only through the deployment's store, with its endpoint and credentials;
    a URI outside it raises :class:`TeacherRecordError`.
    """
    base = store.uri("").rstrip("/")
    if "://" in uri:
        if uri.rstrip("/") == base:
            return ""
        if not uri.startswith(base + "/"):
            raise TeacherRecordError(
                f"teacher weights {uri} are outside the object store {base}; "
                "copy them into it or give a key relative to it"
            )
        key = uri[len(base) + 1 :].rstrip("/")
        if urlparse(uri).scheme == "file":
            key = unquote(key)  # LocalStore.uri percent-encodes
    else:
        key = uri.strip("/")
    if key == "":
        return ""
    try:
        return validate_key(key)
    except InvalidKeyError as err:
        raise TeacherRecordError(f"invalid teacher weights URI {uri!r}: {err}") from err


def published_teacher(store: ObjectStore, key: str) -> PublishedTeacher | None:
    """The published teacher ``key`` names (its prefix, or a file in it), or None.

    A published teacher is an artifact set whose manifest lists ``teacher.json``.
    """
    candidates = [(key, TEACHER_WEIGHTS)]
    if key:
        parent, _, name = key.rpartition("/")
        candidates.append((parent, name))
    for prefix, name in candidates:
        if not store.exists(join_key(prefix, MANIFEST_NAME)):
            continue
        try:
            manifest = read_manifest(store, prefix)
        except ManifestError as err:
            raise TeacherRecordError(f"teacher at {store.uri(prefix)}: {err}") from err
        if TEACHER_JSON in manifest.files and name in manifest.files:
            return PublishedTeacher(prefix, name, manifest)
    return None


def read_teacher_record(store: ObjectStore, teacher: PublishedTeacher) -> dict[str, Any]:
    """The ``teacher.json`` of a published teacher, checked against its manifest."""
    key = join_key(teacher.prefix, TEACHER_JSON)
    try:
        raw = fetch_verified(store, key, teacher.manifest.files[TEACHER_JSON])
    except ObjectNotFoundError as err:
        raise TeacherRecordError(f"teacher file {store.uri(key)} does not exist") from err
    except ChecksumMismatchError as err:
        raise TeacherRecordError(f"teacher file {store.uri(key)} is corrupt: {err}") from err
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise TeacherRecordError(f"{store.uri(key)} is not JSON: {err}") from err
    if not isinstance(record, dict):
        raise TeacherRecordError(f"{store.uri(key)} does not hold a JSON object")
    return record


@dataclass(frozen=True)
class TeacherFacts:
    """What a submit checks about a teacher: the input it takes and the classes it predicts.

    ``input``: ``"image"`` or ``"tabular"`` (None: unknown); ``inputs``: its input channels or
    features (None: any, or unknown); ``num_classes`` / ``task``: what it was trained for (None:
    unknown, or a probe trained per job); ``spatial``: whether it gives a spatial feature map
    (attention transfer needs one); ``arch``: the architecture a published record names.
    ``uri`` names the teacher in messages.
    """

    uri: str | None = None
    arch: str | None = None
    input: str | None = None
    inputs: int | None = None
    num_classes: int | None = None
    task: str | None = None
    spatial: bool | None = None
    published: bool = False


def _arch_spatial(arch: str | None) -> bool | None:
    if arch in ("small_cnn", "resnet18"):
        return True
    if arch == "mlp" or (arch or "").startswith("tv:"):
        return False
    facts = architecture_facts(arch) if arch else None
    return facts.spatial if facts is not None else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_teacher_facts(
    store: ObjectStore, kind: str, arch: str | None, uri: str | None
) -> TeacherFacts:
    """The :class:`TeacherFacts` of a teacher spec (``kind``, ``arch``, ``weights_uri``).

    For kind ``model`` the weights must exist in ``store``; a published teacher's record fills
    in what the spec leaves out. Raises :class:`TeacherRecordError` (naming the URI) for
    weights outside the store, missing weights and unreadable records; other storage errors
    (the store unreachable) propagate.
    """
    if kind == "efficientnet_lite0_probe":
        # RGB, but grayscale and RGBA images are converted for it; its probe is trained per job.
        return TeacherFacts(arch=kind, input="image", spatial=True)
    if uri is None:
        raise TeacherRecordError(f"teacher kind {kind!r} needs a weights_uri")
    key = resolve_teacher_key(store, uri)
    published = published_teacher(store, key)
    if published is None:
        if key == "" or not store.exists(key):
            raise TeacherRecordError(
                f"teacher weights {store.uri(key)} do not exist (train a teacher with "
                "`bird teachers train --out DIR` and upload it with `bird teachers push DIR "
                "--name NAME`: jobs name it teachers/NAME)"
            )
        if kind == "open_clip":
            return TeacherFacts(uri=store.uri(key), arch=arch, input="image", spatial=False)
        return TeacherFacts(
            uri=store.uri(key),
            arch=arch,
            input=None if arch is None else ("tabular" if arch == "mlp" else "image"),
            spatial=_arch_spatial(arch),
        )
    record = read_teacher_record(store, published)
    where = store.uri(join_key(published.prefix, published.weights_name))
    recorded_arch = record.get("arch") if isinstance(record.get("arch"), str) else None
    preprocessing = record.get("preprocessing")
    inputs: int | None = None
    input_kind: str | None = None
    if isinstance(preprocessing, dict):
        input_kind = (
            preprocessing.get("kind")
            if preprocessing.get("kind")
            in (
                "image",
                "tabular",
            )
            else None
        )
        mean = preprocessing.get("mean")
        inputs = len(mean) if isinstance(mean, list) and mean else None
    final_arch = arch or recorded_arch
    return TeacherFacts(
        uri=where,
        arch=final_arch,
        input=input_kind,
        inputs=inputs,
        num_classes=_int_or_none(record.get("num_classes")),
        task=record.get("task") if isinstance(record.get("task"), str) else None,
        spatial=False if kind == "open_clip" else _arch_spatial(final_arch),
        published=True,
    )
