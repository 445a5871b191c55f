"""BirdClient and ``bird jobs`` against the live API (uvicorn, PostgreSQL, S3 on moto)."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bird_core.checkpoint import load_student, save_checkpoint
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from cli.app import app
from service import queue
from service.client import (
    BirdAPIError,
    BirdClient,
    BirdConnectionError,
    ChecksumError,
    format_detail,
)
from tests.integration.api_fixtures import LiveAPI, job_spec, publish_checkpoint


@pytest.fixture
def client(live_api: LiveAPI) -> Iterator[BirdClient]:
    with BirdClient(live_api.base_url, live_api.api_key, timeout=30) as bird:
        yield bird


def run_cli(api: LiveAPI, *args: str, key: str | None = None) -> object:
    """``bird <args>`` in-process, configured through the environment like a user would."""
    env = {"BIRD_URL": api.base_url, "BIRD_API_KEY": key if key is not None else api.api_key}
    return CliRunner().invoke(app, list(args), env=env)


def real_checkpoint_tar(tmp_path: Path) -> tuple[bytes, torch.Tensor, torch.Tensor]:
    """A real student checkpoint (bird_core's format) packed the way the worker publishes it:
    the checkpoint directory's files at the top level of a tar. Also an input and its logits."""
    torch.manual_seed(0)
    model = create_model("mlp", 3, in_features=5, hidden=(8,), embed_dim=4).eval()
    preprocess = Preprocessor.from_config({"kind": "tabular", "mean": [0.0] * 5, "std": [1.0] * 5})
    directory = save_checkpoint(tmp_path / "ckpt", model, preprocess, spec={"task": "multiclass"})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(directory.iterdir()):
            archive.add(path, arcname=path.name)
    x = torch.randn(4, 5)
    with torch.no_grad():
        logits = model(preprocess(x))
    return buffer.getvalue(), x, logits


# --- the client -----------------------------------------------------------------------------


def test_client_covers_the_job_endpoints(
    live_api: LiveAPI, client: BirdClient, tiny_dataset: str
) -> None:
    job = client.submit(job_spec(tiny_dataset), idempotency_key="k1")
    assert job["state"] == "queued"
    assert client.submit(job_spec(tiny_dataset), idempotency_key="k1")["id"] == job["id"]
    assert client.get_job(job["id"]) == job
    assert [j["id"] for j in client.list_jobs(state="queued")["items"]] == [job["id"]]
    assert client.list_jobs(state="running")["total"] == 0
    with live_api.session() as session:
        queue.record_metrics(session, job["id"], [{"split": "val", "name": "auroc", "value": 0.7}])
        queue.append_log(session, job["id"], "warning", "careful")
    metrics = client.metrics(job["id"])
    assert metrics["latest"] == {"val": {"auroc": 0.7}}
    assert client.metrics(job["id"], since=metrics["next_since"])["series"] == []
    assert client.trials(job["id"]) == []
    assert client.logs(job["id"])["items"][0]["message"] == "careful"
    assert client.checkpoints(job["id"]) == []
    assert client.cancel(job["id"])["state"] == "cancelled"
    assert [e["transition"] for e in client.events(job["id"])] == ["submit", "cancel"]
    assert [j["id"] for j in client.iter_jobs(page_size=1)] == [job["id"]]

    with pytest.raises(BirdAPIError) as conflict:
        client.cancel(job["id"])
    assert conflict.value.status == 409
    assert "already cancelled" in conflict.value.detail
    with pytest.raises(BirdAPIError) as missing:
        client.get_job(2**31 - 1)
    assert missing.value.status == 404
    assert str(missing.value) == f"HTTP 404: job {2**31 - 1} not found"
    with pytest.raises(BirdAPIError) as invalid:
        client.submit(job_spec("datasets/none"))
    assert invalid.value.status == 422
    assert format_detail(invalid.value.detail).startswith(
        "dataset.uri: dataset 'datasets/none' does not exist"
    )
    with pytest.raises(BirdAPIError) as conflict:
        client.submit(job_spec(tiny_dataset, seed=5), idempotency_key="k1")
    assert conflict.value.status == 409


def test_client_errors_for_bad_keys_and_unreachable_servers(live_api: LiveAPI) -> None:
    with BirdClient(live_api.base_url, "bird_wrong") as wrong, pytest.raises(BirdAPIError) as err:
        wrong.list_jobs()
    assert err.value.status == 401
    assert err.value.detail == "invalid API key: it is unknown or was revoked"
    assert "bird_wrong" not in repr(wrong)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = BirdClient(f"http://127.0.0.1:{port}", "k", timeout=5)
    with nowhere, pytest.raises(BirdConnectionError, match="cannot reach the bird API"):
        nowhere.list_jobs()


def test_download_checkpoint_from_s3_loads_as_a_student(
    live_api: LiveAPI, client: BirdClient, tiny_dataset: str, tmp_path: Path
) -> None:
    job_id = client.submit(job_spec(tiny_dataset))["id"]
    archive, x, logits = real_checkpoint_tar(tmp_path)
    key = f"jobs/{job_id}/checkpoints/best.tar"
    live_api.store.put_bytes(key, archive)
    with live_api.session() as session:
        queue.add_checkpoint(
            session, job_id, "best", live_api.store.uri(key),
            size=len(archive), sha256=hashlib.sha256(archive).hexdigest(),
        )  # fmt: skip

    out = tmp_path / "models"
    path = client.download_checkpoint(job_id, "best", out)
    assert path == out / "best"
    student = load_student(path)
    with torch.no_grad():
        assert torch.equal(student.model(student.preprocess(x)), logits)
    # Nothing but the checkpoint is left behind (no partial files, no archive).
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    # Downloading again replaces the directory.
    assert client.download_checkpoint(job_id, "best", out, keep_archive=True) == out / "best"
    assert sorted(p.name for p in out.iterdir()) == ["best", "best.tar"]

    with pytest.raises(BirdAPIError, match="no checkpoint named 'worst'"):
        client.download_checkpoint(job_id, "worst", out)


def test_download_detects_tampering(
    live_api: LiveAPI, client: BirdClient, tiny_dataset: str, tmp_path: Path
) -> None:
    job_id = client.submit(job_spec(tiny_dataset))["id"]
    original = publish_checkpoint(live_api, job_id, "best")
    tampered = bytearray(original)
    tampered[600] ^= 0xFF
    live_api.store.put_bytes(f"jobs/{job_id}/checkpoints/best.tar", bytes(tampered))
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="failed verification") as err:
        client.download_checkpoint(job_id, "best", out)
    assert "sha256" in str(err.value) and "discarded" in str(err.value)
    assert list(out.iterdir()) == []

    result = run_cli(live_api, "jobs", "download", str(job_id), "--out", str(out))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint 'best' of job")
    assert "sha256" in lines[0]


def test_download_from_a_local_store(
    live_api_local: LiveAPI, tiny_dataset_local: str, tmp_path: Path
) -> None:
    with BirdClient(live_api_local.base_url, live_api_local.api_key) as bird:
        job_id = bird.submit(job_spec(tiny_dataset_local))["id"]
        files = {"manifest.json": b"{}", "student.safetensors": b"\x00" * 100}
        publish_checkpoint(live_api_local, job_id, "last", files)
        path = bird.download_checkpoint(job_id, "last", tmp_path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


# --- the CLI --------------------------------------------------------------------------------


def test_cli_submit_list_show_cancel(live_api: LiveAPI, tiny_dataset: str, tmp_path: Path) -> None:
    yaml_spec = tmp_path / "spec.yaml"
    yaml_spec.write_text(
        f"dataset:\n  uri: {tiny_dataset}\nmethod:\n  name: bkd\ntraining:\n  epochs: 2\n"
    )
    submitted = run_cli(live_api, "jobs", "submit", str(yaml_spec))
    assert submitted.exit_code == 0, submitted.output
    first_id = int(submitted.stdout.split()[1])
    assert submitted.stdout.startswith(f"job {first_id} queued (method bkd")

    json_spec = tmp_path / "spec.json"
    json_spec.write_text(json.dumps(job_spec(tiny_dataset)))
    as_json = run_cli(live_api, "jobs", "submit", str(json_spec), "--json")
    assert as_json.exit_code == 0, as_json.output
    second_id = json.loads(as_json.stdout)["id"]

    listing = run_cli(live_api, "jobs", "list")
    assert listing.exit_code == 0, listing.output
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "STAGE", "PROGRESS", "METHOD", "DATASET", "CREATED"]
    assert [line.split()[0] for line in lines[1:3]] == [str(second_id), str(first_id)]
    assert lines[-1] == "1-2 of 2 job(s)"

    shown = run_cli(live_api, "jobs", "show", str(first_id))
    assert shown.exit_code == 0, shown.output
    assert "state     queued" in shown.stdout
    assert "attempts  0 of 3" in shown.stdout

    cancelled = run_cli(live_api, "jobs", "cancel", str(first_id))
    assert cancelled.exit_code == 0
    assert cancelled.stdout.strip() == f"job {first_id} cancelled"
    only_queued = run_cli(live_api, "jobs", "list", "--state", "queued", "--json")
    assert [j["id"] for j in json.loads(only_queued.stdout)["items"]] == [second_id]

    again = run_cli(live_api, "jobs", "cancel", str(first_id))
    assert again.exit_code == 1
    assert again.stderr.strip() == (
        f"error: job {first_id} is already cancelled: only queued or running jobs can be "
        "cancelled (HTTP 409)"
    )


def test_cli_errors_are_one_line(live_api: LiveAPI, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli(live_api, "jobs", "submit", str(missing))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: cannot read spec file {missing}: No such file or directory"
    )

    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": ')
    result = run_cli(live_api, "jobs", "submit", str(broken))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: spec file {broken} is not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("dataset: [unclosed\n")
    result = run_cli(live_api, "jobs", "submit", str(bad_yaml))
    assert result.exit_code == 2
    assert f"spec file {bad_yaml} is not valid YAML" in result.stderr

    result = run_cli(live_api, "jobs", "submit", str(tmp_path))
    assert result.exit_code == 2
    assert f"cannot read spec file {tmp_path}" in result.stderr

    no_dataset = tmp_path / "spec.yaml"
    no_dataset.write_text("dataset:\n  uri: datasets/absent\n")
    result = run_cli(live_api, "jobs", "submit", str(no_dataset))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: dataset.uri: dataset 'datasets/absent' does not exist")
    assert lines[0].endswith("(HTTP 422)")

    result = run_cli(live_api, "jobs", "show", "999999")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: job 999999 not found (HTTP 404)"

    result = run_cli(live_api, "jobs", "list", key="bird_wrong")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: invalid API key: it is unknown or was revoked (HTTP 401)"
    )
    result = CliRunner().invoke(
        app, ["jobs", "list"], env={"BIRD_URL": live_api.base_url, "BIRD_API_KEY": ""}
    )
    assert result.exit_code == 2
    assert "no API key" in result.stderr


def test_cli_watch_follows_a_job_to_the_end(live_api: LiveAPI, tiny_dataset: str) -> None:
    with BirdClient(live_api.base_url, live_api.api_key) as bird:
        job_id = bird.submit(job_spec(tiny_dataset, priority=100))["id"]

    def worker() -> None:
        # The job may not be first in the shared queue: claim until it is ours.
        with live_api.session() as session:
            while (claimed := queue.claim(session, "w", 300)) is not None:
                if claimed.id == job_id:
                    break
            time.sleep(0.3)
            queue.append_log(session, job_id, "info", "training: starting", attempt=1)
            queue.append_log(session, job_id, "warning", "two lines\n  the second", attempt=1)
            queue.heartbeat(session, job_id, "w", 300, progress=0.5, stage="training")
            queue.record_metrics(
                session, job_id, [{"split": "val", "name": "auroc", "value": 0.8, "epoch": 0}]
            )
            time.sleep(0.3)
            queue.record_metrics(
                session, job_id, [{"split": "test", "name": "auroc", "value": 0.9}]
            )
            queue.finish(session, job_id, "w")

    thread = threading.Thread(target=worker)
    thread.start()
    result = run_cli(live_api, "jobs", "watch", str(job_id), "--interval", "0.1", "--timeout", "60")
    thread.join()
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"job {job_id} succeeded: auroc 0.9"
    # Off a terminal the bar is written once, in its last state: not a line per poll.
    bars = [line for line in lines[:-1] if line.startswith(f"job {job_id} ")]
    assert len(bars) == 1 and "succeeded" in bars[0] and "auroc 0.8" in bars[0], lines
    # The API keeps the finished job's last stage ("training"); show and list leave it out.
    shown = run_cli(live_api, "jobs", "show", str(job_id)).stdout
    assert "stage     -" in shown.splitlines(), shown
    listed = [line for line in run_cli(live_api, "jobs", "list").stdout.splitlines()]
    row = next(line.split() for line in listed if line.startswith(f"{job_id} "))
    assert row[1:3] == ["succeeded", "-"], row

    # The job's log, as its worker wrote it, oldest first; a message's own lines kept.
    logged = run_cli(live_api, "jobs", "logs", str(job_id))
    assert logged.exit_code == 0, logged.output
    lines = logged.stdout.splitlines()
    assert lines[0].endswith("  INFO     training: starting"), lines
    assert lines[1].endswith("  WARNING  two lines") and lines[2] == "  the second", lines
    as_json = json.loads(run_cli(live_api, "jobs", "logs", str(job_id), "--json").stdout)
    assert [item["message"] for item in as_json][:2] == [
        "training: starting",
        "two lines\n  the second",
    ]
    # More lines than one answer holds (1,000): every one, in order, once.
    with live_api.session() as session:
        for index in range(1_001):
            queue.append_log(session, job_id, "debug", f"line {index}")
    paged = run_cli(live_api, "jobs", "logs", str(job_id)).stdout.splitlines()
    assert [line.rsplit("  ", 1)[-1] for line in paged[3:]] == [f"line {i}" for i in range(1_001)]
    missing = run_cli(live_api, "jobs", "logs", "999999999")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: "), missing.output

    cancelled = run_cli(live_api, "jobs", "cancel", str(job_id))
    assert cancelled.exit_code == 1
    with BirdClient(live_api.base_url, live_api.api_key) as bird:
        other = bird.submit(job_spec(tiny_dataset))["id"]
        bird.cancel(other)
    result = run_cli(live_api, "jobs", "watch", str(other), "--interval", "0.1")
    assert result.exit_code == 1
    assert result.stdout.strip().splitlines()[-1] == f"job {other} cancelled"


def test_cli_show_of_a_search_gives_the_best_trials_val_metrics(
    live_api: LiveAPI, tiny_dataset: str
) -> None:
    """While a search runs, its latest val metrics are of whichever trial reported last and
    `show` says so; once the search has picked its winner, `show` gives the winner's best epoch."""
    search = {
        "space": {"lambda_kd": {"kind": "uniform", "low": 0.1, "high": 2.0}},
        "num_samples": 2,
    }
    with BirdClient(live_api.base_url, live_api.api_key) as bird:
        job_id = bird.submit(job_spec(tiny_dataset, priority=100, search=search))["id"]
    with live_api.session() as session:
        while (claimed := queue.claim(session, "w", 300)) is not None:
            if claimed.id == job_id:
                break
        for trial, auroc in ((0, 0.9), (1, 0.6)):  # trial 1 reports last, and is worse
            queue.upsert_trial(session, job_id, trial, state="running", params={"phi_lr": 1.0})
            rows = [{"split": "val", "name": "auroc", "value": auroc, "epoch": 1, "trial": trial}]
            queue.record_metrics(session, job_id, rows)
    running = run_cli(live_api, "jobs", "show", str(job_id))
    assert running.exit_code == 0, running.output
    assert "val       auroc 0.6  (the trial that reported last)" in running.stdout.splitlines()
    with live_api.session() as session:
        best = {"auroc": 0.9, "delta_mean_deo": 4.0, "epoch": 1, "best": True}
        queue.upsert_trial(session, job_id, 0, state="completed", metrics=best)
        queue.upsert_trial(session, job_id, 1, state="completed", metrics={"best": False})
        queue.finish(session, job_id, "w")
    done = run_cli(live_api, "jobs", "show", str(job_id)).stdout.splitlines()
    assert "val       auroc 0.9  delta_mean_deo 4  (best trial 0, epoch 1)" in done, done
