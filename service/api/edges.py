"""The API's request edges: what is refused or bounded before, or instead of, a route's work.

* **Body limit.** :class:`BodyLimitMiddleware` counts a request's body as it streams in and
  answers 413 once it passes ``BIRD_MAX_BODY_BYTES``; a body whose ``Content-Length`` already
  says so is refused before the application reads a byte of it. Nothing ever holds more than
  the limit in memory, and the event loop is never busy parsing a huge document.
* **Bounded 422s.** :func:`bounded_errors` keeps at most :data:`MAX_ERRORS` errors and cuts
  every echoed value (``input``, ``ctx``, long ``loc`` parts and messages) to an excerpt of at
  most :data:`EXCERPT_CHARS` characters: a 422 never mirrors a large body back.
* **Text that UTF-8 cannot carry.** JSON may spell a lone UTF-16 surrogate (``"\\ud800"``);
  Python keeps it in a ``str``, but it has no UTF-8 encoding, so it could be neither stored as
  text nor answered. :func:`invalid_text_at` finds one in a parsed request (the API refuses it
  with a 422), :func:`valid_text` replaces any in what the API answers (U+FFFD).
* **Credentials in URLs.** API keys belong in the ``Authorization`` header only: a query string
  ends up in access logs, proxies and browser histories. :func:`credential_in_query` spots a
  query that carries one (the API refuses it with a 401), and :class:`AccessLogRedaction`
  rewrites such a query in uvicorn's access log before the line is written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import status
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import KEY_PREFIX

__all__ = [
    "CREDENTIAL_PARAMS",
    "EXCERPT_CHARS",
    "MAX_ERRORS",
    "AccessLogRedaction",
    "BodyLimitMiddleware",
    "BodyTooLarge",
    "bounded_errors",
    "credential_in_query",
    "excerpt",
    "invalid_text_at",
    "redact_query",
    "valid_text",
]

# A 422 lists at most this many errors, and echoes at most this many characters of any value.
MAX_ERRORS = 20
EXCERPT_CHARS = 200
# Query parameters that look like an attempt to authenticate through the URL.
CREDENTIAL_PARAMS = frozenset(
    {"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization"}
)
_REDACTED = "[redacted]"


# --- body limit -------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """A request body over the limit (413). An HTTPException, so that FastAPI, which turns
    other errors raised while it reads a body into a 400, passes it on unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"request body too large: at most {limit} bytes are accepted",
            # The rest of the body is not read: the connection cannot carry another request.
            headers={"Connection": "close"},
        )
        self.limit = limit


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP server refuses these before the app sees them
                return None
    return None


_UPLOAD_PATH = re.compile(r"^/(datasets|teachers)/[^/]+/files/.+")


class BodyLimitMiddleware:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, counting as they come.

    A ``Content-Length`` over the limit is answered at once, before the application runs (no
    key check, no routing). A body sent without one (chunked) is counted chunk by chunk as the
    application reads it; the chunk that passes the limit ends the request with a 413. Either
    way the answer asks the client to close the connection, so the rest of the body is never
    read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes if upload_max_bytes is not None else max_bytes

    def _limit(self, scope: Scope) -> int:
        """The limit of this request: a file PUT to a dataset upload (a local store's upload
        route) may be as large as one dataset file; everything else is JSON."""
        path = scope.get("path", "")
        if scope.get("method") == "PUT" and _UPLOAD_PATH.match(path):
            return self.upload_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the application with a counting ``receive``; answer 413 when it overflows."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Normally the application's own handler answers it; this covers a read outside
            # the routes (a middleware, a mounted app).
            if response_started:
                raise
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = BodyTooLarge(limit)
        response = JSONResponse(
            {"detail": error.detail}, status_code=error.status_code, headers=error.headers
        )
        await response(scope, receive, send)


# --- bounded validation errors ----------------------------------------------------------------


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> Any:
    """``value`` if it is short, else an excerpt of its JSON text of at most ``limit`` characters.

    Numbers, booleans and None are kept. A string or a container whose JSON text is longer than
    ``limit`` becomes a string: its first characters and an ellipsis. Anything else becomes its
    ``str``. Strings come back valid UTF-8 (:func:`valid_text`).
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, (str, list, tuple, dict)):
        value = str(value)
    text = value if isinstance(value, str) else _json_text(value)
    if len(text) <= limit:
        return valid_text(value)
    return valid_text(text[: limit - 1]) + "…"


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def bounded_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's field-level errors, bounded: at most :data:`MAX_ERRORS` of them, each value
    they echo cut to an excerpt, every string valid UTF-8. When errors were left out, a last
    entry (type ``too_many_errors``) says how many."""
    bounded: list[dict[str, Any]] = []
    for error in errors[:MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": excerpt(str(error.get("type", "value_error")), 100),
            "loc": [
                part if isinstance(part, int) else excerpt(str(part), 100)
                for part in list(error.get("loc", ()))[:32]
            ],
            # Pydantic prefixes a validator's own message with "Value error, ": noise to a
            # user who reads the message (the type already says value_error).
            "msg": excerpt(
                str(error.get("msg", "")).removeprefix("Value error, "), 2 * EXCERPT_CHARS
            ),
        }
        if "input" in error:
            item["input"] = excerpt(error["input"])
        ctx = error.get("ctx")
        if isinstance(ctx, Mapping):
            item["ctx"] = {excerpt(str(key), 100): excerpt(value) for key, value in ctx.items()}
        bounded.append(item)
    if len(errors) > MAX_ERRORS:
        bounded.append(
            {
                "type": "too_many_errors",
                "loc": [],
                "msg": f"{len(errors) - MAX_ERRORS} more errors not shown",
            }
        )
    return bounded


# --- text that UTF-8 cannot carry -------------------------------------------------------------


def _is_valid(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def invalid_text_at(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in ``value`` (parsed JSON) a string or key holds a lone surrogate, or None."""
    if isinstance(value, str):
        return None if _is_valid(value) else loc
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and not _is_valid(key):
                return (*loc, excerpt(valid_text(key), 100))
            found = invalid_text_at(item, (*loc, key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = invalid_text_at(item, (*loc, index))
            if found is not None:
                return found
    return None


def valid_text(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (and keys) replaced by U+FFFD."""
    if isinstance(value, str):
        if _is_valid(value):
            return value
        # Through UTF-16, where a proper pair joins into one character and a lone half cannot
        # be decoded and becomes U+FFFD.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, Mapping):
        return {valid_text(key): valid_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [valid_text(item) for item in value]
    if isinstance(value, tuple):
        return tuple(valid_text(item) for item in value)
    return value


# --- credentials in URLs ----------------------------------------------------------------------


def _carries_credential(name: str, value: str) -> bool:
    return name.lower() in CREDENTIAL_PARAMS or value.strip().startswith(KEY_PREFIX)


def credential_in_query(query_string: bytes | str) -> str | None:
    """The name of the first query parameter that carries a credential, or None.

    A parameter carries one when its name is one of :data:`CREDENTIAL_PARAMS` or its value looks
    like an API key.
    """
    query = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    if not query:
        return None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if _carries_credential(name, value):
            return name
    return None


def redact_query(path: str) -> str:
    """``path`` with the value of every credential-carrying query parameter replaced."""
    base, separator, query = path.partition("?")
    if not separator:
        return path
    parts = []
    for part in query.split("&"):
        pairs = parse_qsl(part, keep_blank_values=True)
        if pairs and _carries_credential(*pairs[0]):
            parts.append(f"{part.partition('=')[0]}={_REDACTED}")
        else:
            parts.append(part)
    return f"{base}?{'&'.join(parts)}"


class AccessLogRedaction(logging.Filter):
    """A filter for the ``uvicorn.access`` logger: redacts credentials in logged query strings.

    uvicorn logs each request as ``'%s - "%s %s HTTP/%s" %d'`` with the path and query as the
    third argument; any string argument with a query is rewritten by :func:`redact_query`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments in place; always keep the record."""
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "?" in arg for arg in record.args
        ):
            record.args = tuple(
                redact_query(arg) if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True
