"""``bird jobs``: submit, list, show, watch, cancel and download jobs on a bird API server.

The server and key come from ``--url``/``--key`` or the environment (``BIRD_URL``, default
http://127.0.0.1:8000, and ``BIRD_API_KEY``). Every failure is one line on stderr,
``error: ...``, and a non-zero exit status: 1 when the server refused or failed the request,
2 for a problem with the command line or the spec file. No tracebacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    DEFAULT_URL,
    JsonOption,
    KeyOption,
    UrlOption,
    api_client,
    call_api,
    explain_and_exit,
    fail,
)
from cli.progress import stage_to_show

__all__ = ["jobs_app", "load_spec"]

jobs_app = typer.Typer(
    help="Jobs on a bird API server: submit, list, show, watch, cancel, download.",
    no_args_is_help=True,
    add_completion=False,
)

# What `watch` and `show` print from a split's latest metrics, in this order.
SUMMARY_METRICS = ("auroc", "accuracy", "f1", "delta_mean_deo", "delta_max_deo")
# `watch` rides out an API restart this long before giving up.
WATCH_RECONNECT_S = 30.0

JobIdArgument = Annotated[int, typer.Argument(help="The job's id.", min=1, show_default=False)]


def load_spec(path: Path) -> dict[str, Any]:
    """The job spec in ``path``: JSON for ``.json``, YAML (a superset of JSON) otherwise."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"cannot read spec file {path}: it is not UTF-8 text", 2)
    except OSError as exc:
        fail(f"cannot read spec file {path}: {exc.strerror or exc}", 2)
    if path.suffix.lower() == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(
                f"spec file {path} is not valid JSON: {exc.msg} "
                f"(line {exc.lineno}, column {exc.colno})",
                2,
            )
    else:
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            fail(f"spec file {path} is not valid YAML: {problem}{at}", 2)
    if not isinstance(spec, dict):
        fail(f"spec file {path} must hold a mapping (the job spec), not {type(spec).__name__}", 2)
    return spec


def _percent(job: Mapping[str, Any]) -> str:
    return f"{100 * float(job.get('progress') or 0):.0f}%"


def _summary(values: Mapping[str, Any] | None) -> str:
    """``auroc 0.912  accuracy 0.871 ...`` from a split's latest metrics."""
    if not values:
        return ""
    parts = []
    for name in SUMMARY_METRICS:
        value = values.get(name)
        if isinstance(value, int | float):
            parts.append(f"{name} {value:.4g}")
    return "  ".join(parts)


def _search_val(trials: list[dict[str, Any]], latest: str) -> str:
    """A search's val line: its best trial's best epoch once the search has picked it (the
    checkpoint the job keeps), else the latest epoch of the trial that reported last, said so
    (while a search runs, the API's latest val metrics are of whichever trial reported last)."""
    best = next((t for t in trials if t["metrics"].get("best")), None)
    if best is None:
        return f"{latest}  (the trial that reported last)" if latest else ""
    metrics = best["metrics"]
    return f"{_summary(metrics)}  (best trial {best['trial_index']}, epoch {metrics.get('epoch')})"


@jobs_app.command("submit")
def submit(
    spec_file: Annotated[
        Path, typer.Argument(help="The job spec, YAML or JSON.", show_default=False)
    ],
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Submitting again with the same key returns the same job."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit the job spec in SPEC_FILE; print the new job's id and state."""
    spec = load_spec(spec_file)
    client = api_client(url, key)
    with client:
        job = call_api(lambda: client.submit(spec, idempotency_key=idempotency_key))
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    typer.echo(f"job {job['id']} {job['state']} (method {job['method']}, dataset {job['dataset']})")


@jobs_app.command("list")
def list_jobs(
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    state: Annotated[
        str | None,
        typer.Option(help="Only jobs in this state (queued, running, cancelling, ...)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Jobs per page.", min=1, max=200)] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many jobs.", min=0)] = 0,
    as_json: JsonOption = False,
) -> None:
    """List your jobs, newest first."""
    client = api_client(url, key)
    with client:
        page = call_api(lambda: client.list_jobs(state=state, limit=limit, offset=offset))
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    rows = [("ID", "STATE", "STAGE", "PROGRESS", "METHOD", "DATASET", "CREATED")]
    for job in page["items"]:
        rows.append(
            (
                str(job["id"]),
                job["state"],
                stage_to_show(job) or "-",
                _percent(job),
                job["method"],
                job["dataset"],
                job["created_at"][:19].replace("T", " "),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    shown = len(page["items"])
    first = page["offset"] + 1 if shown else page["offset"]
    typer.echo(f"{first}-{page['offset'] + shown} of {page['total']} job(s)")


@jobs_app.command("show")
def show(
    job_id: JobIdArgument,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job: state, progress, attempts, error and its latest metrics."""
    client = api_client(url, key)
    with client:
        job = call_api(lambda: client.get_job(job_id))
        metrics = call_api(lambda: client.metrics(job_id, since=2**63 - 1))
        is_search = bool(job["spec"].get("search"))
        trials = call_api(lambda: client.trials(job_id)) if is_search else []
    if as_json:
        typer.echo(json.dumps({**job, "latest": metrics["latest"]}, indent=2))
        return
    lines = [
        ("job", str(job["id"])),
        ("state", job["state"] + (" (cancel requested)" if job["cancel_requested"] else "")),
        ("stage", stage_to_show(job) or "-"),
        ("progress", _percent(job)),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("priority", str(job["priority"])),
        ("method", job["method"]),
        ("dataset", job["dataset"]),
        ("created", job["created_at"]),
        ("started", job["started_at"] or "-"),
        ("finished", job["finished_at"] or "-"),
    ]
    if job["error"]:
        lines.append(("error", job["error"]))
    for split in ("val", "test"):
        summary = _summary(metrics["latest"].get(split))
        if split == "val" and trials:
            summary = _search_val(trials, summary)
        if summary:
            lines.append((split, summary))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        typer.echo(f"{name.ljust(width)}  {value}")


@jobs_app.command("logs")
def logs(
    job_id: JobIdArgument,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a job's log, oldest line first: what its worker did and said (the search's
    summary, warnings, and an error's traceback)."""
    client = api_client(url, key)
    items: list[dict[str, Any]] = []  # kept for --json only; text is printed page by page
    since = 0
    with client:
        while True:  # the API answers at most 1,000 lines at a time
            page = call_api(lambda after=since: client.logs(job_id, since=after))
            if not page["items"]:
                break
            if as_json:
                items.extend(page["items"])
            else:
                for item in page["items"]:
                    typer.echo(f"{item['at']}  {item['level'].upper():<7}  {item['message']}")
            since = page["next_since"]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
    elif since == 0:
        typer.echo(f"job {job_id} has no log lines yet", err=True)


@jobs_app.command("watch")
def watch(
    job_id: JobIdArgument,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.05)] = 2.0,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (0: never).", min=0)
    ] = 0,
) -> None:
    """Follow a job until it finishes: a progress bar with its stage and latest val metrics.

    Exits 0 when the job succeeded, 1 when it failed or was cancelled, 3 on --timeout.
    """
    from cli.progress import JobBars
    from service.client import TERMINAL_STATES, BirdConnectionError, BirdError

    client = api_client(url, key)
    started = time.monotonic()
    since: int | None = None
    latest: dict[str, Any] = {}
    job: dict[str, Any] = {}
    label = f"job {job_id}"
    with client, JobBars() as bars:
        unreachable_since: float | None = None
        while True:
            try:
                job = client.get_job(job_id)
                metrics = client.metrics(job_id, since=since)
                unreachable_since = None
            except BirdConnectionError as exc:
                # Ride out an API restart; a server that stays away is an error.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > WATCH_RECONNECT_S:
                    bars.stop()
                    fail(str(exc))
                time.sleep(interval)
                continue
            except BirdError as exc:
                bars.stop()
                explain_and_exit(exc)
            since = metrics["next_since"]
            latest = metrics["latest"]
            bars.update(label, job, _summary(latest.get("val")))
            if job["state"] in TERMINAL_STATES:
                break
            if timeout and time.monotonic() - started > timeout:
                bars.stop()
                typer.echo(f"job {job_id} is still {job['state']} after {timeout:g} s", err=True)
                raise typer.Exit(3)
            time.sleep(interval)
    state = job["state"]
    final = _summary(latest.get("test")) or _summary(latest.get("val"))
    message = f"job {job_id} {state}" + (f": {final}" if final and state == "succeeded" else "")
    if state == "failed" and job.get("error"):
        message += f": {job['error']}"
    typer.echo(message)
    if state != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
def cancel(job_id: JobIdArgument, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Cancel a job: at once if queued; a running job's worker stops it shortly."""
    client = api_client(url, key)
    with client:
        job = call_api(lambda: client.cancel(job_id))
    if job["state"] == "cancelling":
        typer.echo(f"job {job_id} cancelling: its worker will stop it shortly")
    else:
        typer.echo(f"job {job_id} {job['state']}")


@jobs_app.command("download")
def download(
    job_id: JobIdArgument,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
    name: Annotated[str, typer.Option(help="Which checkpoint: best, last, ...")] = "best",
    out: Annotated[
        Path, typer.Option(help="Directory to unpack into (the checkpoint goes to OUT/NAME).")
    ] = Path("."),
) -> None:
    """Download a checkpoint, verify its sha256, and unpack it into OUT/NAME."""
    client = api_client(url, key)
    with client:
        target = call_api(lambda: client.download_checkpoint(job_id, name, out))
    typer.echo(f"checkpoint {name} of job {job_id} -> {target} (sha256 verified)")
