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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_fixtures import (  # noqa: F401
    _api_local_server,
    _api_s3_server,
    live_api,
    live_api_local,
    tiny_dataset,
    tiny_dataset_local,
)
from tests.integration.conftest import s3_server  # noqa: F401

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
