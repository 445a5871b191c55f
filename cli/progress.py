"""Live progress bars for jobs followed by polling the API (`bird jobs watch`, `bird demo`).

One bar per job, redrawn in place on a terminal (state, percentage, stage, a metrics summary,
elapsed time) instead of a new line per poll. Off a terminal (a pipe, a log file) rich draws
the bars once, when they stop, so a log holds the final state and no redraw codes.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Column

__all__ = ["JobBars", "stage_to_show"]


class JobBars:
    """Progress bars, one per job, fed with the job objects the API returns."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column

        self.console = console or Console(highlight=False)

        def fixed(width: int) -> Column:
            return Column(no_wrap=True, min_width=width)

        # The job, state, percentage and stage keep their width and the metrics summary is cut
        # with an ellipsis: rich otherwise shrank every column alike once the summary arrived,
        # and an 80-column line (what a pipe gets) read "job 2… s…  … auroc ...".
        self.progress: Progress = Progress(
            TextColumn("{task.description}", table_column=fixed(14)),
            TextColumn("{task.fields[state]:<10}", table_column=fixed(10)),
            BarColumn(bar_width=None, table_column=Column(min_width=10, ratio=1)),
            TaskProgressColumn(table_column=fixed(4)),
            TextColumn("{task.fields[stage]:<12}", table_column=fixed(12)),
            TextColumn(
                "{task.fields[metrics]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=4),
            ),
            TimeElapsedColumn(table_column=fixed(7)),
            console=self.console,
            expand=True,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> JobBars:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Draw the bars a last time and leave them on the screen (idempotent)."""
        self.progress.stop()

    def update(self, label: str, job: dict[str, Any], metrics: str = "") -> None:
        """Show ``job`` (the API's job object) on the bar named ``label`` (made on first use)."""
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(
                label, total=100, state="", stage="", metrics=""
            )
        state = job.get("state") or ""
        self.progress.update(
            self.tasks[label],
            completed=100 * min(max(float(job.get("progress") or 0), 0.0), 1.0),
            state=state,
            stage=stage_to_show(job) or "",
            metrics=metrics,
        )
        self.progress.refresh()


def stage_to_show(job: dict[str, Any]) -> str | None:
    """The stage a user reads for ``job``: a finished job keeps its last stage in the API, and
    only a failure's (where it failed) is worth showing."""
    if job.get("state") in ("succeeded", "cancelled"):
        return None
    return job.get("stage") or None
