"""Single-process training loop: seeding, teacher features, train step, evaluation.

The loop is plain PyTorch. When ``torch.distributed`` is initialised (``torchrun``, or a Ray
Train worker) it shards every epoch across ranks and wraps student + method in DDP, without any
change to the calling code.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bird_core.data.base import DatasetSplits, Split, Task
from bird_core.losses import attention_map, probabilities
from bird_core.methods.base import Batch, Method, StepContext
from bird_core.metrics import fairness_report
from bird_core.models import Net, NetOutput
from bird_core.preprocess import Preprocessor


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- teacher features --------------------------------------------------------------------------


@dataclass
class TeacherFeatures:
    """A teacher's outputs for every row of one split, computed once and reused."""

    embedding: torch.Tensor
    logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None  # [N, H, W]

    def __len__(self) -> int:
        return self.embedding.shape[0]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The batch fields for rows ``index``."""
        return {
            "teacher_embedding": self.embedding[index],
            "teacher_logits": None if self.logits is None else self.logits[index],
            "teacher_attention": None if self.attention is None else self.attention[index],
        }


@torch.no_grad()
def compute_teacher_features(
    teacher: Net,
    preprocess: Preprocessor,
    split: Split,
    *,
    batch_size: int = 256,
    attention_size: int | None = 4,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> TeacherFeatures:
    """Run the frozen teacher once over ``split``: embeddings, logits and attention maps.

    ``attention_size`` pools the attention map to a small square (AT needs only a coarse map;
    storing it small keeps the precomputed features light). ``None`` skips attention maps.
    """
    teacher = teacher.to(device).eval()
    preprocess = preprocess.to(device)
    embeddings, logits, attentions = [], [], []
    for start in range(0, len(split), batch_size):
        x = preprocess(split.x[start : start + batch_size].to(device))
        out = teacher(x, features=True)
        embeddings.append(out.embedding.float().cpu())
        logits.append(out.logits.float().cpu())
        if attention_size is not None and out.feature_map is not None:
            size = (attention_size, attention_size)
            att = attention_map(out.feature_map.float(), size=size).view(-1, *size)
            attentions.append(att.cpu())
        if progress is not None:
            progress(x.shape[0])
    return TeacherFeatures(
        embedding=torch.cat(embeddings),
        logits=torch.cat(logits),
        attention=torch.cat(attentions) if attentions else None,
    )


def train_linear_probe(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    probe: nn.Linear | None = None,
) -> nn.Linear:
    """A linear classifier on frozen features (deterministic given ``seed``).

    Training the probe on precomputed features is exactly what a frozen backbone + probe
    computes end to end, at a fraction of the cost. ``probe`` trains an existing layer (a
    model's own head) in place; otherwise a new one is initialised from ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    if probe is None:
        torch.manual_seed(seed)
        probe = nn.Linear(embeddings.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(embeddings), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(probe(embeddings[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


# -- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None  # cap for quick runs
    eval_batch_size: int = 512
    device: str = "cpu"
    # None: decided by StepFormat.resolve from the device the steps run on.
    bf16: bool | None = None
    channels_last: bool | None = None

    def step_format(self, device: str | torch.device | None = None) -> StepFormat:
        """How this run's steps run on ``device`` (default: ``self.device``)."""
        return StepFormat.resolve(
            self.bf16, self.channels_last, self.device if device is None else device
        )

    @property
    def use_bf16(self) -> bool:
        """Whether steps on ``self.device`` run under bf16 autocast."""
        return self.step_format().bf16

    @property
    def use_channels_last(self) -> bool:
        """Whether image models and batches on ``self.device`` use channels-last."""
        return self.step_format().channels_last

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")


@dataclass(frozen=True)
class StepFormat:
    """How training steps run on one device: bf16 autocast, and the memory format of images.

    The one place that decides both, for :func:`fit` and for every other training loop (the
    Ray Train loop of the workers): an explicit setting wins; ``None`` means on for CUDA
    devices and off elsewhere (CPU bf16 kernels are slow, not fast, and channels-last pays off
    with cuDNN's kernels).
    """

    bf16: bool
    channels_last: bool

    @classmethod
    def resolve(
        cls, bf16: bool | None, channels_last: bool | None, device: str | torch.device
    ) -> StepFormat:
        """The format for ``device`` given the run's settings (``None``: the device decides)."""
        on_gpu = torch.device(device).type == "cuda"
        return cls(
            bf16=on_gpu if bf16 is None else bf16,
            channels_last=on_gpu if channels_last is None else channels_last,
        )

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-D weights (convolutions) in channels-last, when that is on.

        Converts in place (``Module.to``); call it before wrapping the model in DDP.
        """
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def prepare_batch(self, batch: Batch) -> Batch:
        """``batch`` with its images (``[N, C, H, W]``) in channels-last, when that is on."""
        if self.channels_last and batch.x.dim() == 4:
            batch.x = batch.x.contiguous(memory_format=torch.channels_last)
        return batch

    def as_dict(self) -> dict[str, bool]:
        """JSON-able form."""
        return asdict(self)


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` has 4-D weights and every one of them is in channels-last."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in weights
    )


@dataclass
class EpochResult:
    """What one epoch produced: mean loss parts on train and the validation report."""

    epoch: int
    train: dict[str, float]
    val: dict[str, Any]
    seconds: float


@dataclass
class TrainResult:
    """The history of a run; the student itself is trained in place."""

    epochs: list[EpochResult] = field(default_factory=list)
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"epochs": [asdict(e) for e in self.epochs], "stopped_early": self.stopped_early}


# -- the step --------------------------------------------------------------------------------


class Distiller(nn.Module):
    """Student and method in one module, so DDP synchronises both with a single wrapper."""

    def __init__(self, student: Net, method: Method):
        super().__init__()
        self.student = student
        self.method = method

    def forward(
        self, batch: Batch, ctx: StepContext, meta_batch: Batch | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss on ``batch``, after its meta step when ``meta_batch`` is given.

        The meta step (BIRD's Stages I–II) runs between the student's body and head: it reuses
        the body's output on ``batch`` instead of recomputing it, and the joint loss then sees
        the updated φ. Its logs are left in ``self.meta_logs``.
        """
        pooled, feature_map = self.student.body(batch.x)
        self.meta_logs: dict[str, float] = {}
        if meta_batch is not None:
            self.meta_logs = self.method.meta_step(
                self.student, batch, meta_batch, ctx, train_pooled=pooled.detach()
            )
        embedding, logits = self.student.head(pooled)
        return self.method.loss(NetOutput(logits, embedding, feature_map), batch, ctx)


def build_optimizer(student: Net, method: Method, config: TrainConfig) -> torch.optim.Optimizer:
    """The main optimizer over the student and the method's own trainable parts."""
    params = [p for p in student.parameters() if p.requires_grad] + method.main_parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def train_step(
    distiller: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    ctx: StepContext,
    meta_batch: Batch | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """One optimisation step: the method's meta step (BIRD's Stages I–II), then the joint step.

    ``bf16`` runs the forward passes (meta step included) under bf16 autocast; gradients and
    the optimizer stay in float32.

    ``distiller`` is a :class:`Distiller`, possibly wrapped in DDP. Returns the loss parts.
    """
    inner: Distiller = unwrap(distiller)  # type: ignore[assignment]
    method = inner.method
    if method.needs_meta_batch and meta_batch is None:
        raise ValueError(f"method {method.name!r} needs a meta batch")
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, parts = distiller(batch, ctx, meta_batch if method.needs_meta_batch else None)
    logs: dict[str, float] = dict(inner.meta_logs)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {ctx.step}: lower the lr")
    optimizer.zero_grad(set_to_none=True)
    aux = method.aux_optimizer()
    if aux is not None:
        aux.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if aux is not None:
        aux.step()
    logs["loss"] = float(loss.detach())
    logs.update({k: float(v.detach()) for k, v in parts.items()})
    return logs


# -- data plumbing -----------------------------------------------------------------------------


def split_meta(split: Split, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, meta): a stratified ``fraction`` of every (label, group) cell."""
    generator = torch.Generator().manual_seed(seed)
    keys = _cell_keys(split)
    train_idx, meta_idx = [], []
    for key in torch.unique(keys):
        rows = torch.nonzero(keys == key).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_meta = round(len(rows) * fraction)
        if len(rows) >= 2:
            n_meta = min(max(n_meta, 1), len(rows) - 1)
        meta_idx.append(rows[:n_meta])
        train_idx.append(rows[n_meta:])
    return torch.cat(train_idx).sort().values, torch.cat(meta_idx).sort().values


def _cell_keys(split: Split) -> torch.Tensor:
    """One integer per row identifying its (label, group) cell (multi-label: the group alone)."""
    if split.label.dim() == 1:
        return split.label.long() * 1000 + split.group.long()
    return split.group.long()


class MetaSampler:
    """Draws meta batches from the held-out rows, uniformly or balanced over (label, group)."""

    def __init__(self, split: Split, rows: torch.Tensor, balanced: bool, seed: int):
        self.rows = rows
        self.generator = torch.Generator().manual_seed(seed)
        keys = _cell_keys(split)[rows]
        self.cells = [rows[keys == k] for k in torch.unique(keys)] if balanced else [rows]

    def sample(self, size: int) -> torch.Tensor:
        """``size`` row indices."""
        cell_ids = torch.randint(len(self.cells), (size,), generator=self.generator)
        picks = []
        for c, cell in enumerate(self.cells):
            n = int((cell_ids == c).sum())
            if n:
                picks.append(cell[torch.randint(len(cell), (n,), generator=self.generator)])
        return torch.cat(picks)


def make_batch(
    split: Split,
    index: torch.Tensor,
    preprocess: Preprocessor,
    features: TeacherFeatures | None,
    device: str | torch.device,
) -> Batch:
    """Gather rows ``index`` into a preprocessed :class:`Batch` on ``device``."""
    teacher = features.rows(index) if features is not None else {}
    batch = Batch(x=split.x[index], label=split.label[index], group=split.group[index], **teacher)
    batch = batch.to(device)
    batch.x = preprocess(batch.x)
    return batch


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    student: nn.Module,
    preprocess: Preprocessor,
    x: torch.Tensor,
    task: Task = "multiclass",
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class probabilities for raw rows ``x`` (the model is put in eval mode and back)."""
    was_training = student.training
    student.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        logits = student(preprocess(x[start : start + batch_size].to(device)))
        out.append(probabilities(logits.float(), task).cpu())
    student.train(was_training)
    return torch.cat(out)


def evaluate(
    student: nn.Module,
    preprocess: Preprocessor,
    split: Split,
    task: Task = "multiclass",
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """AUROC, F1, accuracy and fairness metrics of ``student`` on ``split``."""
    probs = predict(student, preprocess, split.x, task, batch_size, device)
    return fairness_report(probs.numpy(), split.label.numpy(), split.group.numpy(), task=task)


# -- the loop ---------------------------------------------------------------------------------


EpochCallback = Callable[[EpochResult, "TrainingState"], None]


@dataclass
class TrainingState:
    """What a caller needs to checkpoint or resume a run between epochs."""

    distiller: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int  # epochs completed
    step: int  # optimisation steps completed


def fit(
    student: Net,
    method: Method,
    data: DatasetSplits,
    config: TrainConfig,
    *,
    preprocess: Preprocessor,
    train_features: TeacherFeatures | None = None,
    on_epoch_end: EpochCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``student`` with ``method`` on ``data.train`` (in place), validating every epoch.

    ``method`` must already be set up (``method.setup(...)``); ``train_features`` holds the
    teacher's outputs for every train row. ``should_stop`` is checked between steps: when it
    returns true the current epoch ends early, is reported, and the result says so.
    ``start_epoch``/``optimizer_state`` resume a run from a checkpoint.
    """
    if method.needs_teacher and train_features is None:
        raise ValueError(f"method {method.name!r} needs precomputed teacher features")
    if train_features is not None and len(train_features) != len(data.train):
        raise ValueError(
            f"teacher features have {len(train_features)} rows but the train split has "
            f"{len(data.train)}"
        )
    method.check_student(student)
    rank, world = rank_and_world()
    device = torch.device(config.device)
    student.to(device)
    method.to(device)
    preprocess = preprocess.to(device)
    step_format = config.step_format(device)
    step_format.prepare_model(student)

    train_rows = torch.arange(len(data.train))
    meta_sampler: MetaSampler | None = None
    meta_batch_size = config.batch_size
    if method.needs_meta_batch:
        opts = method.options
        train_rows, meta_rows = split_meta(data.train, opts.meta_fraction, config.seed)  # type: ignore[attr-defined]
        # Each rank draws its own meta batches from the same held-out slice.
        meta_sampler = MetaSampler(
            data.train,
            meta_rows,
            opts.meta_sampling == "balanced",
            config.seed + 7919 * (rank + 1),  # type: ignore[attr-defined]
        )
        meta_batch_size = opts.meta_batch_size or config.batch_size  # type: ignore[attr-defined]

    distiller: nn.Module = Distiller(student, method)
    if world > 1:
        distiller = DistributedDataParallel(
            distiller,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.has_unused_parameters,
        )
    optimizer = build_optimizer(student, method, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    per_rank = len(train_rows) // world
    steps_per_epoch = max(per_rank // config.batch_size, 1)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    result = TrainResult()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        distiller.train()
        # Same permutation on every rank (seeded by epoch), each rank takes its own stride.
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        order = order[rank : per_rank * world : world]
        sums: dict[str, float] = {}
        done = 0
        for i in range(steps_per_epoch):
            if should_stop is not None and should_stop():
                result.stopped_early = True
                break
            index = order[i * config.batch_size : (i + 1) * config.batch_size]
            batch = make_batch(data.train, index, preprocess, train_features, device)
            batch = step_format.prepare_batch(batch)
            meta_batch = None
            if meta_sampler is not None:
                meta_index = meta_sampler.sample(meta_batch_size)
                meta_batch = make_batch(data.train, meta_index, preprocess, train_features, device)
                meta_batch = step_format.prepare_batch(meta_batch)
            ctx = StepContext(task=data.task, progress=step / total_steps, step=step)
            logs = train_step(distiller, optimizer, batch, ctx, meta_batch, bf16=step_format.bf16)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            done += 1
            step += 1
            if progress is not None:
                progress(1)
        train_means = {k: v / max(done, 1) for k, v in sums.items()}
        val = evaluate(student, preprocess, data.val, data.task, config.eval_batch_size, device)
        epoch_result = EpochResult(epoch, train_means, val, time.perf_counter() - started)
        result.epochs.append(epoch_result)
        if on_epoch_end is not None:
            on_epoch_end(epoch_result, TrainingState(distiller, optimizer, epoch + 1, step))
        if result.stopped_early:
            break
    return result


def plan_steps_per_epoch(data: DatasetSplits, method: Method, config: TrainConfig) -> int:
    """How many optimisation steps :func:`fit` runs per epoch in this process."""
    _, world = rank_and_world()
    num_train = len(data.train)
    if method.needs_meta_batch:
        rows, _ = split_meta(data.train, method.options.meta_fraction, config.seed)  # type: ignore[attr-defined]
        num_train = len(rows)
    steps = max((num_train // world) // config.batch_size, 1)
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return steps
