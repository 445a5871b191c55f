"""Jobs end to end: real HTTP to the real app, real workers, local Ray, PostgreSQL, moto S3.

The worker is ``workers.runner.Worker`` — in a thread of the test process for the happy path
and the cancellation, and as separate ``bird worker`` processes for the SIGKILL test (the
processes join the test session's Ray as drivers, as workers of a deployment join its cluster).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bird_core.checkpoint import load_student
from bird_core.train import evaluate
from service.client import BirdClient
from tests.integration.api_fixtures import LiveAPI
from workers.runner import Worker

DATASET = "datasets/fm-e2e"
SIZES = {"train_size": 400, "test_size": 100, "val_fraction": 0.005, "seed": 5}


def _spec(**training: Any) -> dict[str, Any]:
    return {
        "dataset": {"uri": DATASET},
        "teacher": {"image_size": 32, "probe_epochs": 3},
        "student": {"model": "small_cnn", "options": {"width": 8, "embed_dim": 32}},
        "method": {"name": "bird"},
        "training": {"epochs": 2, "batch_size": 32, **training},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
    }


@pytest.fixture(scope="module")
def e2e_dataset(_api_s3_server: Any, ray_local: str) -> Any:
    """FashionMNIST-S (tiny) in the API's bucket; returns its bird_core splits."""
    from workers.converters import prepare_fashion_mnist_s
    from workers.datasets import load_splits

    prepare_fashion_mnist_s(_api_s3_server.store, DATASET, **SIZES)
    return load_splits(_api_s3_server.store, DATASET)


@pytest.fixture
def worker_thread(live_api: LiveAPI, ray_local: str) -> Iterator[Worker]:
    """A worker polling the API's database in a thread of this process."""
    worker = Worker(live_api.settings, engine=live_api.engine, store=live_api.store, poll_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    yield worker
    stop.set()
    thread.join(timeout=120)


def _wait(client: BirdClient, job_id: int, states: set[str], timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states}: {client.get_job(job_id)}")


def _epochs(client: BirdClient, job_id: int) -> list[int]:
    series = client.metrics(job_id)["series"]
    return sorted(
        p["epoch"]
        for p in series
        if p["split"] == "val" and p["name"] == "objective" and p["trial"] is None
    )


def test_a_bird_job_goes_from_post_to_a_checkpoint_that_reproduces_its_metrics(
    live_api: LiveAPI, e2e_dataset: Any, worker_thread: Worker, tmp_path: Path
) -> None:
    client = BirdClient(live_api.base_url, live_api.api_key)
    response = httpx.post(f"{live_api.base_url}/jobs", json=_spec(), headers=live_api.headers())
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    job = _wait(client, job_id, {"succeeded", "failed", "cancelled"})
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0

    metrics = client.metrics(job_id)
    assert _epochs(client, job_id) == [1, 2]  # per epoch, each once
    val_epochs = {p["epoch"] for p in metrics["series"] if p["split"] == "val"}
    assert val_epochs == {1, 2}
    assert {"loss", "ce", "kd", "fair"} <= {
        p["name"] for p in metrics["series"] if p["split"] == "train"
    }
    reported_test = metrics["latest"]["test"]
    assert metrics["groups"]["test"], "the per-group table of the test split is served"

    stages = [e["message"] for e in client.events(job_id)]
    for stage in ("precomputing", "training", "evaluating", "uploading"):
        assert any(stage in message for message in stages), stages

    # Download through the presigned URL (307 from the API), check sha256, load, evaluate.
    checkpoints = {c["name"]: c for c in client.checkpoints(job_id)}
    assert {"best", "last"} <= set(checkpoints)
    redirect = httpx.get(
        f"{live_api.base_url}/jobs/{job_id}/checkpoints/best", headers=live_api.headers()
    )
    assert redirect.status_code == 307
    directory = client.download_checkpoint(job_id, "best", tmp_path)
    student = load_student(directory)
    test = evaluate(student.model, student.preprocess, e2e_dataset.test, e2e_dataset.task)
    for name in ("auroc", "f1", "accuracy", "delta_mean_deo"):
        assert test[name] == pytest.approx(reported_test[name], abs=1e-6), name


def test_cancelling_a_running_job_stops_it_with_a_final_checkpoint(
    live_api: LiveAPI, e2e_dataset: Any, worker_thread: Worker
) -> None:
    client = BirdClient(live_api.base_url, live_api.api_key)
    # Long enough that it is still training when the cancel arrives.
    job_id = client.submit(_spec(epochs=30, batch_size=4))["id"]
    deadline = time.monotonic() + 240
    while not _epochs(client, job_id):
        assert time.monotonic() < deadline, client.get_job(job_id)
        time.sleep(0.3)
    response = httpx.post(f"{live_api.base_url}/jobs/{job_id}/cancel", headers=live_api.headers())
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "cancelling"

    job = _wait(client, job_id, {"cancelled", "succeeded", "failed"}, timeout_s=60)
    assert job["state"] == "cancelled", job
    assert len(_epochs(client, job_id)) < 30
    # The training loop wrote a final checkpoint when it stopped.
    names = {c["name"] for c in client.checkpoints(job_id)}
    assert "last" in names
    transitions = [e["transition"] for e in client.events(job_id)]
    assert transitions[-1] in ("finish_cancelled", "cancel", "finish"), transitions


def _worker_process(live_api: LiveAPI, ray_address: str, log: Path) -> subprocess.Popen:
    settings = live_api.settings
    env = {
        **os.environ,
        "BIRD_DATABASE_URL": settings.resolved_database_url,
        "BIRD_STORE_URL": settings.resolved_store_url,
        "BIRD_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "BIRD_S3_ACCESS_KEY_ID": settings.s3_access_key_id.get_secret_value(),  # type: ignore[union-attr]
        "BIRD_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get_secret_value(),  # type: ignore[union-attr]
        "BIRD_RAY_ADDRESS": ray_address,
        "BIRD_LEASE_S": "5",
        "BIRD_HEARTBEAT_S": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_worker_killed_mid_job_loses_its_lease_and_another_resumes_the_job(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str, tmp_path: Path
) -> None:
    """Two `bird worker` processes, each joining the `ray start --head` cluster on its own."""
    client = BirdClient(live_api.base_url, live_api.api_key)
    job_id = client.submit(_spec(epochs=3, batch_size=8))["id"]
    first = _worker_process(live_api, ray_local, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while not _epochs(client, job_id):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, client.get_job(job_id)
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the worker and anything it started
        first.wait(timeout=30)
        killed_at_epochs = _epochs(client, job_id)
        assert 1 <= len(killed_at_epochs) < 3
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    second = _worker_process(live_api, ray_local, tmp_path / "second.log")
    try:
        job = _wait(client, job_id, {"succeeded", "failed", "cancelled"}, timeout_s=300)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text()[-3000:]
    assert job["state"] == "succeeded", (job, log)
    assert job["attempts"] == 2
    # Every epoch once, and the second attempt restored the first one's last checkpoint
    # instead of starting over.
    assert _epochs(client, job_id) == [1, 2, 3]
    logs = [line["message"] for line in client.logs(job_id)["items"]]
    resumed = [m for m in logs if m.startswith("resumed from the checkpoint after epoch")]
    assert resumed, logs
    assert int(resumed[0].rsplit(" ", 1)[-1]) >= killed_at_epochs[-1]
    transitions = [e["transition"] for e in client.events(job_id)]
    assert "reap_requeue" in transitions and transitions.count("claim") == 2, transitions
