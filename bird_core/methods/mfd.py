"""``mfd``: MMD-based fair feature distillation (Jung et al., CVPR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bird_core.data.base import Task
from bird_core.losses import kd_loss, mmd_loss, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import NetOutput


@dataclass(frozen=True)
class MFDOptions(MethodOptions):
    """λ_f = 3 (CIFAR/UTKFace) or 7 (CelebA) in MFD; optional logit KD with ``lambda_kd``."""

    lambda_f: float = 3.0
    sigma: float = 1.0
    lambda_kd: float = 0.0
    temperature: float = 3.0

    def __post_init__(self) -> None:
        self._check_positive("lambda_f", "lambda_kd", allow_zero=True)
        self._check_positive("sigma", "temperature")


class MFD(Method):
    """CE (+ KD) + ½·λ_f·Σ_{c,g} MMD²(T_c, S_{c,g}).

    The student features are projected to the teacher's width when the widths differ (MFD's
    own setting uses equal widths, where the projection is the identity).
    """

    name = "mfd"
    options_class = MFDOptions

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """A projector when student and teacher widths differ."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        if task == "multilabel":
            raise ValueError("method 'mfd' supports multi-class tasks only")
        self.projector: nn.Module = (
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)
        )

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE plus the class-and-group conditional MMD (and KD when ``lambda_kd`` > 0)."""
        opts: MFDOptions = self.options  # type: ignore[assignment]
        teacher = require(batch.teacher_embedding, "teacher features", self.name)
        ce = task_loss(out.logits, batch.label, ctx.task)
        mmd = mmd_loss(
            self.projector(out.embedding),
            teacher,
            batch.label,
            batch.group,
            opts.lambda_f,
            opts.sigma,
        )
        parts = {"ce": ce, "mmd": mmd}
        total = ce + mmd
        if opts.lambda_kd > 0:
            teacher_logits = require(batch.teacher_logits, "teacher logits", self.name)
            kd = kd_loss(out.logits, teacher_logits, opts.temperature)
            total = total + opts.lambda_kd * kd
            parts["kd"] = kd
        return total, parts
