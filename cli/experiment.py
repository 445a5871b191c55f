"""``bird experiment``: the paper's comparison table, offline (bird_core only, no service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import split_csv

__all__ = ["experiment"]


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
    if (t := split_csv(teachers)) is not None:
        bad = sorted(set(t) - {"cnn", "efficientnet"})
        if bad:
            raise typer.BadParameter(f"unknown teacher(s) {bad}; use cnn, efficientnet")
        changes["teachers"] = t
    if (m := split_csv(methods)) is not None:
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
