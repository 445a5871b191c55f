"""The moto S3 server the tests talk to over HTTP (a session fixture of ``tests/conftest.py``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

S3_ACCESS_KEY_ID = "testing"
S3_SECRET_ACCESS_KEY = "testing"
S3_REGION = "us-east-1"
S3_STORE_PREFIX = "bird"


def _fix_complete_multipart_root(patch: pytest.MonkeyPatch) -> None:
    """Work around getmoto/moto#10055 (a moto 5.2.1 regression) in the in-process server.

    Moto answers CompleteMultipartUpload with a ``<CompleteMultipartUploadResponse>`` root where
    S3 sends ``<CompleteMultipartUploadResult>``. boto3 ignores the root name, but the AWS C++
    SDK inside pyarrow (and so Ray Train/Ray Data writing to S3) takes any other root for an
    error embedded in a 200 and fails every multipart write. Renaming the root in the response
    makes the server behave like S3; versions without the bug are left alone.
    """
    try:
        from moto.core.serialize import S3Serializer
    except ImportError:  # a moto without this serializer does not have the bug either
        return
    original = S3Serializer._serialized_result_to_response
    wrong, right = "<CompleteMultipartUploadResponse", "<CompleteMultipartUploadResult"

    def serialized_result_to_response(self: Any, resp: Any, *args: Any, **kwargs: Any) -> Any:
        resp = original(self, resp, *args, **kwargs)
        body = resp.get("body")
        if self.operation_model.name == "CompleteMultipartUpload" and isinstance(body, str):
            resp["body"] = body.replace(wrong, right, 1).replace(
                "</CompleteMultipartUploadResponse>", "</CompleteMultipartUploadResult>", 1
            )
        return resp

    patch.setattr(S3Serializer, "_serialized_result_to_response", serialized_result_to_response)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 and a free port; yields its endpoint URL.

    Port 0 lets the OS pick a free port at bind time, which avoids the race of probing for a
    free port first and binding it later. The server runs in a thread of this process, so
    clients in other processes (Ray workers) can reach it too.
    """
    # One INFO line per request, formatted and captured by pytest, costs the server time.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as patch:
        _fix_complete_multipart_root(patch)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
