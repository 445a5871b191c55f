"""Teacher-feature precompute and training-step cost, measured side by side in one run.

1. Precompute throughput: Ray Data (read Parquet → ``map_batches`` with the teacher in an
   actor → write shards + manifest) vs a plain single-process PyTorch loop over the same teacher
   and the same dataset (read Parquet → decode → forward → write one Parquet file). Ray start-up
   is excluded (``ray.init`` happens before timing). Target: Ray ≥ 0.8 × plain rows/s.
2. Student step: a KD step on precomputed teacher outputs vs a plain CE step of the same student
   (target ≤ 1.15 ×), and a KD step that runs the teacher online in the step.

    python bench/precompute.py [--rows 8000] [--out bench/results/precompute.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save

from bird_core.methods import create_method
from bird_core.methods.base import StepContext
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import Distiller, TrainConfig, build_optimizer, train_step
from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from service.storage import LocalStore, read_manifest
from workers.features import (
    TeacherEmbedder,
    batch_from_rows,
    load_feature_table,
    precompute_features,
)
from workers.rows import table_for_write
from workers.teachers import TeacherSource

TEACHER = {"arch": "resnet18", "options": (("width", 32),)}


def plain_loop(
    store: LocalStore,
    prefix: str,
    source: TeacherSource,
    preprocessing: dict,
    batch_size: int,
    out: Path,
) -> int:
    """Single-process reference: read, decode, forward, write — no Ray."""
    manifest = read_manifest(store, prefix)
    embedder = TeacherEmbedder(source, preprocessing, attention_size=4, device="cpu")
    writer = None
    rows = 0
    for name in sorted(manifest.files):
        table = pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/{name}")))
        for batch in table.to_batches(max_chunksize=batch_size):
            arrays = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.schema.names}
            result = table_for_write(embedder(arrays))
            if writer is None:
                writer = pq.ParquetWriter(out, result.schema)
            writer.write_table(result)
            rows += result.num_rows
    if writer is not None:
        writer.close()
    return rows


def time_steps(
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    batches: list,
    teacher: torch.nn.Module | None,
    teacher_pre: Preprocessor | None,
    raw: list | None,
    repeats: int,
) -> float:
    """Median seconds per step over ``repeats`` passes of the batches (first pass warms up)."""
    times = []
    for r in range(repeats + 1):
        started = time.perf_counter()
        for i, batch in enumerate(batches):
            if teacher is not None:
                with torch.no_grad():
                    out = teacher(teacher_pre(raw[i]), features=True)
                batch.teacher_logits = out.logits
                batch.teacher_embedding = out.embedding
            train_step(distiller, optimizer, batch, StepContext(step=i))
        if r:
            times.append((time.perf_counter() - started) / len(batches))
    return statistics.median(times)


def main() -> None:
    """Run both measurements, print ratios, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", type=int, default=20000, help="train images (plus a small val/test)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=1, help="teacher actors")
    parser.add_argument(
        "--torch-threads", type=int, default=2, help="torch threads per teacher actor"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/precompute.json"))
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bird-bench-"))
    store = LocalStore(work / "store")
    prepare_fashion_mnist_s(
        store, "datasets/fm", train_size=args.rows, test_size=200, val_fraction=0.01
    )
    torch.manual_seed(0)
    teacher_net = create_model(TEACHER["arch"], 10, **dict(TEACHER["options"]))
    weights = save({k: v.contiguous() for k, v in teacher_net.state_dict().items()})
    source = TeacherSource(
        kind="model",
        num_classes=10,
        arch=TEACHER["arch"],
        weights=weights,
        weights_uri="bench://teacher",
        options=TEACHER["options"],
    )
    from workers.datasets import load_splits

    preprocessing = load_splits(store, "datasets/fm").preprocessing
    total_rows = sum(read_manifest(store, "datasets/fm").metadata["counts"].values())

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Warm Ray Data up once (worker processes, imports) so start-up does not count.
    precompute_features(
        store,
        "datasets/fm",
        source,
        dataset_preprocessing=preprocessing,
        batch_size=args.batch_size,
        seed=99,
    )
    results = {"rows": total_rows}
    plain_times, ray_times = [], []
    for seed in range(2):  # interleaved, fresh cache keys (seed) so Ray really recomputes
        started = time.perf_counter()
        plain_loop(
            store,
            "datasets/fm",
            source,
            preprocessing,
            args.batch_size,
            work / f"plain-{seed}.parquet",
        )
        plain_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        features = precompute_features(
            store,
            "datasets/fm",
            source,
            dataset_preprocessing=preprocessing,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            torch_threads=args.torch_threads,
            seed=seed,
        )
        ray_times.append(time.perf_counter() - started)
    plain_rate = total_rows / min(plain_times)
    ray_rate = total_rows / min(ray_times)
    results["precompute"] = {
        "plain_rows_per_s": plain_rate,
        "ray_data_rows_per_s": ray_rate,
        "ratio_ray_to_plain": ray_rate / plain_rate,
        "target_min": 0.8,
    }
    ray.shutdown()

    # Student steps on precomputed features vs CE vs online teacher.
    table = load_feature_table(store, features).slice(0, 32 * 128)
    student_pre = Preprocessor.from_config(preprocessing)
    batches, raw = [], []
    for rb in table.to_batches(max_chunksize=128)[:16]:
        rows = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
        rows = {
            c: (np.stack(v) if v.dtype == object and c != "image" else v) for c, v in rows.items()
        }
        batch = batch_from_rows(rows, student_pre)
        batches.append(batch)
        raw.append(batch.x)
    teacher_net.eval()
    identity = Preprocessor("image", [0.0] * 3, [1.0] * 3)  # batch.x is already normalised
    runners = {}
    for label, method_name, online in (
        ("ce", "none", False),
        ("kd_precomputed", "bkd", False),
        ("kd_online_teacher", "bkd", True),
    ):
        torch.manual_seed(0)
        student = create_model("small_cnn", 10, width=16, embed_dim=64)
        method = create_method(method_name)
        method.setup(
            student_dim=64, teacher_dim=teacher_net.embed_dim, num_classes=10, task="multiclass"
        )
        distiller = Distiller(student, method).train()
        runners[label] = (distiller, build_optimizer(student, method, TrainConfig()), online)
    # Configurations interleaved pass by pass, so machine noise hits all of them alike.
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(4):
        for label, (distiller, optimizer, online) in runners.items():
            samples[label].append(
                time_steps(
                    distiller,
                    optimizer,
                    batches,
                    teacher_net if online else None,
                    identity if online else None,
                    raw,
                    repeats=1,
                )
            )
    step_ms = {label: 1000 * statistics.median(t[1:]) for label, t in samples.items()}
    results["student_step_ms"] = step_ms
    results["student_step_ratios"] = {
        "kd_precomputed_vs_ce": step_ms["kd_precomputed"] / step_ms["ce"],
        "kd_online_vs_ce": step_ms["kd_online_teacher"] / step_ms["ce"],
        "target_max_kd_precomputed_vs_ce": 1.15,
    }
    p = results["precompute"]
    r = results["student_step_ratios"]
    print(
        f"precompute: plain {p['plain_rows_per_s']:.0f} rows/s, Ray Data "
        f"{p['ray_data_rows_per_s']:.0f} rows/s, ratio {p['ratio_ray_to_plain']:.2f} "
        f"(target >= 0.8: {'met' if p['ratio_ray_to_plain'] >= 0.8 else 'NOT met'})"
    )
    print(
        f"student step: CE {step_ms['ce']:.1f} ms, KD on precomputed "
        f"{step_ms['kd_precomputed']:.1f} ms ({r['kd_precomputed_vs_ce']:.2f}x, target <= 1.15: "
        f"{'met' if r['kd_precomputed_vs_ce'] <= 1.15 else 'NOT met'}), KD with online teacher "
        f"{step_ms['kd_online_teacher']:.1f} ms ({r['kd_online_vs_ce']:.2f}x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
