"""Distributed training of a bird job with Ray Train V2 (PyTorch DDP; NCCL on GPUs, gloo on CPU).

bird_core owns the algorithm (model, method, :func:`bird_core.train.train_step`, evaluation,
checkpoint format); this module only distributes it:

* :func:`plan_training` turns a :class:`~service.spec.JobSpec` and a published feature set into
  a :class:`TrainPlan` — plain data every Ray worker receives.
* :func:`build_datasets` gives the Ray Data datasets: ``train`` (split across ranks by
  ``get_dataset_shard``), and, unsplit, ``meta`` (BIRD's held-out slice: every rank draws its
  own meta batches from it) and ``val`` (rank 0 evaluates).
* :func:`train_loop_per_worker` is the per-rank loop: restore from ``ray.train.get_checkpoint()``,
  DDP through ``prepare_model``, one ``ray.train.report`` per epoch (rank 0 attaches the
  checkpoint and publishes ``last`` and, when the objective improved, ``best``), the job's
  :class:`~workers.control.RunControl` checked between steps (stop: final checkpoint; abort:
  nothing more).
* :func:`run_training` builds the ``TorchTrainer`` with ``ScalingConfig``, ``RunConfig`` on the
  object store (S3 with an explicit endpoint, or a local directory), ``FailureConfig`` and the
  metrics sink callback, and runs it; :func:`train_job_run` is what a job's Ray task runs
  (datasets, then training).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data.expressions import col
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback

from bird_core.checkpoint import load_training_state, save_checkpoint
from bird_core.data.base import Split
from bird_core.methods import create_method
from bird_core.methods.base import StepContext
from bird_core.metrics import predicts_one_class
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    Distiller,
    MetaSampler,
    TeacherFeatures,
    TrainConfig,
    build_optimizer,
    evaluate,
    is_channels_last,
    make_batch,
    seed_everything,
    split_meta,
    train_step,
    unwrap,
)
from service.compat import resolve_spec
from service.settings import Settings
from service.spec import JobSpec, ObjectiveSpec
from service.storage import ObjectStore, open_store
from workers.checkpoints import publish_checkpoint
from workers.control import ABORT, RUN, STOP
from workers.errors import RunInputError
from workers.features import (
    FeatureSet,
    batch_from_rows,
    read_feature_split,
    rows_as_tensors,
)
from workers.ingest import ShardedIngest, presplit
from workers.rows import decode_images_once, select_ids
from workers.sinks import EpochRecord, MetricsSink, SinkCallback

__all__ = [
    "FAULT_ENV",
    "SLOW_STEP_ENV",
    "FaultInjection",
    "TrainOutcome",
    "TrainPlan",
    "build_datasets",
    "objective_score",
    "plan_training",
    "run_training",
    "search_score",
    "train_job_run",
    "train_loop_per_worker",
]

# Test-only fault injection: "rank=1,epoch=2,marker=/tmp/file" makes rank 1 exit hard halfway
# through epoch 2 (0-based) — once: the marker file records that the fault happened.
FAULT_ENV = "BIRD_TEST_FAULT"
# Test-only: seconds every training step sleeps (read on the driver), so that a test can see a
# run in the middle of an epoch however fast the machine is.
SLOW_STEP_ENV = "BIRD_TEST_SLOW_STEP"
# The epoch record inside Ray's checkpoint directory (see train_loop_per_worker).
RECORD_FILE = "epoch_record.json"
# How often rank 0 asks the job's RunControl (a Ray actor) between steps.
_STOP_POLL_S = 0.2


@dataclass(frozen=True)
class FaultInjection:
    """Where a test wants a training worker to die (see :data:`FAULT_ENV`)."""

    rank: int
    epoch: int
    marker: str

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        """Parse :data:`FAULT_ENV` from the driver's environment (None when unset)."""
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        try:
            parts = dict(item.split("=", 1) for item in text.split(","))
            return cls(int(parts["rank"]), int(parts["epoch"]), parts["marker"])
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{FAULT_ENV} must look like rank=1,epoch=2,marker=/path, got {text!r}"
            ) from err

    def maybe_exit(self, rank: int, epoch: int) -> None:
        """Exit the process at once if this is the rank and epoch, the first time only."""
        if rank == self.rank and epoch == self.epoch and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(f"rank {rank} exited in epoch {epoch}\n")
            os._exit(17)  # no cleanup, no exception: as if the process was killed


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training worker needs, as plain data (sent to every Ray worker)."""

    spec: dict[str, Any]  # the JobSpec, JSON form
    method_options: dict[str, Any]  # spec options with the trial's overrides applied
    task: str
    num_classes: int
    num_groups: int
    preprocessing: dict[str, Any]
    teacher_dim: int | None
    student_options: dict[str, Any]
    num_train_rows: int
    store_url: str
    settings: Settings
    checkpoint_base: str | None  # where best/last are published, e.g. jobs/7/checkpoints
    trial: int | None = None
    run_control: str | None = None  # name of the job's RunControl actor
    fault: FaultInjection | None = None
    step_delay_s: float = 0.0  # see SLOW_STEP_ENV
    # The dataset's declared (C, H, W): images are decoded to these channels everywhere.
    image_shape: tuple[int, int, int] | None = None

    @property
    def job(self) -> JobSpec:
        """The parsed spec."""
        return JobSpec.model_validate(self.spec)

    @property
    def trial_params(self) -> dict[str, Any] | None:
        """A search trial's sampled options (None outside a search): the searched names'
        values in ``method_options``, where the trial put them."""
        search = self.job.search
        if self.trial is None or search is None:
            return None
        return {name: self.method_options[name] for name in search.space}

    def train_config(self) -> TrainConfig:
        """bird_core's hyper-parameters for this plan."""
        training = self.job.training
        return TrainConfig(
            epochs=training.epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            optimizer=training.optimizer,
            weight_decay=training.weight_decay,
            seed=self.job.seed,
            max_steps_per_epoch=training.max_steps_per_epoch,
            bf16=training.bf16,
            channels_last=training.channels_last,
        )


@dataclass
class TrainOutcome:
    """What a finished (or stopped) run produced: rank 0's last report and its checkpoints."""

    stopped: bool = False
    last: dict[str, Any] | None = None  # the published `last` checkpoint (PublishedCheckpoint)
    metrics: dict[str, Any] = field(default_factory=dict)


# An epoch that breaks a search's Δ_mean-DEO bound scores below any epoch that keeps it.
_INFEASIBLE = -1000.0
# An epoch whose student predicts one class for every val row scores below both (by its AUROC
# among such epochs): its Δ-DEO of 0 is no fairness, and would otherwise win on it. Seen on a
# small dataset of a user's, where a search kept a one-class student as "best" (Δ 0).
_ONE_CLASS = -2000.0


def search_score(val: dict[str, Any], objective: ObjectiveSpec) -> float:
    """The search objective of one validation report (higher is better)."""
    auroc, deo = val.get("auroc"), val.get("delta_mean_deo")
    if auroc is None or not math.isfinite(auroc):
        return -math.inf
    if predicts_one_class(val):
        return _ONE_CLASS + float(auroc)
    deo_value = float(deo) if deo is not None and math.isfinite(deo) else 0.0
    if objective.kind == "weighted":
        return float(auroc) - objective.fairness_weight * deo_value
    if deo_value <= objective.max_delta_mean_deo:
        return float(auroc)
    return _INFEASIBLE - deo_value


def objective_score(val: dict[str, Any], spec: JobSpec) -> float:
    """The value ``best`` maximises.

    Under a search: the search's objective (:func:`search_score`). Otherwise the training
    objective: val AUROC, or AUROC − fairness_weight · Δ_mean-DEO. Where Δ_mean-DEO counts, an
    epoch whose student predicts one class ranks below every other.
    """
    if spec.search is not None:
        return search_score(val, spec.search.objective)
    auroc = val.get("auroc")
    if auroc is None or not math.isfinite(auroc):
        return -math.inf
    if spec.training.objective == "auroc":
        return float(auroc)
    if predicts_one_class(val):
        return _ONE_CLASS + float(auroc)
    deo = val.get("delta_mean_deo")
    if deo is None or not math.isfinite(deo):
        return float(auroc)  # no group has both positives and negatives: nothing to penalise
    return float(auroc) - spec.training.fairness_weight * float(deo)


# -- planning ----------------------------------------------------------------------------------


def _train_columns(store: ObjectStore, features: FeatureSet) -> dict[str, np.ndarray]:
    """id, label and group of every train row (small: no images, no teacher outputs)."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from service.storage import fetch_verified

    ids, labels, groups = [], [], []
    for shard, name in zip(features.shards, sorted(features.manifest.files), strict=True):
        data = fetch_verified(store, shard, features.manifest.files[name])
        table = pq.read_table(io.BytesIO(data), columns=["id", "label", "group", "split"])
        table = table.filter(pc.equal(table.column("split"), "train"))
        ids.append(table.column("id").to_numpy())
        labels.extend(table.column("label").to_pylist())
        groups.append(table.column("group").to_numpy())
    order = np.argsort(np.concatenate(ids), kind="stable")
    multilabel = bool(labels) and isinstance(labels[0], list)
    label_array = np.asarray(labels, dtype=np.float32 if multilabel else np.int64)
    return {
        "id": np.concatenate(ids)[order],
        "label": label_array[order],
        "group": np.concatenate(groups)[order],
    }


def meta_ids(store: ObjectStore, features: FeatureSet, fraction: float, seed: int) -> np.ndarray:
    """Ids of the train rows held out for BIRD's meta batches (stratified by label × group)."""
    columns = _train_columns(store, features)
    n = len(columns["id"])
    split = Split(
        torch.zeros(n, 1),
        torch.from_numpy(columns["label"]),
        torch.from_numpy(columns["group"].astype(np.int64)),
    )
    _, meta_rows = split_meta(split, fraction, seed)
    return columns["id"][meta_rows.numpy()]


def plan_training(
    spec: JobSpec,
    *,
    store_url: str,
    settings: Settings,
    features: FeatureSet,
    dataset_meta: Any,
    checkpoint_base: str | None,
    trial: int | None = None,
    overrides: dict[str, Any] | None = None,
    run_control: str | None = None,
) -> TrainPlan:
    """The :class:`TrainPlan` of a job (or of one trial of its search, with ``overrides``)."""
    # A spec the API stored is resolved already; one from elsewhere (a test, a bench) gets the
    # defaults that depend on the dataset here (the student for its kind, input sizes).
    spec, problems = resolve_spec(spec, dataset_meta)
    if problems or spec.student.model is None:
        raise ValueError("; ".join(f"{'.'.join(p.loc)}: {p.message}" for p in problems))
    options = {**spec.method.options, **(overrides or {})}
    create_method(spec.method.name, **options)  # unknown options or bad values fail here, early
    student_options = dict(spec.student.options or {})
    if spec.student.model == "mlp":
        student_options.setdefault("in_features", dataset_meta.num_features)
    elif dataset_meta.image_shape is not None:
        # Images are decoded to the channels the dataset declares, whatever the stored mode.
        student_options.setdefault("in_channels", dataset_meta.image_shape[0])
    # The student is built and run once here, on two inputs of the dataset's shape, so that
    # options it does not take or images it cannot handle fail the job at once.
    student = create_model(spec.student.model, dataset_meta.num_classes, **student_options)
    check_student_input(student, spec.student.model, dataset_meta)
    metadata = features.metadata
    counts = metadata.get("counts", {})
    return TrainPlan(
        spec=spec.model_dump(mode="json"),
        method_options=options,
        task=dataset_meta.task,
        num_classes=dataset_meta.num_classes,
        num_groups=dataset_meta.num_groups,
        preprocessing=metadata["preprocessing"],
        teacher_dim=metadata.get("dims", {}).get("embedding"),
        student_options=student_options,
        num_train_rows=int(counts.get("train", 0)),
        store_url=store_url,
        settings=settings,
        checkpoint_base=checkpoint_base,
        trial=trial,
        run_control=run_control,
        fault=FaultInjection.from_env(),
        step_delay_s=float(os.environ.get(SLOW_STEP_ENV) or 0),
        image_shape=dataset_meta.image_shape,
    )


def check_student_input(student: torch.nn.Module, model: str, dataset_meta: Any) -> None:
    """Run ``student`` (eval mode) on two zero inputs of the dataset's shape; ``ValueError``
    saying which shape it cannot take (an architecture whose downsampling leaves nothing of a
    small image, say)."""
    shape = dataset_meta.image_shape or (dataset_meta.num_features,)
    student.eval()
    try:
        with torch.no_grad():
            student(torch.zeros(2, *shape))
    except (RuntimeError, ValueError) as err:
        what = "x".join(str(v) for v in shape)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"student {model} cannot take inputs of shape {what}: {first}") from err


def build_datasets(
    store: ObjectStore, features: FeatureSet, plan: TrainPlan, *, materialize: bool = True
) -> dict[str, Any]:
    """Ray Data datasets of the feature shards: ``train`` (and BIRD's ``meta``), ``val``.

    With ``materialize`` the shards are read once into Ray's object store instead of again in
    every epoch (right for feature sets that fit in the cluster's memory): one read of the
    train and val rows, decoded once, then split in memory. A Ray Data execution costs
    seconds of scheduling however small the data, so one read beats one per split.
    """
    rows = read_feature_split(store, features, ("train", "val"))
    if materialize:
        # Decoded once here, not in every epoch of every rank.
        rows = rows.map_batches(
            decode_images_once, fn_kwargs={"image_shape": plan.image_shape}, batch_format="numpy"
        ).materialize()
    train = rows.filter(expr=col("split") == "train")
    datasets: dict[str, Any] = {"val": rows.filter(expr=col("split") == "val")}
    method = create_method(plan.spec["method"]["name"], **plan.method_options)
    if method.needs_meta_batch:
        ids = meta_ids(store, features, method.options.meta_fraction, plan.job.seed)  # type: ignore[attr-defined]
        datasets["meta"] = train.map_batches(
            select_ids, fn_kwargs={"ids": ids, "keep": True}, batch_format="numpy"
        )
        train = train.map_batches(
            select_ids, fn_kwargs={"ids": ids, "keep": False}, batch_format="numpy"
        )
    datasets["train"] = train
    if materialize:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    return datasets


# -- the per-rank loop -------------------------------------------------------------------------


def _split_from_rows(
    rows: dict[str, np.ndarray], image_shape: Sequence[int] | None = None
) -> tuple[Split, TeacherFeatures | None]:
    """Rows of the feature table as an in-memory bird_core split (+ the teacher's outputs)."""
    t = rows_as_tensors(rows, image_shape)
    split = Split(t["x"], t["label"], t["group"])  # type: ignore[arg-type]
    if t["teacher_embedding"] is None:
        return split, None
    return split, TeacherFeatures(
        t["teacher_embedding"], t["teacher_logits"], t["teacher_attention"]
    )


def _collect_rows(dataset: Any) -> dict[str, np.ndarray]:
    batches = list(dataset.iter_batches(batch_size=4096, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _param_checksums(module: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares of every parameter (identical tensors give identical sums).

    Parameters only: batch-norm running statistics are buffers each rank updates from its own
    batches, and are meant to differ.
    """
    values = []
    for tensor in module.parameters():
        t = tensor.detach().double()
        values += [t.sum(), (t * t).sum()]
    return torch.stack(values).cpu() if values else torch.zeros(1, dtype=torch.float64)


def _rank_divergence(student: torch.nn.Module, method: torch.nn.Module, world: int) -> float:
    """Largest difference between ranks of the student's and the method's (φ) checksums."""
    if world == 1:
        return 0.0
    local = torch.cat([_param_checksums(student), _param_checksums(method)])
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    return float((stacked - stacked[0]).abs().max())


class _StopPoller:
    """Rank 0 polls the job's RunControl (every _STOP_POLL_S at most); ranks agree by
    all-reduce. A control that is gone (its worker died, or a new attempt replaced it) means
    abort: this run belongs to an attempt that no longer owns the job. Each poll also tells the
    control how far training got (``epochs``), so the job's progress moves within an epoch."""

    def __init__(self, handle: Any, trial: int | None = None):
        self.handle = handle
        self.trial = trial
        self.next_poll = 0.0
        self.mode = RUN

    def local(self, epochs: float | None = None) -> int:
        if self.handle is not None and self.mode != ABORT and time.monotonic() >= self.next_poll:
            try:
                if epochs is not None:  # fire and forget: the mode call below waits anyway
                    self.handle.report_epochs.remote(self.trial, epochs)
                self.mode = max(self.mode, int(ray.get(self.handle.mode.remote())))
            except ray.exceptions.RayActorError:
                self.mode = ABORT
            self.next_poll = time.monotonic() + _STOP_POLL_S
        return self.mode


def _control_handle(plan: TrainPlan) -> Any:
    """The job's RunControl actor, or None (no control named, or already gone)."""
    if plan.run_control is None:
        return None
    try:
        return ray.get_actor(plan.run_control)
    except ValueError:
        return None


class RegisterController(ControllerCallback):
    """Registers the run's Train controller with the job's RunControl as it starts, before it
    reserves its workers' placement group (and any later one, for a restored worker group):
    :func:`workers.control.release_placement_groups` removes what it made. Rank 0 registering
    the group it runs in came too late: a trial that Tune stopped while its workers were
    starting left its group reserved."""

    def __init__(self, run_control: str, trial: int | None) -> None:
        self.run_control = run_control
        self.trial = trial

    def after_controller_start(self, train_run_context: Any) -> None:
        """In the controller actor: register it, and wait for that (it may be killed soon)."""
        try:
            handle = ray.get_actor(self.run_control)
        except ValueError:
            return  # the attempt is over; the training loop takes that for an abort
        context = ray.get_runtime_context()
        ray.get(
            handle.register_controller.remote(
                self.trial, context.get_actor_id(), context.current_actor
            ),
            timeout=30,
        )


def build_student_and_method(plan: TrainPlan) -> tuple[Any, Any]:
    """The student and the set-up method of ``plan``, seeded: every rank builds the same."""
    seed_everything(plan.job.seed)
    student = create_model(plan.job.student.model, plan.num_classes, **plan.student_options)
    method = create_method(plan.job.method.name, **plan.method_options)
    method.setup(
        student_dim=student.embed_dim,
        teacher_dim=plan.teacher_dim,
        num_classes=plan.num_classes,
        task=plan.task,  # type: ignore[arg-type]
    )
    return student, method


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of a training run (called by Ray Train in each worker process)."""
    plan: TrainPlan = config["plan"]
    spec = plan.job
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_config = plan.train_config()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))

    control = _control_handle(plan)
    try:
        student, method = build_student_and_method(plan)
        method.check_student(student)
    except (TypeError, ValueError) as error:
        # The spec asks for a combination that cannot train (e.g. BIRD's head-only virtual step
        # on a student without an embedding layer): the job's input, not a fault to retry.
        message = f"{plan.job.method.name} cannot train this student: {error}"
        if control is not None:
            control.report_input_error.remote(message, traceback.format_exc())
        raise RunInputError(message) from None
    preprocess = Preprocessor.from_config(plan.preprocessing)

    start_epoch, step, best_score, best_epoch = 0, 0, -math.inf, None
    resumed_from: int | None = None
    restored_record: str | None = None  # the restored epoch's record, reported again once
    optimizer_state = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = load_training_state(directory)
            record_file = Path(directory) / RECORD_FILE
            if record_file.is_file():
                restored_record = record_file.read_text()
        student.load_state_dict(state["student"])
        if state["method"] is not None:
            method.load_state_dict(state["method"])
        optimizer_state = state["optimizer"]
        meta = state["meta"]
        start_epoch, step = int(meta["epoch"]), int(meta["step"])
        resumed_from = start_epoch
        extra = meta.get("extra", {})
        best_score = extra.get("best_score", -math.inf)
        best_score = -math.inf if best_score is None else float(best_score)
        best_epoch = extra.get("best_epoch")

    student.to(device)
    method.to(device)
    preprocess = preprocess.to(device)
    # bf16 and channels-last as bird_core.train.fit decides them, for this rank's device.
    step_format = train_config.step_format(device)
    step_format.prepare_model(student)
    distiller: torch.nn.Module = Distiller(student, method)
    if world > 1:
        distiller = ray.train.torch.prepare_model(
            distiller,
            parallel_strategy_kwargs={"find_unused_parameters": method.has_unused_parameters},
        )
    else:
        distiller.to(device)
    optimizer = build_optimizer(student, method, train_config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    meta_split, meta_features = None, None
    if method.needs_meta_batch:
        meta_split, meta_features = _split_from_rows(
            _collect_rows(ray.train.get_dataset_shard("meta")), plan.image_shape
        )
        if meta_features is not None:
            # Every rank holds the same held-out rows, so every rank fits the same state.
            method.fit_to_teacher(meta_features.embedding, meta_features.logits)
    val_split = None
    if rank == 0:
        val_split, _ = _split_from_rows(
            _collect_rows(ray.train.get_dataset_shard("val")), plan.image_shape
        )

    train_rows = plan.num_train_rows
    if meta_split is not None:
        train_rows -= len(meta_split)
    batch_size = train_config.batch_size
    steps_per_epoch = max((train_rows // world) // batch_size, 1)
    if train_config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, train_config.max_steps_per_epoch)
    total_steps = steps_per_epoch * train_config.epochs
    store = open_store(plan.store_url, plan.settings) if rank == 0 else None
    poller = _StopPoller(control if rank == 0 else None, plan.trial)
    shard = ray.train.get_dataset_shard("train")
    meta_batch_size = getattr(method.options, "meta_batch_size", None) or batch_size

    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        distiller.train()
        sampler = None
        if meta_split is not None:
            # Re-seeded per epoch and rank: a run restored mid-way draws the same meta batches.
            sampler = MetaSampler(
                meta_split,
                torch.arange(len(meta_split)),
                method.options.meta_sampling == "balanced",  # type: ignore[attr-defined]
                spec.seed + 7919 * (rank + 1) + 104_729 * epoch,
            )
        sums: dict[str, float] = {}
        done = 0
        stopped = False
        aborted = False
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=min(4 * batch_size, max(train_rows // world, 1)),
            local_shuffle_seed=spec.seed * 100_003 + epoch * 101 + rank,
        )
        iterator = iter(batches)
        for i in range(steps_per_epoch):
            rows = next(iterator, None)
            if plan.fault is not None and i == steps_per_epoch // 2:
                plan.fault.maybe_exit(rank, epoch)
            # Every rank must run the same steps (DDP): stop when any rank is asked to stop
            # or has run out of rows.
            flags = torch.tensor(
                [float(poller.local(epoch + i / steps_per_epoch)), float(rows is None)]
            )
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0] >= ABORT:
                aborted = True
                break
            if flags[1] > 0:
                break
            if flags[0] >= STOP:
                stopped = True
                break
            batch = step_format.prepare_batch(
                batch_from_rows(rows, preprocess, device, plan.image_shape)
            )
            meta_batch = None
            if sampler is not None:
                meta_batch = make_batch(
                    meta_split,  # type: ignore[arg-type]
                    sampler.sample(meta_batch_size),
                    preprocess,
                    meta_features,
                    device,
                )
                meta_batch = step_format.prepare_batch(meta_batch)
            ctx = StepContext(task=plan.task, progress=step / total_steps, step=step)  # type: ignore[arg-type]
            logs = train_step(distiller, optimizer, batch, ctx, meta_batch, bf16=step_format.bf16)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            done += 1
            step += 1
            if plan.step_delay_s:
                time.sleep(plan.step_delay_s)
        if aborted:
            # The attempt lost the job: end without a checkpoint, a report or a publication.
            return
        train_means = {k: v / max(done, 1) for k, v in sums.items()}
        train_means.update(method.epoch_metrics())  # BIRD: the gate's state and mean |∇φ|
        divergence = _rank_divergence(student, method, world)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "stopped": stopped}
        if rank != 0:
            ray.train.report(metrics)
            if stopped:
                break
            continue
        assert val_split is not None and store is not None
        published: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="bird-ckpt-") as directory:
            if stopped:
                # A stop mid-epoch: keep what was trained (the final checkpoint) but report no
                # epoch record; a resumed run repeats this epoch from its start.
                _save(
                    directory,
                    plan,
                    student,
                    preprocess,
                    method,
                    optimizer,
                    epoch,
                    step,
                    {},
                    best_score=best_score if math.isfinite(best_score) else None,
                    best_epoch=best_epoch,
                )
                if plan.checkpoint_base is not None:
                    published["last"] = publish_checkpoint(
                        store, directory, plan.checkpoint_base, "last"
                    ).as_dict()
                metrics["checkpoints"] = published
                # Tune refuses a trial's report without the search metric (and would fail the
                # search being cancelled): a stop reports the run's best objective so far.
                metrics["objective"] = best_score if math.isfinite(best_score) else -math.inf
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
                break
            val = evaluate(
                unwrap(distiller).student,
                preprocess,
                val_split,
                plan.task,  # type: ignore[arg-type]
                train_config.eval_batch_size,
                device,
            )
            score = objective_score(val, spec)
            improved = score > best_score or best_epoch is None
            if improved:
                best_score, best_epoch = score, epoch + 1
            _save(
                directory,
                plan,
                student,
                preprocess,
                method,
                optimizer,
                epoch + 1,
                step,
                {"val": val, "objective": score},
                best_score=best_score,
                best_epoch=best_epoch,
            )
            if plan.checkpoint_base is not None:
                published["last"] = publish_checkpoint(
                    store, directory, plan.checkpoint_base, "last"
                ).as_dict()
                if improved:
                    published["best"] = publish_checkpoint(
                        store, directory, plan.checkpoint_base, "best"
                    ).as_dict()
            record = EpochRecord(
                epoch=epoch + 1,
                step=step,
                train=train_means,
                val=val,
                objective=score,
                seconds=time.perf_counter() - started,
                trial=plan.trial,
                trial_params=plan.trial_params,
                checkpoints=published,
                rank_param_max_diff=divergence,
                resumed_from_epoch=resumed_from,
            )
            resumed_from = None
            metrics.update(
                {
                    "objective": score,
                    "best_objective": best_score,
                    "val_auroc": val["auroc"],
                    "val_delta_mean_deo": val["delta_mean_deo"],
                    "rank_param_max_diff": divergence,
                    "checkpoints": published,
                    "record": record.to_json(),
                    # What the steps ran with, and the student's weights as they are now.
                    "step_format": {
                        **step_format.as_dict(),
                        "student_channels_last": is_channels_last(student),
                    },
                }
            )
            if restored_record is not None:
                # A process killed after Ray persisted a checkpoint but before the sink stored
                # its report would lose that epoch: the restored epoch travels again (sinks
                # ignore epochs they already have).
                metrics["restored_record"] = restored_record
                restored_record = None
            # Ray's copy of the checkpoint carries the record (bird_core's manifest does not
            # list it: it is for the restore above, not for users).
            (Path(directory) / RECORD_FILE).write_text(record.to_json())
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def _save(
    directory: str,
    plan: TrainPlan,
    student: torch.nn.Module,
    preprocess: Preprocessor,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs_done: int,
    step: int,
    metrics: dict[str, Any],
    *,
    best_score: float | None = None,
    best_epoch: int | None = None,
) -> None:
    """bird_core's checkpoint of this rank's state (what Ray restores and users download)."""
    save_checkpoint(
        directory,
        student,  # type: ignore[arg-type]
        preprocess,
        method=method,
        optimizer=optimizer,
        spec={**plan.spec, "task": plan.task, "method_options": plan.method_options},
        epoch=epochs_done,
        step=step,
        metrics=metrics,
        extra={"best_score": best_score, "best_epoch": best_epoch, "trial": plan.trial},
    )


# -- the driver side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train keeps its run state and checkpoints (``storage_path`` + filesystem)."""

    path: str
    filesystem: Any = None

    @classmethod
    def on_store(cls, store: ObjectStore, prefix: str) -> RayStorage:
        """A prefix of the object store as Ray storage (S3: explicit endpoint; local: a dir)."""
        filesystem, base = store.pyarrow_filesystem()
        return cls(f"{base}/{prefix}".rstrip("/"), filesystem)


def run_training(
    plan: TrainPlan,
    datasets: dict[str, Any],
    *,
    storage: RayStorage,
    run_name: str,
    sink: MetricsSink | None = None,
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """Run ``plan`` with a ``TorchTrainer``; resume if ``storage``/``run_name`` hold a run.

    Resources come from the spec: ``resources.workers`` ranks with ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs each (GPU runs use NCCL, CPU runs gloo), packed on few nodes or
    spread over many (``resources.placement``). Up to
    ``max_attempts - 1`` worker failures are survived by restoring the last checkpoint.
    """
    spec = plan.job
    resources = spec.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    # The sink first: a report reaches the database before Tune (TuneReportCallback) hears of
    # it, since Tune may stop the trial, and with it this run's controller, right after.
    all_callbacks = [SinkCallback(sink)] if sink is not None else []
    all_callbacks += list(callbacks or [])
    if plan.run_control is not None:
        all_callbacks.append(RegisterController(plan.run_control, plan.trial))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plan": plan,
            "torch_threads": max(1, int(resources.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            # Ray's placement-group strategies: SPREAD is best effort, so a run that lost a
            # node restores on the nodes that remain.
            placement_strategy=resources.placement.upper(),
        ),
        datasets=datasets,
        # `train` is split across ranks; `meta` and `val` are read whole where they are needed.
        dataset_config=ShardedIngest(
            datasets_to_split=["train"],
            shards=presplit(datasets, ["train"], resources.workers),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=max(spec.max_attempts - 1, 0)),
            # Ray keeps the latest two for restoring; best/last for users are published apart.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=all_callbacks,
        ),
    )
    outcome = TrainOutcome()
    # Worker errors beyond max_failures raise here (ray.train.TrainingFailedError).
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    outcome.metrics = metrics
    outcome.stopped = bool(metrics.get("stopped", False))
    published = metrics.get("checkpoints") or {}
    outcome.last = published.get("last")
    return outcome


def train_job_run(
    plan: TrainPlan,
    data_store_url: str,
    features: FeatureSet,
    *,
    storage: RayStorage,
    run_name: str,
    sink: MetricsSink | None = None,
) -> TrainOutcome:
    """A job's training as its Ray task runs it: the datasets, then :func:`run_training`.

    The datasets are materialized here, in the task, so that killing the task frees them too.
    """
    store = open_store(data_store_url, plan.settings)
    datasets = build_datasets(store, features, plan)
    return run_training(plan, datasets, storage=storage, run_name=run_name, sink=sink)
