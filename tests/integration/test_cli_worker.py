"""``bird worker`` as a deployment runs it: its own process, joined to a Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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
        deadline = time.monotonic() + 120
        while "polling for jobs" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
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
