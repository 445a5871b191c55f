"""``bird methods``: the distillation methods and their options, from bird_core's registry."""

from __future__ import annotations

import json

import typer

__all__ = ["list_methods"]


def list_methods() -> None:
    """List the distillation methods and their options with defaults."""
    from bird_core.methods import available_methods, method_options

    for name in available_methods():
        typer.echo(f"{name}: {json.dumps(method_options(name))}")
