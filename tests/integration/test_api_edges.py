"""The API's request edges over real HTTP: the attacks a tenant could try, and their answers.

uvicorn on loopback, PostgreSQL, S3 (moto) — and SQLite with a local store where the queue's
limit is at stake. A body over the limit gets a 413 before it is read; a 422 echoes only bounded
excerpts; a lone UTF-16 surrogate is a 422; a key in the query string is a 401 and never reaches
the access log; a flood of submissions meets the per-tenant queued limit with 429 and
``Retry-After``. Every refused request is checked to have stored nothing: the test reads the
database's jobs and events before and after.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select

from service import queue
from service.api import create_app
from service.api.edges import EXCERPT_CHARS, MAX_ERRORS
from service.auth import create_key
from service.db import make_engine, session_factory, upgrade
from service.models import Job, JobEvent, JobState
from service.settings import Settings
from service.storage import store_from_settings
from tests.integration.api_fixtures import LiveAPI, job_spec, publish_tiny_dataset, serve

SEVENTEEN_MB = 17 * 1024 * 1024


@pytest.fixture
def http(live_api: LiveAPI) -> Iterator[httpx.Client]:
    """An HTTP client on the S3-backed API, authenticated as the test's tenant."""
    with httpx.Client(base_url=live_api.base_url, headers=live_api.headers(), timeout=30) as c:
        yield c


def stored(api: LiveAPI) -> tuple[int, int]:
    """(jobs, job events) in the whole database: a refused request must change neither."""
    with api.session() as session:
        return (
            session.scalar(sql_select(func.count()).select_from(Job)),
            session.scalar(sql_select(func.count()).select_from(JobEvent)),
        )


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the response"
        body += chunk
    return int(status_line.split()[1]), headers, body


# --- body limit -------------------------------------------------------------------------------


def test_a_declared_17_mb_body_is_refused_before_it_is_read(live_api: LiveAPI) -> None:
    before = stored(live_api)
    head = (
        "POST /jobs HTTP/1.1\r\nHost: bird\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {live_api.api_key}\r\nContent-Length: {SEVENTEEN_MB}\r\n\r\n"
    ).encode()
    with socket.create_connection(_address(live_api.base_url), timeout=10) as sock:
        # The headers and the first 64 KiB: the answer comes without waiting for the rest.
        sock.sendall(head + b'{"dataset": {"uri": "' + b"a" * 65536)
        code, headers, body = _read_response(sock)
    assert code == 413
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    limit = live_api.settings.max_body_bytes
    assert json.loads(body) == {
        "detail": f"request body too large: at most {limit} bytes are accepted"
    }
    assert stored(live_api) == before


def _send_chunked(base_url: str, api_key: str, total: int) -> dict[str, object]:
    """POST /jobs with ``total`` bytes, chunked (no Content-Length), reading while writing.

    Returns the response (status, headers, body), the bytes sent before it came, and the error
    the sending met, if any.
    """
    result: dict[str, object] = {}
    head = (
        "POST /jobs HTTP/1.1\r\nHost: bird\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api_key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b'{"x": "' + b"a" * (16 * 1024 - 7)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(_address(base_url), timeout=10) as sock:
        sock.sendall(head)
        # Send without blocking and watch for an answer, as a client that reads while it
        # writes: once the server answers, stop sending and read it.
        sock.setblocking(False)
        pending = b""
        try:
            while sent < total or pending:
                if not pending:
                    pending = framed
                readable, writable, _ = select.select([sock], [sock], [], 10)
                if readable:
                    break
                if writable:
                    written = sock.send(pending)
                    sent += written
                    pending = pending[written:]
        except OSError as error:  # the server closed the connection under our feet
            result["error"] = error
        sock.settimeout(10)
        result["response"] = _read_response(sock)
    result["sent"] = sent
    return result


def test_streamed_bodies_are_cut_off_at_the_limit_while_healthz_answers(
    live_api: LiveAPI,
) -> None:
    """Ten 17 MB bodies sent chunked (no Content-Length), one after another: each is answered
    413 while it is still being sent; meanwhile /healthz keeps answering."""
    before = stored(live_api)
    results: list[dict[str, object]] = []
    failures: list[BaseException] = []

    def attack() -> None:
        try:
            for _ in range(10):
                results.append(_send_chunked(live_api.base_url, live_api.api_key, SEVENTEEN_MB))
        except BaseException as error:
            failures.append(error)

    sender = threading.Thread(target=attack)
    sender.start()
    latencies = []
    with httpx.Client(base_url=live_api.base_url, timeout=5) as client:
        while sender.is_alive() or not latencies:
            began = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - began)
    sender.join(timeout=120)
    assert failures == [] and len(results) == 10
    sent = [int(result["sent"]) for result in results]  # type: ignore[call-overload]
    print(
        f"\n/healthz answered {len(latencies)} times during the attacks, slowest "
        f"{max(latencies) * 1000:.1f} ms; the client had sent {min(sent)} … {max(sent)} bytes "
        "when each 413 came"
    )
    for result in results:
        code, _headers, body = result["response"]  # type: ignore[misc]
        assert code == 413, body
        assert "too large" in json.loads(body)["detail"]
    # Each answer came while its body was still being sent: the server did not wait for it.
    # (What the client got out before it saw the answer sat in the kernels' socket buffers.)
    assert max(sent) < SEVENTEEN_MB, sent
    assert stored(live_api) == before


def test_the_limit_is_a_setting(live_api: LiveAPI) -> None:
    settings = live_api.settings.model_copy(update={"max_body_bytes": 4096})
    app = create_app(settings, engine=live_api.engine, store=live_api.store)
    with serve(app) as base_url, httpx.Client(base_url=base_url, headers=live_api.headers()) as c:
        small = c.post("/jobs", json={"dataset": {"uri": "x" * 3000}})
        large = c.post("/jobs", json={"dataset": {"uri": "x" * 5000}})
    assert small.status_code == 422
    assert large.status_code == 413
    assert large.json()["detail"] == "request body too large: at most 4096 bytes are accepted"
    assert Settings(max_body_bytes=2**20).max_body_bytes == 2**20
    with pytest.raises(ValueError, match="max_body_bytes"):
        Settings(max_body_bytes=10)


# --- bounded 422s -----------------------------------------------------------------------------


def test_a_422_echoes_only_a_bounded_excerpt(live_api: LiveAPI, http: httpx.Client) -> None:
    before = stored(live_api)
    # A value of almost 1 MB where at most 1,024 characters are allowed.
    huge_uri = "x" * 1_000_000
    response = http.post("/jobs", json={"dataset": {"uri": huge_uri}})
    assert response.status_code == 422
    assert len(response.content) < 2_000
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "dataset", "uri"]
    assert error["type"] == "string_too_long"
    assert len(error["input"]) <= EXCERPT_CHARS and error["input"].endswith("…")
    assert error["input"].startswith("xxxx")

    # Thousands of unknown fields: the first MAX_ERRORS are listed, then how many more there were.
    flood = {"dataset": {"uri": "d"}, **{f"field{n}": n for n in range(5_000)}}
    response = http.post("/jobs", json=flood)
    assert response.status_code == 422
    assert len(response.content) < 10_000
    detail = response.json()["detail"]
    assert len(detail) == MAX_ERRORS + 1
    assert {error["type"] for error in detail[:-1]} == {"extra_forbidden"}
    assert detail[-1] == {
        "type": "too_many_errors",
        "loc": [],
        "msg": f"{5_000 - MAX_ERRORS} more errors not shown",
    }

    # Not JSON at all (text/plain): the body is refused as a whole, echoed as an excerpt.
    response = http.post("/jobs", content=b"y" * 900_000, headers={"Content-Type": "text/plain"})
    assert response.status_code == 422
    assert len(response.content) < 2_000
    assert stored(live_api) == before


# --- text UTF-8 cannot carry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "loc", "error_type"),
    [
        # Plain string fields: pydantic refuses the string itself.
        ({"dataset": {"uri": "datasets/tiny\ud800"}}, ["dataset", "uri"], "string_unicode"),
        ({"teacher": {"arch": "resnet18\udfff"}}, ["teacher", "arch"], "string_unicode"),
        # Free-form options pass the schema; the API's own check finds the value or the name.
        ({"student": {"options": {"width": "\ud83d"}}}, ["student", "options", "width"], None),
        ({"student": {"options": {"\ud800": 1}}}, ["student", "options", "\ufffd"], None),
    ],
)
def test_lone_surrogates_are_refused_and_nothing_is_stored(
    live_api: LiveAPI,
    http: httpx.Client,
    tiny_dataset: str,
    spec: dict,
    loc: list,
    error_type: str | None,
) -> None:
    before = stored(live_api)
    # json.dumps writes a lone surrogate as the escape "\ud800", exactly what an attacker sends.
    body = json.dumps({**job_spec(tiny_dataset), **spec})
    assert "\\ud" in body
    response = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", *loc]
    if error_type is None:
        assert error["type"] == "value_error"
        assert "lone UTF-16 surrogate" in error["msg"]
    else:
        assert error["type"] == error_type
    assert stored(live_api) == before
    assert http.get("/jobs").status_code == 200


def test_a_surrogate_in_an_option_name_is_refused_without_breaking_the_answer(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    before = stored(live_api)
    spec = job_spec(tiny_dataset, method={"name": "bkd", "options": {"\ud800": 1.0}})
    response = http.post(
        "/jobs", content=json.dumps(spec), headers={"Content-Type": "application/json"}
    )
    # The unknown option is named in the message, with the surrogate made printable.
    assert response.status_code == 422, response.text
    assert "\ufffd" in response.text or "\\ud800" in response.text
    assert stored(live_api) == before


def test_an_idempotency_key_must_be_printable_ascii(
    live_api: LiveAPI, http: httpx.Client, tiny_dataset: str
) -> None:
    before = stored(live_api)
    # (Control characters other than tab never reach the app: uvicorn refuses the request.)
    for key in [b"caf\xc3\xa9", b"tab\there", b"\xff"]:
        response = http.post("/jobs", json=job_spec(tiny_dataset), headers={"Idempotency-Key": key})
        assert response.status_code == 422, (key, response.text)
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert stored(live_api) == before


def test_a_stored_row_with_a_lone_surrogate_cannot_break_the_reads(
    live_api: LiveAPI, http: httpx.Client
) -> None:
    # As a row written before the API refused such specs: PostgreSQL's json type keeps the
    # escape, and reading it back gives Python a string UTF-8 cannot encode.
    with live_api.session() as session:
        job = queue.submit(
            session, live_api.tenant_id, {"dataset": {"uri": "old\ud800"}, "method": {"name": "x"}}
        )
    listed = http.get("/jobs")
    assert listed.status_code == 200
    (item,) = [item for item in listed.json()["items"] if item["id"] == job.id]
    assert item["dataset"] == "old\ufffd"
    shown = http.get(f"/jobs/{job.id}")
    assert shown.status_code == 200
    assert shown.json()["spec"]["dataset"]["uri"] == "old\ufffd"


# --- credentials only in the Authorization header ---------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_keys_in_the_query_string_are_refused_and_never_logged(
    live_api: LiveAPI, tiny_dataset: str
) -> None:
    key = live_api.api_key
    app = create_app(live_api.settings, engine=live_api.engine, store=live_api.store)
    access = logging.getLogger("uvicorn.access")
    # uvicorn reconfigures its loggers for this server; the module's other servers, which run
    # without an access log, get them back as they were afterwards.
    saved = (access.level, list(access.handlers), access.propagate)
    lines = _Lines()
    before = stored(live_api)
    with serve(app, access_log=True) as base_url:
        # uvicorn configured its loggers at start; listen from now on.
        access.addHandler(lines)
        try:
            with httpx.Client(base_url=base_url, timeout=30) as client:
                alone = client.get("/jobs", params={"api_key": key})
                beside = client.get("/jobs", params={"api_key": key}, headers=live_api.headers())
                submitted = client.post(
                    "/jobs",
                    params={"token": key},
                    json=job_spec(tiny_dataset),
                    headers=live_api.headers(),
                )
                disguised = client.get(
                    "/jobs", params={"limit": 5, "x": key}, headers=live_api.headers()
                )
                health = client.get("/healthz", params={"api_key": key})
                fine = client.get("/jobs", params={"limit": 5}, headers=live_api.headers())
        finally:
            access.removeHandler(lines)
    access.setLevel(saved[0])
    access.handlers = saved[1]
    access.propagate = saved[2]
    for response in (alone, beside, submitted, disguised):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert "only in the Authorization header" in response.json()["detail"]
        assert key not in response.text
    assert health.status_code == 200 and fine.status_code == 200
    assert stored(live_api) == before
    # Every request was logged, none with the key; its place in the query says [redacted].
    log = "\n".join(lines.lines)
    assert len(lines.lines) >= 6, log
    assert key not in log
    assert log.count("=[redacted]") == 5, log
    assert "/jobs?limit=5 HTTP/1.1" in log


# --- the per-tenant queued limit --------------------------------------------------------------


def _flood(base_url: str, headers: dict[str, str], dataset: str) -> list[httpx.Response]:
    """300 quick submissions from 8 threads."""
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:

        def submit(n: int) -> httpx.Response:
            return client.post("/jobs", json=job_spec(dataset, seed=n))

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(submit, range(300)))


def _check_flood(responses: list[httpx.Response], limit: int) -> list[int]:
    codes = [response.status_code for response in responses]
    assert codes.count(201) == limit and codes.count(429) == 300 - limit, sorted(set(codes))
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "60"
            assert f"already has {limit} queued" in response.json()["detail"]
    ids = [response.json()["id"] for response in responses if response.status_code == 201]
    # Random ids: neither in submission order nor dense.
    assert sorted(ids) != ids and max(ids) - min(ids) > 10 * limit
    return ids


def test_300_quick_submissions_meet_the_queued_limit_on_postgresql(
    live_api: LiveAPI, tiny_dataset: str
) -> None:
    limit = live_api.settings.max_queued_per_tenant
    assert limit == 100  # the default
    ids = _check_flood(_flood(live_api.base_url, live_api.headers(), tiny_dataset), limit)
    with live_api.session() as session:
        rows = session.execute(
            sql_select(Job.id, Job.state).where(Job.tenant_id == live_api.tenant_id)
        ).all()
    assert sorted(job_id for job_id, _ in rows) == sorted(ids)
    assert {state for _, state in rows} == {JobState.QUEUED}
    # Another tenant is not affected by this one's full queue.
    other = live_api.new_key()
    with httpx.Client(base_url=live_api.base_url, timeout=30) as client:
        response = client.post(
            "/jobs", json=job_spec(tiny_dataset), headers=live_api.headers(other.key)
        )
    assert response.status_code == 201


def test_300_quick_submissions_meet_the_queued_limit_on_sqlite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_queued_per_tenant=40)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            created = create_key(session, "flood")
        store = store_from_settings(settings)
        dataset = publish_tiny_dataset(store)
        with serve(create_app(settings, engine=engine, store=store)) as base_url:
            headers = {"Authorization": f"Bearer {created.key}"}
            ids = _check_flood(_flood(base_url, headers, dataset), 40)
        with session_factory(engine)() as session:
            assert sorted(session.scalars(sql_select(Job.id))) == sorted(ids)
            assert session.scalar(sql_select(func.count()).select_from(JobEvent)) == 40
    finally:
        engine.dispose()
