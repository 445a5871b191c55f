"""The import rules of DESIGN.md section 2, checked in fresh interpreters.

bird_core is a plain PyTorch library: it never imports ray, boto3, sqlalchemy or fastapi.
service/ (the API process) never imports torch or ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

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
FORBIDDEN_IN_BIRD_CORE = ["ray", "boto3", "botocore", "sqlalchemy", "fastapi", "uvicorn"]
FORBIDDEN_IN_SERVICE = ["torch", "ray"]

# Imports the given modules (skipping optional ones that do not exist yet) in a fresh
# interpreter and prints which modules ended up loaded, as JSON.
_PROBE = """
import importlib, importlib.util, json, sys
required, optional = json.loads(sys.argv[1]), json.loads(sys.argv[2])
imported = []
for name in required:
    importlib.import_module(name)
    imported.append(name)
for name in optional:
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
        imported.append(name)
print(json.dumps({"imported": imported, "modules": sorted(sys.modules)}))
"""


def _probe(required: list[str], optional: list[str] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(required), json.dumps(list(optional))],
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
    return [m for m in modules if m == top_level or m.startswith(top_level + ".")]


def test_bird_core_imports_no_service_dependencies():
    result = _probe(BIRD_CORE_MODULES)
    assert result["imported"] == BIRD_CORE_MODULES
    modules = result["modules"]
    assert "torch" in modules  # the probe really imported the library
    for name in FORBIDDEN_IN_BIRD_CORE:
        assert not _loaded(modules, name), f"bird_core pulled in {name}"


def test_service_imports_neither_torch_nor_ray():
    result = _probe(["service"], optional=["service.cli"])
    assert result["imported"][0] == "service"
    modules = result["modules"]
    for name in FORBIDDEN_IN_SERVICE:
        assert not _loaded(modules, name), f"{' and '.join(result['imported'])} pulled in {name}"


def test_probe_detects_a_forbidden_import():
    # The checks above must be able to fail: a package imported through a submodule is seen,
    # and a prefix of another name is not mistaken for it.
    result = _probe(["email.mime.text"])
    assert _loaded(result["modules"], "email")
    assert not _loaded(["emailer", "rayon"], "email") and not _loaded(["rayon"], "ray")
