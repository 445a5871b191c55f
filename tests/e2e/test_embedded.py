"""The embedded default as a user runs it: `bird serve` with SQLite, a local store and its own
local Ray (2 CPUs), driven over HTTP.

The server runs as its own process (`bird serve`, which calls `ray.init`) while the test
session's Ray cluster runs on the same machine: a second Ray instance on the machine is what
made Ray Train's clean-up of the placement groups of trials that Tune stopped ask the wrong
cluster, so that a search hung after its first trial. The cases share the server:

* a 2-trial search asking for 4 at a time (default resources: 1 worker × 1 CPU, so one trial
  at a time fits on 2 CPUs) reaches ``succeeded``: the second trial gets the CPUs the first
  held (what hung);
* a search cancelled while tuning ends ``cancelled`` within the stated bound and keeps the
  best checkpoint so far, and leaves every CPU free (a training on the whole cluster runs
  next); a job queued behind it is cancelled at once;
* a request for 64 workers fails at once with what the cluster has, and the worker goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.storage import LocalStore
from tests.e2e.conftest import E2E_DATASET, job_spec
from tests.integration.train_fixtures import TrainData, copy_dataset_and_features

# The bound on cancelling a running job that the worker sees at its next heartbeat (1 s here):
# heartbeat + stop grace (the default 15 s for a Ray run to stop on its own) + a few seconds to
# kill and clean up. The test states it; the times measured are printed.
CANCEL_BOUND_S = 1 + 15 + 10
TERMINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Embedded:
    """A running `bird serve` and a client for it."""

    process: subprocess.Popen
    base_url: str
    key: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return httpx.post(self.base_url + path, json=body, headers=self.headers(), timeout=30)

    def get(self, path: str) -> Any:
        response = httpx.get(self.base_url + path, headers=self.headers(), timeout=30)
        response.raise_for_status()
        return response.json()

    def wait(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(f"/jobs/{job_id}")
            if job["state"] in states:
                return job
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, (job, self.tail())
            time.sleep(0.3)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def embedded(
    fm_features: TrainData, ray_local: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Embedded]:
    """`bird serve` on a fresh data directory holding the session's dataset (shared) and
    features."""
    data_dir = tmp_path_factory.mktemp("embedded")
    # The dataset is shared operator data (every tenant, the embedded one too, names it).
    copy_dataset_and_features(fm_features, LocalStore(data_dir / "store"), E2E_DATASET)
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        # As a user runs it: no Ray address, and Ray's token authentication on (its default;
        # the session's cluster turns it off, and a check that sent no token passed here
        # while `make run` failed).
        if not key.startswith(("BIRD_", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"))
    }
    env.update(
        BIRD_DATA_DIR=str(data_dir),
        BIRD_API_PORT=str(port),
        BIRD_HEARTBEAT_S="1",
        BIRD_RESOURCE_WAIT_S="20",
        PYTHONUNBUFFERED="1",
        # Test speed only (as for the session's cluster): Ray Train polls its workers every
        # 2 s by default, and each run starts a preemption watcher a single node never needs.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
    )
    bird = os.path.join(os.path.dirname(sys.executable), "bird")
    log = data_dir / "serve.log"
    process = subprocess.Popen(
        [bird, "serve"],
        env=env,
        cwd=data_dir,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        key = None
        while key is None or not _healthy(port):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                if line.startswith("API key (shown once, keep it): "):
                    key = line.rsplit(" ", 1)[1]
            time.sleep(0.5)
        yield Embedded(process, f"http://127.0.0.1:{port}", key, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _search_spec(epochs: int, samples: int) -> dict[str, Any]:
    return {
        **job_spec(epochs=epochs),
        # Resources as a user leaves them: 1 worker × 1 CPU (a trial takes 1.01 CPUs).
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "search": {
            "space": {"phi_lr": {"kind": "loguniform", "low": 1.0, "high": 1000.0}},
            "num_samples": samples,
            "max_concurrent_trials": 4,
            "grace_period": 1,
        },
    }


def _val_epochs(server: Embedded, job_id: int) -> list[tuple[int | None, int]]:
    series = server.get(f"/jobs/{job_id}/metrics")["series"]
    return sorted(
        (p["trial"], p["epoch"]) for p in series if p["split"] == "val" and p["name"] == "objective"
    )


def _logs(server: Embedded, job_id: int) -> list[str]:
    return [line["message"] for line in server.get(f"/jobs/{job_id}/logs")["items"]]


def test_a_search_on_the_embedded_default_succeeds_with_other_ray_on_the_machine(
    embedded: Embedded, ray_local: str
) -> None:
    import ray

    # Another Ray instance runs on this machine: the session's cluster, joined by this process.
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2.0
    started = time.monotonic()
    job_id = embedded.post("/jobs", _search_spec(epochs=1, samples=2)).json()["id"]
    job = embedded.wait(job_id, TERMINAL, timeout_s=300)
    seconds = time.monotonic() - started
    print(f"\nembedded search: {job['state']} after {seconds:.1f} s")
    assert job["state"] == "succeeded", (job, _logs(embedded, job_id), embedded.tail())
    assert job["attempts"] == 1
    trials = embedded.get(f"/jobs/{job_id}/trials")
    assert [t["trial_index"] for t in trials] == [0, 1]
    # Every trial reported its one epoch exactly once.
    assert _val_epochs(embedded, job_id) == [(0, 1), (1, 1)]
    # The concurrency was fitted to the cluster: 4 asked, one at a time fits in 2 CPUs.
    assert any(
        m.startswith("search: starting Ray Tune with 2 trial(s), 1 at a time, each 1 worker")
        and m.endswith(
            "(1 trial(s) at a time instead of 4: the Ray cluster has 2 CPUs and 0 GPUs "
            "in total (1 node; at most 2 CPUs and 0 GPUs on one))"
        )
        for m in _logs(embedded, job_id)
    ), _logs(embedded, job_id)
    # The log says how the search went and which trial won.
    summary = [m for m in _logs(embedded, job_id) if m.startswith("search: 2 trial(s) (")]
    assert len(summary) == 1 and "best trial" in summary[0] and "phi_lr=" in summary[0], summary
    names = {c["name"] for c in embedded.get(f"/jobs/{job_id}/checkpoints")}
    assert "best" in names
    # The job's latest val (what a poller and the dashboard read) is the best trial's, on SQLite.
    # With one epoch per trial its highest epoch is its best, which its trials row holds.
    (best,) = [t for t in trials if t["metrics"]["best"]]
    latest = embedded.get(f"/jobs/{job_id}/metrics")["latest"]["val"]
    assert {k: latest[k] for k in ("auroc", "delta_mean_deo")} == pytest.approx(
        {k: best["metrics"][k] for k in ("auroc", "delta_mean_deo")}
    ), (latest, trials)


def test_cancelling_a_search_keeps_its_best_checkpoint_and_the_worker_goes_on(
    embedded: Embedded,
) -> None:
    search_id = embedded.post("/jobs", _search_spec(epochs=30, samples=4)).json()["id"]
    queued_id = embedded.post("/jobs", job_spec(epochs=1)).json()["id"]
    response = embedded.post(f"/jobs/{queued_id}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"

    deadline = time.monotonic() + 240
    while not _val_epochs(embedded, search_id):
        assert time.monotonic() < deadline, (embedded.get(f"/jobs/{search_id}"), embedded.tail())
        time.sleep(0.3)
    assert embedded.get(f"/jobs/{search_id}")["stage"] == "tuning"
    # A running trial shows what it samples from its first epoch on, not once it has ended.
    running = [t for t in embedded.get(f"/jobs/{search_id}/trials") if t["state"] == "running"]
    assert running and all(1.0 <= t["params"]["phi_lr"] <= 1000.0 for t in running), running
    asked = time.monotonic()
    response = embedded.post(f"/jobs/{search_id}/cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelling"
    job = embedded.wait(search_id, TERMINAL, timeout_s=120)
    seconds = time.monotonic() - asked
    print(f"\nembedded search cancelled while tuning: {job['state']} after {seconds:.1f} s")
    assert job["state"] == "cancelled", (job, _logs(embedded, search_id))
    assert seconds <= CANCEL_BOUND_S, seconds
    # The best trial's best checkpoint so far became the job's.
    checkpoints = embedded.get(f"/jobs/{search_id}/checkpoints")
    assert "best" in {c["name"] for c in checkpoints}, (checkpoints, _logs(embedded, search_id))
    assert any(m.startswith("search cancelled: kept trial") for m in _logs(embedded, search_id))
    # No epoch twice.
    epochs = _val_epochs(embedded, search_id)
    assert len(epochs) == len(set(epochs))

    # Every CPU is free again: a training that takes the whole cluster (2 workers × 1 CPU)
    # starts at once (BIRD_RESOURCE_WAIT_S=20 here: a trial left holding a CPU fails it).
    whole = job_spec(epochs=1)
    whole["resources"] = {"workers": 2, "cpus_per_worker": 1}
    job_id = embedded.post("/jobs", whole).json()["id"]
    job = embedded.wait(job_id, TERMINAL, timeout_s=240)
    assert job["state"] == "succeeded", (job, _logs(embedded, job_id))
    messages = _logs(embedded, job_id)
    assert not any(m.startswith("waiting up to") for m in messages)
    assert "training: starting Ray Train with 2 workers × 1 CPU (2 CPUs)" in messages, messages

    # The same worker takes the next job: a request the cluster can never hold fails at once.
    infeasible = job_spec(epochs=1)
    infeasible["resources"] = {"workers": 64, "cpus_per_worker": 1}
    submitted = time.monotonic()
    job_id = embedded.post("/jobs", infeasible).json()["id"]
    job = embedded.wait(job_id, TERMINAL, timeout_s=60)
    seconds = time.monotonic() - submitted
    print(f"\nembedded 64-worker request: {job['state']} after {seconds:.1f} s")
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "64 workers" in job["error"] and "2 CPUs" in job["error"], job["error"]
    assert "\n" not in job["error"]
