"""The ``bird`` command line.

This module belongs to the service layer, which never imports torch or ray at module level:
commands that need the training library import it inside their own function, so ``bird --help``
and the service commands start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="bird: fair knowledge distillation (BIRD and published baselines).",
    no_args_is_help=True,
    add_completion=False,
)


def _split_csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise typer.BadParameter("expected a comma-separated list")
    return items


@app.command()
def experiment(
    quick: Annotated[
        bool, typer.Option("--quick", help="Every method for a few steps (smoke test).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for results.json and results.md.")] = Path(
        "runs/experiment"
    ),
    teachers: Annotated[
        str | None, typer.Option(help="Comma-separated teacher settings: cnn,efficientnet.")
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (default: all registered).")
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds (0..N-1).", min=1)] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Train images to subsample (default 20000).", min=10)
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Student epochs.", min=1)] = None,
) -> None:
    """Reproduce the paper's table offline on FashionMNIST-S with two biased teachers."""
    from dataclasses import replace

    from bird_core.experiment import ExperimentConfig, format_markdown, run_experiment
    from bird_core.methods import available_methods

    config = ExperimentConfig.quick() if quick else ExperimentConfig()
    changes: dict = {}
    if (t := _split_csv(teachers)) is not None:
        bad = sorted(set(t) - {"cnn", "efficientnet"})
        if bad:
            raise typer.BadParameter(f"unknown teacher(s) {bad}; use cnn, efficientnet")
        changes["teachers"] = t
    if (m := _split_csv(methods)) is not None:
        bad = sorted(set(m) - set(available_methods()))
        if bad:
            raise typer.BadParameter(
                f"unknown method(s) {bad}; valid: {', '.join(available_methods())}"
            )
        changes["methods"] = m
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if train_size is not None:
        changes["train_size"] = train_size
    if epochs is not None:
        changes["student_train"] = replace(config.student_train, epochs=epochs)
    config = replace(config, **changes)
    results = run_experiment(config, out_dir=out)
    typer.echo(format_markdown(results))
    typer.echo(
        f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['seconds']:.0f} s"
    )


@app.command("methods")
def list_methods() -> None:
    """List the distillation methods and their options with defaults."""
    from bird_core.methods import available_methods, method_options

    for name in available_methods():
        typer.echo(f"{name}: {json.dumps(method_options(name))}")


if __name__ == "__main__":
    app()
