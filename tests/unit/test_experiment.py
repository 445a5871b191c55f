"""Smoke test of the offline experiment through the real ``bird`` command."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from bird_core.methods import available_methods


def _bird() -> list[str]:
    exe = shutil.which("bird")
    return [exe] if exe else [sys.executable, "-m", "cli"]


def test_quick_experiment_runs_every_method_for_both_teachers(tmp_path: Path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [*_bird(), "experiment", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"cnn", "efficientnet"}
    for teacher, table in results["table"].items():
        assert list(table) == available_methods(), teacher
        for method, summary in table.items():
            for metric in ("auroc", "f1", "delta_mean_deo", "delta_max_deo"):
                value = summary[metric]["mean"]
                assert math.isfinite(value) and 0.0 <= value <= 100.0, (teacher, method, metric)
    markdown = (out / "results.md").read_text()
    assert "| bird |" in markdown and "| bkd |" in markdown
    assert "Δ_mean-DEO" in proc.stdout


def test_experiment_rejects_unknown_method_by_name(tmp_path: Path):
    proc = subprocess.run(
        [*_bird(), "experiment", "--quick", "--methods", "bkd,nonsense", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "nonsense" in proc.stderr and "bird" in proc.stderr
    assert "Traceback" not in proc.stderr
