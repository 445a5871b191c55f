"""Ray Train overhead: the same training in bird_core's plain loop and through Ray Train.

Three paths train the same student with the same method, batch size and epochs on the same
precomputed feature table (FashionMNIST-S rows + EfficientNet-Lite0 teacher outputs, in a local
store under a temp dir):

* ``plain`` — :func:`bird_core.train.fit` in this process on in-memory tensors built from the
  feature table (rows split by their ``split`` column, train rows sorted by id so BIRD's meta
  slice is the one the Ray path holds out; the teacher outputs as ``TeacherFeatures``).
* ``ray-1`` — :func:`workers.train.run_training` with one worker (``cpus_per_worker=1``).
* ``ray-2`` — two workers of one CPU each, the same batch size per rank (so half the steps per
  rank, the same rows per epoch). On a 2-core machine this shows the cost of gloo all-reduces,
  not a speed-up.

Every path uses one torch thread per process (the Ray loop sets ``max(1, int(cpus_per_worker))``;
the plain loop is set to match). Time per epoch is what each path reports itself (``fit``'s
``EpochResult.seconds``; rank 0's ``EpochRecord.seconds``), both including validation, so Ray
start-up, dataset materialisation and worker-group creation are excluded. The first epoch of
every run is warm-up and reported apart. Paths are interleaved round by round (order rotated) so
machine noise hits all of them alike. Target: Ray 1-worker / plain ≤ 1.15 ×.

    python bench/ray_overhead.py [--quick] [--method bird] [--train-size 4000] [--epochs 4]
        [--rounds 2] [--out docs/results/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import ray.data
import torch

from bird_core.data.base import DatasetSplits
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    TrainingState,
    build_optimizer,
    fit,
    make_batch,
    plan_steps_per_epoch,
    split_meta,
)
from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from bird_datasets.reader import read_dataset_meta
from service.settings import Settings
from service.spec import JobSpec
from service.storage import LocalStore, join_key
from workers.checkpoints import publish_checkpoint
from workers.features import (
    FeatureSet,
    batch_from_rows,
    load_feature_table,
    precompute_features,
)
from workers.ingest import ShardedIngest
from workers.sinks import EpochRecord
from workers.teachers import TeacherSource
from workers.train import (
    RayStorage,
    TrainPlan,
    _save,
    _split_from_rows,
    build_datasets,
    build_student_and_method,
    plan_training,
    run_training,
)

DATASET_PREFIX = "datasets/fm"
TARGET_MAX = 1.15
# Logical CPUs for Ray. Two training workers reserve one CPU each; Ray Data needs a CPU of its
# own for the tasks that materialise the datasets and feed the streaming split of `train`
# (with num_cpus=2 a 2-worker run would hold every CPU and such a task would wait forever).
# Physically the machine has 2 cores: the driver sits idle in trainer.fit() while Ray trains,
# and the 2-worker run's two single-threaded ranks fill both cores.
RAY_NUM_CPUS = 3


class _Arrivals:
    """Ray actor: each epoch record with the wall-clock time it reached the sink."""

    def __init__(self) -> None:
        self.items: list[tuple[float, EpochRecord]] = []

    def write(self, record: EpochRecord, at: float) -> bool:
        if any(r.epoch == record.epoch for _, r in self.items):
            return False
        self.items.append((at, record))
        return True

    def get(self) -> list[tuple[float, EpochRecord]]:
        return list(self.items)


class TimedSink:
    """A metrics sink (runs in the Train controller) that also stamps when each record arrived.

    The gap between two arrivals is a second, fuller measure of a Ray epoch: it also holds the
    ``ray.train.report`` of the previous epoch (checkpoint persisted to Ray storage, rank
    barrier, controller poll), which rank 0's ``seconds`` does not.
    """

    def __init__(self) -> None:
        self.actor = ray.remote(num_cpus=0)(_Arrivals).remote()

    def write(self, record: EpochRecord) -> bool:
        return bool(ray.get(self.actor.write.remote(record, time.time())))

    def arrivals(self) -> list[tuple[float, EpochRecord]]:
        return sorted(ray.get(self.actor.get.remote()), key=lambda item: item[1].epoch)


def machine_load() -> dict[str, Any]:
    """``uptime`` output and the 1/5/15-minute load averages."""
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    return {"uptime": text.strip(), "loadavg": list(os.getloadavg())}


def make_spec(args: argparse.Namespace, workers: int) -> JobSpec:
    """The job every path trains (only ``resources`` differs between the Ray paths)."""
    return JobSpec.model_validate(
        {
            "dataset": {"uri": DATASET_PREFIX},
            "student": {
                "model": "small_cnn",
                "options": {"width": args.width, "embed_dim": args.embed_dim},
            },
            "method": {"name": args.method},
            "training": {"epochs": args.epochs, "batch_size": args.batch_size},
            "resources": {"workers": workers, "cpus_per_worker": 1},
            "seed": 0,
        }
    )


def split_rows(table: Any, split: str, by_id: bool = False) -> dict[str, np.ndarray]:
    """The rows of one split of the feature table as NumPy columns (optionally sorted by id)."""
    part = table.filter(pc.equal(table.column("split"), split))
    rows = {c: part.column(c).to_numpy(zero_copy_only=False) for c in part.column_names}
    if by_id:
        order = np.argsort(rows["id"], kind="stable")
        rows = {c: v[order] for c, v in rows.items()}
    return rows


def in_memory_data(plan: TrainPlan, table: Any) -> tuple[DatasetSplits, Any]:
    """The feature table as bird_core splits plus the train rows' teacher outputs."""
    # Sorted by id, as workers.train.meta_ids orders rows before split_meta: the same meta slice.
    train, train_features = _split_from_rows(split_rows(table, "train", by_id=True))
    val, _ = _split_from_rows(split_rows(table, "val"))
    data = DatasetSplits(
        name="fashion_mnist_s",
        train=train,
        val=val,
        test=val,  # unused by fit
        num_classes=plan.num_classes,
        num_groups=plan.num_groups,
        task=plan.task,  # type: ignore[arg-type]
        preprocessing=plan.preprocessing,
    )
    return data, train_features


def run_plain(plan: TrainPlan, table: Any, threads: int) -> dict[str, Any]:
    """bird_core.train.fit on in-memory tensors; per-epoch seconds and steps."""
    torch.set_num_threads(threads)
    data, train_features = in_memory_data(plan, table)
    config = plan.train_config()
    student, method = build_student_and_method(plan)
    steps_at_end: list[int] = []

    def on_epoch_end(_: Any, state: TrainingState) -> None:
        steps_at_end.append(state.step)

    started = time.perf_counter()
    result = fit(
        student,
        method,
        data,
        config,
        preprocess=Preprocessor.from_config(plan.preprocessing),
        train_features=train_features if method.needs_teacher else None,
        on_epoch_end=on_epoch_end,
    )
    wall = time.perf_counter() - started
    steps = [b - a for a, b in zip([0, *steps_at_end], steps_at_end, strict=False)]
    return {
        "seconds": [e.seconds for e in result.epochs],
        "steps_per_epoch": steps,
        "planned_steps_per_epoch": plan_steps_per_epoch(data, method, config),
        "train_rows": len(data.train),
        "train_rows_after_meta_slice": (
            len(split_meta(data.train, method.options.meta_fraction, config.seed)[0])  # type: ignore[attr-defined]
            if method.needs_meta_batch
            else len(data.train)
        ),
        "val_rows": len(data.val),
        "final_val_auroc": result.epochs[-1].val["auroc"],
        "run_wall_s": wall,
    }


def run_ray(
    args: argparse.Namespace,
    store: LocalStore,
    root: Path,
    features: FeatureSet,
    meta: Any,
    workers: int,
    name: str,
) -> dict[str, Any]:
    """run_training with ``workers`` ranks; rank 0's per-epoch seconds and step deltas."""
    base = join_key("bench", name)
    plan = plan_training(
        make_spec(args, workers),
        store_url=str(root),
        settings=Settings(data_dir=root),
        features=features,
        dataset_meta=meta,
        checkpoint_base=join_key(base, "checkpoints"),
    )
    datasets = build_datasets(store, features, plan)  # materialised: not part of any epoch
    storage = RayStorage.on_store(store, join_key(base, "ray"))
    sink = TimedSink()
    started = time.perf_counter()
    run_training(plan, datasets, storage=storage, run_name="run", sink=sink)
    wall = time.perf_counter() - started
    arrivals = sink.arrivals()
    records = [r for _, r in arrivals]
    steps = [b.step - a for a, b in zip([0] + [r.step for r in records], records, strict=False)]
    times = [t for t, _ in arrivals]
    return {
        "seconds": [r.seconds for r in records],
        "steps_per_epoch": steps,
        # Arrival gaps: epoch k+1's full cost including epoch k's report (first epoch: none).
        "report_interval_s": [b - a for a, b in itertools.pairwise(times)],
        "final_val_auroc": records[-1].val["auroc"] if records else None,
        "run_wall_s": wall,
        "rank_param_max_diff": max((r.rank_param_max_diff for r in records), default=0.0),
    }


def breakdown(
    store: LocalStore,
    features: FeatureSet,
    plan: TrainPlan,
    table: Any,
    threads: int,
    repeats: int,
) -> dict[str, Any]:
    """Per-epoch costs the Ray path has and the plain loop has not, measured in this process.

    * feeding one epoch of train batches: Ray Data (a 1-way ``streaming_split`` of the
      materialised dataset, iterated with train_loop_per_worker's ``iter_batches`` arguments,
      PNG decode + tensors in ``batch_from_rows``) vs ``make_batch`` on in-memory tensors;
    * rank 0's end of epoch: the bird_core checkpoint written to a temp dir (``_save``) and
      published as ``last`` and ``best`` (files + tar + sha256 into the local store).
    """
    torch.set_num_threads(threads)
    data, train_features = in_memory_data(plan, table)
    config = plan.train_config()
    student, method = build_student_and_method(plan)
    preprocess = Preprocessor.from_config(plan.preprocessing)
    steps = plan_steps_per_epoch(data, method, config)
    train_rows = torch.arange(len(data.train))
    if method.needs_meta_batch:
        train_rows, _ = split_meta(data.train, method.options.meta_fraction, config.seed)  # type: ignore[attr-defined]
    batch_size = config.batch_size
    # The rank's shard exactly as the training run gets it (one rank: the whole dataset).
    ingest = ShardedIngest(datasets_to_split=["train"])
    train = build_datasets(store, features, plan)["train"]
    shard = ingest.configure({"train": train}, 1, None, None)[0]["train"]
    ray_feed, plain_feed, ckpt = [], [], []
    for epoch in range(repeats + 1):  # the first pass warms up and is discarded
        started = time.perf_counter()
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=min(4 * batch_size, max(len(train_rows), 1)),
            local_shuffle_seed=epoch,
        )
        iterator = iter(batches)
        for _ in range(steps):
            rows = next(iterator, None)
            if rows is None:
                break
            batch_from_rows(rows, preprocess)
        ray_feed.append(time.perf_counter() - started)
        started = time.perf_counter()
        order = train_rows[torch.randperm(len(train_rows))]
        for i in range(steps):
            index = order[i * batch_size : (i + 1) * batch_size]
            make_batch(data.train, index, preprocess, train_features, "cpu")
        plain_feed.append(time.perf_counter() - started)
        optimizer = build_optimizer(student, method, config)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bird-bench-ckpt-") as directory:
            _save(directory, plan, student, preprocess, method, optimizer, 1, steps, {})
            for name in ("last", "best"):
                publish_checkpoint(store, directory, "bench/breakdown/checkpoints", name)
        ckpt.append(time.perf_counter() - started)
    return {
        "steps_per_epoch": steps,
        "ray_data_feed_s_per_epoch": statistics.fmean(ray_feed[1:]),
        "plain_feed_s_per_epoch": statistics.fmean(plain_feed[1:]),
        "checkpoint_save_and_publish_s_per_epoch": statistics.fmean(ckpt[1:]),
        "repeats": repeats,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Warm-up epochs apart; mean and median s/epoch over every other epoch of every run."""
    steady = [s for run in runs for s in run["seconds"][1:]]
    out = {
        "runs": runs,
        "warmup_s": [run["seconds"][0] for run in runs],
        "steady_epochs": len(steady),
        "mean_s_per_epoch": statistics.fmean(steady) if steady else None,
        "median_s_per_epoch": statistics.median(steady) if steady else None,
        "steps_per_epoch": sorted({s for run in runs for s in run["steps_per_epoch"]}),
    }
    intervals = [s for run in runs for s in run.get("report_interval_s", [])]
    if intervals:
        out["mean_report_interval_s"] = statistics.fmean(intervals)
    return out


def main() -> None:
    """Prepare data and features, run the paths interleaved, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="bird")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--val-fraction", type=float, default=0.01, help="of the 60k images")
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each path")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip timing the Ray path's extra parts"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/ray_overhead.json"))
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.val_fraction, args.epochs, args.rounds = 600, 0.005, 2, 1
    if args.threads != 1:
        parser.error("--threads must be 1: run_training gives each rank int(cpus_per_worker)=1")

    load_before = machine_load()
    work = Path(tempfile.mkdtemp(prefix="bird-ray-overhead-"))
    root = work / "store"
    store = LocalStore(root)
    ray.init(
        address="local",  # a cluster of its own, never one already running on this machine
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={
            "env_vars": {
                # The Train controller polls its workers every 2 s by default.
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            }
        },
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # keep the printed table readable
    ctx.enable_operator_progress_bars = False
    prep_started = time.perf_counter()
    prepare_fashion_mnist_s(
        store,
        DATASET_PREFIX,
        train_size=args.train_size,
        test_size=100,
        val_fraction=args.val_fraction,
        seed=3,
    )
    from workers.datasets import load_splits

    features = precompute_features(
        store,
        DATASET_PREFIX,
        TeacherSource(kind="efficientnet_lite0_probe", num_classes=10, image_size=32),
        dataset_preprocessing=load_splits(store, DATASET_PREFIX).preprocessing,
        batch_size=128,
        probe_epochs=3,
    )
    meta = read_dataset_meta(store, DATASET_PREFIX)
    table = load_feature_table(store, features)
    plain_plan = plan_training(
        make_spec(args, 1),
        store_url=str(root),
        settings=Settings(data_dir=root),
        features=features,
        dataset_meta=meta,
        checkpoint_base=None,
    )
    print(f"data + teacher features ready in {time.perf_counter() - prep_started:.1f} s ({work})")

    paths = ["plain", "ray-1", "ray-2"]
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for r in range(args.rounds):
        order = paths[r % 3 :] + paths[: r % 3]  # rotated so no path always runs first
        for path in order:
            if path == "plain":
                run = run_plain(plain_plan, table, args.threads)
            else:
                workers = int(path.split("-")[1])
                run = run_ray(args, store, root, features, meta, workers, f"{path}-r{r}")
            runs[path].append(run)
            secs = ", ".join(f"{s:.2f}" for s in run["seconds"])
            print(f"round {r} {path}: s/epoch [{secs}] steps/epoch {run['steps_per_epoch']}")
    costs = None
    if not args.no_breakdown:
        costs = breakdown(store, features, plain_plan, table, args.threads, repeats=args.epochs - 1)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    load_after = machine_load()

    summary = {p: summarise(runs[p]) for p in paths}
    plain_mean = summary["plain"]["mean_s_per_epoch"]
    for p in paths:
        summary[p]["ratio_vs_plain"] = summary[p]["mean_s_per_epoch"] / plain_mean
    ratio = summary["ray-1"]["ratio_vs_plain"]
    two_vs_one = summary["ray-2"]["mean_s_per_epoch"] / summary["ray-1"]["mean_s_per_epoch"]
    met = ratio <= TARGET_MAX

    print()
    print(
        f"{'path':8s} {'epochs':>6s} {'warm-up s':>10s} {'mean s/epoch':>13s} "
        f"{'× plain':>8s} {'steps/epoch/rank':>17s} {'report gap s':>13s}"
    )
    for p in paths:
        s = summary[p]
        gap = s.get("mean_report_interval_s")
        print(
            f"{p:8s} {s['steady_epochs']:6d} {statistics.fmean(s['warmup_s']):10.2f} "
            f"{s['mean_s_per_epoch']:13.3f} {s['ratio_vs_plain']:8.3f} "
            f"{','.join(map(str, s['steps_per_epoch'])):>17s} "
            f"{'-' if gap is None else f'{gap:.3f}':>13s}"
        )
    print(
        f"steps check: plain fit {summary['plain']['steps_per_epoch']} "
        f"(planned {runs['plain'][0]['planned_steps_per_epoch']}), Ray 1 worker "
        f"{summary['ray-1']['steps_per_epoch']}, Ray 2 workers "
        f"{summary['ray-2']['steps_per_epoch']} per rank"
    )
    print(
        f"Ray 1-worker / plain: {ratio:.3f} (target <= {TARGET_MAX}) "
        f"{'met' if met else 'NOT met'}; Ray 2 workers / 1 worker: {two_vs_one:.3f}"
    )
    if costs is not None:
        print(
            f"per-epoch parts ({costs['steps_per_epoch']} steps, measured in the driver): "
            f"Ray Data feed {costs['ray_data_feed_s_per_epoch']:.3f} s vs in-memory "
            f"{costs['plain_feed_s_per_epoch']:.3f} s; checkpoint save + publish last/best "
            f"{costs['checkpoint_save_and_publish_s_per_epoch']:.3f} s"
        )
    print(f"load before: {load_before['uptime']}")
    print(f"load after:  {load_after['uptime']}")

    result = {
        "benchmark": "ray_overhead",
        "command": "python bench/ray_overhead.py" + (" --quick" if args.quick else ""),
        "settings": {
            "method": args.method,
            "dataset": "FashionMNIST-S",
            "train_size": args.train_size,
            "train_rows": runs["plain"][0]["train_rows"],
            "train_rows_after_meta_slice": runs["plain"][0]["train_rows_after_meta_slice"],
            "val_rows": runs["plain"][0]["val_rows"],
            "teacher": "efficientnet_lite0_probe (image_size 32), precomputed",
            "student": f"small_cnn(width={args.width}, embed_dim={args.embed_dim})",
            "batch_size_per_rank": args.batch_size,
            "epochs": args.epochs,
            "warmup_epochs_excluded": 1,
            "rounds": args.rounds,
            "torch_threads_per_process": args.threads,
            "ray_num_cpus": RAY_NUM_CPUS,
            "cpus_per_worker": 1,
            "datasets_materialized": True,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": 0.1,
            "store": "local directory (temp)",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_before": load_before,
            "load_after": load_after,
        },
        "paths": summary,
        "ray_path_parts": costs,
        "ratio_ray1_vs_plain": ratio,
        "ratio_ray2_vs_ray1": two_vs_one,
        "target": {"max_ratio_ray1_vs_plain": TARGET_MAX, "met": met},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
