"""Checked at submit, over real HTTP (uvicorn, PostgreSQL, the moto S3 server): a spec that
cannot run on its dataset is a 422 naming the field and the fix, and no job is queued.

The datasets and the teachers are real artifact sets in the API's store: the tiny image
dataset of the API tests (shared), a tabular one and a tabular teacher in the tenant's own space,
and a shared teacher, published the way ``bird teachers train`` publishes them (their record is
what the API reads, found where the tenant's names resolve; the weights are never loaded at
submit).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from bird_datasets.format import DatasetMeta
from bird_datasets.location import tenant_prefix
from bird_datasets.writer import DatasetArrays, write_dataset
from service.storage import ObjectStore, join_key, publish
from tests.integration.api_fixtures import TINY_DATASET_PREFIX, LiveAPI

# The tenant's own dataset and teacher (names in its space), and shared data.
TABULAR = "datasets/tabular-11"
TEACHER_TABULAR = "teachers/tabular-mlp"
TEACHER_FIVE_CLASSES = "shared/teachers/five-classes"
TINY = TINY_DATASET_PREFIX


def _publish_tabular(store: ObjectStore, prefix: str) -> None:
    """Eleven numeric features, a binary label, two groups (an Adult-like table)."""
    meta = DatasetMeta(
        name="tabular-11", task="multiclass", input="tabular", num_classes=2, num_groups=2,
        num_features=11,
    )  # fmt: skip
    rng = np.random.default_rng(1)

    def split() -> DatasetArrays:
        return DatasetArrays(
            label=np.array([0, 1, 0, 1]), group=np.array([0, 0, 1, 1]), x=rng.normal(size=(4, 11))
        )

    write_dataset(store, prefix, splits={s: split() for s in ("train", "val", "test")}, meta=meta)


def _publish_teacher(store: ObjectStore, prefix: str, record: dict[str, Any]) -> None:
    """A teacher artifact set as ``bird teachers train`` writes it (record and weights)."""
    files = {
        "model.safetensors": b"weights are not read at submit",
        "teacher.json": json.dumps(record).encode(),
    }
    publish(store, prefix, files, metadata={"arch": record["arch"]})


@pytest.fixture
def http(live_api: LiveAPI, tiny_dataset: str) -> Iterator[httpx.Client]:
    """A client of the API for a fresh tenant, whose space holds a tabular dataset and a
    tabular teacher; the shared space holds the tiny image dataset and a five-class teacher."""
    store = live_api.store
    own = tenant_prefix(live_api.tenant_id)
    _publish_tabular(store, join_key(own, TABULAR))
    tabular = {"kind": "tabular", "mean": [0.0] * 11, "std": [1.0] * 11}
    _publish_teacher(
        store,
        join_key(own, TEACHER_TABULAR),
        {"arch": "mlp", "num_classes": 2, "task": "multiclass", "preprocessing": tabular},
    )
    if not store.exists(f"{TEACHER_FIVE_CLASSES}/manifest.json"):
        image = {"kind": "image", "mean": [0.5] * 3, "std": [0.25] * 3}
        _publish_teacher(
            store,
            TEACHER_FIVE_CLASSES,
            {"arch": "resnet18", "num_classes": 5, "task": "multiclass", "preprocessing": image},
        )
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(), timeout=30) as c:
        yield c


TABULAR_TEACHER = {"kind": "model", "weights_uri": TEACHER_TABULAR}


def _spec(dataset: str, **sections: Any) -> dict[str, Any]:
    return {"dataset": {"uri": dataset}, "training": {"epochs": 1, "batch_size": 4}, **sections}


# (case, dataset, spec sections, the field the 422 names, words its message must hold)
BAD_SPECS: list[tuple[str, str, dict[str, Any], tuple[str, ...], tuple[str, ...]]] = [
    (
        "tabular dataset, the default image teacher",
        TABULAR,
        {},
        ("teacher",),
        (
            "tabular rows of 11 features",
            "takes images only",
            "bird teachers train",
            "--arch mlp",
            "bird teachers push",
        ),
    ),
    (
        "tabular dataset, an image teacher named",
        TABULAR,
        {"teacher": {"kind": "efficientnet_lite0_probe"}},
        ("teacher", "kind"),
        ("takes images only", "bird teachers train"),
    ),
    (
        "tabular dataset, an image student",
        TABULAR,
        {"teacher": TABULAR_TEACHER, "student": {"model": "small_cnn"}},
        ("student", "model"),
        ("takes image input", "use the mlp student"),
    ),
    (
        "tabular dataset, a timm student",
        TABULAR,
        {"teacher": TABULAR_TEACHER, "student": {"model": "timm:mobilenetv3_large_100"}},
        ("student", "model"),
        ("takes image input", "mlp"),
    ),
    (
        "image dataset, the mlp student",
        TINY,
        {"student": {"model": "mlp"}},
        ("student", "model"),
        ("takes tabular input", "small_cnn"),
    ),
    (
        "a width of 1e9",
        TINY,
        {"student": {"model": "small_cnn", "options": {"width": 1e9}}},
        ("student", "options"),
        ("width must be an integer",),
    ),
    (
        "a width past its bound",
        TINY,
        {"student": {"model": "small_cnn", "options": {"width": 1_000_000_000}}},
        ("student", "options"),
        ("width must lie in 1..4096",),
    ),
    (
        "a student over the parameter bound",
        TINY,
        {"student": {"model": "small_cnn", "options": {"width": 4096}}},
        ("student", "options"),
        ("parameters", "BIRD_MAX_STUDENT_PARAMS", "smaller width"),
    ),
    (
        "an unknown student option",
        TINY,
        {"student": {"model": "small_cnn", "options": {"depth": 3}}},
        ("student", "options"),
        ("unknown option(s) ['depth']", "valid options: width, embed_dim, in_channels"),
    ),
    (
        "a NUL in an option's name",
        TINY,
        {"student": {"model": "small_cnn", "options": {"\x00": 1}}},
        ("student", "options"),
        ("unknown option(s)",),
    ),
    (
        "in_channels that are not the dataset's",
        TINY,
        {"student": {"model": "small_cnn", "options": {"in_channels": 1}}},
        ("student", "options"),
        ("in_channels is 1", "3-channel", "leave it out"),
    ),
    (
        "a teacher with a different class count",
        TINY,
        {"teacher": {"kind": "model", "weights_uri": TEACHER_FIVE_CLASSES}},
        ("teacher", "weights_uri"),
        ("predicts 5 classes", "has 2", "bird teachers train"),
    ),
    (
        "teacher weights that do not exist",
        TINY,
        {"teacher": {"kind": "model", "arch": "resnet18", "weights_uri": "teachers/nothing"}},
        ("teacher", "weights_uri"),
        ("do not exist", "bird teachers push"),
    ),
    (
        "teacher weights outside the store",
        TINY,
        {"teacher": {"kind": "model", "arch": "resnet18", "weights_uri": "s3://elsewhere/t"}},
        ("teacher", "weights_uri"),
        ("is refused", "s3:// URIs are not accepted", "teachers/<name>"),
    ),
    (
        "an unknown timm architecture",
        TINY,
        {"student": {"model": "timm:mobilenetv3_larg_100"}},
        ("student", "model"),
        ("unknown timm architecture", "close matches: timm:mobilenetv3_large_100"),
    ),
    (
        "an unknown torchvision architecture",
        TINY,
        {"student": {"model": "tv:resnet5O"}},
        ("student", "model"),
        ("unknown torchvision architecture 'resnet5O'",),
    ),
    (
        "an unknown registry",
        TINY,
        {"student": {"model": "keras:resnet50"}},
        ("student", "model"),
        ("unknown student model", "tv:<torchvision architecture>"),
    ),
    (
        "a fixed-size ViT on 8x8 images",
        TINY,
        {"student": {"model": "tv:vit_b_16"}},
        ("student", "model"),
        ("only 224x224 images", "3x8x8 images"),
    ),
    (
        "attention transfer on a tabular dataset",
        TABULAR,
        {"teacher": TABULAR_TEACHER, "method": {"name": "at"}},
        ("method", "name"),
        ("spatial feature maps", "is tabular"),
    ),
    (
        "BIRD's head step without an embedding layer",
        TINY,
        {
            "student": {"model": "small_cnn", "options": {"embed_dim": None}},
            "method": {"name": "bird"},
        },
        ("student", "options"),
        ("embedding layer", "embed_dim"),
    ),
    (
        "fewer adversary groups than the dataset has",
        TINY,
        {"method": {"name": "ad", "options": {"num_groups": 1}}},
        ("method", "options"),
        (),
    ),
]


def _jobs(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/jobs")
    assert response.status_code == 200, response.text
    return response.json()["items"]


@pytest.mark.parametrize(
    ("dataset", "sections", "field", "words"),
    [case[1:] for case in BAD_SPECS],
    ids=[case[0] for case in BAD_SPECS],
)
def test_a_spec_that_cannot_run_is_refused_at_submit_naming_the_field(
    http: httpx.Client,
    dataset: str,
    sections: dict[str, Any],
    field: tuple[str, ...],
    words: tuple[str, ...],
) -> None:
    response = http.post("/jobs", json=_spec(dataset, **sections))
    assert response.status_code == 422, response.text
    found = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
    assert ("body", *field) in found, found
    message = found[("body", *field)]
    for word in words:
        assert word in message, message
    assert "\n" not in message and "Traceback" not in message
    # Nothing was queued: no worker ever sees the spec.
    assert _jobs(http) == []


def test_tabular_defaults_resolve_to_the_mlp_student_with_the_datasets_features(
    http: httpx.Client,
) -> None:
    response = http.post("/jobs", json=_spec(TABULAR, teacher=TABULAR_TEACHER))
    assert response.status_code == 201, response.text
    stored = response.json()["spec"]
    assert stored["student"] == {
        "model": "mlp",
        "options": {"hidden": [64], "embed_dim": 32, "in_features": 11},
    }
    # The published teacher's architecture is filled in from its record.
    assert stored["teacher"]["arch"] == "mlp"
    # Images get small_cnn with the dataset's channels.
    image = http.post("/jobs", json=_spec(TINY)).json()["spec"]["student"]
    assert image == {
        "model": "small_cnn",
        "options": {"width": 16, "embed_dim": 64, "in_channels": 3},
    }


def test_a_deployable_architecture_is_accepted_by_name(http: httpx.Client) -> None:
    spec = _spec(TINY, student={"model": "tv:mobilenet_v3_large"})
    response = http.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["student"]["options"]["in_channels"] == 3


def test_the_manifest_and_teacher_read_are_the_callers_own(
    http: httpx.Client, live_api: LiveAPI
) -> None:
    """The same names from another tenant name nothing: the API reads the manifest and the
    teacher record in the caller's space, and its answers never say where they are stored."""
    other = live_api.headers(live_api.new_key().key)
    spec = _spec(TABULAR, teacher=TABULAR_TEACHER)
    refused = http.post("/jobs", json=spec, headers=other)
    assert refused.status_code == 422, refused.text
    found = {tuple(e["loc"]): e["msg"] for e in refused.json()["detail"]}
    assert "does not exist" in found[("body", "dataset", "uri")], found
    # With a shared dataset of its own kind, the other tenant's teacher name is still nothing.
    teacher_only = _spec(TINY, teacher={"kind": "model", "arch": "mlp", **TABULAR_TEACHER})
    refused = http.post("/jobs", json=teacher_only, headers=other)
    assert refused.status_code == 422, refused.text
    message = {tuple(e["loc"]): e["msg"] for e in refused.json()["detail"]}[
        ("body", "teacher", "weights_uri")
    ]
    assert "do not exist" in message and TEACHER_TABULAR in message, message
    assert "tenants/" not in message and "s3://" not in message, message
    # The owner's submit of the same spec reads both and is queued.
    assert http.post("/jobs", json=spec).status_code == 201
