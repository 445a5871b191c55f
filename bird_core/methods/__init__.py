"""The method registry: ``create_method(name, **options)`` like timm's ``create_model``."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from bird_core.methods.ad import AdversarialDebiasing
from bird_core.methods.at import AttentionTransfer
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext
from bird_core.methods.bird import BIRD
from bird_core.methods.bkd import BKD
from bird_core.methods.fitnet import FitNet
from bird_core.methods.mfd import MFD
from bird_core.methods.none import NoDistillation

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (NoDistillation, BKD, FitNet, AttentionTransfer, AdversarialDebiasing, MFD, BIRD)
}

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodOptions",
    "StepContext",
    "available_methods",
    "create_method",
    "method_options",
]


def available_methods() -> list[str]:
    """Registered method names, in the order of the paper's table."""
    return list(METHODS)


def method_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults."""
    cls = _lookup(name)
    return {f.name: f.default for f in dataclasses.fields(cls.options_class)}


def _lookup(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def create_method(name: str, **options: Any) -> Method:
    """Build method ``name`` with ``options``; unknown names and options raise clearly."""
    cls = _lookup(name)
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) or "none"
        raise ValueError(
            f"method {name!r} got unknown option(s) {unknown}; valid options: {listed}"
        )
    hints = typing.get_type_hints(cls.options_class)
    for key, value in options.items():
        _check_type(name, key, value, hints[key])
    return cls(cls.options_class(**options))


def _check_type(method: str, key: str, value: Any, hint: Any) -> None:
    """Reject a value of the wrong type with a message naming the option and the type."""
    allowed = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    )
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if typing.get_origin(kind) is Literal and value in typing.get_args(kind):
            return
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is bool and isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
    expected = " or ".join(
        repr(list(typing.get_args(k)))
        if typing.get_origin(k) is Literal
        else getattr(k, "__name__", str(k))
        for k in allowed
    )
    raise ValueError(f"method {method!r} option {key} must be {expected}, got {value!r}")


_UnionType = type(int | None)
