"""The import rules of docs/architecture.md ("Layers and what each may import").

Two checks, each able to fail on its own:

* every module of every package, parsed: each ``import`` statement anywhere in it (at module
  level, inside functions, under ``TYPE_CHECKING``) and each ``importlib.import_module("...")``
  with a literal name must respect its package's rules (:data:`RULES`);
* fresh interpreters: importing the light entry points (the API, the CLI, the dataset codec,
  the Ray row transforms) must not load the heavy libraries they must stay clear of.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bird_core", "bird_datasets", "service", "workers", "cli")


# ---------------------------------------------------------------------------------------------
# The rules, checked on the source of every module
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Modules under ``scope`` (and not under ``exempt``) may not import what ``forbidden``
    names (a module and everything below it), except what ``allowed`` names."""

    scope: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()
    why: str = ""


RULES = (
    Rule(
        "service",
        ("workers", "cli", "bird_core", "bird_datasets.converters", "torch", "ray"),
        why="the API process never imports torch, ray, the workers or the CLI",
    ),
    Rule(
        "bird_core",
        (
            *("service", "workers", "cli", "bird_datasets"),
            *("ray", "boto3", "botocore", "sqlalchemy", "fastapi", "uvicorn"),
        ),
        why="bird_core is a plain PyTorch library",
    ),
    Rule(
        "bird_datasets",
        ("torch", "bird_core", "workers", "cli", "ray", "service", "bird_datasets.converters"),
        allowed=("service.storage", "service.settings"),
        exempt=("bird_datasets.converters",),
        why="the dataset format needs numpy, pyarrow, Pillow and the store, nothing heavier",
    ),
    Rule(
        "bird_datasets.converters",
        ("workers", "cli", "ray", "service"),
        allowed=("service.storage", "service.settings"),
        why="converters build on bird_core's loaders and the format, nothing else",
    ),
    Rule("workers", ("cli",), why="the CLI is the composition root; nothing imports it"),
    Rule(
        "service.storage",
        ("service", "bird_datasets", "bird_core", "workers", "cli"),
        allowed=("service.storage", "service.settings"),
        why="the store is the base layer every package builds on",
    ),
    Rule(
        "service.settings",
        ("service", "bird_datasets", "bird_core", "workers", "cli"),
        allowed=("service.settings",),
        why="the settings are the base layer every package builds on",
    ),
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    """``service/api/app.py`` → ``service.api.app``; ``cli/__init__.py`` → ``cli``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``source``, wherever it sits.

    ``from a import b`` counts as importing ``a.b`` (``b`` may be a submodule or a name in
    ``a``; either way it lies under ``a``, and ``from service import storage`` is
    ``service.storage``); relative imports are resolved against ``module``;
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too.
    """
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    """The imports of ``module`` that break a rule, one message each."""
    problems = []
    for rule in RULES:
        if not _under(module, rule.scope) or any(_under(module, e) for e in rule.exempt):
            continue
        for line, name in imports:
            if any(_under(name, a) for a in rule.allowed):
                continue
            if any(_under(name, f) for f in rule.forbidden):
                problems.append(f"{module}:{line} imports {name} ({rule.why})")
    return problems


def _modules() -> list[tuple[str, Path]]:
    return [
        (module_name(path), path)
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    ]


def test_every_module_follows_the_import_rules():
    modules = _modules()
    assert len(modules) > 50  # the walk found the packages
    problems = []
    for name, path in modules:
        imports = imported_names(path.read_text(), name, path.name == "__init__.py")
        problems += violations(name, imports)
    assert problems == [], "\n".join(problems)


def _judged(source: str, module: str) -> list[str]:
    """The names in ``source`` that break a rule for ``module``."""
    found = violations(module, imported_names(source, module))
    return sorted({problem.split(" imports ")[1].split(" ")[0] for problem in found})


def test_the_source_check_sees_imports_anywhere():
    # A rule that cannot fail checks nothing: each form of import is found and judged.
    source = """
import json
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from workers.train import TrainPlan
def later():
    import torch.nn
    importlib.import_module("ray.data")
    from . import queue
    from ..storage import ObjectStore
"""
    assert _judged(source, "service.api.thing") == [
        "ray.data",
        "torch.nn",
        "workers.train.TrainPlan",
    ]
    relative = "def f():\n    from .converters import get_converter\n"
    assert _judged(relative, "bird_datasets.reader") == ["bird_datasets.converters.get_converter"]
    assert _judged("from service.api.app import create_app", "bird_datasets.reader")
    assert not _judged("from service.storage import join_key", "bird_datasets.reader")
    assert _judged("import bird_core.data", "bird_datasets.format")
    assert not _judged("import bird_core.data", "bird_datasets.converters.adult")
    assert _judged("from service import db", "service.storage")
    assert not _judged("from service import settings", "service.storage")
    assert not _judged("from service import db", "workers.train")
    assert _judged("from cli.common import fail", "workers.train")
    # A prefix of another name is not that name.
    assert not _judged("import rayon, torchvisionish", "service.x")
    assert module_name(REPO_ROOT / "cli" / "__init__.py") == "cli"


# ---------------------------------------------------------------------------------------------
# What the entry points load, in fresh interpreters
# ---------------------------------------------------------------------------------------------

BIRD_CORE_MODULES = [
    "bird_core",
    "bird_core.methods",
    "bird_core.train",
    "bird_core.checkpoint",
    "bird_core.metrics",
    "bird_core.models",
    "bird_core.losses",
    "bird_core.fairdistill",
    "bird_core.preprocess",
    "bird_core.data",
]

# Imports the given modules in a fresh interpreter and prints which modules ended up loaded,
# as JSON.
_PROBE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def _probe(modules: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(modules: list[str], top_level: str) -> list[str]:
    return [m for m in modules if _under(m, top_level)]


@pytest.mark.parametrize(
    ("entry_points", "must_not_load"),
    [
        # The algorithms: plain PyTorch.
        (BIRD_CORE_MODULES, ["ray", "boto3", "botocore", "sqlalchemy", "fastapi", "uvicorn"]),
        # The API process, and the whole dataset format it reads manifests with.
        (
            [
                "service.api.app",
                "service.client",
                *("bird_datasets.reader", "bird_datasets.validation"),
                *("bird_datasets.describe", "bird_datasets.location"),
            ],
            ["torch", "ray", "workers", "cli", "bird_core"],
        ),
        # `bird --help` and the client commands start fast.
        (["cli.app"], ["torch", "ray", "boto3", "sqlalchemy", "fastapi", "bird_core"]),
        # Listing the converters and their options (`bird datasets prepare --help`).
        (["bird_datasets.converters"], ["torch", "ray", "bird_core"]),
        # What a Ray Data task imports to decode images: numpy, pyarrow, Pillow.
        (["workers.rows", "bird_datasets.codec"], ["torch", "boto3", "bird_core", "service"]),
    ],
    ids=["bird_core", "api-and-format", "cli", "converter-registry", "ray-row-transforms"],
)
def test_entry_points_load_only_what_they_need(
    entry_points: list[str], must_not_load: list[str]
) -> None:
    modules = _probe(entry_points)
    assert all(name in modules for name in entry_points)
    for name in must_not_load:
        assert not _loaded(modules, name), f"{' and '.join(entry_points)} pulled in {name}"


def test_the_probe_sees_a_loaded_package():
    # The probe must be able to fail: a package imported through a submodule is seen, and a
    # prefix of another name is not mistaken for it.
    modules = _probe(["email.mime.text"])
    assert _loaded(modules, "email")
    assert not _loaded(["emailer", "rayon"], "email") and not _loaded(["rayon"], "ray")
    assert "torch" in _probe(["bird_core.models"])
