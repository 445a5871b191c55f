"""Time per training step of every method on the same batches, as a ratio to ``none``.

Each configuration trains its own student from the same initialisation on the same
FashionMNIST-S batches (teacher features precomputed once). Configurations are interleaved
round by round so machine noise hits all of them alike; the median step time per
configuration is reported. Targets (issue: bird_core): BIRD with meta_interval=1 at most
2.5 × BKD's step, with meta_interval=4 at most 1.5 ×.

    python bench/step_cost.py [--rounds 5] [--steps 10] [--out bench/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bird_core.data import load_fashion_mnist_s
from bird_core.methods import available_methods, create_method
from bird_core.methods.base import StepContext
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    Distiller,
    MetaSampler,
    TrainConfig,
    build_optimizer,
    compute_teacher_features,
    make_batch,
    split_meta,
    train_step,
)

CONFIGS: dict[str, tuple[str, dict]] = {
    **{name: (name, {}) for name in available_methods() if name != "bird"},
    "bird (meta_interval=1)": ("bird", {"meta_interval": 1}),
    "bird (meta_interval=4)": ("bird", {"meta_interval": 4}),
    "bird (all params, interval=1)": ("bird", {"meta_interval": 1, "virtual_params": "all"}),
}


def main() -> None:
    """Run the benchmark, print the ratios, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per round (multiple of 4)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_cost.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_fashion_mnist_s(train_size=4000, test_size=100)
    preprocess = Preprocessor.from_config(data.preprocessing)
    teacher = create_model("resnet18", 10, width=16)
    features = compute_teacher_features(teacher, preprocess, data.train)
    train_rows, meta_rows = split_meta(data.train, 0.1, 0)
    batches = [
        make_batch(
            data.train,
            train_rows[i * args.batch_size : (i + 1) * args.batch_size],
            preprocess,
            features,
            "cpu",
        )
        for i in range(args.steps)
    ]
    sampler = MetaSampler(data.train, meta_rows, balanced=True, seed=0)
    meta_batches = [
        make_batch(data.train, sampler.sample(args.batch_size), preprocess, features, "cpu")
        for _ in range(args.steps)
    ]

    runners = {}
    for label, (name, options) in CONFIGS.items():
        torch.manual_seed(0)
        student = create_model("small_cnn", 10, width=16, embed_dim=64)
        method = create_method(name, **options)
        method.setup(
            student_dim=64,
            teacher_dim=features.embedding.shape[1],
            num_classes=10,
            task="multiclass",
        )
        # What fit() does before training: BIRD fits the teacher's head on the held-out rows.
        method.fit_to_teacher(features.embedding[meta_rows], features.logits[meta_rows])
        distiller = Distiller(student, method).train()
        runners[label] = (distiller, build_optimizer(student, method, TrainConfig()))

    times: dict[str, list[float]] = {label: [] for label in CONFIGS}
    step = 0
    for _ in range(args.rounds + 1):  # the first round warms up and is discarded
        for label, (distiller, optimizer) in runners.items():
            started = time.perf_counter()
            for i in range(args.steps):
                ctx = StepContext(task="multiclass", progress=0.5, step=step + i)
                train_step(distiller, optimizer, batches[i], ctx, meta_batches[i])
            times[label].append((time.perf_counter() - started) / args.steps)
        step += args.steps
    per_step = {label: statistics.median(t[1:]) for label, t in times.items()}
    base, bkd = per_step["none"], per_step["bkd"]
    rows = {
        label: {"ms_per_step": 1000 * t, "ratio_to_none": t / base, "ratio_to_bkd": t / bkd}
        for label, t in per_step.items()
    }
    targets = {
        "bird_interval1_vs_bkd": {
            "value": rows["bird (meta_interval=1)"]["ratio_to_bkd"],
            "max": 2.5,
        },
        "bird_interval4_vs_bkd": {
            "value": rows["bird (meta_interval=4)"]["ratio_to_bkd"],
            "max": 1.5,
        },
    }
    for target in targets.values():
        target["met"] = target["value"] <= target["max"]
    print(f"{'configuration':32s} {'ms/step':>9s} {'× none':>8s} {'× bkd':>8s}")
    for label, row in rows.items():
        print(
            f"{label:32s} {row['ms_per_step']:9.1f} {row['ratio_to_none']:8.2f} "
            f"{row['ratio_to_bkd']:8.2f}"
        )
    for name, target in targets.items():
        print(
            f"{name}: {target['value']:.2f} (target <= {target['max']}) "
            f"{'met' if target['met'] else 'NOT met'}"
        )
    result = {
        "benchmark": "step_cost",
        "batch_size": args.batch_size,
        "student": "small_cnn(width=16, embed_dim=64)",
        "threads": torch.get_num_threads(),
        "rows": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
