"""The offline experiment: a smoke run through the real ``bird`` command, and the variants,
paired comparisons and tables it reports."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# -- variants, paired comparisons and their rendering (no training) ----------------------------


def test_named_variants_and_definitions_resolve():
    from bird_core.experiment import NAMED_VARIANTS, parse_variant, resolve_variants

    custom = parse_variant("bird-adam=bird:phi_optimizer=adam,phi_lr=0.05,freeze_gate=false")
    assert custom.method == "bird"
    assert custom.options == {"phi_optimizer": "adam", "phi_lr": 0.05, "freeze_gate": False}
    variants = resolve_variants(["bkd", "bird-frozen", "bird-adam"], [custom])
    assert [v.name for v in variants] == ["bkd", "bird-frozen", "bird-adam"]
    assert variants[0].options == {} and variants[0].method == "bkd"
    assert variants[1] == NAMED_VARIANTS["bird-frozen"]
    assert variants[1].options == {"freeze_gate": True}
    assert NAMED_VARIANTS["bird-nofair-frozen"].options == {"lambda_fair": 0.0, "freeze_gate": True}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-method", "NAME=METHOD"),
        ("x=nomethod", "unknown method"),
        ("x=bird:nope=1", "unknown option"),
        ("x=bird:phi_lr", "key=value"),
        ("x=bird:phi_optimizer=rmsprop", "phi_optimizer"),
        ("a:b=bird", "may not contain"),
    ],
)
def test_bad_variant_definitions_are_refused_clearly(text, message):
    from bird_core.experiment import parse_variant

    with pytest.raises(ValueError, match=message):
        parse_variant(text)


def test_build_config_validates_names():
    from bird_core.experiment import build_config

    config = build_config(preset_name="gate-ablation", seeds=5)
    assert config.seeds == (0, 1, 2, 3, 4)
    assert ("bird", "bird-frozen") in config.resolved_comparisons()
    assert ("bird-nofair", "bird-nofair-frozen") in config.resolved_comparisons()
    adult = build_config(preset_name="gate-ablation", dataset="adult")
    assert adult.teachers == ("mlp",) and adult.student_model == "mlp"
    with pytest.raises(ValueError, match="unknown teacher"):
        build_config(dataset="adult", teachers=["cnn"])
    with pytest.raises(ValueError, match="unknown variant 'nonsense'"):
        build_config(variants=["bkd", "nonsense"])
    with pytest.raises(ValueError, match="do not run"):
        build_config(variants=["bkd", "bird"], comparisons=["bird:ad"])
    with pytest.raises(ValueError, match="A:B"):
        build_config(comparisons=["bird-bkd"])
    with pytest.raises(ValueError, match="unknown preset"):
        build_config(preset_name="fast")


def test_build_config_sizes_the_trained_teacher():
    from bird_core.experiment import build_config

    config = build_config(preset_name="gate-ablation", teacher_epochs=15, teacher_width=32)
    assert config.teacher_train.epochs == 15 and config.teacher_train.lr == 2e-3
    assert config.teacher_options == {"width": 32, "embed_dim": 128}
    assert config.student_train.epochs == 5  # the student is not touched
    adult = build_config(preset_name="gate-ablation", dataset="adult", teacher_epochs=3)
    assert adult.teacher_train.epochs == 3 and adult.teacher_train.batch_size == 256
    # An option that no teacher of the run reads is refused rather than ignored.
    with pytest.raises(ValueError, match="teacher width sets the cnn teacher"):
        build_config(dataset="adult", teacher_width=32)
    with pytest.raises(ValueError, match="teacher epochs sets the cnn teacher"):
        build_config(teachers=["efficientnet"], teacher_epochs=15)
    with pytest.raises(ValueError, match="efficientnet image size sets the efficientnet"):
        build_config(teachers=["cnn"], efficientnet_image_size=64)
    with pytest.raises(ValueError, match="efficientnet image size sets the efficientnet"):
        build_config(dataset="adult", efficientnet_image_size=64)
    assert build_config(efficientnet_image_size=64).efficientnet_image_size == 64
    with pytest.raises(ValueError, match="must be >= 32"):
        build_config(efficientnet_image_size=16)


def _runs(variant: str, deo: list[float], auroc: list[float]) -> list[dict]:
    return [
        {
            "variant": variant,
            "seed": seed,
            "auroc": a,
            "f1": 70.0,
            "accuracy": 70.0,
            "delta_mean_deo": d,
            "delta_max_deo": 2 * d,
        }
        for seed, (d, a) in enumerate(zip(deo, auroc, strict=True))
    ]


def test_compare_pairs_runs_by_seed():
    from bird_core.experiment import compare

    # bird − frozen per seed: Δ_mean-DEO −1, −2, −3, −4, −5 (listed out of order on purpose):
    # mean −3, sd √2.5, half-width t_{0.975,4}·sd/√5 = 1.9632.
    runs = _runs("bird", [9, 8, 7, 6, 5], [90, 91, 92, 93, 94])
    runs += list(reversed(_runs("frozen", [10, 10, 10, 10, 10], [90, 91, 92, 93, 94])))
    comp = compare(runs, "bird", "frozen")
    assert comp["seeds"] == [0, 1, 2, 3, 4]
    deo = comp["delta_mean_deo"]
    assert deo["mean"] == pytest.approx(-3.0)
    assert deo["half_width"] == pytest.approx(1.9632, abs=1e-4)
    assert deo["high"] == pytest.approx(-1.0368, abs=1e-4)
    assert deo["excludes_zero"] is True
    assert comp["auroc"]["mean"] == 0.0 and comp["auroc"]["excludes_zero"] is False
    assert comp["delta_mean_deo_ratio"] == pytest.approx(7.0 / 10.0)
    with pytest.raises(ValueError, match="share no seed"):
        compare(_runs("a", [1], [1]), "a", "b")


def test_markdown_shows_intervals_and_paired_differences():
    from bird_core.experiment import _summary, compare, format_markdown

    runs = _runs("bird", [9, 8, 7, 6, 5], [90, 91, 92, 93, 94])
    runs += _runs("frozen", [10, 10, 10, 10, 10], [90, 91, 92, 93, 94])
    results = {
        "config": {"seeds": [0, 1, 2, 3, 4]},
        "teachers": {
            "cnn": {k: 50.0 for k in ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")}
        },
        "table": {
            "cnn": {v: _summary([r for r in runs if r["variant"] == v]) for v in ("bird", "frozen")}
        },
        "comparisons": {"cnn": [compare(runs, "bird", "frozen")]},
    }
    text = format_markdown(results)
    # bird's Δ_mean-DEO: mean 7, sd √2.5 → 7.00 ± 1.96
    assert "| bird | 92.00 ± 1.96 | 70.00 ± 0.00 | 70.00 ± 0.00 | 7.00 ± 1.96 |" in text
    assert (
        "| bird − frozen | +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] | -3.00 [-4.96, -1.04] * |"
        in text
    )
    assert "0.70 |" in text
