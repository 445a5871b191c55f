"""The live job bars of `bird jobs watch` and `bird demo` (cli/progress.py), rendered by rich."""

from __future__ import annotations

import io
import re

from rich.console import Console

from cli.progress import JobBars

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _job(progress: float, state: str = "running", stage: str | None = "training") -> dict:
    return {"state": state, "stage": stage, "progress": progress}


def test_on_a_terminal_one_bar_is_redrawn_in_place_and_shows_each_poll() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with JobBars(console) as bars:
        for progress in (0.1, 0.37, 0.64):
            bars.update("job 7", _job(progress), "auroc 0.81")
        bars.update("job 7", _job(1.0, "succeeded", "done"), "auroc 0.9")
    text = out.getvalue()
    # Each poll's figures were drawn ...
    for figure in ("10%", "37%", "64%", "100%"):
        assert figure in text, text
    # ... over the previous drawing (carriage return + erase line), never on a new line.
    assert text.count("\r\x1b[2K") >= 4, repr(text)
    assert text.count("\n") == 1 and text.rstrip("\x1b[?25h").endswith("\n"), repr(text)
    final = ANSI.sub("", text.rsplit("\x1b[2K", 1)[-1])
    assert "job 7" in final and "succeeded" in final and "auroc 0.9" in final, final


def test_off_a_terminal_the_bars_are_written_once_with_the_last_state() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with JobBars(console) as bars:
        for progress in (0.1, 0.37, 0.64):
            bars.update("bird  job 1", _job(progress))
            bars.update("bkd   job 2", _job(progress / 2))
        bars.update("bird  job 1", _job(1.0, "succeeded", "uploading"))
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2, lines  # one line per job, not one per poll
    assert "bird  job 1" in lines[0] and "succeeded" in lines[0] and "100%" in lines[0]
    assert "training" not in lines[0] and "uploading" not in lines[0]  # a finished job's old stage
    assert "bkd   job 2" in lines[1] and "32%" in lines[1] and "training" in lines[1]
    assert "\x1b[" not in out.getvalue()


def test_a_job_without_progress_or_stage_yet_shows_zero() -> None:
    out = io.StringIO()
    with JobBars(Console(file=out, force_terminal=False, width=120)) as bars:
        bars.update("job 3", {"state": "queued", "stage": None, "progress": None})
    assert re.search(r"job 3\s+queued\s+.*\b0%", out.getvalue()), out.getvalue()


def test_a_long_metrics_summary_is_cut_and_the_job_stays_readable() -> None:
    """Off a terminal rich draws 80 columns; the val summary of a job is about that long."""
    summary = "auroc 76.19  accuracy 75  f1 71.03  delta_mean_deo 15.07  delta_max_deo 29.3"
    out = io.StringIO()
    with JobBars(Console(file=out, force_terminal=False, width=80)) as bars:
        bars.update("job 2104195476", _job(0.4), summary)
    (line,) = [line for line in out.getvalue().splitlines() if line.strip()]
    assert re.match(r"job 2104195476 +running +━+.* +40% +training +auroc 76\.19 ", line), line
    assert line.rstrip().endswith("0:00:00") and len(line.rstrip()) <= 80, line
