"""Jobs end to end: real HTTP to the real app, real workers, local Ray, PostgreSQL, moto S3.

The worker is ``workers.runner.Worker`` — in a thread of the test process for the cancellation
and for resuming a job, and as a separate ``bird worker`` process for the one killed with
SIGKILL (the process joins the test session's ``ray start --head`` cluster, as workers of a
deployment join theirs). The happy path,
from the dashboard's form to a loaded checkpoint, is ``test_dashboard_real_worker.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bird_core.checkpoint import load_training_state
from service.client import BirdClient
from tests.e2e.conftest import job_spec, running_worker
from tests.integration.api_fixtures import LiveAPI
from workers.runner import Worker


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


def _steps_of_first_epoch(client: BirdClient, job_id: int) -> int:
    series = client.metrics(job_id)["series"]
    steps = {p["step"] for p in series if p["epoch"] == 1 and p["trial"] is None and p["step"]}
    assert len(steps) == 1, steps
    return steps.pop()


def test_cancelling_a_running_job_stops_it_with_a_final_checkpoint(
    live_api: LiveAPI, e2e_dataset: Any, worker_thread: Worker, tmp_path: Path
) -> None:
    client = BirdClient(live_api.base_url, live_api.api_key)
    # Long enough that it is still training when the cancel arrives.
    job_id = client.submit(job_spec(epochs=30, batch_size=4))["id"]
    deadline = time.monotonic() + 240
    while not _epochs(client, job_id):
        assert time.monotonic() < deadline, client.get_job(job_id)
        time.sleep(0.3)
    response = httpx.post(f"{live_api.base_url}/jobs/{job_id}/cancel", headers=live_api.headers())
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "cancelling"

    job = _wait(client, job_id, {"cancelled", "succeeded", "failed"}, timeout_s=60)
    assert job["state"] == "cancelled", job
    epochs = _epochs(client, job_id)
    assert 1 <= len(epochs) < 30
    # The training loop stopped between two steps of the next epoch and wrote a final
    # checkpoint there: more steps than the reported epochs hold, fewer than one more epoch.
    names = {c["name"] for c in client.checkpoints(job_id)}
    assert "last" in names
    steps_per_epoch = _steps_of_first_epoch(client, job_id)
    final = load_training_state(client.download_checkpoint(job_id, "last", tmp_path))["meta"]
    assert final["epoch"] == len(epochs)
    assert len(epochs) * steps_per_epoch <= final["step"] < (len(epochs) + 1) * steps_per_epoch
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
        [sys.executable, "-m", "cli", "worker"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _claimed_by(client: BirdClient, job_id: int, attempt: int) -> str:
    """The id of the worker that runs ``attempt`` (from its log line "attempt N on worker …")."""
    prefix = f"attempt {attempt} on worker "
    for line in client.logs(job_id)["items"]:
        if line["message"].startswith(prefix):
            return line["message"][len(prefix) :]
    raise AssertionError(f"no log line {prefix!r}: {client.logs(job_id)['items']}")


def _worker_id(log: Path) -> str:
    """The id a `bird worker` process announced in its log ("worker <id> polling for jobs")."""
    for line in log.read_text().splitlines():
        if line.startswith("worker ") and line.endswith(" polling for jobs"):
            return line.split()[1]
    raise AssertionError(f"no worker id in {log}: {log.read_text()[-2000:]}")


def test_a_worker_killed_mid_job_loses_its_lease_and_another_resumes_the_job(
    live_api: LiveAPI, e2e_dataset: Any, ray_local: str, tmp_path: Path
) -> None:
    """A `bird worker` process (joining the `ray start --head` cluster on its own) claims the
    job and is killed with SIGKILL after its first epoch; a second worker, started once the
    first holds the job, reaps the expired lease and resumes the job from its checkpoint."""
    client = BirdClient(live_api.base_url, live_api.api_key)
    job_id = client.submit(job_spec(epochs=3, batch_size=8))["id"]
    first_log = tmp_path / "first.log"
    first = _worker_process(live_api, ray_local, first_log)
    try:
        deadline = time.monotonic() + 240
        while not _epochs(client, job_id):
            assert first.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, client.get_job(job_id)
            time.sleep(0.2)
        assert _claimed_by(client, job_id, 1) == _worker_id(first_log)
        # The second worker runs in this process (it has torch and Ray loaded already) with
        # the same short lease; it waits for the first one's lease to expire.
        with running_worker(live_api, lease_s=5) as second:
            os.killpg(first.pid, signal.SIGKILL)  # the worker and anything it started
            first.wait(timeout=30)
            killed_at_epochs = _epochs(client, job_id)
            assert 1 <= len(killed_at_epochs) < 3
            job = _wait(client, job_id, {"succeeded", "failed", "cancelled"}, timeout_s=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log = [line["message"] for line in client.logs(job_id)["items"]][-20:]
    assert job["state"] == "succeeded", (job, log)
    assert job["attempts"] == 2
    assert _claimed_by(client, job_id, 2) == second.worker_id
    # Every epoch once, and the second attempt restored the first one's last checkpoint
    # instead of starting over.
    assert _epochs(client, job_id) == [1, 2, 3]
    logs = [line["message"] for line in client.logs(job_id)["items"]]
    resumed = [m for m in logs if m.startswith("resumed from the checkpoint after epoch")]
    assert resumed, logs
    assert int(resumed[0].rsplit(" ", 1)[-1]) >= killed_at_epochs[-1]
    transitions = [e["transition"] for e in client.events(job_id)]
    assert "reap_requeue" in transitions and transitions.count("claim") == 2, transitions
