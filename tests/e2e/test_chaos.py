"""No job can wedge a worker: faults and cancels in each stage, over HTTP, with real workers.

The CI part of the chaos matrix (``bench/chaos.py`` runs the whole matrix and prints it): the
real app on PostgreSQL and the moto S3 server, workers in threads of this process on the
session's Ray cluster (heartbeat every second). Every case checks that the job reaches a
terminal state within its bound, that no metric row is repeated, and that the cluster is free
again afterwards (no placement group or actor left holding a CPU), so the worker that ran the
case is not wedged. Also covered elsewhere: a cancel while training and a worker SIGKILLed
while training (``test_jobs_e2e.py``); a search on the embedded default, a search cancelled
while tuning, a cancel while queued and a request for 64 workers (``test_embedded.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from bird_datasets.location import tenant_prefix
from service import queue
from service.client import BirdClient
from service.models import Job
from service.storage import join_key
from tests.e2e.conftest import E2E_DATASET, job_spec, running_worker
from tests.integration.api_fixtures import LiveAPI
from tests.integration.train_fixtures import TrainData, copy_dataset_and_features
from tests.ray_checks import wait_for_free_cpus
from workers.features import MANIFEST_NAME, find_features
from workers.pipeline import SLOW_STAGE_ENV

TERMINAL = {"succeeded", "failed", "cancelled"}
HEARTBEAT_S = 1
# A cancel outside a Ray run: seen at the next heartbeat, acted on within a poll.
CANCEL_BOUND_S = HEARTBEAT_S + 5
MATRIX: list[tuple[str, str, float]] = []


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    yield
    print("\nchaos (CI part): case | terminal state | seconds to reach it")
    for case, state, seconds in MATRIX:
        print(f"  {case:<58} {state:<10} {seconds:6.1f}")


def _wait(client: BirdClient, job_id: int, states: set[str], timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(job_id)
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, (job, client.logs(job_id)["items"][-10:])
        time.sleep(0.2)


def _wait_stage(client: BirdClient, job_id: int, stage: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(job_id)
        if job["stage"] == stage and job["state"] == "running":
            return
        assert job["state"] not in TERMINAL, job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def _cancel_and_time(api: LiveAPI, client: BirdClient, job_id: int, case: str) -> dict:
    asked = time.monotonic()
    response = httpx.post(f"{api.base_url}/jobs/{job_id}/cancel", headers=api.headers())
    assert response.status_code in (200, 202), response.text
    job = _wait(client, job_id, TERMINAL, timeout_s=120)
    seconds = time.monotonic() - asked
    MATRIX.append((case, job["state"], seconds))
    return job | {"seconds": seconds}


def _assert_cluster_free(timeout_s: float = 60) -> None:
    """Every CPU of the session's cluster is free again: no run, placement group or actor of
    the case holds one."""
    wait_for_free_cpus(timeout_s)


def _val_epochs(client: BirdClient, job_id: int) -> list[tuple[int | None, int]]:
    series = client.metrics(job_id)["series"]
    return sorted(
        (p["trial"], p["epoch"]) for p in series if p["split"] == "val" and p["name"] == "objective"
    )


def _messages(client: BirdClient, job_id: int) -> list[str]:
    return [line["message"] for line in client.logs(job_id)["items"]]


def test_waiting_for_resources_is_visible_cancellable_and_bounded_and_never_is_refused(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str
) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    client = BirdClient(live_api.base_url, live_api.api_key)
    # Another tenant's run holds the whole cluster.
    busy = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(busy.ready(), timeout=60)
    try:
        with running_worker(live_api, heartbeat_s=HEARTBEAT_S):
            job_id = client.submit(job_spec(epochs=1))["id"]
            _wait_stage(client, job_id, "waiting_for_resources")
            assert any(
                m.startswith("waiting up to 600 s for room") for m in _messages(client, job_id)
            )
            job = _cancel_and_time(live_api, client, job_id, "cancel while waiting for resources")
            assert job["state"] == "cancelled" and job["seconds"] <= CANCEL_BOUND_S, job

            # A request the cluster can never hold fails at once, whatever is free right now.
            spec = job_spec(epochs=1)
            spec["resources"] = {"workers": 64, "cpus_per_worker": 1}
            submitted = time.monotonic()
            job_id = client.submit(spec)["id"]
            job = _wait(client, job_id, TERMINAL, timeout_s=60)
            MATRIX.append(
                ("64 workers on a 2-CPU cluster", job["state"], time.monotonic() - submitted)
            )
            assert job["state"] == "failed" and job["attempts"] == 1, job
            assert "64 workers × 1 CPU" in job["error"] and "2 CPUs" in job["error"], job["error"]
            assert job["stage"] is None, job  # it failed before any stage began

        # The wait is bounded (resource_wait_s): past it the job fails, saying what was free.
        with running_worker(live_api, heartbeat_s=HEARTBEAT_S, resource_wait_s=2):
            submitted = time.monotonic()
            job_id = client.submit(job_spec(epochs=1))["id"]
            job = _wait(client, job_id, TERMINAL, timeout_s=120)
            seconds = time.monotonic() - submitted
            MATRIX.append(("no room within resource_wait_s = 2 s", job["state"], seconds))
            assert job["state"] == "failed" and job["attempts"] == 1, job
            assert job["error"].startswith("waited 2 s for room for 1 worker × 0.5 CPU"), job
    finally:
        remove_placement_group(busy)
    _assert_cluster_free()


def test_cancel_while_precomputing_a_corrupt_cache_again(
    live_api_local: LiveAPI, fm_features: TrainData, ray_local: str
) -> None:
    """A flipped byte in a cached feature shard: the job invalidates the cache and computes it
    again (self-healing) in a Ray task; a cancel meanwhile kills that task and frees its lock."""
    api = live_api_local
    store = api.store
    copy_dataset_and_features(fm_features, store, E2E_DATASET)
    shard = fm_features.features.shards[0]
    data = bytearray(store.get_bytes(shard))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(shard, bytes(data))

    client = BirdClient(api.base_url, api.api_key)
    with running_worker(api, heartbeat_s=HEARTBEAT_S):
        job_id = client.submit(job_spec(epochs=1))["id"]
        deadline = time.monotonic() + 120
        while not any(m == "computing the teacher's features" for m in _messages(client, job_id)):
            assert time.monotonic() < deadline, _messages(client, job_id)
            time.sleep(0.1)
        assert client.get_job(job_id)["stage"] == "precomputing"
        messages = _messages(client, job_id)
        assert any("cached teacher features are corrupt" in m for m in messages), messages
        job = _cancel_and_time(api, client, job_id, "cancel while precomputing (corrupt cache)")
    assert job["state"] == "cancelled" and job["seconds"] <= CANCEL_BOUND_S, job
    # The corrupt set was invalidated (its manifest is gone) and the precompute's lock freed.
    prefix = fm_features.features.prefix
    assert not store.exists(join_key(prefix, MANIFEST_NAME))
    assert find_features(store, fm_features.features.key) is None
    assert not store.exists(join_key(prefix, ".lock"))
    _assert_cluster_free()


def test_cancel_while_evaluating(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = BirdClient(live_api.base_url, live_api.api_key)
    # Evaluating a tiny test split is over in a moment; here it takes 60 s more.
    monkeypatch.setenv(SLOW_STAGE_ENV, "evaluating=60")
    with running_worker(live_api, heartbeat_s=HEARTBEAT_S):
        job_id = client.submit(job_spec(epochs=1))["id"]
        _wait_stage(client, job_id, "evaluating")
        job = _cancel_and_time(live_api, client, job_id, "cancel while evaluating")
    assert job["state"] == "cancelled" and job["seconds"] <= CANCEL_BOUND_S, job
    assert _val_epochs(client, job_id) == [(None, 1)]
    assert not live_api.store.exists(f"jobs/{job_id}/result.json")
    _assert_cluster_free()


EPOCHS_AFTER_LEASE_LOSS = 5


def test_a_worker_that_lost_its_lease_stops_its_run_and_the_next_attempt_resumes(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str
) -> None:
    """Mid-training, the worker's lease is taken away: its expiry moved into the past and the
    reaper run (as if its heartbeats had stalled and another worker had reaped it). The
    worker's next heartbeat finds the lease lost: it kills its Ray run (whose writes the
    database now refuses) and reports nothing; the requeued job's next attempt (here by the
    same worker, free again at once) resumes from the last checkpoint."""
    client = BirdClient(live_api.base_url, live_api.api_key)
    # Epochs enough that the killed attempt cannot have finished them all before its worker
    # next heartbeats, however loaded the machine: the next attempt has epochs left to resume.
    job_id = client.submit(job_spec(epochs=EPOCHS_AFTER_LEASE_LOSS, batch_size=16))["id"]
    with running_worker(live_api, heartbeat_s=HEARTBEAT_S) as worker:
        deadline = time.monotonic() + 240
        while not _val_epochs(client, job_id):
            assert time.monotonic() < deadline, client.get_job(job_id)
            time.sleep(0.2)
        with live_api.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_expires_at=datetime.now(timezone.utc) - timedelta(minutes=10))
            )
            session.commit()
            assert queue.reap(session) == [job_id]
        taken = time.monotonic()
        job = _wait(client, job_id, TERMINAL, timeout_s=300)
        seconds = time.monotonic() - taken
    MATRIX.append(("lease lost while training (fenced), resumed", job["state"], seconds))
    messages = _messages(client, job_id)
    assert job["state"] == "succeeded", (job, messages)
    assert job["attempts"] == 2
    assert f"attempt 2 on worker {worker.worker_id}" in messages
    assert any(m.startswith("resumed from the checkpoint after epoch") for m in messages), messages
    # Every epoch once: the stale attempt wrote nothing after the new one took over.
    assert _val_epochs(client, job_id) == [
        (None, epoch) for epoch in range(1, EPOCHS_AFTER_LEASE_LOSS + 1)
    ]
    transitions = [e["transition"] for e in client.events(job_id)]
    assert transitions.count("claim") == 2 and "reap_requeue" in transitions, transitions
    assert transitions[-1] == "finish"
    _assert_cluster_free()


def test_an_input_error_inside_a_ray_run_fails_once_with_one_line(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str
) -> None:
    """BIRD's head-only virtual step needs a student with an embedding layer; the training loop
    finds out inside Ray. Queued straight into the database (a check at submit may refuse the
    spec one day; this is about the worker)."""
    spec = job_spec(epochs=1)
    spec["student"] = {"model": "small_cnn", "options": {"width": 8, "embed_dim": None}}
    with live_api.session() as session:
        job_id = queue.submit(session, live_api.tenant_id, spec).id
    client = BirdClient(live_api.base_url, live_api.api_key)
    with running_worker(live_api, heartbeat_s=HEARTBEAT_S):
        submitted = time.monotonic()
        job = _wait(client, job_id, TERMINAL, timeout_s=240)
    MATRIX.append(("input error inside the Ray run", job["state"], time.monotonic() - submitted))
    assert job["state"] == "failed" and job["attempts"] == 1, job
    error = job["error"]
    assert error.startswith("bird cannot train this student: bird with virtual_params='head'")
    assert "\n" not in error and "\x1b" not in error and "Traceback" not in error
    # The traceback where the training loop found it is in the job's log, without server paths.
    messages = _messages(client, job_id)
    remote = [m for m in messages if m.startswith("in the Ray run:")]
    assert remote and "check_student" in remote[0], messages
    for report in remote + [m for m in messages if m.startswith("Traceback")]:
        assert "/root/" not in report and "/work/" not in report and "site-packages" not in report
    _assert_cluster_free()


def test_a_corrupt_dataset_part_fails_at_once_naming_the_part(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = live_api.store
    prefix = "datasets/fm-corrupt"
    # A copy of the shared dataset in the tenant's own space, one part corrupted.
    stored_at = join_key(tenant_prefix(live_api.tenant_id), prefix)
    for info in sorted(store.list(E2E_DATASET), key=lambda i: i.key.endswith("manifest.json")):
        data = bytearray(store.get_bytes(info.key))
        if info.key.endswith(".parquet"):
            data[len(data) // 3] ^= 0xFF
            part = info.key.rsplit("/", 1)[1]
        store.put_bytes(stored_at + info.key[len(E2E_DATASET) :], bytes(data))
    spec = job_spec(epochs=1)
    spec["dataset"] = {"uri": prefix}
    client = BirdClient(live_api.base_url, live_api.api_key)
    with running_worker(live_api, heartbeat_s=HEARTBEAT_S):
        submitted = time.monotonic()
        job_id = client.submit(spec)["id"]
        job = _wait(client, job_id, TERMINAL, timeout_s=120)
    MATRIX.append(("corrupt dataset part", job["state"], time.monotonic() - submitted))
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert job["error"].startswith(f"dataset {prefix}: part {part} does not match"), job["error"]
    bucket = live_api.settings.resolved_store_url.split("/")[2]
    assert bucket not in job["error"] and "tenants/" not in job["error"]
    # The job's inputs are at fault, not the server: one warning line in the server's log,
    # no traceback logged as an error (the traceback is in the job's own log).
    about_job = [r for r in caplog.records if f"job {job_id}" in r.getMessage()]
    assert any(
        r.levelname == "WARNING" and "failed on its inputs" in r.getMessage() for r in about_job
    ), [r.getMessage() for r in about_job]
    assert not [r for r in about_job if r.levelno >= logging.ERROR or r.exc_info], about_job
    assert any(m.startswith("Traceback") for m in _messages(client, job_id))


def test_an_s3_endpoint_failure_shows_tenants_no_endpoint_or_bucket(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's store endpoint refuses connections: the raw error names the endpoint URL and
    the bucket. The job's error, events and log show neither; the server's log has both."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    bucket = live_api.settings.resolved_store_url.split("/")[2]
    spec = job_spec(epochs=1) | {"max_attempts": 1}
    client = BirdClient(live_api.base_url, live_api.api_key)
    job_id = client.submit(spec)["id"]
    caplog.set_level(logging.ERROR, logger="bird.worker")
    with running_worker(live_api, heartbeat_s=HEARTBEAT_S, s3_endpoint_url=dead):
        submitted = time.monotonic()
        job = _wait(client, job_id, TERMINAL, timeout_s=180)
    MATRIX.append(
        ("S3 endpoint unreachable (max_attempts 1)", job["state"], time.monotonic() - submitted)
    )
    assert job["state"] == "failed", job
    shown = [job["error"]]
    shown += [e["message"] for e in client.events(job_id)]
    shown += [str(e["worker"]) for e in client.events(job_id)]
    shown += _messages(client, job_id)
    port = dead.rsplit(":", 1)[1]
    for text in shown:
        for leak in (dead, f"127.0.0.1:{port}", bucket, "/root/", "/tmp/"):
            assert leak not in text, (leak, text)
    assert "Could not connect to the endpoint URL" in job["error"], job["error"]
    server_log = caplog.text
    assert dead in server_log and bucket in server_log
