"""Fixtures for the browser tests: headless Chromium driven by Playwright, and the real API.

The browser is the Debian ``chromium`` package (``make browser`` installs it); Playwright's own
browser downloads are never used. A missing browser or Playwright is a test failure with the
command that fixes it, not a skip: these tests exist to run.

The API is the real app (``service.api.create_app``) under uvicorn, on PostgreSQL and the moto
S3 server, from ``tests/integration/api_fixtures.py``; importing the fixtures here makes them
visible to the e2e modules.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.storage import store_from_settings
from tests.integration.api_fixtures import (  # noqa: F401
    LiveAPI,
    _api_local_server,
    _api_s3_server,
    live_api,
    live_api_local,
    tiny_dataset,
    tiny_dataset_local,
)
from tests.integration.train_fixtures import (
    DATASET_PREFIX,
    PROBE_EPOCHS,
    TEACHER,
    TrainData,
    copy_dataset_and_features,
)
from workers.runner import Worker

CHROMIUM = Path(os.environ.get("BIRD_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Playwright's default is 30 s per action; the dashboard polls every 2 s, so 15 s is plenty and
# a broken page fails fast.
DEFAULT_TIMEOUT_MS = 15_000


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the session (start-up costs about a second)."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the dashboard tests need the Debian package "
            "(run `make browser`, or apt-get install -y chromium; or set BIRD_CHROMIUM)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: pip install -e '.[dev]' (never `playwright install`: "
            "the tests use the Debian chromium)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def js_errors() -> list[str]:
    """Uncaught errors of the page's JavaScript (a test asserts there are none)."""
    return []


@pytest.fixture
def page(browser: Any, js_errors: list[str]) -> Iterator[Any]:
    """A fresh page in its own context (empty localStorage), downloads accepted."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    page.on("pageerror", lambda error: js_errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``tests/e2e/artifacts/`` (screenshots; ignored by git)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# Jobs run by the real worker

# Published by the operator for every tenant: each test's tenant names it.
E2E_DATASET = f"shared/{DATASET_PREFIX}"


def job_spec(**training: Any) -> dict[str, Any]:
    """A small BIRD job on the e2e dataset; ``training`` overrides training fields."""
    return {
        "dataset": {"uri": E2E_DATASET},
        "teacher": {"image_size": TEACHER["image_size"], "probe_epochs": PROBE_EPOCHS},
        "student": {"model": "small_cnn", "options": {"width": 8, "embed_dim": 32}},
        "method": {"name": "bird"},
        "training": {"epochs": 2, "batch_size": 32, **training},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
    }


@pytest.fixture(scope="module")
def e2e_dataset(_api_s3_server: Any, fm_features: TrainData) -> Any:  # noqa: F811
    """FashionMNIST-S (tiny) in the API's bucket; returns its bird_core splits.

    The session's teacher features come along: the jobs' precompute stage finds them
    published under the same content address and reuses them (the feature tests cover the
    computation itself).
    """
    copy_dataset_and_features(fm_features, _api_s3_server.store, E2E_DATASET)
    return fm_features.splits


@contextmanager
def running_worker(api: LiveAPI, **settings: Any) -> Iterator[Worker]:
    """A worker polling the API's database in a thread of this process until the block ends.

    Heartbeats every second (a cancel reaches the running job within a second); ``settings``
    override further fields of the API's settings (the worker opens its own store when they
    change the S3 endpoint).
    """
    overrides = {"heartbeat_s": 1, **settings}
    worker_settings = api.settings.model_copy(update=overrides)
    store = store_from_settings(worker_settings) if "s3_endpoint_url" in settings else api.store
    worker = Worker(worker_settings, engine=api.engine, store=store, poll_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=120)


@pytest.fixture
def worker_thread(live_api: LiveAPI, ray_local: str) -> Iterator[Worker]:  # noqa: F811
    """A worker polling the API's database in a thread of this process."""
    with running_worker(live_api) as worker:
        yield worker
