"""``bird worker`` as a deployment runs it: its own process, joined to a Ray cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _wait_for(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until ``text`` is in ``log`` (the output of ``process``, which must keep running)."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_worker_logs_what_it_does_and_stops_cleanly_on_sigterm(ray_local: str, tmp_path: Path):
    """The worker's info lines reach its log (they were dropped: no handler was configured), and
    SIGTERM, what docker stop and Kubernetes send, ends the loop with status 0 (ray.init had
    replaced the worker's handler with one that exits at once, mid-job included)."""
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "BIRD_DATA_DIR": str(tmp_path / "data"),  # SQLite and a local store, migrated at start
        "BIRD_RAY_ADDRESS": ray_local,
        "BIRD_LOG_LEVEL": "info",
        # A State API address left in the shell, of no cluster: the worker's check of its own
        # cluster's State API must not ask it (Ray's client prefers it to its argument).
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(log, "polling for jobs", process)
        process.send_signal(signal.SIGTERM)  # the process alone, as a container runtime does
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert status == 0, text[-3000:]
    assert " INFO bird.worker: worker worker-" in text, text[-3000:]
    assert "ran 0 job(s)" in text, text[-3000:]
    assert "SIGTERM received" not in text, text[-3000:]


def test_worker_refuses_a_ray_cluster_without_its_state_api(tmp_path: Path) -> None:
    """A head started with --include-dashboard=false has no State API, and Ray Train then never
    frees the CPUs of a search's ended trials: the search hung after its first trial with
    nothing in any log. The worker refuses such a cluster at start, saying how to start it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head_log = tmp_path / "head.log"
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=head_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for(head_log, "Ray runtime started", head)
        worker = subprocess.run(
            [sys.executable, "-m", "cli", "worker"],
            env={
                **env,
                "BIRD_DATA_DIR": str(tmp_path / "data"),
                "BIRD_RAY_ADDRESS": f"127.0.0.1:{port}",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
    assert worker.returncode == 1, worker.stderr[-3000:]
    error = worker.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"error: the Ray cluster at 127.0.0.1:{port} runs without its dashboard"
    )
    assert "--include-dashboard=true" in error and "search" in error, error
    assert "Traceback" not in worker.stderr, worker.stderr[-3000:]
    assert "polling for jobs" not in worker.stderr
