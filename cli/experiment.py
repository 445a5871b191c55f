"""``bird experiment``: methods and named variants with paired seeds, offline (bird_core only,
no service)."""

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
    preset: Annotated[
        str,
        typer.Option(
            help="paper (every method, 3 seeds) or gate-ablation (BIRD, its frozen-gate and "
            "λ_fair = 0 ablations, BKD and AD; 6 paired seeds, the benchmark setting)."
        ),
    ] = "paper",
    dataset: Annotated[str, typer.Option(help="fashion-mnist-s or adult.")] = "fashion-mnist-s",
    teachers: Annotated[
        str | None,
        typer.Option(help="Comma-separated teacher settings (cnn,efficientnet; adult: mlp)."),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods or named variants (bird-frozen, bird-nofair, "
            "bird-nofair-frozen); default: the preset's."
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Define and run a variant: NAME=METHOD:key=value,... (repeatable), "
            "e.g. bird-adam=bird:phi_optimizer=adam,phi_lr=0.05."
        ),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="Report the paired difference A − B: A:B (repeatable)."),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds (0..N-1).", min=1)] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Train rows to subsample (default 20000).", min=10)
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Student epochs.", min=1)] = None,
    teacher_epochs: Annotated[
        int | None,
        typer.Option(help="Epochs of the teacher trained from scratch (cnn, mlp).", min=1),
    ] = None,
    teacher_width: Annotated[
        int | None, typer.Option(help="Channels of the cnn teacher (gate-ablation: 16).", min=1)
    ] = None,
    efficientnet_image_size: Annotated[
        int | None,
        typer.Option(help="Side the efficientnet teacher's inputs are resized to (48).", min=32),
    ] = None,
) -> None:
    """Run the offline experiment: methods and variants with paired seeds, biased teachers."""
    from bird_core.experiment import build_config, format_markdown, run_experiment

    try:
        config = build_config(
            preset_name="quick" if quick else preset,
            dataset=dataset,
            teachers=split_csv(teachers),
            variants=split_csv(methods),
            variant_definitions=variant or (),
            comparisons=compare,
            seeds=seeds,
            train_size=train_size,
            epochs=epochs,
            teacher_epochs=teacher_epochs,
            teacher_width=teacher_width,
            efficientnet_image_size=efficientnet_image_size,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    results = run_experiment(config, out_dir=out)
    typer.echo(format_markdown(results))
    typer.echo(
        f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['seconds']:.0f} s"
    )
