"""Offline experiments: biased teachers, named method variants, paired seeds.

Two datasets. **FashionMNIST-S** with two teacher settings: a ResNet-18-style CNN trained on the
skewed train split (``cnn``), and the frozen ImageNet EfficientNet-Lite0 with a linear probe
(``efficientnet``, like the paper's CLIP teachers). **Adult** with an MLP teacher (``mlp``).
Teacher features are computed once per setting and reused by every variant and seed.

A *variant* is a method with options: every registered method with its defaults, the named
ablations of BIRD (:data:`NAMED_VARIANTS`: the gate frozen, λ_fair = 0, both), or one defined
on the command line (:func:`parse_variant`). Every variant runs with the same seeds; a seed fixes
the student's initialisation, the batch order and the meta batches, so two variants differ, seed
by seed, only in what the variants change. The result holds the table (mean and 95% interval
over seeds) and the **paired differences** of chosen pairs of variants with their 95% intervals
(``bird_core.stats``), as JSON and Markdown.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from bird_core.data import load_adult, load_fashion_mnist_s
from bird_core.data.base import DatasetSplits
from bird_core.methods import available_methods, create_method
from bird_core.methods.base import Method
from bird_core.metrics import fairness_report
from bird_core.models import EFFICIENTNET_LITE_NORM, create_model
from bird_core.preprocess import Preprocessor
from bird_core.stats import mean_interval, paired_difference
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
DIFFERENCED = ("auroc", "f1", "delta_mean_deo", "delta_max_deo")
Dataset = Literal["fashion-mnist-s", "adult"]
TEACHERS: dict[str, tuple[str, ...]] = {
    "fashion-mnist-s": ("cnn", "efficientnet"),
    "adult": ("mlp",),
}
PRESETS = ("paper", "quick", "gate-ablation")


# -- variants ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A named method configuration: ``options`` go on top of the config's method options."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


NAMED_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("bird-frozen", "bird", {"freeze_gate": True}),
        Variant("bird-nofair", "bird", {"lambda_fair": 0.0}),
        Variant("bird-nofair-frozen", "bird", {"lambda_fair": 0.0, "freeze_gate": True}),
    )
}

# Pairs (a, b) whose paired difference a − b is reported when both variants ran.
DEFAULT_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("bird", "bird-frozen"),
    ("bird-nofair", "bird-nofair-frozen"),
    ("bird-nofair", "bkd"),
    ("bird", "bkd"),
    ("bird", "ad"),
)

GATE_ABLATION_VARIANTS = (
    "bkd",
    "ad",
    "bird",
    "bird-frozen",
    "bird-nofair",
    "bird-nofair-frozen",
)


def _parse_value(text: str) -> Any:
    """An option value: JSON (numbers, true/false, null, quoted strings) or a bare string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_variant(text: str) -> Variant:
    """``NAME=METHOD`` or ``NAME=METHOD:key=value,key=value`` (values read as JSON, e.g.
    ``bird-adam=bird:phi_optimizer=adam,phi_lr=0.05``). Checked against the method's options."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise ValueError(
            f"variant {text!r} must look like NAME=METHOD or NAME=METHOD:key=value,..."
        )
    method, _, option_text = rest.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in option_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"variant {name!r}: option {item!r} must look like key=value")
        options[key.strip()] = _parse_value(value.strip())
    if any(c in name for c in ":,"):
        raise ValueError(f"variant name {name!r} may not contain ':' or ','")
    variant = Variant(name, method.strip(), options)
    create_method(variant.method, **options)  # unknown methods, options or values raise here
    return variant


def resolve_variants(names: Iterable[str], custom: Iterable[Variant] = ()) -> list[Variant]:
    """Variants for ``names``: custom definitions first, then named ablations, then methods."""
    defined = {v.name: v for v in custom}
    out = []
    for name in names:
        if name in defined:
            out.append(defined[name])
        elif name in NAMED_VARIANTS:
            out.append(NAMED_VARIANTS[name])
        elif name in available_methods():
            out.append(Variant(name, name))
        else:
            valid = [*available_methods(), *NAMED_VARIANTS, *defined]
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(valid)}")
    return out


# -- configuration -----------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    """Everything an experiment does; :func:`preset` gives the standard settings."""

    dataset: Dataset = "fashion-mnist-s"
    teachers: tuple[str, ...] = ("cnn", "efficientnet")
    variants: tuple[str, ...] = tuple(available_methods())
    custom_variants: tuple[Variant, ...] = ()
    # None: the pairs of DEFAULT_COMPARISONS whose variants both ran.
    comparisons: tuple[tuple[str, str], ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    skew: float = 0.95
    train_size: int | None = 20_000
    test_size: int | None = 5_000
    # The CNN teacher: ResNet-18 with a CIFAR stem, narrowed to fit two CPU cores (Adult: an MLP).
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
        return preset("quick")

    def resolved_variants(self) -> list[Variant]:
        """The variants to run, in order."""
        return resolve_variants(self.variants, self.custom_variants)

    def resolved_comparisons(self) -> list[tuple[str, str]]:
        """The pairs to difference: the given ones, or the default pairs that both ran."""
        names = set(self.variants)
        if self.comparisons is not None:
            return list(self.comparisons)
        return [(a, b) for a, b in DEFAULT_COMPARISONS if a in names and b in names]

    def validate(self) -> None:
        """Raise ``ValueError`` naming what is wrong (unknown teacher, variant or pair)."""
        if self.dataset not in TEACHERS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(TEACHERS)}")
        valid = TEACHERS[self.dataset]
        bad = [t for t in self.teachers if t not in valid]
        if bad or not self.teachers:
            raise ValueError(
                f"unknown teacher(s) {bad} for {self.dataset}; valid: {', '.join(valid)}"
            )
        if not self.seeds:
            raise ValueError("an experiment needs at least one seed")
        variants = self.resolved_variants()
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        for variant in variants:
            create_method(variant.method, **self.options_of(variant))
        for a, b in self.resolved_comparisons():
            missing = [n for n in (a, b) if n not in names]
            if missing:
                raise ValueError(f"comparison {a} − {b} names variants that do not run: {missing}")

    def options_of(self, variant: Variant) -> dict[str, Any]:
        """The variant's options on top of the config's options for its method."""
        return {**self.method_options.get(variant.method, {}), **variant.options}


def preset(name: str, dataset: Dataset = "fashion-mnist-s") -> ExperimentConfig:
    """A standard setting: ``paper`` (every method, 3 seeds), ``quick`` (a smoke test in
    seconds) or ``gate-ablation`` (BIRD and its ablations against BKD and AD, paired seeds)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    if dataset not in TEACHERS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(TEACHERS)}")
    config = ExperimentConfig(dataset=dataset, teachers=TEACHERS[dataset])
    if dataset == "adult":
        config = replace(
            config,
            train_size=None,
            test_size=None,
            teacher_model="mlp",
            teacher_options={"hidden": [256, 256], "embed_dim": None},
            teacher_train=TrainConfig(epochs=10, batch_size=256, lr=1e-3),
            student_model="mlp",
            student_options={"hidden": [32], "embed_dim": 16},
            student_train=TrainConfig(epochs=10, batch_size=256, lr=1e-3),
        )
    if name == "quick":
        few = TrainConfig(epochs=2, batch_size=64, lr=2e-3, max_steps_per_epoch=4)
        small = {"width": 4, "embed_dim": 16} if dataset != "adult" else config.student_options
        config = replace(
            config,
            seeds=(0,),
            train_size=1_000,
            test_size=200 if dataset != "adult" else None,
            teacher_options={"width": 4} if dataset != "adult" else config.teacher_options,
            teacher_train=few,
            efficientnet_image_size=32,
            probe_epochs=5,
            student_options=small,
            student_train=few,
        )
    elif name == "gate-ablation":
        config = replace(config, variants=GATE_ABLATION_VARIANTS, seeds=tuple(range(6)))
        if dataset == "adult":
            config = replace(config, train_size=10_000)
        else:
            # Sized so that six paired seeds of every variant, with both teachers, fit about an
            # hour on two cores, and the students are strong enough (F1 ≈ 60–70) that seed
            # spread does not drown the gate's effect: a 6,000-image train split, a smaller
            # CNN teacher that trains in half a minute, and five student epochs.
            config = replace(
                config,
                train_size=6_000,
                test_size=2_000,
                teacher_model="small_cnn",
                teacher_options={"width": 16, "embed_dim": 128},
                teacher_train=TrainConfig(epochs=5, lr=2e-3),
                student_train=TrainConfig(epochs=5, lr=2e-3),
            )
    return config


def build_config(
    *,
    preset_name: str = "paper",
    dataset: str = "fashion-mnist-s",
    teachers: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    variant_definitions: Sequence[str] = (),
    comparisons: Sequence[str] | None = None,
    seeds: int | None = None,
    train_size: int | None = None,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    teacher_width: int | None = None,
    efficientnet_image_size: int | None = None,
) -> ExperimentConfig:
    """The configuration a command line asks for, validated; ``ValueError`` names the problem.

    ``variant_definitions`` are ``NAME=METHOD:key=value,...`` strings (:func:`parse_variant`);
    each defined variant runs in addition to ``variants`` (default: the preset's).
    ``comparisons`` are ``A:B`` strings, each reported as the paired difference A − B.
    ``teacher_epochs`` and ``teacher_width`` size the teacher trained from scratch (``cnn``,
    ``mlp``); the EfficientNet teacher is pretrained and frozen, so they do not touch it:
    ``efficientnet_image_size`` sets the side its inputs are resized to (gate-ablation: 48).
    """
    config = preset(preset_name, dataset)  # type: ignore[arg-type]
    custom = tuple(parse_variant(text) for text in variant_definitions)
    names = list(variants) if variants is not None else list(config.variants)
    names += [v.name for v in custom if v.name not in names]
    changes: dict[str, Any] = {"variants": tuple(names), "custom_variants": custom}
    if teachers is not None:
        changes["teachers"] = tuple(teachers)
    if comparisons is not None:
        pairs = []
        for text in comparisons:
            a, sep, b = text.partition(":")
            if not sep or not a.strip() or not b.strip():
                raise ValueError(f"comparison {text!r} must look like A:B (variant names)")
            pairs.append((a.strip(), b.strip()))
        changes["comparisons"] = tuple(pairs)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        changes["seeds"] = tuple(range(seeds))
    if train_size is not None:
        changes["train_size"] = train_size
    if epochs is not None:
        changes["student_train"] = replace(config.student_train, epochs=epochs)
    runs = set(teachers if teachers is not None else config.teachers)
    for option, value, teacher in (
        ("teacher epochs", teacher_epochs, "cnn" if dataset != "adult" else "mlp"),
        ("teacher width", teacher_width, "cnn"),
        ("efficientnet image size", efficientnet_image_size, "efficientnet"),
    ):
        # An option no teacher of the run reads would be silently ignored.
        if value is not None and teacher not in runs:
            raise ValueError(f"{option} sets the {teacher} teacher, which this run does not use")
    if teacher_epochs is not None:
        changes["teacher_train"] = replace(config.teacher_train, epochs=teacher_epochs)
    if teacher_width is not None:
        changes["teacher_options"] = {**config.teacher_options, "width": teacher_width}
    if efficientnet_image_size is not None:
        if efficientnet_image_size < 32:
            raise ValueError(
                f"efficientnet image size must be >= 32 (the backbone downsamples 32×), "
                f"got {efficientnet_image_size}"
            )
        changes["efficientnet_image_size"] = efficientnet_image_size
    config = replace(config, **changes)
    config.validate()
    return config


# -- teachers ----------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A teacher setting: its features for the train split and its own test metrics."""

    name: str
    features: TeacherFeatures
    test_metrics: dict[str, Any]


def _trained_teacher(
    data: DatasetSplits, config: ExperimentConfig, preprocess: Preprocessor, tick: Callable
) -> Teacher:
    """A teacher trained from scratch with CE on the (biased) train split."""
    seed_everything(config.data_seed)
    options = dict(config.teacher_options)
    if config.teacher_model == "mlp":
        options.setdefault("in_features", data.train.x.shape[1])
    net = create_model(config.teacher_model, data.num_classes, **options)
    method = create_method("none")
    method.setup(
        student_dim=net.embed_dim, teacher_dim=None, num_classes=data.num_classes, task=data.task
    )
    fit(net, method, data, config.teacher_train, preprocess=preprocess, progress=tick)
    metrics = evaluate(net, preprocess, data.test, data.task)
    features = compute_teacher_features(net, preprocess, data.train, progress=None)
    return Teacher(config.teacher_model if config.dataset == "adult" else "cnn", features, metrics)


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
    metrics = fairness_report(test_probs.numpy(), data.test.label.numpy(), data.test.group.numpy())
    return Teacher("efficientnet", features, metrics)


def _load_data(config: ExperimentConfig) -> DatasetSplits:
    if config.dataset == "adult":
        return load_adult(seed=config.data_seed, train_size=config.train_size)
    return load_fashion_mnist_s(
        skew=config.skew,
        seed=config.data_seed,
        train_size=config.train_size,
        test_size=config.test_size,
    )


# -- running -----------------------------------------------------------------------------------


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and 95% interval over seeds of every reported metric."""
    out = {}
    for key in REPORTED:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = mean_interval(values).as_dict() if values else {"mean": float("nan")}
    return out


def compare(
    runs: Sequence[dict[str, Any]], a: str, b: str, metrics: Sequence[str] = DIFFERENCED
) -> dict[str, Any]:
    """Paired differences a − b over the seeds both variants ran, per metric, with 95% CIs;
    and the ratio of their mean Δ_mean-DEO."""
    by_seed = {name: {r["seed"]: r for r in runs if r["variant"] == name} for name in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if not seeds:
        raise ValueError(f"variants {a} and {b} share no seed")
    out: dict[str, Any] = {"a": a, "b": b, "seeds": seeds}
    for metric in metrics:
        xs = [by_seed[a][s][metric] for s in seeds]
        ys = [by_seed[b][s][metric] for s in seeds]
        interval = paired_difference(xs, ys)
        out[metric] = {**interval.as_dict(), "excludes_zero": interval.excludes_zero()}
    mean_a = sum(by_seed[a][s]["delta_mean_deo"] for s in seeds) / len(seeds)
    mean_b = sum(by_seed[b][s]["delta_mean_deo"] for s in seeds) / len(seeds)
    out["delta_mean_deo_ratio"] = mean_a / mean_b if mean_b else float("nan")
    return out


def _student(config: ExperimentConfig, data: DatasetSplits) -> torch.nn.Module:
    options = dict(config.student_options)
    if config.student_model == "mlp":
        options.setdefault("in_features", data.train.x.shape[1])
    return create_model(config.student_model, data.num_classes, **options)


def _run_one(
    config: ExperimentConfig,
    data: DatasetSplits,
    preprocess: Preprocessor,
    teacher: Teacher,
    variant: Variant,
    seed: int,
    tick: Callable[[int], None],
) -> dict[str, Any]:
    """Train and test one (variant, seed) with ``teacher``'s features."""
    seed_everything(seed)
    student = _student(config, data)
    method: Method = create_method(variant.method, **config.options_of(variant))
    method.setup(
        student_dim=student.embed_dim,  # type: ignore[arg-type]
        teacher_dim=teacher.features.embedding.shape[1],
        num_classes=data.num_classes,
        task=data.task,
    )
    started = time.perf_counter()
    history = fit(
        student,  # type: ignore[arg-type]
        method,
        data,
        replace(config.student_train, seed=seed),
        preprocess=preprocess,
        train_features=teacher.features,
        progress=tick,
    )
    metrics = evaluate(student, preprocess, data.test, data.task)
    run: dict[str, Any] = {
        "teacher": teacher.name,
        "variant": variant.name,
        "method": variant.method,
        "options": config.options_of(variant),
        "seed": seed,
        "seconds": time.perf_counter() - started,
        **_pick(metrics),
    }
    state = method.extra_state_for_checkpoint()
    if state:
        run["method_state"] = state
        run["epochs"] = [
            {"epoch": e.epoch + 1, "val_delta_mean_deo": e.val["delta_mean_deo"], **e.train}
            for e in history.epochs
        ]
    return run


def run_experiment(
    config: ExperimentConfig, out_dir: str | Path | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run every (teacher, variant, seed); return and optionally write the results.

    Variants that use no teacher (``none``, ``ad``) run once per seed and are reported under
    every teacher: their runs would be identical.
    """
    config.validate()
    started = time.perf_counter()
    data = _load_data(config)
    preprocess = Preprocessor.from_config(data.preprocessing)
    variants = config.resolved_variants()
    student_cfg = config.student_train
    per_variant = {
        v.name: plan_steps_per_epoch(
            data, create_method(v.method, **config.options_of(v)), student_cfg
        )
        for v in variants
    }
    needs_teacher = {v.name: create_method(v.method).needs_teacher for v in variants}
    total = 0
    for i, _ in enumerate(config.teachers):
        total += sum(steps for name, steps in per_variant.items() if needs_teacher[name] or i == 0)
    total *= len(config.seeds) * student_cfg.epochs
    trains_teacher = any(t in ("cnn", "mlp") for t in config.teachers)
    total += (
        trains_teacher
        * plan_steps_per_epoch(data, create_method("none"), config.teacher_train)
        * config.teacher_train.epochs
    )
    total += "efficientnet" in config.teachers
    bar = tqdm(total=total, disable=not show_progress, unit="step", dynamic_ncols=True)
    results: dict[str, Any] = {"config": _jsonable(config), "teachers": {}, "runs": []}
    teacher_free: dict[tuple[str, int], dict[str, Any]] = {}
    teacher_seconds: dict[str, float] = {}

    for teacher_name in config.teachers:
        bar.set_description(f"teacher {teacher_name}")
        teacher_started = time.perf_counter()
        if teacher_name == "efficientnet":
            teacher = _efficientnet_teacher(data, config, bar.update)
        else:
            teacher = _trained_teacher(data, config, preprocess, bar.update)
        results["teachers"][teacher_name] = _pick(teacher.test_metrics)
        for variant in variants:
            for seed in config.seeds:
                bar.set_description(f"{teacher_name}/{variant.name}/seed {seed}")
                key = (variant.name, seed)
                if not needs_teacher[variant.name] and key in teacher_free:
                    run = {**teacher_free[key], "teacher": teacher_name, "reused": True}
                else:
                    run = _run_one(config, data, preprocess, teacher, variant, seed, bar.update)
                    if not needs_teacher[variant.name]:
                        teacher_free[key] = run
                results["runs"].append(run)
        teacher_seconds[teacher_name] = time.perf_counter() - teacher_started
    bar.close()
    results["table"] = {
        t: {
            v.name: _summary(
                [r for r in results["runs"] if r["teacher"] == t and r["variant"] == v.name]
            )
            for v in variants
        }
        for t in config.teachers
    }
    results["comparisons"] = {
        t: [
            compare([r for r in results["runs"] if r["teacher"] == t], a, b)
            for a, b in config.resolved_comparisons()
        ]
        for t in config.teachers
    }
    results["teacher_seconds"] = teacher_seconds
    results["seconds"] = time.perf_counter() - started
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        (out / "results.md").write_text(format_markdown(results))
    return results


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in REPORTED}


def _jsonable(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))


# -- rendering ---------------------------------------------------------------------------------


def _cell(summary: dict[str, float]) -> str:
    half = summary.get("half_width", float("nan"))
    if half != half:  # a single seed: no interval
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {half:.2f}"


def _difference_cell(diff: dict[str, Any]) -> str:
    if diff["half_width"] != diff["half_width"]:
        return f"{diff['mean']:+.2f}"
    mark = " *" if diff["excludes_zero"] else ""
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]{mark}"


def format_markdown(results: dict[str, Any]) -> str:
    """One section per teacher: the table (mean ± half-width of the 95% interval over seeds)
    and the paired differences (mean [95% interval]; * when the interval excludes 0)."""
    lines = []
    seeds = results["config"].get("seeds", [])
    for teacher, table in results["table"].items():
        t = results["teachers"][teacher]
        lines += [
            f"### Teacher: {teacher}",
            "",
            f"Mean ± half-width of the 95% interval over {len(seeds)} seed(s).",
            "",
            "| Variant | AUROC | F1 | Accuracy | Δ_mean-DEO | Δ_max-DEO |",
            "|---|---|---|---|---|---|",
            f"| teacher | {t['auroc']:.2f} | {t['f1']:.2f} | {t['accuracy']:.2f} | "
            f"{t['delta_mean_deo']:.2f} | {t['delta_max_deo']:.2f} |",
        ]
        for variant, summary in table.items():
            cells = " | ".join(_cell(summary[k]) for k in REPORTED)
            lines.append(f"| {variant} | {cells} |")
        lines.append("")
        comparisons = results.get("comparisons", {}).get(teacher, [])
        if comparisons:
            lines += [
                "Paired differences A − B over the same seeds: mean [95% interval], "
                "* when the interval excludes 0; ratio = mean Δ_mean-DEO of A / of B.",
                "",
                "| A − B | AUROC | F1 | Δ_mean-DEO | Δ_max-DEO | Δ_mean-DEO ratio |",
                "|---|---|---|---|---|---|",
            ]
            for comp in comparisons:
                cells = " | ".join(_difference_cell(comp[k]) for k in DIFFERENCED)
                lines.append(
                    f"| {comp['a']} − {comp['b']} | {cells} | {comp['delta_mean_deo_ratio']:.2f} |"
                )
            lines.append("")
    return "\n".join(lines)
