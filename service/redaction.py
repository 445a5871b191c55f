"""What a tenant may read of an error: no internal endpoint, host, bucket or server path.

A job's ``error``, its events and its log (``GET /jobs/{id}/logs``) are shown to the tenant.
Worker errors quote what they failed on: an S3 endpoint URL, the deployment's bucket, a path on
the server, a Ray node's address, colour codes of a Ray traceback. :class:`Redactor` rewrites
such text: the deployment's own store becomes store-relative keys (``datasets/fm/part-0.parquet``,
as the tenant names them in a spec), the other names become placeholders. The server's own log
(Python logging) keeps everything.
"""

from __future__ import annotations

import re
import socket
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from service.settings import Settings

__all__ = ["Redactor", "error_report", "error_summary", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_URL = re.compile(r"\b(?:https?|wss?|ray|redis|postgresql(?:\+\w+)?|sqlite)://[^\s'\"<>]+")
_S3_BUCKET = re.compile(r"\bs3://[^/\s'\"<>]+")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])")
# An absolute POSIX path of two components or more (not a piece of a URL or of a relative key).
_PATH = re.compile(r"(?<![\w.:/<>-])/(?:[\w.@+=~-]+/)+[\w.@+=~-]*")
_SITE_PACKAGES = ("site-packages/", "dist-packages/")
# How long a one-line error may be.
SUMMARY_CHARS = 500


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour and cursor codes."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Redactor:
    """Rewrites text for tenants; ``replacements`` (literal, placeholder) apply longest first."""

    replacements: tuple[tuple[str, str], ...] = ()
    code_roots: tuple[str, ...] = ()  # directories whose files are named relative to them

    @classmethod
    def for_deployment(cls, settings: Settings, *, extra: Iterable[str] = ()) -> Redactor:
        """The redactor of a deployment: its store, S3 endpoint, database, Ray address, data
        directory and host name, plus ``extra`` names (e.g. a worker's own host)."""
        pairs: list[tuple[str, str]] = []
        store = settings.resolved_store_url
        if store.startswith("s3://"):
            bucket = urlparse(store).netloc
            root = store.rstrip("/")
            pairs += [(root + "/", ""), (root, "<store>"), (f"s3://{bucket}", "s3://<bucket>")]
            pairs.append((bucket, "<bucket>"))
        else:
            root = store.rstrip("/")
            pairs += [(f"file://{root}/", ""), (root + "/", ""), (root, "<store>")]
        if settings.s3_endpoint_url:
            endpoint = settings.s3_endpoint_url.rstrip("/")
            pairs += [(endpoint, "<s3 endpoint>"), (urlparse(endpoint).netloc, "<s3 endpoint>")]
        pairs.append((settings.resolved_database_url, "<database>"))
        if settings.ray_address:
            pairs.append((settings.ray_address, "<ray>"))
        pairs.append((str(settings.data_dir.resolve()), "<data>"))
        hosts = {socket.gethostname(), socket.getfqdn(), *extra}
        pairs += [(host, "<host>") for host in hosts if host and host != "localhost"]
        roots = [str(Path(__file__).resolve().parents[1])]  # the project's own source tree
        return cls(
            tuple(sorted({p for p in pairs if p[0]}, key=lambda p: -len(p[0]))), tuple(roots)
        )

    def stripping(self, *prefixes: str) -> Redactor:
        """This redactor, also removing ``prefixes`` (e.g. a tenant's own space, so that its
        names read as the tenant writes them in a spec)."""
        pairs = {*self.replacements, *((p, "") for p in prefixes if p)}
        return Redactor(tuple(sorted(pairs, key=lambda p: -len(p[0]))), self.code_roots)

    def _path(self, match: re.Match[str]) -> str:
        path = match.group(0)
        for marker in _SITE_PACKAGES:
            if marker in path:
                return path.split(marker, 1)[1]
        for root in self.code_roots:
            if path.startswith(root.rstrip("/") + "/"):
                return path[len(root.rstrip("/")) + 1 :]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f"<path>/{name}" if name else "<path>"

    def __call__(self, text: str) -> str:
        """``text`` with colour codes removed and internal names replaced."""
        text = strip_ansi(text)
        for literal, placeholder in self.replacements:
            text = _replace_token(text, literal, placeholder)
        text = _URL.sub("<endpoint>", text)
        text = _S3_BUCKET.sub("s3://<bucket>", text)
        text = _IPV4.sub("<host>", text)
        return _PATH.sub(self._path, text)


def _replace_token(text: str, literal: str, placeholder: str) -> str:
    """Replace ``literal`` where it stands as a whole name (not inside a longer word)."""
    # A boundary is checked only at an end that is part of a name: a literal ending in "/"
    # (a store's root) replaces the start of the longer key that follows it.
    before = r"(?<![\w-])" if literal[0].isalnum() else ""
    after = r"(?![\w-])" if literal[-1].isalnum() else ""
    if before or after:
        pattern = before + re.escape(literal) + after
        return re.sub(pattern, lambda _m: placeholder, text)
    return text.replace(literal, placeholder)


def error_summary(
    error: BaseException, redact: Redactor, *, prefix: str = "", with_type: bool = True
) -> str:
    """One line for the job's ``error``: the exception's type (``with_type``) and message,
    redacted, colour codes and line breaks removed, at most :data:`SUMMARY_CHARS` characters."""
    message = str(error).strip()
    name = type(error).__name__
    text = f"{name}: {message}" if message and with_type else (message or name)
    line = " ".join(redact(prefix + text).split())
    if len(line) > SUMMARY_CHARS:
        line = line[: SUMMARY_CHARS - 1] + "…"
    return line


def error_report(error: BaseException, redact: Redactor) -> str:
    """The traceback of ``error`` (with its chain) for the job's log, redacted."""
    return redact("".join(traceback.format_exception(error)).rstrip())
