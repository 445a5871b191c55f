"""The REST API over real HTTP: uvicorn on loopback, PostgreSQL, and S3 (moto) or a local store.

Each test gets its own tenant (``live_api``), so tests sharing the module's server never see
each other's jobs.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from sqlalchemy import URL, Engine, event, text, update
from sqlalchemy.orm import Session

from service import queue
from service.api import create_app
from service.auth import create_key
from service.db import make_engine, session_factory
from service.models import ApiKey, JobState
from service.settings import Settings
from service.spec import METHOD_OPTIONS
from service.storage import S3Store
from tests.integration.api_fixtures import (
    LiveAPI,
    job_spec,
    publish_checkpoint,
    publish_tiny_dataset,
    serve,
)


@pytest.fixture
def http(live_api: LiveAPI) -> Iterator[httpx.Client]:
    """An HTTP client on the S3-backed API, authenticated as the test's tenant."""
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(), timeout=30) as c:
        yield c


def submit(http: httpx.Client, dataset: str, **overrides: object) -> dict:
    response = http.post("/jobs", json=job_spec(dataset, **overrides))
    assert response.status_code == 201, response.text
    return response.json()


def errors(response: httpx.Response) -> dict[tuple, str]:
    """FastAPI's 422 body as {loc: msg}."""
    assert response.status_code == 422, response.text
    return {tuple(err["loc"]): err["msg"] for err in response.json()["detail"]}


def claim_job(live_api: LiveAPI, job_id: int, worker: str = "w1") -> None:
    """Claim queued jobs until ``job_id`` is among them (other tests' jobs share the queue)."""
    for _ in range(1000):
        job = queue.claim(live_api.engine, worker, 300)
        assert job is not None, f"job {job_id} was never claimed"
        if job.id == job_id:
            return
    raise AssertionError(f"job {job_id} was never claimed")


# --- health and authentication ------------------------------------------------------------


def test_health_and_readiness_need_no_key(live_api: LiveAPI) -> None:
    with httpx.Client(base_url=live_api.base_url) as client:
        assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "store": "ok"}}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "missing Authorization header"),
        ("Basic dXNlcjpwYXNz", "malformed Authorization header"),
        ("Bearer", "malformed Authorization header"),
        ("Bearer two words", "malformed Authorization header"),
        ("Bearer bird_not-a-real-key", "invalid API key"),
        ("Bearer sk-something-else", "invalid API key"),
    ],
)
def test_requests_without_a_valid_key_get_401(
    live_api: LiveAPI, header: str | None, expected: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    with httpx.Client(base_url=live_api.base_url, headers=headers) as client:
        for method, path in [
            ("GET", "/jobs"),
            ("POST", "/jobs"),
            ("GET", "/jobs/1"),
            ("GET", "/jobs/1/metrics"),
            ("GET", "/jobs/1/checkpoints/best"),
            ("GET", "/files/jobs/1/checkpoints/best.tar"),
        ]:
            response = client.request(method, path, json={} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            detail = response.json()["detail"]
            assert expected in detail
            assert "not-a-real-key" not in detail and "sk-something" not in detail


def test_revoked_key_gets_401(live_api: LiveAPI, http: httpx.Client) -> None:
    assert http.get("/jobs").status_code == 200
    with live_api.session() as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.tenant_id == live_api.tenant_id)
            .values(revoked_at=datetime.now(timezone.utc))
        )
        session.commit()
    response = http.get("/jobs")
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


# --- submit, get, list ----------------------------------------------------------------------


def test_submit_then_get(http: httpx.Client, tiny_dataset: str) -> None:
    spec = job_spec(tiny_dataset, priority=7, max_attempts=2)
    response = http.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert job["stage"] is None
    assert job["progress"] == 0.0
    assert (job["priority"], job["max_attempts"], job["attempts"]) == (7, 2, 0)
    assert job["method"] == "bkd"
    assert job["dataset"] == tiny_dataset
    assert job["cancel_requested"] is False
    assert job["error"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    # The stored spec is resolved: the defaults the user left out are filled in.
    assert job["spec"]["training"]["lr"] == 2e-3
    assert job["spec"]["teacher"]["kind"] == "efficientnet_lite0_probe"

    fetched = http.get(f"/jobs/{job['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == job


def test_a_multi_tenant_deployment_refuses_full_uris_whatever_they_name(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    # The default: even the deployment's own bucket is refused as a full URI (it would reach
    # every tenant's prefix); an existing and a missing location get the same kind of answer.
    full_uri = live_api.store.uri(tiny_dataset)
    assert full_uri.startswith("s3://")
    for uri in (full_uri, "/nonexistent/bird/datasets/x", f"{full_uri}-missing"):
        message = errors(http.post("/jobs", json=job_spec(uri)))[("body", "dataset", "uri")]
        assert message == (
            f"dataset URI {uri!r} is refused: name one of your own (datasets/<name>) or a "
            "shared one (shared/...); absolute paths, file:// and s3:// URIs are not accepted "
            "by this deployment"
        )
    assert http.get("/jobs").json()["total"] == 0
    assert submit(http, tiny_dataset)["dataset"] == tiny_dataset


def test_list_filters_by_state_and_pages_newest_first(
    http: httpx.Client, tiny_dataset: str
) -> None:
    ids = [submit(http, tiny_dataset)["id"] for _ in range(5)]
    for job_id in ids[:2]:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200

    everything = http.get("/jobs").json()
    assert [job["id"] for job in everything["items"]] == ids[::-1]
    assert (everything["total"], everything["limit"], everything["offset"]) == (5, 50, 0)

    queued = http.get("/jobs", params={"state": "queued"}).json()
    assert [job["id"] for job in queued["items"]] == ids[:1:-1]
    assert queued["total"] == 3
    cancelled = http.get("/jobs", params={"state": "cancelled"}).json()
    assert [job["id"] for job in cancelled["items"]] == ids[1::-1]

    pages = [
        http.get("/jobs", params={"limit": 2, "offset": offset}).json() for offset in (0, 2, 4)
    ]
    assert [[job["id"] for job in page["items"]] for page in pages] == [
        ids[:2:-1][:2],
        [ids[2], ids[1]],
        [ids[0]],
    ]
    assert all(page["total"] == 5 for page in pages)
    assert http.get("/jobs", params={"offset": 10}).json()["items"] == []


def test_list_rejects_bad_parameters(http: httpx.Client) -> None:
    message = errors(http.get("/jobs", params={"state": "exploded"}))[("query", "state")]
    for state in JobState:
        assert state.value in message
    assert ("query", "limit") in errors(http.get("/jobs", params={"limit": 0}))
    assert ("query", "limit") in errors(http.get("/jobs", params={"limit": 201}))
    assert ("query", "offset") in errors(http.get("/jobs", params={"offset": -1}))


# --- idempotency ----------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_job(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    spec = job_spec(tiny_dataset)
    first = http.post("/jobs", json=spec, headers={"Idempotency-Key": "run-1"})
    assert first.status_code == 201
    again = http.post("/jobs", json=spec, headers={"Idempotency-Key": "run-1"})
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # Spelling out a default is the same spec.
    explicit = {**spec, "seed": 0}
    same = http.post("/jobs", json=explicit, headers={"Idempotency-Key": "run-1"})
    assert same.json()["id"] == first.json()["id"]

    other = http.post("/jobs", json={**spec, "seed": 1}, headers={"Idempotency-Key": "run-1"})
    assert other.status_code == 409
    assert "run-1" in other.json()["detail"] and "different spec" in other.json()["detail"]
    assert http.get("/jobs").json()["total"] == 1

    # Keys are per tenant: another tenant's run-1 is its own job.
    stranger = live_api.new_key()
    theirs = http.post(
        "/jobs",
        json=spec,
        headers={"Idempotency-Key": "run-1", **live_api.headers(stranger.key)},
    )
    assert theirs.status_code == 201
    assert theirs.json()["id"] != first.json()["id"]

    too_long = http.post("/jobs", json=spec, headers={"Idempotency-Key": "k" * 201})
    assert ("header", "Idempotency-Key") in errors(too_long)


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_queued_job_is_immediate_and_it_never_runs(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job = submit(http, tiny_dataset, priority=100)
    response = http.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "cancelled"
    assert body["cancel_requested"] is True
    assert body["finished_at"] is not None
    # Drain the queue: the cancelled job is never handed to a worker.
    claimed = []
    while (claimed_job := queue.claim(live_api.engine, "drain", 300)) is not None:
        claimed.append(claimed_job.id)
    assert job["id"] not in claimed
    assert http.get(f"/jobs/{job['id']}").json()["state"] == "cancelled"
    # Cancelling twice: the job is finished now.
    again = http.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["detail"] == (
        f"job {job['id']} is already cancelled: only queued or running jobs can be cancelled"
    )


def test_cancel_running_job_then_terminal_is_409(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job = submit(http, tiny_dataset)
    claim_job(live_api, job["id"])
    response = http.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["state"] == "cancelling"
    assert http.post(f"/jobs/{job['id']}/cancel").status_code == 202  # idempotent
    with live_api.session() as session:
        queue.finish_cancelled(session, job["id"], "w1")
    assert http.get(f"/jobs/{job['id']}").json()["state"] == "cancelled"

    done = submit(http, tiny_dataset)
    claim_job(live_api, done["id"], "w2")
    with live_api.session() as session:
        queue.finish(session, done["id"], "w2")
    response = http.post(f"/jobs/{done['id']}/cancel")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["detail"]


# --- tenant isolation -----------------------------------------------------------------------


def test_another_tenants_job_is_404_everywhere(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    publish_checkpoint(live_api, job_id)
    stranger = live_api.headers(live_api.new_key().key)
    paths = [
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("GET", f"/jobs/{job_id}/metrics"),
        ("GET", f"/jobs/{job_id}/trials"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/logs"),
        ("GET", f"/jobs/{job_id}/checkpoints"),
        ("GET", f"/jobs/{job_id}/checkpoints/best"),
    ]
    missing_id = 2**31 - 1
    for method, path in paths:
        theirs = http.request(method, path, headers=stranger)
        assert theirs.status_code == 404, (path, theirs.text)
        nonexistent = http.request(method, path.replace(str(job_id), str(missing_id), 1))
        assert nonexistent.status_code == 404
        # Same answer as a job that does not exist: nothing tells the two apart.
        assert theirs.json()["detail"] == f"job {job_id} not found"
        assert nonexistent.json()["detail"] == f"job {missing_id} not found"
    assert not any(
        job["id"] == job_id for job in http.get("/jobs", headers=stranger).json()["items"]
    )
    # Still there, untouched, for its owner.
    assert http.get(f"/jobs/{job_id}").json()["state"] == "queued"


# --- bad input ------------------------------------------------------------------------------


def test_malformed_json_is_422(http: httpx.Client) -> None:
    response = http.post(
        "/jobs", content=b'{"dataset": {"uri": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert (
        http.post("/jobs", content=b"", headers={"Content-Type": "application/json"}).status_code
        == 422
    )
    assert http.post("/jobs", json=[1, 2]).status_code == 422


def test_spec_errors_are_field_level(http: httpx.Client, tiny_dataset: str) -> None:
    wrong_type = errors(http.post("/jobs", json=job_spec(tiny_dataset, training={"epochs": "x"})))
    assert "valid integer" in wrong_type[("body", "training", "epochs")]

    unknown_method = errors(http.post("/jobs", json=job_spec(tiny_dataset, method={"name": "x"})))
    message = unknown_method[("body", "method")]
    assert message.startswith("unknown method 'x'"), message  # no "Value error, " before it
    for name in METHOD_OPTIONS:
        assert name in message

    out_of_range = errors(http.post("/jobs", json=job_spec(tiny_dataset, training={"epochs": 0})))
    assert "greater than or equal to 1" in out_of_range[("body", "training", "epochs")]
    too_high = errors(http.post("/jobs", json=job_spec(tiny_dataset, priority=101)))
    assert "less than or equal to 100" in too_high[("body", "priority")]

    unknown_field = errors(http.post("/jobs", json=job_spec(tiny_dataset, colour="red")))
    assert "Extra inputs are not permitted" in unknown_field[("body", "colour")]
    nested_unknown = errors(http.post("/jobs", json=job_spec(tiny_dataset, training={"lr_": 1})))
    assert ("body", "training", "lr_") in nested_unknown

    assert ("body", "dataset") in errors(http.post("/jobs", json={}))

    # Python's JSON parser accepts NaN; JSON (and the stored spec) cannot hold it.
    nan_body = (
        b'{"dataset": {"uri": "%s"}, "search": {"space": {"gamma": {"kind": "choice", '
        b'"values": [1]}, "lambda_kd": {"kind": "uniform", "low": NaN, "high": 2}}}}'
    ) % tiny_dataset.encode()
    nan = http.post("/jobs", content=nan_body, headers={"Content-Type": "application/json"})
    assert nan.status_code == 422, nan.text
    assert http.get("/jobs").json()["total"] == 0


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("datasets/missing", "does not exist"),
        ("shared/datasets/missing", "does not exist"),
        ("../etc", "invalid"),
        # Outside the tenant's space: refused by the form alone, whatever is there.
        ("gs://bucket/x", "is refused"),
        ("s3://Not_A_Bucket/x", "is refused"),
        ("s3://bird-no-such-bucket-here/x", "is refused"),
        ("/etc/passwd", "is refused"),
        ("file:///proc/self/environ", "is refused"),
    ],
)
def test_dataset_that_does_not_exist_is_422_naming_it(
    http: httpx.Client, uri: str, expected: str
) -> None:
    message = errors(http.post("/jobs", json=job_spec(uri)))[("body", "dataset", "uri")]
    assert uri in message
    assert expected in message


def test_a_manifest_that_is_not_a_dataset_is_422(live_api: LiveAPI, http: httpx.Client) -> None:
    from service.storage import publish

    publish(live_api.store, "shared/x", {"a.bin": b"1"}, metadata={"format": "features"})
    message = errors(http.post("/jobs", json=job_spec("shared/x")))[("body", "dataset", "uri")]
    assert "is not a bird dataset" in message and "metadata.format" in message


def test_path_parameters_are_checked(http: httpx.Client) -> None:
    assert ("path", "job_id") in errors(http.get("/jobs/abc"))
    assert ("path", "job_id") in errors(http.get("/jobs/0"))
    assert ("path", "job_id") in errors(http.get(f"/jobs/{2**40}"))
    assert ("query", "since") in errors(http.get("/jobs/1/metrics", params={"since": -1}))
    assert ("query", "since") in errors(http.get("/jobs/1/logs", params={"since": "x"}))


# --- metrics, trials, events, logs ----------------------------------------------------------


def test_metrics_series_latest_groups_and_since(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    empty = http.get(f"/jobs/{job_id}/metrics").json()
    assert empty == {"job_id": job_id, "series": [], "latest": {}, "groups": {}, "next_since": 0}

    rows = []
    for epoch in (0, 1):
        rows += [
            {"split": "train", "name": "loss", "value": 2.0 - epoch, "epoch": epoch, "step": 10},
            {"split": "train", "name": "kd", "value": 0.5 - epoch / 10, "epoch": epoch},
            {"split": "val", "name": "auroc", "value": 0.7 + epoch / 10, "epoch": epoch},
            {"split": "val", "name": "delta_mean_deo", "value": 9.0 - epoch, "epoch": epoch},
            {"split": "val", "name": "group/0/accuracy", "value": 0.8, "epoch": epoch},
            {"split": "val", "name": "group/0/count", "value": 30, "epoch": epoch},
            {"split": "val", "name": "group/1/accuracy", "value": 0.6 + epoch / 10, "epoch": epoch},
            {"split": "val", "name": "group/1/tpr", "value": 0.5, "epoch": epoch},
            {"split": "val", "name": "group/1/fpr", "value": 0.25, "epoch": epoch},
        ]
    # A search trial's rows never override the main run's latest values.
    rows.append({"split": "val", "name": "auroc", "value": 0.1, "epoch": 5, "trial": 3})
    rows.append({"split": "test", "name": "accuracy", "value": 0.9})
    rows.append({"split": "test", "name": "f1", "value": math.nan})
    rows.append({"split": "train", "name": "grad_norm", "value": math.inf, "epoch": 1})
    with live_api.session() as session:
        queue.record_metrics(session, job_id, rows)

    metrics = http.get(f"/jobs/{job_id}/metrics").json()
    series = metrics["series"]
    assert len(series) == len(rows)
    ids = [point["id"] for point in series]
    assert ids == sorted(ids)
    assert metrics["next_since"] == ids[-1]
    first = series[0]
    assert set(first) == {"id", "trial", "epoch", "step", "split", "name", "value", "at"}
    assert (first["split"], first["name"], first["value"], first["epoch"], first["step"]) == (
        "train", "loss", 2.0, 0, 10,
    )  # fmt: skip
    assert series[-1]["value"] is None  # infinity has no JSON number
    assert [p["trial"] for p in series if p["trial"] is not None] == [3]

    assert metrics["latest"] == {
        "train": {"loss": 1.0, "kd": pytest.approx(0.4), "grad_norm": None},
        "val": {"auroc": pytest.approx(0.8), "delta_mean_deo": 8.0},
        "test": {"accuracy": 0.9, "f1": None},
    }
    assert metrics["groups"] == {
        "val": [
            {"group": 0, "count": 30.0, "accuracy": 0.8, "tpr": None, "fpr": None},
            {"group": 1, "count": None, "accuracy": pytest.approx(0.7), "tpr": 0.5, "fpr": 0.25},
        ]
    }

    since = ids[9]
    later = http.get(f"/jobs/{job_id}/metrics", params={"since": since}).json()
    assert [point["id"] for point in later["series"]] == ids[10:]
    assert later["latest"] == metrics["latest"]  # the summary covers the whole series
    nothing = http.get(f"/jobs/{job_id}/metrics", params={"since": ids[-1]}).json()
    assert nothing["series"] == [] and nothing["next_since"] == ids[-1]


def test_metrics_latest_of_a_search_is_its_best_trial_once_picked(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    """While a search runs, its latest val is the trial that reported last; once the search
    has picked its best trial, that trial's (the one whose checkpoint the job keeps)."""
    job_id = submit(http, tiny_dataset)["id"]
    rows = [
        {"split": "val", "name": "auroc", "value": 0.5, "epoch": 3, "trial": 1},
        {"split": "val", "name": "auroc", "value": 0.6, "epoch": 4, "trial": 1},
        {"split": "val", "name": "auroc", "value": 0.7, "epoch": 0, "trial": 2},
        {"split": "val", "name": "group/0/tpr", "value": 0.4, "epoch": 0, "trial": 2},
        {"split": "val", "name": "auroc", "value": 0.75, "epoch": 1, "trial": 2},
        {"split": "val", "name": "f1", "value": 0.2, "epoch": 1, "trial": 2},
        {"split": "val", "name": "f1", "value": 0.3, "epoch": 1, "trial": 2},  # re-reported
        {"split": "train", "name": "loss", "value": 1.0, "epoch": 2, "trial": 1},
        {"split": "train", "name": "loss", "value": 0.9},  # main run, no epoch: still wins
        {"split": "train", "name": "loss", "value": 0.8, "epoch": 7, "trial": 2},
    ]
    with live_api.session() as session:
        queue.record_metrics(session, job_id, rows)
    metrics = http.get(f"/jobs/{job_id}/metrics").json()
    # val: only trials; trial 2 reported last, so its highest epoch (1) is shown.
    assert metrics["latest"] == {"train": {"loss": 0.9}, "val": {"auroc": 0.75, "f1": 0.3}}
    assert metrics["groups"] == {}  # trial 2's group row is at epoch 0, not its latest
    assert len(metrics["series"]) == len(rows)

    # Running trials' rows (no "best" yet, or "best": false) change nothing.
    with live_api.session() as session:
        queue.upsert_trial(session, job_id, 1, state="running", metrics={"auroc": 0.6})
        queue.upsert_trial(session, job_id, 2, state="running", metrics={"best": False})
    assert http.get(f"/jobs/{job_id}/metrics").json()["latest"]["val"] == {"auroc": 0.75, "f1": 0.3}

    # The search ends and picks trial 1: its highest epoch (4) is the latest val now.
    with live_api.session() as session:
        queue.upsert_trial(session, job_id, 1, state="completed", metrics={"best": True})
        queue.upsert_trial(session, job_id, 2, state="early_stopped", metrics={"best": False})
    metrics = http.get(f"/jobs/{job_id}/metrics").json()
    assert metrics["latest"] == {"train": {"loss": 0.9}, "val": {"auroc": 0.6}}


def test_the_latest_query_ranks_a_searchs_best_trial_on_both_databases(
    db_session: Session, db_tenant_id: int
) -> None:
    """The latest-values query itself, on PostgreSQL and SQLite (its JSON test differs by
    dialect): the trial marked best wins over one that reported later, at its highest epoch;
    a trial marked not best, or a row without the key, changes nothing."""
    from service.api.routes.jobs import _LATEST

    job_id = queue.submit(db_session, db_tenant_id, {"method": "bird"}).id
    queue.record_metrics(
        db_session,
        job_id,
        [
            {"split": "val", "name": "auroc", "value": 0.5, "epoch": 1, "trial": 0},
            {"split": "val", "name": "auroc", "value": 0.6, "epoch": 2, "trial": 0},
            {"split": "val", "name": "auroc", "value": 0.9, "epoch": 1, "trial": 1},
        ],
    )

    def latest() -> list[tuple[str, str, float]]:
        params = {"job_id": job_id, "tenant_id": db_tenant_id}
        return [tuple(row) for row in db_session.connection().execute(_LATEST, params)]

    assert latest() == [("val", "auroc", 0.9)]  # no trial is best yet: the last reporter
    queue.upsert_trial(db_session, job_id, 0, state="running", metrics={"auroc": 0.6})
    queue.upsert_trial(db_session, job_id, 1, state="early_stopped", metrics={"best": False})
    assert latest() == [("val", "auroc", 0.9)]
    queue.upsert_trial(db_session, job_id, 0, state="completed", metrics={"best": True})
    assert latest() == [("val", "auroc", 0.6)]


@contextmanager
def statements_on(engine: Engine) -> Iterator[list[tuple[str, bool]]]:
    """(SQL, sent in autocommit mode) for each statement ``engine`` sends in the block."""
    sent: list[tuple[str, bool]] = []

    def record(conn, _cursor, statement, _params, _context, _many) -> None:
        sent.append((statement, conn.connection.dbapi_connection.autocommit))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_reads_send_their_queries_and_nothing_else(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    with live_api.session() as session:
        queue.record_metrics(session, job_id, [{"split": "val", "name": "auroc", "value": 0.5}])
    # The key (one query, tenant included), then the endpoint's own queries; all outside any
    # transaction (autocommit: no BEGIN, no ROLLBACK round trips).
    expected = {f"/jobs/{job_id}": 2, f"/jobs/{job_id}/metrics": 3, "/jobs/999999/metrics": 2}
    for path, count in expected.items():
        with statements_on(live_api.engine) as sent:
            response = http.get(path)
        assert response.status_code == (404 if "999999" in path else 200), response.text
        assert len(sent) == count, (path, [sql for sql, _ in sent])
        assert all(autocommit for _, autocommit in sent), (path, sent)
    with statements_on(live_api.engine) as sent:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert sent[0][1] and "api_keys" in sent[0][0]  # the key: a read, like any other
    assert sent[1:] and not any(autocommit for _, autocommit in sent[1:])  # the write: one txn


def test_trials_events_and_logs(live_api: LiveAPI, http: httpx.Client, tiny_dataset: str) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    assert http.get(f"/jobs/{job_id}/trials").json() == []
    with live_api.session() as session:
        queue.upsert_trial(
            session, job_id, 1, state="running", params={"phi_lr": 10.0}, metrics={"auroc": 0.5}
        )
        queue.upsert_trial(
            session, job_id, 0, state="done", params={"phi_lr": 1.0},
            metrics={"auroc": math.nan},
            checkpoint_uri=live_api.store.uri(f"jobs/{job_id}/trials/0/checkpoints/best.tar"),
        )  # fmt: skip
        for index in range(3):
            queue.append_log(session, job_id, "info", f"line {index}")
    trials = http.get(f"/jobs/{job_id}/trials").json()
    assert trials == [
        {
            "trial_index": 0,
            "params": {"phi_lr": 1.0},
            "metrics": {"auroc": None},
            "state": "done",
            # By its key: the deployment's bucket and prefix are not the tenant's.
            "checkpoint_uri": f"jobs/{job_id}/trials/0/checkpoints/best.tar",
        },
        {
            "trial_index": 1,
            "params": {"phi_lr": 10.0},
            "metrics": {"auroc": 0.5},
            "state": "running",
            "checkpoint_uri": None,
        },
    ]

    http.post(f"/jobs/{job_id}/cancel")
    events = http.get(f"/jobs/{job_id}/events").json()
    assert [(e["from_state"], e["to_state"], e["transition"]) for e in events] == [
        (None, "queued", "submit"),
        ("queued", "cancelled", "cancel"),
    ]
    assert set(events[0]) == {
        "id",
        "at",
        "from_state",
        "to_state",
        "transition",
        "message",
        "worker",
    }

    logs = http.get(f"/jobs/{job_id}/logs").json()
    assert [line["message"] for line in logs["items"]] == ["line 0", "line 1", "line 2"]
    assert logs["items"][0]["level"] == "info"
    assert logs["next_since"] == logs["items"][-1]["id"]
    tail = http.get(f"/jobs/{job_id}/logs", params={"since": logs["items"][0]["id"]}).json()
    assert [line["message"] for line in tail["items"]] == ["line 1", "line 2"]
    none = http.get(f"/jobs/{job_id}/logs", params={"since": logs["next_since"]}).json()
    assert none == {"items": [], "next_since": logs["next_since"]}


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoints_on_s3_redirect_to_presigned_urls(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    assert http.get(f"/jobs/{job_id}/checkpoints").json() == []
    best = publish_checkpoint(live_api, job_id, "best")
    last = publish_checkpoint(live_api, job_id, "last")

    listing = http.get(f"/jobs/{job_id}/checkpoints").json()
    assert [c["name"] for c in listing] == ["best", "last"]
    record = listing[0]
    assert record["size"] == len(best)
    assert record["sha256"] == hashlib.sha256(best).hexdigest()
    # By its key, not the deployment's s3://bucket/prefix (the presigned url has to name them).
    assert record["uri"] == f"jobs/{job_id}/checkpoints/best.tar"
    assert record["url"].startswith(live_api.settings.s3_endpoint_url)
    assert "Signature=" in record["url"] or "X-Amz-Signature=" in record["url"]
    # The presigned URL works without any bird key.
    assert httpx.get(record["url"]).content == best

    redirect = http.get(f"/jobs/{job_id}/checkpoints/last", follow_redirects=False)
    assert redirect.status_code == 307
    assert redirect.headers["x-bird-sha256"] == hashlib.sha256(last).hexdigest()
    location = redirect.headers["location"]
    assert location.startswith(live_api.settings.s3_endpoint_url)
    downloaded = httpx.get(location)
    assert downloaded.status_code == 200
    assert downloaded.content == last

    missing = http.get(f"/jobs/{job_id}/checkpoints/nope")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        f"job {job_id} has no checkpoint named 'nope' (it has: best, last)"
    )
    # /files serves local stores only.
    files = http.get(f"/files/jobs/{job_id}/checkpoints/best.tar")
    assert files.status_code == 404
    assert "local object store only" in files.json()["detail"]


def test_a_job_without_checkpoints_says_whether_one_may_still_come(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str, tmp_path: Path
) -> None:
    job_id = submit(http, tiny_dataset)["id"]
    missing = http.get(f"/jobs/{job_id}/checkpoints/best")
    assert missing.status_code == 404
    assert missing.json()["detail"].endswith("(it has: none yet)")
    claim_job(live_api, job_id)
    with live_api.session() as session:
        queue.fail(session, job_id, "w1", "the dataset is gone")
    missing = http.get(f"/jobs/{job_id}/checkpoints/best")
    assert missing.status_code == 404
    assert missing.json()["detail"].endswith("(it has: none)")
    # The client's download says the same before it downloads anything.
    from service.client import BirdAPIError, BirdClient

    with (
        BirdClient(live_api.base_url, live_api.api_key) as client,
        pytest.raises(BirdAPIError, match=r"\(it has: none\)$"),
    ):
        client.download_checkpoint(job_id, "best", tmp_path)


def test_checkpoints_on_a_local_store_are_served_by_the_api(
    live_api_local: LiveAPI, tiny_dataset_local: str
) -> None:
    api = live_api_local
    with httpx.Client(base_url=api.base_url, headers=api.headers()) as http:
        job_id = submit(http, tiny_dataset_local)["id"]
        data = publish_checkpoint(api, job_id, "best")

        [record] = http.get(f"/jobs/{job_id}/checkpoints").json()
        assert record["url"] == f"{api.base_url}/files/jobs/{job_id}/checkpoints/best.tar"
        # By its key: the server's directories stay its own.
        assert record["uri"] == f"jobs/{job_id}/checkpoints/best.tar"
        assert str(api.store.root) not in json.dumps(record)
        via_files = http.get(record["url"])
        assert via_files.status_code == 200
        assert via_files.content == data

        direct = http.get(f"/jobs/{job_id}/checkpoints/best")
        assert direct.status_code == 200
        assert direct.content == data
        assert direct.headers["content-type"] == "application/x-tar"
        assert direct.headers["x-bird-sha256"] == record["sha256"]
        assert 'filename="best.tar"' in direct.headers["content-disposition"]

        # The file route needs the key, and only serves this tenant's job files.
        assert httpx.get(record["url"]).status_code == 401
        stranger = api.headers(api.new_key().key)
        assert http.get(record["url"], headers=stranger).status_code == 404
        for key in (
            "shared/datasets/tiny/manifest.json",
            f"jobs/{job_id}/nothing-here",
            f"jobs/{job_id}/../../shared/datasets/tiny/manifest.json",
            "jobs/x/checkpoints/best.tar",
        ):
            assert http.get(f"/files/{key}").status_code == 404, key

        # A record whose archive went missing is a clear 404, not a 500.
        (api.store.root / "jobs" / str(job_id) / "checkpoints" / "best.tar").unlink()
        gone = http.get(f"/jobs/{job_id}/checkpoints/best")
        assert gone.status_code == 404
        assert "not in the store" in gone.json()["detail"]


# --- readiness ------------------------------------------------------------------------------


def test_readyz_is_503_when_the_store_is_unreachable(live_api: LiveAPI) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead_store = S3Store(
        "bucket", endpoint_url=f"http://127.0.0.1:{closed_port}",
        access_key_id="testing", secret_access_key="testing",
    )  # fmt: skip
    app = create_app(live_api.settings, engine=live_api.engine, store=dead_store)
    with serve(app) as base_url:
        started = time.monotonic()
        response = httpx.get(f"{base_url}/readyz", timeout=30)
        elapsed = time.monotonic() - started
        assert httpx.get(f"{base_url}/healthz").status_code == 200
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["store"] != "ok"
    assert elapsed < 10


# --- dropped database connections -----------------------------------------------------------


@pytest.fixture
def own_engines_api(pg_url: URL, tmp_path: Path) -> Iterator[tuple[str, str, str, Engine]]:
    """The API with the engines it makes itself (as deployed), on a fresh schema.

    Yields its base URL, an API key, the ``application_name`` its connections carry (to find
    them in ``pg_stat_activity``) and an engine for the test's own use.
    """
    name = f"bird-test-{uuid.uuid4().hex[:12]}"
    url = pg_url.update_query_dict({"application_name": name})
    settings = Settings(
        data_dir=tmp_path,
        database_url=url.render_as_string(hide_password=False),
        store_url=str(tmp_path / "store"),
    )
    helper = make_engine(pg_url)
    with session_factory(helper)() as session:
        key = create_key(session, "dropped").key
    try:
        with serve(create_app(settings)) as base_url:
            yield base_url, key, name, helper
    finally:
        helper.dispose()


def test_requests_survive_the_database_dropping_pooled_connections(
    own_engines_api: tuple[str, str, str, Engine],
) -> None:
    base_url, key, name, helper = own_engines_api
    with session_factory(helper)() as session:
        tenant_id = session.scalar(text("SELECT id FROM tenants WHERE name = 'dropped'"))
        jobs = [queue.submit(session, tenant_id, {"dataset": {"uri": "d"}}).id for _ in range(3)]

    def get(path: str) -> int:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as c:
            return c.get(path).status_code

    def cancel(job_id: int) -> int:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as c:
            return c.post(f"/jobs/{job_id}/cancel").status_code

    paths = [f"/jobs/{jobs[0]}", f"/jobs/{jobs[0]}/metrics", "/jobs"] * 8
    with ThreadPoolExecutor(8) as pool:  # several pooled connections of each kind
        assert set(pool.map(get, paths)) == {200}
    assert cancel(jobs[0]) == 200

    # What a database restart or an idle-session timeout does to every pooled connection.
    with helper.connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                "FROM pg_stat_activity WHERE application_name = :name"
            ),
            {"name": name},
        ).scalar()
    assert killed >= 2

    # No request sees the dead connections: each is found closed at checkout and replaced.
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, paths)) == {200}
    assert [cancel(jobs[1]), cancel(jobs[2])] == [200, 200]


def test_publish_tiny_dataset_is_a_valid_dataset(live_api: LiveAPI) -> None:
    from bird_datasets.validation import validate_dataset

    prefix = publish_tiny_dataset(live_api.store, "datasets/check")
    assert validate_dataset(live_api.store, prefix).ok


def test_root_redirects_to_the_dashboard_when_it_is_installed(live_api: LiveAPI) -> None:
    from service.api.app import DASHBOARD_DIR

    with httpx.Client(base_url=live_api.base_url) as client:
        root = client.get("/", follow_redirects=False)
        if DASHBOARD_DIR.is_dir():
            assert root.status_code == 307
            assert root.headers["location"] == "/ui/"
            page = client.get("/ui/")
            assert page.status_code == 200
            assert "text/html" in page.headers["content-type"]
        else:
            assert root.status_code == 404
        # The dashboard is not part of the API's schema; the API's own paths are.
        paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/jobs" in paths and "/files/{key}" in paths
    assert client_docs_ok(live_api.base_url)


def client_docs_ok(base_url: str) -> bool:
    """/docs is FastAPI's Swagger UI, served without a key."""
    response = httpx.get(f"{base_url}/docs")
    return response.status_code == 200 and "swagger" in response.text.lower()
