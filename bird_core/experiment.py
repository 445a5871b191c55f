"""The paper's table, offline: biased teachers on FashionMNIST-S, every method, several seeds.

Two teacher settings: a ResNet-18-style CNN trained on the skewed train split, and the frozen
ImageNet EfficientNet-Lite0 with a linear probe (like the paper's CLIP teachers). Teacher
features are computed once per setting and reused by every method and seed. The result is the
table in the paper's shape (method × AUROC, F1, Δ_mean-DEO, Δ_max-DEO, mean ± std) as text,
JSON and Markdown.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bird_core.data import load_fashion_mnist_s
from bird_core.data.base import DatasetSplits
from bird_core.methods import available_methods, create_method
from bird_core.models import EFFICIENTNET_LITE_NORM, create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    TeacherFeatures,
    TrainConfig,
    compute_teacher_features,
    evaluate,
    fit,
    plan_steps_per_epoch,
    seed_everything,
    train_linear_probe,
)

REPORTED = ("auroc", "f1", "accuracy", "delta_mean_deo", "delta_max_deo")


@dataclass
class ExperimentConfig:
    """Everything the experiment does; ``quick()`` gives the smoke-test setting."""

    teachers: tuple[str, ...] = ("cnn", "efficientnet")
    methods: tuple[str, ...] = tuple(available_methods())
    seeds: tuple[int, ...] = (0, 1, 2)
    skew: float = 0.95
    train_size: int | None = 20_000
    test_size: int | None = 5_000
    # The CNN teacher: ResNet-18 with a CIFAR stem, narrowed to fit two CPU cores.
    teacher_model: str = "resnet18"
    teacher_options: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=2e-3))
    efficientnet_image_size: int = 48
    probe_epochs: int = 30
    student_model: str = "small_cnn"
    student_options: dict[str, Any] = field(default_factory=lambda: {"width": 16, "embed_dim": 64})
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=2e-3))
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_seed: int = 0

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """Every method for a few steps on a small subsample: a smoke test in seconds."""
        few = TrainConfig(epochs=2, batch_size=64, lr=2e-3, max_steps_per_epoch=4)
        return cls(
            seeds=(0,),
            train_size=1_000,
            test_size=200,
            teacher_options={"width": 4},
            teacher_train=few,
            efficientnet_image_size=32,
            probe_epochs=5,
            student_options={"width": 4, "embed_dim": 16},
            student_train=few,
        )


@dataclass
class Teacher:
    """A teacher setting: its features for the train split and its own test metrics."""

    name: str
    features: TeacherFeatures
    test_metrics: dict[str, Any]


def _cnn_teacher(
    data: DatasetSplits, config: ExperimentConfig, preprocess: Preprocessor, tick: Callable
) -> Teacher:
    seed_everything(config.data_seed)
    net = create_model(config.teacher_model, data.num_classes, **config.teacher_options)
    method = create_method("none")
    method.setup(student_dim=net.embed_dim, teacher_dim=None, num_classes=10, task=data.task)
    fit(net, method, data, config.teacher_train, preprocess=preprocess, progress=tick)
    metrics = evaluate(net, preprocess, data.test, data.task)
    features = compute_teacher_features(net, preprocess, data.train, progress=None)
    return Teacher("cnn", features, metrics)


def _efficientnet_teacher(data: DatasetSplits, config: ExperimentConfig, tick: Callable) -> Teacher:
    seed_everything(config.data_seed)
    size = config.efficientnet_image_size
    net = create_model("efficientnet_lite0_probe", data.num_classes, image_size=size)
    preprocess = Preprocessor("image", size=size, **EFFICIENTNET_LITE_NORM)
    features = compute_teacher_features(net, preprocess, data.train, attention_size=2)
    test_features = compute_teacher_features(net, preprocess, data.test, attention_size=None)
    tick(1)
    # The linear probe is trained on the frozen features: cheap, and exactly what the
    # backbone + probe computes end to end.
    probe = train_linear_probe(
        features.embedding,
        data.train.label,
        data.num_classes,
        epochs=config.probe_epochs,
        seed=config.data_seed,
        probe=net.head.fc,
    )
    with torch.no_grad():
        features.logits = probe(features.embedding)
        test_probs = torch.softmax(probe(test_features.embedding), dim=1)
    from bird_core.metrics import fairness_report

    metrics = fairness_report(test_probs.numpy(), data.test.label.numpy(), data.test.group.numpy())
    return Teacher("efficientnet", features, metrics)


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in REPORTED:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = {
            "mean": statistics.fmean(values) if values else float("nan"),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


def run_experiment(
    config: ExperimentConfig, out_dir: str | Path | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run every (teacher, method, seed); return and optionally write the results."""
    started = time.perf_counter()
    data = load_fashion_mnist_s(
        skew=config.skew,
        seed=config.data_seed,
        train_size=config.train_size,
        test_size=config.test_size,
    )
    preprocess = Preprocessor.from_config(data.preprocessing)
    student_cfg = config.student_train
    probe_method = create_method("none")
    teacher_steps = plan_steps_per_epoch(data, probe_method, config.teacher_train)
    per_method = {
        m: plan_steps_per_epoch(
            data, create_method(m, **config.method_options.get(m, {})), student_cfg
        )
        for m in config.methods
    }
    total = len(config.seeds) * len(config.teachers) * sum(per_method.values()) * student_cfg.epochs
    total += ("cnn" in config.teachers) * teacher_steps * config.teacher_train.epochs
    total += "efficientnet" in config.teachers
    bar = tqdm(total=total, disable=not show_progress, unit="step", dynamic_ncols=True)
    results: dict[str, Any] = {"config": _jsonable(config), "teachers": {}, "runs": []}

    for teacher_name in config.teachers:
        bar.set_description(f"teacher {teacher_name}")
        if teacher_name == "cnn":
            teacher = _cnn_teacher(data, config, preprocess, bar.update)
        elif teacher_name == "efficientnet":
            teacher = _efficientnet_teacher(data, config, bar.update)
        else:
            raise ValueError(
                f"unknown teacher setting {teacher_name!r}; use 'cnn' or 'efficientnet'"
            )
        results["teachers"][teacher_name] = _pick(teacher.test_metrics)
        teacher_dim = teacher.features.embedding.shape[1]
        for method_name in config.methods:
            for seed in config.seeds:
                bar.set_description(f"{teacher_name}/{method_name}/seed {seed}")
                seed_everything(seed)
                student = create_model(
                    config.student_model, data.num_classes, **config.student_options
                )
                method = create_method(method_name, **config.method_options.get(method_name, {}))
                method.setup(
                    student_dim=student.embed_dim,
                    teacher_dim=teacher_dim,
                    num_classes=data.num_classes,
                    task=data.task,
                )
                run_started = time.perf_counter()
                fit(
                    student,
                    method,
                    data,
                    replace(student_cfg, seed=seed),
                    preprocess=preprocess,
                    train_features=teacher.features,
                    progress=bar.update,
                )
                metrics = evaluate(student, preprocess, data.test, data.task)
                results["runs"].append(
                    {
                        "teacher": teacher_name,
                        "method": method_name,
                        "seed": seed,
                        "seconds": time.perf_counter() - run_started,
                        **_pick(metrics),
                    }
                )
    bar.close()
    results["table"] = {
        t: {
            m: _summary([r for r in results["runs"] if r["teacher"] == t and r["method"] == m])
            for m in config.methods
        }
        for t in config.teachers
    }
    results["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(format_markdown(results))
    return results


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in REPORTED}


def _jsonable(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))


def format_markdown(results: dict[str, Any]) -> str:
    """The table in the paper's shape, one section per teacher setting."""
    lines = []
    for teacher, table in results["table"].items():
        t = results["teachers"][teacher]
        lines.append(f"### Teacher: {teacher}")
        lines.append("")
        lines.append("| Method | AUROC | F1 | Accuracy | Δ_mean-DEO | Δ_max-DEO |")
        lines.append("|---|---|---|---|---|---|")
        lines.append(
            f"| teacher | {t['auroc']:.2f} | {t['f1']:.2f} | {t['accuracy']:.2f} | "
            f"{t['delta_mean_deo']:.2f} | {t['delta_max_deo']:.2f} |"
        )
        for method, summary in table.items():
            cells = " | ".join(
                f"{summary[k]['mean']:.2f} ± {summary[k]['std']:.2f}" for k in REPORTED
            )
            lines.append(f"| {method} | {cells} |")
        lines.append("")
    return "\n".join(lines)
