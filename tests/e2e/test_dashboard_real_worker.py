"""The dashboard following a job that the real worker runs on Ray, in headless Chromium.

Nothing stands in for anything here: the job is submitted through the page's form, run by
``workers.runner.Worker`` on the session's Ray cluster against PostgreSQL and the moto S3
server, and its checkpoint is downloaded through the page and loaded with ``load_student``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from bird_core.checkpoint import load_student
from bird_core.train import evaluate
from service.client import BirdClient
from tests.e2e.conftest import job_spec
from tests.e2e.test_dashboard import _download, _path_points, _sign_in
from tests.integration.api_fixtures import LiveAPI
from workers.runner import Worker


def test_dashboard_follows_a_real_worker_from_submit_to_a_loaded_checkpoint(
    page: Page,
    live_api: LiveAPI,
    e2e_dataset: Any,
    worker_thread: Worker,
    js_errors: list[str],
    artifacts_dir: Path,
    tmp_path: Path,
) -> None:
    _sign_in(page, live_api)
    expect(page.locator("#jobs-table")).to_be_visible()
    page.click("#nav-new")
    page.click("#json-alt summary")
    page.fill("#f-spec-json", json.dumps(job_spec(epochs=3)))
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*#/jobs/\d+$"))

    # Running: the stage is shown while the worker goes through it.
    expect(page.locator("#job-state")).to_have_text("running", timeout=60_000)
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=240_000)
    expect(page.locator("#job-progress .progress")).to_have_attribute("data-progress", "1.000")

    # Curves: one point per epoch for val AUROC and Δ_mean-DEO, and every train loss part.
    for series in ("auroc", "delta_mean_deo"):
        selector = f'#chart-val path.series[data-series="{series}"]'
        expect(page.locator(selector)).to_have_attribute("data-points", "3")
        assert _path_points(page, selector) == 3
    train_series = page.locator("#chart-train path.series")
    names = {train_series.nth(i).get_attribute("data-series") for i in range(train_series.count())}
    assert {"loss", "ce", "kd", "fair", "feat"} <= names, names
    for split in ("val", "test"):
        expect(page.locator(f"#groups-table-{split} tbody tr")).to_have_count(2)
        expect(page.locator(f"#chart-groups-{split} rect.bar")).to_have_count(4)

    # The best checkpoint downloads through the page, loads, and gives the test metrics shown.
    data = _download(page, '#checkpoints a.download[data-name="best"]', tmp_path)
    target = tmp_path / "best"
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(target, filter="data")
    student = load_student(target)
    test = evaluate(student.model, student.preprocess, e2e_dataset.test, e2e_dataset.task)
    shown = page.locator('#latest-table tr[data-split="test"] td[data-metric="auroc"]')
    # The page rounds for display; the value it shows is the one the checkpoint reproduces.
    assert abs(float(shown.inner_text()) - test["auroc"]) < 0.005, shown.inner_text()

    # The same job over plain HTTP: each epoch once, every stage, and the API's own download
    # (a 307 to a presigned S3 URL, checked against its sha256) reproduces every test metric.
    job_id = int(page.url.rsplit("/", 1)[1])
    client = BirdClient(live_api.base_url, live_api.api_key)
    metrics = client.metrics(job_id)
    objective = [p for p in metrics["series"] if p["split"] == "val" and p["name"] == "objective"]
    assert sorted(p["epoch"] for p in objective) == [1, 2, 3]
    messages = [e["message"] for e in client.events(job_id)]
    for stage in ("precomputing", "training", "evaluating", "uploading"):
        assert any(stage in message for message in messages), messages
    redirect = httpx.get(
        f"{live_api.base_url}/jobs/{job_id}/checkpoints/best", headers=live_api.headers()
    )
    assert redirect.status_code == 307
    assert {"best", "last"} <= {c["name"] for c in client.checkpoints(job_id)}
    downloaded = load_student(client.download_checkpoint(job_id, "best", tmp_path / "api"))
    again = evaluate(downloaded.model, downloaded.preprocess, e2e_dataset.test, e2e_dataset.task)
    for name in ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo"):
        assert again[name] == pytest.approx(metrics["latest"]["test"][name], abs=1e-6), name
        assert test[name] == pytest.approx(again[name], abs=1e-9), name

    page.screenshot(path=str(artifacts_dir / "dashboard-real-worker.png"), full_page=True)
    assert not js_errors, js_errors
