"""The ``bird`` command line: the composition root of the project.

One module per command group (``cli/datasets.py``, ``cli/jobs.py``, ...); this one puts them
together. The CLI may import every package (``service``, ``workers``, ``bird_core``,
``bird_datasets``), but the heavy ones (torch, ray, boto3, the converters) only inside the
command that needs them, so ``bird --help`` and the client commands (``bird jobs ...``) start
fast. ``python -m cli`` runs it too.
"""

from __future__ import annotations

import typer

from cli.datasets import datasets_app
from cli.db import db_app
from cli.demo import demo
from cli.experiment import experiment
from cli.jobs import jobs_app
from cli.keys import keys_app
from cli.methods import list_methods
from cli.serve import serve, worker
from cli.teachers import teachers_app

__all__ = ["app"]

app = typer.Typer(
    help="bird: fair knowledge distillation (BIRD and published baselines).",
    no_args_is_help=True,
    add_completion=False,
)

# Commands in the order `bird --help` lists them.
app.command("experiment")(experiment)
app.command("methods")(list_methods)
app.add_typer(datasets_app, name="datasets")
app.add_typer(teachers_app, name="teachers")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.command("worker")(worker)
app.command("serve")(serve)
app.command("demo")(demo)
