"""The dashboard in a real headless Chromium against the real API over real HTTP.

A user signs in with an API key, submits a job through the form (after one the server rejects),
finds it in the jobs list, opens it and watches it run: state, stage and progress, the metric
curves growing epoch by epoch, the per-group table and bars, the search trials with their Pareto
front, the events, and finally downloads the checkpoint and gets the bytes that were published.
BIRD's gate is plotted from the metrics of a real (tiny) BIRD training run.

The worker process is played by :func:`_play_worker` through the real queue functions, in a
thread of the test process, so that the browser sees exactly what a worker would produce.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from playwright.sync_api import Page, expect

from bird_core.data.base import DatasetSplits
from bird_core.methods import create_method
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import TrainConfig, compute_teacher_features, fit
from service import queue
from tests.integration.api_fixtures import LiveAPI
from workers.sinks import EpochRecord, metric_rows

WORKER_ID = "e2e-stand-in-worker"
LEASE_S = 60
EPOCHS = 3
TRAIN_PARTS = ("loss", "ce", "kd", "fair")
# (params, AUROC, Δ_mean-DEO) per trial. The Pareto front (max AUROC, min Δ-DEO) is trials 2
# and 1; 0 is beaten by 1 and 3 by 2. The default objective (best AUROC with Δ-DEO ≤ 10)
# picks trial 1.
TRIALS = (
    ({"phi_lr": 10.0, "lambda_fair": 1.0}, 0.90, 12.0),
    ({"phi_lr": 100.0, "lambda_fair": 3.0}, 0.93, 9.0),
    ({"phi_lr": 300.0, "lambda_fair": 8.0}, 0.88, 4.0),
    ({"phi_lr": 30.0, "lambda_fair": 5.0}, 0.86, 6.0),
)
PARETO_TRIALS = {"1", "2"}
BEST_TRIAL = "1"


# ----------------------------------------------------------------------------------------------
# The worker's part
# ----------------------------------------------------------------------------------------------


def _epoch_rows(epoch: int, split: str, *, trial: int | None = None) -> list[dict[str, Any]]:
    """Evaluation metrics of one epoch, with two groups, as the worker reports them."""
    auroc = 0.80 + 0.04 * epoch
    delta = 20.0 - 4.0 * epoch
    rows = {
        "auroc": auroc,
        "f1": 0.6 + 0.05 * epoch,
        "accuracy": 0.7 + 0.05 * epoch,
        "delta_mean_deo": delta,
        "delta_max_deo": 2 * delta,
    }
    for group, (count, accuracy, tpr, fpr) in {
        0: (30, 0.70 + 0.04 * epoch, 0.60 + 0.05 * epoch, 0.20),
        1: (18, 0.60 + 0.05 * epoch, 0.45 + 0.08 * epoch, 0.25),
    }.items():
        rows |= {
            f"group/{group}/count": count,
            f"group/{group}/accuracy": accuracy,
            f"group/{group}/tpr": tpr,
            f"group/{group}/fpr": fpr,
        }
    return [
        {"split": split, "name": name, "value": value, "epoch": epoch, "trial": trial}
        for name, value in rows.items()
    ]


def _train_rows(epoch: int) -> list[dict[str, Any]]:
    """The loss parts of one epoch; the fairness term diverged (NaN) in the first epoch."""
    parts = {
        "loss": 2.0 / epoch,
        "ce": 1.2 / epoch,
        "kd": 0.6 / epoch,
        "fair": math.nan if epoch == 1 else 0.2 / epoch,
    }
    return [
        {"split": "train", "name": name, "value": value, "epoch": epoch, "step": epoch * 10}
        for name, value in parts.items()
    ]


def checkpoint_archive() -> bytes:
    """A small real checkpoint archive (an uncompressed tar, as the worker writes)."""
    files = {
        "student.safetensors": uuid.uuid4().bytes * 256,
        "meta.json": json.dumps({"epoch": EPOCHS, "method": "bird"}).encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _play_worker(
    api: LiveAPI,
    job_id: int,
    checkpoint: bytes,
    *,
    search: bool = True,
    paused: threading.Event | None = None,
    resume: threading.Event | None = None,
    step_s: float = 0.2,
) -> None:
    """Stand in for the worker process: run job ``job_id`` through the real queue functions.

    Claims the job, reports stages and progress through heartbeats, records per-epoch train and
    val metrics (with per-group rows), the trials of a search (``search``), test metrics, then
    publishes ``checkpoint`` as ``jobs/<id>/checkpoints/best.tar`` in the API's store, records
    it, and finishes. With ``paused``/``resume`` it stops after the first epoch, sets
    ``paused`` and waits for ``resume``, so that the test can look at a running job.

    Only the database and the store are shared with the API, exactly as with the real worker
    (``workers/``): swap this for the real worker process once it runs jobs end to end.
    """
    with api.session() as session:
        job = queue.claim(session, WORKER_ID, LEASE_S)
        assert job is not None and job.id == job_id, f"claimed {job!r}, expected job {job_id}"

        def beat(stage: str, progress: float) -> None:
            queue.heartbeat(session, job_id, WORKER_ID, LEASE_S, progress=progress, stage=stage)
            time.sleep(step_s)

        beat("precomputing", 0.05)
        for epoch in range(1, EPOCHS + 1):
            queue.record_metrics(session, job_id, _train_rows(epoch) + _epoch_rows(epoch, "val"))
            beat("training", 0.1 + 0.5 * epoch / EPOCHS)
            if epoch == 1 and paused is not None and resume is not None:
                paused.set()
                assert resume.wait(timeout=30), "the test never resumed the stand-in worker"
        if search:
            for index, (params, auroc, delta) in enumerate(TRIALS):
                queue.upsert_trial(session, job_id, index, state="running", params=params)
                trial_curve = {"auroc": auroc, "delta_mean_deo": delta}
                queue.record_metrics(
                    session,
                    job_id,
                    [
                        {"split": "val", "name": name, "value": value, "epoch": 1, "trial": index}
                        for name, value in trial_curve.items()
                    ],
                )
                queue.upsert_trial(
                    session,
                    job_id,
                    index,
                    state="terminated",
                    metrics={"auroc": auroc, "delta_mean_deo": delta, "f1": math.nan},
                )
                beat("tuning", 0.65 + 0.05 * index)
        queue.record_metrics(session, job_id, _epoch_rows(EPOCHS, "test"))
        beat("evaluating", 0.9)
        key = f"jobs/{job_id}/checkpoints/best.tar"
        api.store.put_bytes(key, checkpoint)
        queue.add_checkpoint(
            session,
            job_id,
            "best",
            api.store.uri(key),
            size=len(checkpoint),
            sha256=hashlib.sha256(checkpoint).hexdigest(),
        )
        beat("uploading", 0.97)
        queue.finish(session, job_id, WORKER_ID)


class _Thread(threading.Thread):
    """A daemon thread that keeps its target's exception for the test to raise."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True, name="e2e-worker")
        self._run_target = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run_target()
        except BaseException as exc:
            self.error = exc

    def check(self, timeout: float = 30) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the stand-in worker did not finish"
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------------------------
# Page helpers
# ----------------------------------------------------------------------------------------------


def _sign_in(page: Page, api: LiveAPI, key: str | None = None) -> None:
    page.goto(f"{api.base_url}/")  # redirects to /ui/
    expect(page.locator("#key-screen")).to_be_visible()
    page.fill("#key-input", key or api.api_key)
    page.click("#key-submit")


def _path_points(page: Page, selector: str) -> int:
    """How many points the SVG path at ``selector`` draws (its M and L commands)."""
    d = page.locator(selector).get_attribute("d") or ""
    return len(re.findall(r"[ML]", d))


def _expect_points(page: Page, selector: str, count: int) -> None:
    expect(page.locator(selector)).to_have_attribute("data-points", str(count))
    assert _path_points(page, selector) == count, page.locator(selector).get_attribute("d")


def _download(page: Page, selector: str, tmp_path: Path) -> bytes:
    with page.expect_download() as info:
        page.locator(selector).click()
    target = tmp_path / info.value.suggested_filename
    info.value.save_as(target)
    return target.read_bytes()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_dashboard_follows_a_job_from_submit_to_download(
    page: Page,
    live_api: LiveAPI,
    tiny_dataset: str,
    js_errors: list[str],
    artifacts_dir: Path,
    tmp_path: Path,
) -> None:
    _sign_in(page, live_api)
    expect(page.locator("#jobs-table")).to_be_visible()
    expect(page.locator("#nav")).to_be_visible()

    # The form: a spec the server rejects shows its 422 next to the field.
    page.click("#nav-new")
    page.fill("#f-dataset", tiny_dataset)
    page.select_option("#f-method", "bird")
    page.fill("#f-epochs", "0")
    page.click("#submit-job")
    expect(page.locator("#f-epochs-error")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#f-dataset-error")).to_be_empty()
    # A dataset that does not exist is the server's 422 on dataset.uri.
    page.fill("#f-epochs", str(EPOCHS))
    page.fill("#f-dataset", "datasets/no-such-dataset")
    page.click("#submit-job")
    expect(page.locator("#f-dataset-error")).to_contain_text("does not exist")
    expect(page.locator("#f-epochs-error")).to_be_empty()
    page.screenshot(path=str(artifacts_dir / "new-job-422.png"), full_page=True)
    # The pasted-JSON alternative: bad JSON is caught here, a bad spec by the server.
    page.click("#json-alt summary")
    page.fill("#f-spec-json", "{not json")
    page.click("#submit-job")
    expect(page.locator("#f-spec-json-error")).to_contain_text("Not valid JSON")
    bad_option = {
        "dataset": {"uri": tiny_dataset},
        "method": {"name": "bird", "options": {"nope": 1}},
    }
    page.fill("#f-spec-json", json.dumps(bad_option))
    page.click("#submit-job")
    expect(page.locator("#form-errors")).to_contain_text("unknown option(s) ['nope']")
    page.fill("#f-spec-json", "")

    # Now a good one, with a search; the page moves to the new job.
    page.fill("#f-dataset", tiny_dataset)
    page.fill("#f-batch-size", "4")
    page.fill("#f-seed", "7")
    page.check("#f-search")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*#/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])

    # The jobs list shows it, queued; open it from there.
    page.click("#nav-jobs")
    row = page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')
    expect(row.locator(".badge")).to_have_text("queued")
    expect(row).to_contain_text("bird")
    expect(row).to_contain_text(tiny_dataset)
    page.screenshot(path=str(artifacts_dir / "jobs.png"))
    page.select_option("#state-filter", "succeeded")  # the filter hides it ...
    expect(page.locator("#jobs-table tr.empty")).to_be_visible()
    page.select_option("#state-filter", "queued")  # ... and shows it again
    row.locator("a.job-link").click()
    expect(page.locator("#job-title")).to_have_text(f"Job #{job_id}")
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("#cancel-btn")).to_be_visible()
    expect(page.locator("#job-spec pre")).to_contain_text('"seed": 7')

    # The worker starts; it stops after epoch 1 so that the running job can be seen.
    checkpoint = checkpoint_archive()
    paused, resume = threading.Event(), threading.Event()
    worker = _Thread(
        lambda: _play_worker(live_api, job_id, checkpoint, paused=paused, resume=resume)
    )
    worker.start()
    try:
        assert paused.wait(timeout=20), "the stand-in worker did not reach epoch 1"
        expect(page.locator("#job-state")).to_have_text("running")
        expect(page.locator("#job-stage")).to_have_text("training")
        expect(page.locator("#job-attempts")).to_have_text("1 / 3")
        _expect_points(page, '#chart-val path.series[data-series="auroc"]', 1)
        expect(page.locator("#groups-table-val tbody tr")).to_have_count(2)
        page.screenshot(path=str(artifacts_dir / "dashboard-running.png"), full_page=True)
    finally:
        resume.set()
    worker.check()

    # Terminal: the page catches up once more and stops polling.
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=20_000)
    expect(page.locator("#job-progress .progress")).to_have_attribute("data-progress", "1.000")
    expect(page.locator("#cancel-btn")).to_have_count(0)

    # Curves: val AUROC and Δ_mean-DEO on one chart, every train loss part on the other.
    _expect_points(page, '#chart-val path.series[data-series="auroc"]', EPOCHS)
    _expect_points(page, '#chart-val path.series[data-series="delta_mean_deo"]', EPOCHS)
    expect(page.locator("#chart-val .legend")).to_contain_text("Δ_mean-DEO")
    expect(page.locator("#chart-train path.series")).to_have_count(len(TRAIN_PARTS))
    _expect_points(page, '#chart-train path.series[data-series="loss"]', EPOCHS)
    _expect_points(page, '#chart-train path.series[data-series="fair"]', EPOCHS - 1)  # NaN gap
    # The final run's curves are drawn, not the trials' (each trial has one point).
    expect(page.locator("#trial-select")).to_have_value("null")

    # Latest summary and per-group tables (val and test) with TPR/accuracy bars.
    expect(page.locator('#latest-table tr[data-split="val"] td[data-metric="auroc"]')).to_have_text(
        "0.92"
    )
    expect(page.locator('#latest-table tr[data-split="test"]')).to_be_visible()
    for split in ("val", "test"):
        expect(page.locator(f"#groups-table-{split} tbody tr")).to_have_count(2)
        expect(page.locator(f"#chart-groups-{split} rect.bar")).to_have_count(4)
    expect(page.locator('#groups-table-val tr[data-group="1"]')).to_contain_text("0.69")

    # Trials: a scatter with the Pareto front marked and connected, the best trial starred.
    expect(page.locator("#chart-trials circle.trial")).to_have_count(len(TRIALS))
    pareto = page.locator("#chart-trials circle.pareto")
    expect(pareto).to_have_count(len(PARETO_TRIALS))
    assert {pareto.nth(i).get_attribute("data-trial") for i in range(2)} == PARETO_TRIALS
    _expect_points(page, "#chart-trials path.pareto-front", len(PARETO_TRIALS))
    expect(page.locator("#chart-trials circle.best")).to_have_attribute("data-trial", BEST_TRIAL)

    # Events: the whole life of the job.
    events = page.locator("#events-table tbody tr")
    for transition in ("submit", "claim", "heartbeat", "finish"):
        expect(events.filter(has_text=transition).first).to_be_visible()

    # The checkpoint (a presigned S3 URL on the moto server) downloads the published bytes.
    links = page.locator("#checkpoints a.download")
    expect(links).to_have_count(1)
    assert _download(page, '#checkpoints a.download[data-name="best"]', tmp_path) == checkpoint

    page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)
    assert not js_errors, js_errors


def _submit(api: LiveAPI, spec: dict[str, Any]) -> int:
    """POST /jobs with ``spec`` over HTTP; the new job's id."""
    request = urllib.request.Request(
        f"{api.base_url}/jobs",
        data=json.dumps(spec).encode(),
        headers={**api.headers(), "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["id"]


def test_local_store_download_cancel_and_unknown_job(
    page: Page,
    live_api_local: LiveAPI,
    tiny_dataset_local: str,
    js_errors: list[str],
    tmp_path: Path,
) -> None:
    """With a local store the URL is the API's /files/...: fetched with the key, saved as a Blob.
    Also: cancelling a queued job from its page, and a job id that is not the tenant's."""
    spec = {"dataset": {"uri": tiny_dataset_local}, "method": {"name": "bkd"}}
    done_id = _submit(live_api_local, spec)
    checkpoint = checkpoint_archive()
    worker = _Thread(
        lambda: _play_worker(live_api_local, done_id, checkpoint, search=False, step_s=0)
    )
    worker.start()
    worker.check()
    queued_id = _submit(live_api_local, spec)

    _sign_in(page, live_api_local)
    expect(page.locator(f'#jobs-table tr[data-job-id="{done_id}"] .badge')).to_have_text(
        "succeeded"
    )
    page.click(f'#jobs-table tr[data-job-id="{done_id}"] a.job-link')
    expect(page.locator("#job-state")).to_have_text("succeeded")
    expect(page.locator("#job-stage")).to_have_text("uploading (last)")
    expect(page.locator("#trials")).to_be_hidden()  # no search, no trials section
    expect(page.locator("#gate-figure")).to_be_hidden()  # no gate metrics, no gate chart
    _expect_points(page, '#chart-val path.series[data-series="auroc"]', EPOCHS)
    assert _download(page, '#checkpoints a.download[data-name="best"]', tmp_path) == checkpoint

    # Cancel asks for a second click, then the queued job is cancelled at once.
    page.goto(f"{live_api_local.base_url}/ui/#/jobs/{queued_id}")
    expect(page.locator("#job-state")).to_have_text("queued")
    page.click("#cancel-btn")
    expect(page.locator("#cancel-btn")).to_have_text("Click again to cancel")
    page.click("#cancel-btn")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator("#cancel-btn")).to_have_count(0)
    expect(page.locator("#events-table")).to_contain_text("cancel")

    # Another tenant's job (or none at all) is a 404, said in words.
    other = live_api_local.new_key()
    page.evaluate(f"localStorage.setItem('bird.apiKey', {json.dumps(other.key)})")
    page.goto(f"{live_api_local.base_url}/ui/#/jobs/{done_id}")
    page.reload()
    expect(page.locator("#job-not-found")).to_contain_text("No such job")
    expect(page.locator("#checkpoints")).to_have_count(0)
    assert not js_errors, js_errors


def test_wrong_key_shows_the_key_screen_with_an_error(
    page: Page, live_api: LiveAPI, js_errors: list[str]
) -> None:
    _sign_in(page, live_api, key="bird_" + "x" * 43)
    error = page.locator("#key-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("rejected the API key")
    expect(page.locator("#key-screen")).to_be_visible()
    expect(page.locator("#view")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('bird.apiKey')") is None

    # A stored key that stops working (revoked, say) brings the key screen back on its own.
    page.evaluate("localStorage.setItem('bird.apiKey', 'bird_revoked')")
    page.goto(f"{live_api.base_url}/ui/#/jobs")
    expect(page.locator("#key-error")).to_contain_text("401")

    # The right key gets in; sign out forgets it.
    page.fill("#key-input", live_api.api_key)
    page.click("#key-submit")
    expect(page.locator("#jobs-table")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#key-screen")).to_be_visible()
    assert page.evaluate("localStorage.getItem('bird.apiKey')") is None
    assert not js_errors, js_errors


def _real_bird_epochs(data: DatasetSplits) -> list[dict[str, Any]]:
    """Metric rows of a real (tiny) BIRD run: bird_core's ``fit`` with a learning gate, each
    epoch turned into the rows a worker records (``workers.sinks.metric_rows``)."""
    preprocess = Preprocessor.from_config(data.preprocessing)
    torch.manual_seed(0)
    teacher = create_model("resnet18", data.num_classes, width=4)
    features = compute_teacher_features(teacher, preprocess, data.train, batch_size=64)
    student = create_model("small_cnn", data.num_classes, width=4, embed_dim=8)
    method = create_method("bird", phi_optimizer="adam", phi_lr=0.5, gate_logits=True)
    method.setup(
        student_dim=8,
        teacher_dim=features.embedding.shape[1],
        num_classes=data.num_classes,
        task=data.task,
    )
    config = TrainConfig(epochs=EPOCHS, batch_size=16, max_steps_per_epoch=3)
    result = fit(student, method, data, config, preprocess=preprocess, train_features=features)
    rows: list[dict[str, Any]] = []
    for epoch in result.epochs:
        record = EpochRecord(
            epoch=epoch.epoch + 1,
            step=3 * (epoch.epoch + 1),
            train=epoch.train,
            val=epoch.val,
            objective=epoch.val["auroc"],
            seconds=epoch.seconds,
        )
        rows += metric_rows(record)
    return rows


def test_gate_chart_plots_the_gate_of_a_real_bird_run(
    page: Page,
    live_api_local: LiveAPI,
    tiny_dataset_local: str,
    tiny_image_data: DatasetSplits,
    js_errors: list[str],
    artifacts_dir: Path,
) -> None:
    rows = _real_bird_epochs(tiny_image_data)
    gate = {
        (row["name"], row["epoch"]): row["value"]
        for row in rows
        if row["split"] == "train" and row["name"].startswith("gate_")
    }
    assert gate[("gate_min", EPOCHS)] < gate[("gate_max", EPOCHS)], "the gate did not move"
    job_id = _submit(
        live_api_local, {"dataset": {"uri": tiny_dataset_local}, "method": {"name": "bird"}}
    )
    with live_api_local.session() as session:
        assert queue.claim(session, WORKER_ID, LEASE_S) is not None
        queue.record_metrics(session, job_id, rows)
        queue.finish(session, job_id, WORKER_ID)

    _sign_in(page, live_api_local)
    page.goto(f"{live_api_local.base_url}/ui/#/jobs/{job_id}")
    expect(page.locator("#job-state")).to_have_text("succeeded")
    expect(page.locator("#gate-figure")).to_be_visible()
    for name in ("gate_min", "gate_p10", "gate_median", "gate_p90", "gate_max", "gate_below_half"):
        _expect_points(page, f'#chart-gate path.series[data-series="{name}"]', EPOCHS)
    # Each point carries the recorded value (the dashboard rounds to 4 decimals).
    for epoch in range(1, EPOCHS + 1):
        median_points = '#chart-gate path.series[data-series="gate_median"] + g.points circle'
        title = page.locator(median_points).nth(epoch - 1).locator("title")
        expect(title).to_have_text(
            f"gate_median @ epoch {epoch}: {round(gate[('gate_median', epoch)], 4)}"
        )
    # The left axis spans the gate's whole range; the loss chart no longer carries the gate.
    expect(page.locator("#chart-gate .legend")).to_contain_text("dimensions below 0.5")
    expect(page.locator('#chart-train path.series[data-series="gate_min"]')).to_have_count(0)
    expect(page.locator('#chart-train path.series[data-series="phi_grad_norm"]')).to_have_count(0)
    _expect_points(page, '#chart-train path.series[data-series="kd"]', EPOCHS)
    page.screenshot(path=str(artifacts_dir / "dashboard-gate.png"), full_page=True)
    assert not js_errors, js_errors


def test_datasets_page_uploads_describes_lists_and_deletes(
    page: Page, live_api_local: LiveAPI, js_errors: list[str], tmp_path: Path
) -> None:
    from bird_datasets.location import tenant_prefix
    from service.storage import LocalStore
    from tests.integration.api_fixtures import publish_tiny_dataset

    api = live_api_local
    publish_tiny_dataset(LocalStore(tmp_path), "ds")
    files = sorted(str(p) for p in (tmp_path / "ds").iterdir() if p.is_file())
    assert any(f.endswith("manifest.json") for f in files)
    _sign_in(page, api)
    page.click("#nav-datasets")
    mine = page.locator('#datasets-table tr[data-dataset="datasets/tiny-mine"]')
    expect(page.locator("#datasets-table tbody tr").first).to_be_visible()  # the first poll
    expect(mine).to_have_count(0)

    page.fill("#upload-name", "tiny-mine")
    page.set_input_files("#upload-files", files)
    page.click("#upload-submit")
    # Uploaded, then shown: the describe table of the API's GET /datasets/{name}.
    expect(page.locator("#dataset-table")).to_contain_text("train")
    assert page.url.endswith("#/datasets/tiny-mine")
    stored = api.store.root / tenant_prefix(api.tenant_id) / "datasets" / "tiny-mine"
    assert (stored / "manifest.json").is_file()

    page.click("#nav-datasets")
    row = page.locator('#datasets-table tr[data-dataset="datasets/tiny-mine"]')
    expect(row).to_contain_text("multiclass")
    expect(row).to_contain_text("2 × 2")

    page.on("dialog", lambda dialog: dialog.accept())
    row.locator("a.dataset-link").click()
    page.click("#dataset-delete")
    expect(page.locator("#datasets-table tbody tr").first).to_be_visible()
    expect(mine).to_have_count(0)
    assert not stored.exists()
    # Deleted: the same answer as a name that never existed.
    page.goto(f"{api.base_url}/ui/#/datasets/tiny-mine")
    expect(page.locator('[data-testid="dataset-error"]')).to_have_text(
        "dataset 'tiny-mine' not found"
    )
    assert js_errors == []
