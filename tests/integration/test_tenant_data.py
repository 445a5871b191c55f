"""Tenants own their data: datasets as tenant resources, names in the tenant's own space, the
attacks of a tenant on another's data, and the cross-tenant matrix.

Real parts: PostgreSQL, the moto S3 server and a local store, the API over real HTTP, the
Python client. Each test lists the whole store (every bucket of the S3 endpoint) before and
after, to show that nothing was written outside the tenant's and the deployment's prefixes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bird_datasets.location import tenant_prefix
from cli.app import app
from service.client import BirdAPIError, BirdClient
from service.storage import LocalStore, S3Store, open_store
from tests.integration.api_fixtures import (
    LiveAPI,
    job_spec,
    publish_checkpoint,
    publish_tiny_dataset,
)

NOWHERE = "nothing-here"


def _s3_objects(store: S3Store) -> dict[tuple[str, str], str]:
    """Every object of every bucket on the S3 endpoint, with its ETag."""
    objects: dict[tuple[str, str], str] = {}
    paginator = store.client.get_paginator("list_objects_v2")
    for bucket in store.client.list_buckets()["Buckets"]:
        for page in paginator.paginate(Bucket=bucket["Name"]):
            for item in page.get("Contents", []):
                objects[(bucket["Name"], item["Key"])] = item["ETag"]
    return objects


def _local_objects(root: Path) -> dict[str, str]:
    """Every file under ``root``, with its sha256."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _dataset_dir(tmp_path: Path) -> Path:
    """A valid local dataset directory (what `bird datasets prepare --out DIR` writes)."""
    publish_tiny_dataset(LocalStore(tmp_path), "ds")
    return tmp_path / "ds"


@pytest.fixture
def http(live_api: LiveAPI) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers()) as client:
        yield client


def _errors(response: httpx.Response) -> dict[tuple, str]:
    assert response.status_code == 422, response.text
    return {tuple(item["loc"]): item["msg"] for item in response.json()["detail"]}


# --- datasets as tenant resources ----------------------------------------------------------


def test_push_list_describe_use_and_delete_a_dataset_on_s3(
    live_api: LiveAPI, http: httpx.Client, tmp_path: Path
) -> None:
    store = live_api.store
    assert isinstance(store, S3Store)
    before = _s3_objects(store)
    own = f"{store.prefix}/{tenant_prefix(live_api.tenant_id)}/datasets/mine/"

    with BirdClient(live_api.base_url, live_api.api_key) as client:
        row = client.push_dataset(_dataset_dir(tmp_path), "mine")
        assert (row["name"], row["uri"], row["shared"]) == ("mine", "datasets/mine", False)
        assert row["description"]["num_classes"] == 2

        # Every byte written lies under the tenant's own prefix of the deployment's bucket.
        written = {k for k, v in _s3_objects(store).items() if before.get(k) != v}
        assert written and all(
            bucket == store.bucket and key.startswith(own) for bucket, key in written
        ), written
        assert (store.bucket, own + "manifest.json") in written

        assert [r["uri"] for r in client.list_datasets() if not r["shared"]] == ["datasets/mine"]
        described = client.describe_dataset("mine")
        assert described["uri"] == "datasets/mine" and described["rows"] == 6
        assert described["splits"]["test"]["rows"] == 2
        assert "train" in described["table"] and "group" in described["table"]
        # The answer names the dataset as the tenant does, never the bucket or the prefix.
        assert store.bucket not in json.dumps(described)

    # The CLI describes it by the name jobs use, from the server (as it does a local copy).
    env = {"BIRD_URL": live_api.base_url, "BIRD_API_KEY": live_api.api_key}
    shown = CliRunner().invoke(app, ["datasets", "describe", "datasets/mine"], env=env)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.rstrip("\n") == described["table"]
    counts = CliRunner().invoke(app, ["datasets", "describe", "datasets/mine", "--json"], env=env)
    assert json.loads(counts.stdout)["splits"] == described["splits"]
    missing = CliRunner().invoke(app, ["datasets", "describe", "datasets/nope"], env=env)
    assert missing.exit_code == 1 and "dataset 'nope' not found" in missing.stderr

    job = http.post("/jobs", json=job_spec("datasets/mine"))
    assert job.status_code == 201, job.text

    again = http.post(
        "/datasets", json={"name": "mine", "files": [{"path": "manifest.json", "size": 1}]}
    )
    assert again.status_code == 409
    assert "already exists" in again.json()["detail"]

    assert http.delete("/datasets/mine").status_code == 204
    gone = http.get("/datasets/mine")
    assert (gone.status_code, gone.json()["detail"]) == (404, "dataset 'mine' not found")
    assert (
        "does not exist"
        in _errors(http.post("/jobs", json=job_spec("datasets/mine")))[("body", "dataset", "uri")]
    )
    assert _s3_objects(store) == before


def test_presigned_upload_urls_name_one_key_each_and_the_manifest_comes_last(
    live_api: LiveAPI, http: httpx.Client
) -> None:
    files = [{"path": "manifest.json", "size": 10}, {"path": "part-00000.parquet", "size": 20}]
    answer = http.post("/datasets", json={"name": "urls", "files": files})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["uri"] == "datasets/urls"
    assert [u["path"] for u in body["uploads"]] == ["part-00000.parquet", "manifest.json"]
    for upload in body["uploads"]:
        assert upload["method"] == "PUT"
        assert upload["url"].startswith(live_api.settings.s3_endpoint_url)
        assert f"/tenants/{live_api.tenant_id}/datasets/urls/{upload['path']}?" in upload["url"]
    # Registering writes nothing; an upload that never finished is not a dataset.
    assert http.get("/datasets/urls").status_code == 404


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"name": "Bad Name", "files": [{"path": "manifest.json", "size": 1}]}, ("body", "name")),
        ({"name": "../x", "files": [{"path": "manifest.json", "size": 1}]}, ("body", "name")),
        ({"name": "ok", "files": [{"path": "part.parquet", "size": 1}]}, ("body", "files")),
        (
            {"name": "ok", "files": [{"path": "../../jobs/1/x", "size": 1}]},
            ("body", "files", 0, "path"),
        ),
        ({"name": "ok", "files": [{"path": "/abs", "size": 1}]}, ("body", "files", 0, "path")),
        (
            {"name": "ok", "files": [{"path": "manifest.json", "size": 10**15}]},
            ("body", "files", 0, "size"),
        ),
    ],
)
def test_a_bad_upload_is_422_naming_the_field(http: httpx.Client, body: dict, loc: tuple) -> None:
    assert loc in _errors(http.post("/datasets", json=body))


def test_a_local_store_takes_uploads_through_the_api(
    live_api_local: LiveAPI, tmp_path: Path
) -> None:
    api = live_api_local
    store = api.store
    assert isinstance(store, LocalStore)
    before = _local_objects(store.root)
    with BirdClient(api.base_url, api.api_key) as client:
        row = client.push_dataset(_dataset_dir(tmp_path), "mine")
    assert row["uri"] == "datasets/mine"
    after = _local_objects(store.root)
    written = {k for k, v in after.items() if before.get(k) != v}
    assert written and all(
        k.startswith(f"{tenant_prefix(api.tenant_id)}/datasets/mine/") for k in written
    )
    # The upload route needs the key, and another tenant's upload lands in its own space.
    with httpx.Client(base_url=api.base_url) as anonymous:
        assert anonymous.put("/datasets/mine/files/x.bin", content=b"x").status_code == 401
    other = api.new_key()
    with httpx.Client(base_url=api.base_url, headers=api.headers(other.key)) as http:
        # a's dataset is complete: for b the name is free, so b's upload goes to b's space.
        assert http.put("/datasets/mine/files/x.bin", content=b"b").status_code == 204
        # A '..' that survives the client's normalisation is refused by the path's pattern.
        escape = http.put("/datasets/mine/files/%2E%2E/%2E%2E/x", content=b"b")
        assert escape.status_code == 422, escape.text
    assert (store.root / tenant_prefix(other.tenant_id) / "datasets/mine/x.bin").read_bytes() == (
        b"b"
    )
    assert {k: v for k, v in _local_objects(store.root).items() if k in after} == after


def test_the_upload_route_is_only_for_a_local_store(http: httpx.Client) -> None:
    answer = http.put("/datasets/x/files/part.parquet", content=b"1")
    assert answer.status_code == 404
    assert "presigned URLs" in answer.json()["detail"]


# --- the attacks ---------------------------------------------------------------------------


@pytest.fixture
def foreign_bucket(live_api: LiveAPI) -> Iterator[str]:
    """Another bucket the deployment's credentials reach, holding a valid dataset."""
    store = live_api.store
    assert isinstance(store, S3Store)
    name = f"bird-foreign-{uuid.uuid4().hex[:12]}"
    store.client.create_bucket(Bucket=name)
    try:
        publish_tiny_dataset(open_store(f"s3://{name}", live_api.settings), "datasets/x")
        yield name
    finally:
        foreign = open_store(f"s3://{name}", live_api.settings)
        foreign.delete_prefix("")
        store.client.delete_bucket(Bucket=name)


def test_data_outside_the_tenants_space_is_refused_and_nothing_is_written(
    live_api: LiveAPI, http: httpx.Client, foreign_bucket: str, tmp_path: Path
) -> None:
    store = live_api.store
    assert isinstance(store, S3Store)
    # Tenant a: a dataset and a job with a checkpoint.
    publish_tiny_dataset(store, f"{tenant_prefix(live_api.tenant_id)}/datasets/a-data")
    job_a = http.post("/jobs", json=job_spec("datasets/a-data")).json()["id"]
    publish_checkpoint(live_api, job_a, "best")
    local_dataset = _dataset_dir(tmp_path)

    b = live_api.new_key()
    before = _s3_objects(store)
    refused = [
        f"s3://{foreign_bucket}/datasets/x",  # another bucket: a valid dataset is there
        f"s3://{foreign_bucket}/datasets/missing",
        store.uri(f"{tenant_prefix(live_api.tenant_id)}/datasets/a-data"),  # a's, in full
        store.uri(f"jobs/{job_a}/checkpoints/best"),
        str(local_dataset),  # an absolute path to a dataset directory
        local_dataset.as_uri(),
        "/etc/passwd",
        "/proc/self/environ",
        "file:///etc/passwd",
    ]
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(b.key)) as as_b:
        for uri in refused:
            message = _errors(as_b.post("/jobs", json=job_spec(uri)))[("body", "dataset", "uri")]
            # One answer from the form alone: existing or missing, file or bucket.
            assert message == (
                f"dataset URI {uri!r} is refused: name one of your own (datasets/<name>) or a "
                "shared one (shared/...); absolute paths, file:// and s3:// URIs are not "
                "accepted by this deployment"
            ), uri
        # Relative names lie in b's space: a's dataset and checkpoints are missing, for b.
        for uri in ("datasets/a-data", f"jobs/{job_a}/checkpoints/best", "datasets/never"):
            message = _errors(as_b.post("/jobs", json=job_spec(uri)))[("body", "dataset", "uri")]
            assert message == (
                f"dataset {uri!r} does not exist (upload one with 'bird datasets push' or "
                "POST /datasets; shared ones are named shared/datasets/<name>)"
            )
        for weights in (store.uri(f"jobs/{job_a}/checkpoints/best"), "/etc/passwd"):
            spec = job_spec(
                "shared/datasets/none",
                teacher={"kind": "model", "arch": "small_cnn", "weights_uri": weights},
            )
            message = _errors(as_b.post("/jobs", json=spec))[("body", "teacher", "weights_uri")]
            assert "is refused" in message and weights in message
        assert as_b.get("/jobs").json()["total"] == 0
    assert _s3_objects(store) == before


def test_a_teacher_named_by_another_tenant_resolves_in_its_own_space(
    live_api: LiveAPI,
) -> None:
    from service.spec import JobSpec
    from workers.pipeline import _tenant_teacher
    from workers.teachers import TeacherLoadError

    spec = JobSpec.model_validate(
        job_spec(
            "datasets/x",
            teacher={
                "kind": "model",
                "arch": "small_cnn",
                "weights_uri": "jobs/7/checkpoints/best",
            },
        )
    )
    teacher = _tenant_teacher(spec, live_api.settings, 42)
    assert teacher.weights_uri == "tenants/42/jobs/7/checkpoints/best"
    shared = spec.model_copy(
        update={"teacher": spec.teacher.model_copy(update={"weights_uri": "shared/teachers/t"})}
    )
    assert _tenant_teacher(shared, live_api.settings, 42).weights_uri == "shared/teachers/t"
    outside = spec.model_copy(
        update={"teacher": spec.teacher.model_copy(update={"weights_uri": "s3://b/k"})}
    )
    with pytest.raises(TeacherLoadError, match="is refused"):
        _tenant_teacher(outside, live_api.settings, 42)


# --- the cross-tenant matrix ---------------------------------------------------------------


def _same_answer(theirs: httpx.Response, missing: httpx.Response, name: str) -> None:
    """``theirs`` (b on a's object) equals ``missing`` (b on a name that exists nowhere)."""
    assert theirs.status_code == missing.status_code, (theirs.text, missing.text)
    assert theirs.headers.get("content-type") == missing.headers.get("content-type")
    assert theirs.text.replace(name, "<name>") == missing.text.replace(NOWHERE, "<name>").replace(
        str(2**31 - 1), "<name>"
    )


def test_cross_tenant_matrix(live_api: LiveAPI, http: httpx.Client, tmp_path: Path) -> None:
    store = live_api.store
    assert isinstance(store, S3Store)
    with BirdClient(live_api.base_url, live_api.api_key) as client:
        client.push_dataset(_dataset_dir(tmp_path), "secret")
    job_a = http.post("/jobs", json=job_spec("datasets/secret")).json()["id"]
    publish_checkpoint(live_api, job_a, "best")
    [checkpoint] = http.get(f"/jobs/{job_a}/checkpoints").json()

    b = live_api.new_key()
    before = _s3_objects(store)
    missing_id = str(2**31 - 1)
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(b.key)) as as_b:
        job_routes = [
            ("GET", "/jobs/{}"),
            ("POST", "/jobs/{}/cancel"),
            ("GET", "/jobs/{}/metrics"),
            ("GET", "/jobs/{}/trials"),
            ("GET", "/jobs/{}/events"),
            ("GET", "/jobs/{}/logs"),
            ("GET", "/jobs/{}/checkpoints"),
            ("GET", "/jobs/{}/checkpoints/best"),
            ("GET", "/files/jobs/{}/checkpoints/best.tar"),
        ]
        for method, route in job_routes:
            theirs = as_b.request(method, route.format(job_a))
            missing = as_b.request(method, route.format(missing_id))
            assert theirs.status_code == 404, (route, theirs.text)
            _same_answer(theirs, missing, str(job_a))
        dataset_routes = [
            ("GET", "/datasets/{}"),
            ("DELETE", "/datasets/{}"),
            ("PUT", "/datasets/{}/files/manifest.json"),
        ]
        for method, route in dataset_routes:
            theirs = as_b.request(method, route.format("secret"), content=b"{}")
            missing = as_b.request(method, route.format(NOWHERE), content=b"{}")
            assert theirs.status_code == 404, (route, theirs.text)
            _same_answer(theirs, missing, "secret")
        # Registering a name a already uses is b's own, new dataset: the answer for a free name.
        register = {"files": [{"path": "manifest.json", "size": 2}]}
        theirs = as_b.post("/datasets", json={"name": "secret", **register})
        missing = as_b.post("/datasets", json={"name": NOWHERE, **register})
        assert theirs.status_code == missing.status_code == 201
        assert f"/tenants/{b.tenant_id}/datasets/secret/" in theirs.json()["uploads"][0]["url"]
        # A job of b naming a's dataset: the answer for a dataset that does not exist.
        theirs = as_b.post("/jobs", json=job_spec("datasets/secret"))
        missing = as_b.post("/jobs", json=job_spec(f"datasets/{NOWHERE}"))
        _same_answer(theirs, missing, "secret")
        # Listings show none of a's.
        assert "secret" not in as_b.get("/datasets").text
        assert as_b.get("/jobs").json()["total"] == 0
        # a's presigned checkpoint URL is a's to hand out; b's key does not make one.
        assert checkpoint["url"] not in as_b.get(f"/jobs/{job_a}/checkpoints").text
    # Nothing of a's was read into b's answers, and nothing was written or deleted.
    assert _s3_objects(store) == before
    with BirdClient(live_api.base_url, live_api.api_key) as client:
        assert client.describe_dataset("secret")["rows"] == 6
        with pytest.raises(BirdAPIError) as raised:
            client.describe_dataset(NOWHERE)
        assert raised.value.status == 404


def test_uploads_through_the_api_have_their_own_limit(live_api_local: LiveAPI) -> None:
    # JSON bodies stay at BIRD_MAX_BODY_BYTES; a dataset file PUT to the upload route may be as
    # large as BIRD_MAX_UPLOAD_BYTES, and no larger.
    from service.api.app import create_app
    from tests.integration.api_fixtures import serve

    api = live_api_local
    settings = api.settings.model_copy(update={"max_body_bytes": 4096, "max_upload_bytes": 8192})
    app = create_app(settings, engine=api.engine, store=api.store)
    with serve(app) as base_url, httpx.Client(base_url=base_url, headers=api.headers()) as http:
        fits = http.put("/datasets/big/files/part.parquet", content=b"x" * 6000)
        over = http.put("/datasets/big/files/part.parquet", content=b"x" * 9000)
        json_over = http.post("/datasets", content=b"{" + b" " * 5000 + b"}")
        declared = http.post(
            "/datasets", json={"name": "big", "files": [{"path": "manifest.json", "size": 9000}]}
        )
    assert fits.status_code == 204, fits.text
    assert over.status_code == 413
    assert over.json()["detail"] == "request body too large: at most 8192 bytes are accepted"
    assert json_over.status_code == 413
    assert ("body", "files", 0, "size") in _errors(declared)
    stored = api.store.root / tenant_prefix(api.tenant_id) / "datasets/big/part.parquet"
    assert stored.read_bytes() == b"x" * 6000


# --- teachers ------------------------------------------------------------------------------


def _teacher_dir(tmp_path: Path) -> Path:
    """A teacher directory as `bird teachers train --out DIR` writes it."""
    from service.storage import publish

    teacher = {"kind": "model", "arch": "small_cnn", "num_classes": 2}
    publish(
        LocalStore(tmp_path),
        "teacher",
        {"model.safetensors": b"\0" * 64, "teacher.json": json.dumps(teacher).encode()},
        metadata={"arch": "small_cnn", "num_classes": 2, "test_accuracy": 91.5},
    )
    return tmp_path / "teacher"


def test_teachers_are_tenant_resources_too(live_api: LiveAPI, tmp_path: Path) -> None:
    from service.spec import JobSpec
    from workers.pipeline import _tenant_teacher
    from workers.teachers import _published_teacher

    store = live_api.store
    assert isinstance(store, S3Store)
    before = _s3_objects(store)
    with BirdClient(live_api.base_url, live_api.api_key) as client:
        row = client.push_teacher(_teacher_dir(tmp_path), "mine")
        assert (row["uri"], row["shared"], row["files"]) == ("teachers/mine", False, 2)
        assert row["description"] == {"arch": "small_cnn", "num_classes": 2, "test_accuracy": 91.5}
        assert client.get_teacher("mine") == row
        assert [r["uri"] for r in client.list_teachers() if not r["shared"]] == ["teachers/mine"]
    own = f"{store.prefix}/{tenant_prefix(live_api.tenant_id)}/teachers/mine/"
    written = {k for k, v in _s3_objects(store).items() if before.get(k) != v}
    assert written and all(key.startswith(own) for _, key in written), written

    # The worker finds it for its tenant; for another tenant the name is empty, as a missing one.
    spec = JobSpec.model_validate(
        job_spec(
            "datasets/x",
            teacher={"kind": "model", "arch": "small_cnn", "weights_uri": "teachers/mine"},
        )
    )
    mine = _tenant_teacher(spec, live_api.settings, live_api.tenant_id).weights_uri
    assert _published_teacher(store, mine) is not None
    other = live_api.new_key()
    theirs = _tenant_teacher(spec, live_api.settings, other.tenant_id).weights_uri
    assert theirs == f"tenants/{other.tenant_id}/teachers/mine"
    assert _published_teacher(store, theirs) is None

    snapshot = _s3_objects(store)
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(other.key)) as as_b:
        for method, route in [
            ("GET", "/teachers/{}"),
            ("DELETE", "/teachers/{}"),
            ("PUT", "/teachers/{}/files/model.safetensors"),
        ]:
            theirs_answer = as_b.request(method, route.format("mine"), content=b"x")
            missing = as_b.request(method, route.format(NOWHERE), content=b"x")
            assert theirs_answer.status_code == 404, theirs_answer.text
            _same_answer(theirs_answer, missing, "mine")
        assert "teachers/mine" not in as_b.get("/teachers").text
    assert _s3_objects(store) == snapshot

    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers()) as http:
        assert http.delete("/teachers/mine").status_code == 204
        gone = http.get("/teachers/mine")
        assert (gone.status_code, gone.json()["detail"]) == (404, "teacher 'mine' not found")
    assert _s3_objects(store) == before


def test_bird_datasets_push_list_delete(live_api: LiveAPI, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    env = {"BIRD_URL": live_api.base_url, "BIRD_API_KEY": live_api.api_key}

    def bird(*args: str):
        return CliRunner().invoke(app, list(args), env=env)

    pushed = bird("datasets", "push", str(_dataset_dir(tmp_path)), "--name", "cli-made")
    assert pushed.exit_code == 0, pushed.output
    assert "as datasets/cli-made" in pushed.output
    listed = bird("datasets", "list")
    assert listed.exit_code == 0 and "datasets/cli-made" in listed.output
    fresh = {**env, "BIRD_API_KEY": live_api.new_key().key}
    for kind in ("datasets", "teachers"):  # another tenant's list: none, said so
        none = CliRunner().invoke(app, [kind, "list"], env=fresh)
        assert none.exit_code == 0 and none.stdout == "", none.output
        assert f"no {kind} (yours or shared): upload one with `bird {kind} push" in none.stderr
    again = bird("datasets", "push", str(tmp_path / "ds"), "--name", "cli-made")
    assert again.exit_code == 1 and "already exists" in again.output and "HTTP 409" in again.output
    not_a_dataset = bird("datasets", "push", str(tmp_path), "--name", "x")
    assert not_a_dataset.exit_code == 2
    assert f"{tmp_path}: not a dataset directory (no manifest.json)" in not_a_dataset.output
    # A name the server cannot hold is refused before any upload, in words (the API's answer
    # is its pattern; a name with a '/' never reached the route: 'Not Found').
    for args in (
        ("datasets", "push", str(tmp_path / "ds"), "--name", "People"),
        ("datasets", "delete", "../2/datasets/cli-made"),
        ("teachers", "push", str(tmp_path / "ds"), "--name", "a/b"),
        ("teachers", "delete", "a/b"),
    ):
        refused = bird(*args)
        assert refused.exit_code == 2, refused.output
        kind = args[0].removesuffix("s")
        assert refused.stderr.startswith(
            f"error: invalid {kind} name {args[-1]!r}: a name is 1 to"
        ), refused.output
    assert bird("datasets", "delete", "cli-made").exit_code == 0
    gone = bird("datasets", "delete", "cli-made")
    assert gone.exit_code == 1 and "dataset 'cli-made' not found (HTTP 404)" in gone.output
