"""What tenants read of an error: the Redactor on messages and tracebacks of a deployment."""

from __future__ import annotations

import socket
from pathlib import Path

from service.redaction import Redactor, error_report, error_summary, strip_ansi
from service.settings import Settings

ENDPOINT = "http://10.1.2.3:9000"


def _s3_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        store_url="s3://bird-internal-7f3a/deploy",
        s3_endpoint_url=ENDPOINT,
        database_url="postgresql+psycopg://bird:secret@db.internal:5432/bird",
        ray_address="10.1.2.4:6379",
    )


def test_the_deployment_store_becomes_store_relative_and_other_names_placeholders(
    tmp_path: Path,
) -> None:
    redact = Redactor.for_deployment(_s3_settings(tmp_path))
    raw = (
        "S3 request for s3://bird-internal-7f3a/deploy/datasets/fm/part-00000.parquet failed: "
        f'Could not connect to the endpoint URL: "{ENDPOINT}/bird-internal-7f3a/deploy/x"; '
        "bucket 'bird-internal-7f3a' does not exist; ray at 10.1.2.4:6379; "
        f"host {socket.gethostname()}; db postgresql+psycopg://bird:secret@db.internal:5432/bird"
    )
    text = redact(raw)
    assert "datasets/fm/part-00000.parquet" in text
    for leak in (
        "bird-internal-7f3a",
        "10.1.2.3",
        "9000",
        "10.1.2.4",
        "secret",
        "db.internal",
        "http://",
    ):
        assert leak not in text, (leak, text)
    assert socket.gethostname() not in text.replace("<host>", "")


def test_a_local_store_and_server_paths_are_not_shown(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", store_url=str(tmp_path / "store"))
    redact = Redactor.for_deployment(settings)
    raw = (
        f"{tmp_path}/store/datasets/fm/part-00000.parquet has 10 bytes; "
        "/etc/bird/secret.conf missing; /root/.pyenv/versions/3.11.7/lib/python3.11/"
        "site-packages/ray/train/v2/api/exceptions.py line 3"
    )
    text = redact(raw)
    assert text.startswith("datasets/fm/part-00000.parquet has 10 bytes")
    assert "<path>/secret.conf" in text and "/etc/bird" not in text
    assert "ray/train/v2/api/exceptions.py" in text and ".pyenv" not in text
    assert str(tmp_path) not in text


def test_a_tenants_own_space_reads_as_the_tenant_names_it(tmp_path: Path) -> None:
    redact = Redactor.for_deployment(_s3_settings(tmp_path)).stripping(
        "s3://bird-internal-7f3a/deploy/tenants/7/", "tenants/7/"
    )
    raw = (
        "part s3://bird-internal-7f3a/deploy/tenants/7/datasets/fm/part-00000.parquet is corrupt; "
        "key tenants/7/teachers/t/model.safetensors missing; "
        "shared s3://bird-internal-7f3a/deploy/shared/datasets/x; other tenants/17/datasets/y"
    )
    assert redact(raw) == (
        "part datasets/fm/part-00000.parquet is corrupt; key teachers/t/model.safetensors "
        "missing; shared shared/datasets/x; other tenants/17/datasets/y"
    )


def test_summary_is_one_line_without_colour_codes_and_bounded(tmp_path: Path) -> None:
    redact = Redactor.for_deployment(Settings(data_dir=tmp_path))
    error = ValueError("\x1b[31mbad\x1b[0m value\n  in line two\n" + "x" * 2000)
    line = error_summary(error, redact)
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("ValueError: bad value in line two")
    assert len(line) <= 500
    assert strip_ansi("\x1b[1m\x1b[36mray\x1b[39m\x1b[22m") == "ray"


def test_report_keeps_the_traceback_but_not_the_paths(tmp_path: Path) -> None:
    redact = Redactor.for_deployment(Settings(data_dir=tmp_path))
    try:
        try:
            raise KeyError(f"{tmp_path}/secret")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as error:
        report = error_report(error, redact)
    assert "Traceback (most recent call last)" in report
    assert "KeyError" in report and "RuntimeError: outer" in report
    assert "tests/unit/test_redaction.py" in report  # the project's own files, relative
    assert str(tmp_path) not in report and "/work/" not in report
