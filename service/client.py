"""A small Python client for the bird REST API (``httpx``, synchronous).

::

    from service.client import BirdClient

    with BirdClient("http://127.0.0.1:8000", api_key) as bird:
        job = bird.submit({"dataset": {"uri": "datasets/fmnist"}, "method": {"name": "bird"}})
        ...
        path = bird.download_checkpoint(job["id"], "best", "models/")
        # bird_core.checkpoint.load_student(path) loads the student

Every 4xx/5xx answer raises :class:`BirdAPIError` carrying the status and the server's
``detail``; a server that cannot be reached raises :class:`BirdConnectionError`. Responses are
returned as the JSON the API sends (dicts and lists).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATES",
    "BirdAPIError",
    "BirdClient",
    "BirdConnectionError",
    "BirdError",
    "ChecksumError",
    "format_detail",
]

DEFAULT_URL = "http://127.0.0.1:8000"
_CHUNK = 1 << 20
# The job states after which nothing more is written (the API's terminal states).
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class BirdError(Exception):
    """Base class of every error this client raises."""


class BirdAPIError(BirdError):
    """The API answered 4xx or 5xx; ``detail`` is the server's explanation (str or list)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")


class BirdConnectionError(BirdError):
    """The API could not be reached (refused, timed out, name not resolved)."""


class ChecksumError(BirdError):
    """A downloaded checkpoint's size or sha256 differs from its checkpoint record."""


def format_detail(detail: Any) -> str:
    """A one-line rendering of a FastAPI ``detail`` (a string, or a list of field errors)."""
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if isinstance(error, Mapping):
                loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
                msg = str(error.get("msg", error))
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(error))
        return "; ".join(parts)
    return " ".join(str(detail).split())


def _same_origin(a: str, b: str) -> bool:
    first, second = urlsplit(a), urlsplit(b)
    return (first.scheme, first.netloc) == (second.scheme, second.netloc)


class BirdClient:
    """A client for one bird API and one API key.

    ``timeout`` (seconds) bounds each request; downloads stream, so it bounds the wait for each
    chunk rather than the whole transfer.
    """

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        headers = {"User-Agent": "bird-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        # Never show the key.
        return f"BirdClient({self.base_url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> BirdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail", body) if isinstance(body, dict) else body
            except ValueError:
                detail = response.text.strip() or response.reason_phrase
            raise BirdAPIError(response.status_code, detail)
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise BirdConnectionError(
                f"cannot reach the bird API at {self.base_url}: {exc or type(exc).__name__}"
            ) from None
        return self._check(response)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, spec: Mapping[str, Any], idempotency_key: str | None = None) -> dict:
        """Submit a job spec; the new (or, for a repeated idempotency key, the same) job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/jobs", json=dict(spec), headers=headers)

    def list_jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        """One page of jobs, newest first: ``{"items", "total", "limit", "offset"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state is not None:
            params["state"] = state
        return self._json("GET", "/jobs", params=params)

    def iter_jobs(self, state: str | None = None, page_size: int = 200) -> Iterator[dict]:
        """Every job (matching ``state``), newest first, fetching pages as needed."""
        offset = 0
        while True:
            page = self.list_jobs(state=state, limit=page_size, offset=offset)
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    def get_job(self, job_id: int) -> dict:
        """One job."""
        return self._json("GET", f"/jobs/{int(job_id)}")

    def cancel(self, job_id: int) -> dict:
        """Cancel a job: ``cancelled`` at once if queued, ``cancelling`` if running."""
        return self._json("POST", f"/jobs/{int(job_id)}/cancel")

    def metrics(self, job_id: int, since: int | None = None) -> dict:
        """Metric series after ``since``, the latest summary and the per-group table."""
        params = {"since": since} if since is not None else None
        return self._json("GET", f"/jobs/{int(job_id)}/metrics", params=params)

    def trials(self, job_id: int) -> list[dict]:
        """The trials of the job's search."""
        return self._json("GET", f"/jobs/{int(job_id)}/trials")

    def events(self, job_id: int) -> list[dict]:
        """The job's state changes, oldest first."""
        return self._json("GET", f"/jobs/{int(job_id)}/events")

    def logs(self, job_id: int, since: int | None = None) -> dict:
        """Log lines after ``since``: ``{"items", "next_since"}``."""
        params = {"since": since} if since is not None else None
        return self._json("GET", f"/jobs/{int(job_id)}/logs", params=params)

    def checkpoints(self, job_id: int) -> list[dict]:
        """The job's checkpoints: name, uri, size, sha256, created_at and a download url."""
        return self._json("GET", f"/jobs/{int(job_id)}/checkpoints")

    # -- datasets -------------------------------------------------------------------------------

    def list_datasets(self) -> list[dict]:
        """The caller's datasets, then the shared ones."""
        return self._json("GET", "/datasets")["items"]

    def describe_dataset(self, name: str) -> dict:
        """Counts per split × class × group of the caller's dataset ``name`` (and ``table``)."""
        return self._json("GET", f"/datasets/{quote(name, safe='')}")

    def delete_dataset(self, name: str) -> None:
        """Delete the caller's dataset ``name``."""
        self._request("DELETE", f"/datasets/{quote(name, safe='')}")

    def push_dataset(self, directory: Path | str, name: str) -> dict:
        """Upload the dataset directory ``directory`` (a published bird dataset: Parquet parts
        and ``manifest.json``) as the caller's dataset ``name``; return its listing row.

        Registers the upload (``POST /datasets``), then PUTs every file to its URL, the
        manifest last, so the dataset never exists half uploaded. The bearer key goes only to
        the API itself, never to a presigned URL.
        """
        return self._push("datasets", directory, name)

    def list_teachers(self) -> list[dict]:
        """The caller's teachers, then the shared ones."""
        return self._json("GET", "/teachers")["items"]

    def get_teacher(self, name: str) -> dict:
        """The caller's teacher ``name``: files, size, metadata."""
        return self._json("GET", f"/teachers/{quote(name, safe='')}")

    def delete_teacher(self, name: str) -> None:
        """Delete the caller's teacher ``name``."""
        self._request("DELETE", f"/teachers/{quote(name, safe='')}")

    def push_teacher(self, directory: Path | str, name: str) -> dict:
        """Upload a teacher directory (what ``bird teachers train --out`` writes) as the
        caller's teacher ``name``, like :meth:`push_dataset`; jobs then name it
        ``teachers/<name>``."""
        return self._push("teachers", directory, name)

    def _push(self, kind: str, directory: Path | str, name: str) -> dict:
        root = Path(directory)
        files = sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        )
        body = {
            "name": name,
            "files": [{"path": rel, "size": (root / rel).stat().st_size} for rel in files],
        }
        upload = self._json("POST", f"/{kind}", json=body)
        for item in upload["uploads"]:
            url = urljoin(self.base_url + "/", item["url"])
            # Streamed from the file, with its Content-Length (S3 refuses chunked uploads).
            with (root / item["path"]).open("rb") as handle:
                request = self._http.build_request(item["method"], url, content=handle)
                if not _same_origin(url, self.base_url):
                    request.headers.pop("Authorization", None)
                response = self._send(request, f"upload {item['path']}")
                response.read()
            if response.status_code >= 400 and _same_origin(url, self.base_url):
                self._check(response)
            elif response.status_code >= 400:
                raise BirdAPIError(
                    response.status_code,
                    f"the object store refused {item['path']} (HTTP {response.status_code})",
                )
        for row in self._json("GET", f"/{kind}")["items"]:
            if row["uri"] == upload["uri"]:
                return row
        raise BirdAPIError(404, f"{kind.removesuffix('s')} {name!r} is not listed after its upload")

    # -- downloads ------------------------------------------------------------------------------

    def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        try:
            return self._http.send(request, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            raise BirdConnectionError(f"cannot {what}: {exc or type(exc).__name__}") from None

    @contextlib.contextmanager
    def _open_download(self, job_id: int, name: str) -> Iterator[httpx.Response]:
        """A streaming response with the archive's bytes, following the API's redirect.

        The bearer key goes only to the API itself: a presigned S3 URL carries its own
        signature (and S3 rejects a request that also has an Authorization header).
        """
        path = f"/jobs/{int(job_id)}/checkpoints/{name}"
        response = self._send(self._http.build_request("GET", path), f"reach {self.base_url}")
        try:
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                response.close()
                request = self._http.build_request("GET", location)
                if not _same_origin(location, self.base_url):
                    del request.headers["Authorization"]
                response = self._send(request, f"download checkpoint {name!r}")
            if response.status_code >= 400:
                response.read()
                self._check(response)
            yield response
        finally:
            response.close()

    def download_checkpoint(
        self,
        job_id: int,
        name: str,
        dest_dir: str | os.PathLike[str],
        *,
        keep_archive: bool = False,
    ) -> Path:
        """Download checkpoint ``name`` of the job, verify it, and unpack it.

        The archive is streamed to a temporary file next to ``dest_dir/<name>``, its size and
        sha256 checked against the checkpoint record (:class:`ChecksumError` on a mismatch,
        nothing left behind), then unpacked into ``dest_dir/<name>/`` (replacing what was
        there), which ``bird_core.checkpoint.load_student`` loads. Returns that directory.
        With ``keep_archive`` the verified ``<name>.tar`` is kept beside it.
        """
        records = {record["name"]: record for record in self.checkpoints(job_id)}
        if name not in records:
            have = ", ".join(sorted(records)) or (
                "none" if self.get_job(job_id)["state"] in TERMINAL_STATES else "none yet"
            )
            raise BirdAPIError(
                404, f"job {job_id} has no checkpoint named {name!r} (it has: {have})"
            )
        record = records[name]
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".tar.part", dir=dest)
        archive = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as handle, self._open_download(job_id, name) as response:
                for chunk in response.iter_bytes(_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if size != record["size"] or digest.hexdigest() != record["sha256"]:
                raise ChecksumError(
                    f"checkpoint {name!r} of job {job_id} failed verification: expected "
                    f"{record['size']} bytes with sha256 {record['sha256']}, got {size} bytes "
                    f"with sha256 {digest.hexdigest()}; the download was discarded"
                )
            target = dest / name
            _unpack(archive, target)
            if keep_archive:
                os.replace(archive, dest / f"{name}.tar")
            return target
        finally:
            archive.unlink(missing_ok=True)


def _unpack(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target`` (replaced), refusing paths that leave it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                if hasattr(tarfile, "data_filter"):
                    # Rejects absolute paths, '..', links out of the tree and device files.
                    tar.extractall(staging, filter="data")
                else:  # Python without extraction filters: check the names ourselves
                    root = staging.resolve()
                    for member in tar.getmembers():
                        dest = (staging / member.name).resolve()
                        if root not in dest.parents or not (member.isfile() or member.isdir()):
                            raise BirdError(f"unsafe entry {member.name!r} in the checkpoint")
                    tar.extractall(staging)
        except (tarfile.TarError, OSError) as exc:
            raise BirdError(f"the checkpoint archive cannot be unpacked: {exc}") from None
        content = staging
        entries = list(staging.iterdir())
        # Also accept an archive that wraps the checkpoint in one top-level directory.
        if not (staging / "manifest.json").exists() and len(entries) == 1 and entries[0].is_dir():
            content = entries[0]
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(content, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
